SELECT coalesce(max(m.version), 0) FROM async.schema_migrations m
