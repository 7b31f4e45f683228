-- Is there an async schema that asyncnode did not install (e.g. pgasync)?
SELECT to_regclass('async.control') IS NOT NULL OR to_regclass('async.task') IS NOT NULL
