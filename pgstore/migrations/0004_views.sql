-- 0004: monitoring views (docs/pgasync-semantics.md §1.6). They read
-- unfinished rows through the partial indexes; only v_target_status scans
-- the last day of history.

-- Every target with its unfinished tasks counted by state. active_workers is
-- pgasync's name for running query tasks.
CREATE VIEW async.v_target AS
SELECT tg.target, tg.max_concurrency, tg.connection_string, tg.asynchronous_finish, tg.default_timeout,
       tg.concurrency_track_yielded, tg.max_retries,
       coalesce(c.running, 0) AS running,
       coalesce(c.queued, 0) AS queued,
       coalesce(c.yielded, 0) AS yielded,
       coalesce(c.active_workers, 0) AS active_workers
  FROM async.target tg
  LEFT JOIN (
    SELECT t.target,
           count(*) FILTER (WHERE t.consumed IS NOT NULL AND t.yielded IS NULL) AS running,
           count(*) FILTER (WHERE t.consumed IS NULL AND t.yielded IS NULL) AS queued,
           count(*) FILTER (WHERE t.yielded IS NOT NULL) AS yielded,
           count(*) FILTER (WHERE t.consumed IS NOT NULL AND t.yielded IS NULL AND t.query IS NOT NULL) AS active_workers
      FROM async.task t
     WHERE t.processed IS NULL
     GROUP BY t.target) c ON c.target = tg.target;

-- Every configured pool and every pool with unfinished tasks: the effective
-- limit (configured, else control.default_concurrency_pool_workers), the tasks
-- holding a pool slot (running, plus yielded ones that track_yielded) and the
-- queued ones.
CREATE VIEW async.v_concurrency_pool AS
WITH live AS (
  SELECT t.concurrency_pool,
         count(*) FILTER (WHERE t.consumed IS NOT NULL AND t.yielded IS NULL) AS running,
         count(*) FILTER (WHERE t.yielded IS NOT NULL AND t.track_yielded) AS yielded_holding,
         count(*) FILTER (WHERE t.consumed IS NULL AND t.yielded IS NULL) AS queued
    FROM async.task t
   WHERE t.processed IS NULL
   GROUP BY t.concurrency_pool)
SELECT coalesce(cp.concurrency_pool, l.concurrency_pool) AS concurrency_pool,
       coalesce(cp.max_workers, ctl.default_concurrency_pool_workers) AS max_workers,
       cp.concurrency_pool IS NOT NULL AS configured,
       coalesce(l.running, 0) + coalesce(l.yielded_holding, 0) AS running,
       coalesce(l.queued, 0) AS queued
  FROM async.concurrency_pool cp
  FULL JOIN live l ON l.concurrency_pool = cp.concurrency_pool
  CROSS JOIN async.control ctl;

-- Running and yielded tasks.
CREATE VIEW async.v_running_task AS
SELECT t.task_id, t.target, t.concurrency_pool AS pool, t.node, t.attempt, t.consumed, t.started,
       t.times_up, async.task_execution_state(t) AS state, t.query
  FROM async.task t
 WHERE t.processed IS NULL AND (t.consumed IS NOT NULL OR t.yielded IS NOT NULL);

-- pgasync's per-target status (column names kept, typos included), over all
-- targets; the entered_* counters look at the last day.
CREATE VIEW async.v_target_status AS
SELECT tg.target,
       coalesce(d.tasks_entered_24h, 0) AS tasks_entered_24h,
       coalesce(d.tasks_entered_1h, 0) AS tasks_entered_1h,
       coalesce(d.tasks_entered_1m, 0) AS tasks_entered_1m,
       coalesce(u.tasks_pending, 0) AS tasks_pending,
       coalesce(u.tasks_running, 0) AS tasks_running,
       coalesce(u.tasks_yielded, 0) AS tasks_yielded,
       coalesce(u.assigned, 0) AS concurency_assigned_workers,
       coalesce(u.external_pool, 0) AS concurrency_external_pool,
       tg.max_concurrency AS concurency_max_workers
  FROM async.target tg
  LEFT JOIN (
    SELECT t.target,
           count(*) AS tasks_entered_24h,
           count(*) FILTER (WHERE t.entered > now() - interval '1 hour') AS tasks_entered_1h,
           count(*) FILTER (WHERE t.entered > now() - interval '1 minute') AS tasks_entered_1m
      FROM async.task t
     WHERE t.entered > now() - interval '1 day'
     GROUP BY t.target) d ON d.target = tg.target
  LEFT JOIN (
    SELECT t.target,
           count(*) FILTER (WHERE t.consumed IS NULL AND t.yielded IS NULL) AS tasks_pending,
           count(*) FILTER (WHERE t.yielded IS NULL) AS tasks_running,
           count(*) FILTER (WHERE t.yielded IS NOT NULL) AS tasks_yielded,
           count(*) FILTER (WHERE t.consumed IS NOT NULL AND t.yielded IS NULL AND t.concurrency_pool = t.target) AS assigned,
           count(*) FILTER (WHERE t.consumed IS NOT NULL AND t.yielded IS NULL AND t.concurrency_pool <> t.target) AS external_pool
      FROM async.task t
     WHERE t.processed IS NULL
     GROUP BY t.target) u ON u.target = tg.target;
