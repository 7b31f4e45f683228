-- A node records outcomes of its attempts; fenced on (task_id, attempt, node)
-- and on the attempt still being RUNNING. FINISHED on a task flagged
-- yield_upon_finish yields instead (finish_status NULL, flag cleared).
-- LOST (never stored) is a node giving up an attempt it had to stop, e.g.
-- cut off from the leader (D13): re-queued if it never started or allows
-- another retry (which it then uses up), else FAILED with the given error.
-- $1 node, $2 task ids, $3 attempts, $4 statuses, $5 errors, $6 times.
-- The state test is written with coalesce() on purpose: spelled as
-- "processed IS NULL AND yielded IS NULL" it lets the planner use
-- task_running_idx and join every running task against every given id
-- (a generic plan did: 46 ms instead of 7 ms for 300 of 1000 running).
-- This way the only path is task_pkey per given id.
-- The id join is written "t.task_id = ANY(ARRAY[o.task_id])" on purpose:
-- a plain equality is mergeable, which makes task_pkey's order useful to
-- the planner, and a generic plan built on the statistics of a table
-- analysed while nearly empty then reads all of task_pkey and compares
-- every row with every id (2848.7 ms instead of 5.1 ms for a finish of
-- 250 ids among 40,000 rows). This form is not mergeable; the only use
-- the planner has for it is as the index condition of a lookup per id.
-- Each task row is looked up once: every SET expression reads the row as
-- it was, so the outcome's effect is spelled out per column from two tests
-- on the old row (a join with a CTE that computed it once looked every id
-- up twice, and cost twice the time of a plain update):
--   requeue: o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries)
--   yield:   o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE)
-- (retries and max_retries are NOT NULL and statuses are never NULL, so
-- both are true or false, never NULL.) Otherwise LOST becomes FAILED.
UPDATE async.task t SET
  processed = CASE
    WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN NULL
    WHEN o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE) THEN NULL
    ELSE o.at END,
  yielded = CASE
    WHEN o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE) THEN o.at
    ELSE t.yielded END,
  consumed = CASE WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN NULL ELSE t.consumed END,
  times_up = CASE WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN NULL ELSE t.times_up END,
  node = CASE WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN NULL ELSE t.node END,
  started = CASE WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN NULL ELSE t.started END,
  -- a re-run after an attempt that may have started uses up a retry
  retries = CASE WHEN o.status = 'LOST' AND t.started IS NOT NULL AND t.retries < t.max_retries THEN t.retries + 1
                 ELSE t.retries END,
  finish_status = CASE
    WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN t.finish_status
    WHEN o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE THEN NULL
    WHEN o.status = 'LOST' THEN 'FAILED'
    ELSE o.status::async.finish_status_t END,
  failed = CASE
    WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN t.failed
    ELSE o.status IN ('LOST', 'FAILED', 'TIMED_OUT', 'CANCELED') END,
  processing_error = CASE
    WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN t.processing_error
    ELSE o.err END,
  tracked = CASE
    WHEN o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE) THEN coalesce(t.track_yielded, false)
    ELSE false END,
  yield_upon_finish = CASE
    WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN t.yield_upon_finish END,
  -- a deferral is used up once the task ran again (as async.finish does)
  eligible_when = CASE
    WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN t.eligible_when END
  FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::timestamptz[])
         AS o(task_id, attempt, status, err, at)
 WHERE t.task_id = ANY(ARRAY[o.task_id]) AND t.attempt = o.attempt AND t.node = $1::text
   AND t.consumed IS NOT NULL AND coalesce(t.processed, t.yielded) IS NULL
RETURNING t.task_id, t.attempt, t.yielded IS NOT NULL AS yielded, coalesce(t.track_yielded, false) AS hold
