SELECT coalesce(c.advisory_mutex_id, 0) FROM async.control c
