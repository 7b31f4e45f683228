INSERT INTO async.schema_migrations (version, name) VALUES ($1::int, $2::text)
