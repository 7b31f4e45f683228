-- The finish statement as written until 2026-12-05 (tenth session): easier
-- to read, and twice as slow (it looked every id up twice). Kept only as the
-- reference TestFinishMatchesItsReference holds the current statement to.
WITH o AS (
  SELECT o.*,
         CASE WHEN o.status = 'LOST' AND (t.started IS NULL OR t.retries < t.max_retries) THEN 'REQUEUE'
              WHEN o.status = 'LOST' THEN 'FAILED'
              WHEN o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE THEN 'YIELDED'
              ELSE o.status END AS eff,
         o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE AS upon_finish
    FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::timestamptz[])
           AS o(task_id, attempt, status, err, at)
    JOIN async.task t ON t.task_id = o.task_id),
u AS (
  UPDATE async.task t SET
    processed = CASE WHEN o.eff IN ('YIELDED', 'REQUEUE') THEN NULL ELSE o.at END,
    yielded = CASE WHEN o.eff = 'YIELDED' THEN o.at ELSE t.yielded END,
    consumed = CASE WHEN o.eff = 'REQUEUE' THEN NULL ELSE t.consumed END,
    times_up = CASE WHEN o.eff = 'REQUEUE' THEN NULL ELSE t.times_up END,
    node = CASE WHEN o.eff = 'REQUEUE' THEN NULL ELSE t.node END,
    started = CASE WHEN o.eff = 'REQUEUE' THEN NULL ELSE t.started END,
    retries = CASE WHEN o.eff = 'REQUEUE' AND t.started IS NOT NULL THEN t.retries + 1 ELSE t.retries END,
    finish_status = CASE WHEN o.eff = 'REQUEUE' THEN t.finish_status
                         WHEN o.upon_finish THEN NULL
                         ELSE o.eff::async.finish_status_t END,
    failed = CASE WHEN o.eff = 'REQUEUE' THEN t.failed
                  ELSE o.eff IN ('FAILED', 'TIMED_OUT', 'CANCELED') END,
    processing_error = CASE WHEN o.eff = 'REQUEUE' THEN t.processing_error ELSE o.err END,
    tracked = CASE WHEN o.eff = 'YIELDED' THEN coalesce(t.track_yielded, false) ELSE false END,
    yield_upon_finish = CASE WHEN o.eff = 'REQUEUE' THEN t.yield_upon_finish END,
    -- a deferral is used up once the task ran again (as async.finish does)
    eligible_when = CASE WHEN o.eff = 'REQUEUE' THEN t.eligible_when END
    FROM o
   WHERE t.task_id = o.task_id AND t.attempt = o.attempt AND t.node = $1::text
     AND t.consumed IS NOT NULL AND coalesce(t.processed, t.yielded) IS NULL
  RETURNING t.task_id, t.attempt, t.yielded IS NOT NULL AS yielded, coalesce(t.track_yielded, false) AS hold)
SELECT u.task_id, u.attempt, u.yielded, u.hold FROM u
