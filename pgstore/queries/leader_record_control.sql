UPDATE async.control SET pid = pg_backend_pid(), running_since = now(), leader_node = $2::text, leader_term = $1::bigint
