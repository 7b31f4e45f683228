SELECT m.version FROM async.schema_migrations m ORDER BY m.version
