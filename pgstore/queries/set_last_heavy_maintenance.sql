UPDATE async.control SET last_heavy_maintenance = $1::timestamptz
