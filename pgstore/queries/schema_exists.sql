SELECT to_regclass('async.schema_migrations') IS NOT NULL
