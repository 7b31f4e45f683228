-- Settle attempts whose node was lost (D13: re-run or fail, never both).
-- $1 task ids, $2 attempts, $3 now, $4 reason (names the lost node).
-- Only attempts still RUNNING qualify; anything else is absent ("skipped").
-- The state test is written with coalesce() on purpose: spelled as
-- "processed IS NULL AND yielded IS NULL" it lets the planner use
-- task_running_idx and join every running task against every given id
-- (a generic plan did: 46 ms instead of 7 ms for 300 of 1000 running).
-- This way the only path is task_pkey per given id.
-- The id joins are written "t.task_id = ANY(ARRAY[r.task_id])" on purpose:
-- a lookup per id on any statistics (see finish_tasks.sql).
-- cur also sorts by task_id, which task_pkey's order gives for free: its
-- "t.task_id = ANY($1)" keeps that scan to the given ids (at worst, each
-- of them compared with each id: a lost node's attempts, not the table).
WITH r AS (
  SELECT * FROM unnest($1::bigint[], $2::int[]) AS r(task_id, attempt)),
cur AS (
  SELECT t.task_id, t.attempt,
         CASE WHEN t.started IS NULL THEN 'requeued'
              WHEN t.times_up <= $3::timestamptz THEN 'timed_out'
              WHEN t.retries < t.max_retries THEN 'retried'
              ELSE 'failed' END AS outcome
    FROM async.task t
    JOIN r ON t.task_id = ANY(ARRAY[r.task_id]) AND r.attempt = t.attempt
   WHERE t.task_id = ANY($1::bigint[])
     AND t.consumed IS NOT NULL AND coalesce(t.processed, t.yielded) IS NULL
   ORDER BY t.task_id
     FOR UPDATE OF t),
upd AS (
  UPDATE async.task t SET
    consumed = CASE WHEN c.outcome IN ('requeued', 'retried') THEN NULL ELSE t.consumed END,
    times_up = CASE WHEN c.outcome IN ('requeued', 'retried') THEN NULL ELSE t.times_up END,
    node = CASE WHEN c.outcome IN ('requeued', 'retried') THEN NULL ELSE t.node END,
    started = CASE WHEN c.outcome IN ('requeued', 'retried') THEN NULL ELSE t.started END,
    retries = CASE WHEN c.outcome = 'retried' THEN t.retries + 1 ELSE t.retries END,
    processed = CASE WHEN c.outcome IN ('timed_out', 'failed') THEN $3::timestamptz END,
    finish_status = CASE c.outcome WHEN 'timed_out' THEN 'TIMED_OUT'::async.finish_status_t
                                   WHEN 'failed' THEN 'FAILED'::async.finish_status_t
                                   ELSE t.finish_status END,
    failed = CASE WHEN c.outcome IN ('timed_out', 'failed') THEN true ELSE t.failed END,
    processing_error = CASE c.outcome WHEN 'timed_out' THEN 'Canceling due to time out'
                                      WHEN 'failed' THEN $4::text
                                      ELSE t.processing_error END,
    tracked = false
    FROM cur c
   WHERE t.task_id = ANY(ARRAY[c.task_id])
  RETURNING t.task_id, t.attempt, c.outcome)
SELECT upd.task_id, upd.attempt, CASE WHEN upd.outcome = 'retried' THEN 'requeued' ELSE upd.outcome END
  FROM upd
