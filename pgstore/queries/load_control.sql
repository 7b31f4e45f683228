-- Intervals as microseconds; NULLs fall back to the install defaults.
SELECT c.enabled, c.paused, c.workers,
       (coalesce(c.idle_sleep, 0.1) * 1000000)::bigint,
       (extract(epoch FROM coalesce(c.default_timeout, interval '1 hour')) * 1000000)::bigint,
       (extract(epoch FROM coalesce(c.task_keep_duration, interval '30 days')) * 1000000)::bigint,
       (extract(epoch FROM coalesce(c.heavy_maintenance_sleep, interval '24 hours')) * 1000000)::bigint,
       coalesce(c.advisory_mutex_id, 0),
       coalesce(c.default_concurrency_pool_workers, 4),
       c.last_heavy_maintenance
  FROM async.control c
