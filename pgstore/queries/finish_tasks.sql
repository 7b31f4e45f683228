-- A node records outcomes of its attempts; fenced on (task_id, attempt, node)
-- and on the attempt still being RUNNING. FINISHED on a task flagged
-- yield_upon_finish yields instead (finish_status NULL, flag cleared).
-- $1 node, $2 task ids, $3 attempts, $4 statuses, $5 errors, $6 times.
WITH o AS (
  SELECT * FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::timestamptz[])
           AS o(task_id, attempt, status, err, at)),
u AS (
  UPDATE async.task t SET
    processed = CASE WHEN o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE)
                     THEN NULL ELSE o.at END,
    yielded = CASE WHEN o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE)
                   THEN o.at ELSE t.yielded END,
    finish_status = CASE WHEN o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE
                         THEN NULL ELSE o.status::async.finish_status_t END,
    failed = o.status IN ('FAILED', 'TIMED_OUT', 'CANCELED'),
    processing_error = o.err,
    tracked = CASE WHEN o.status = 'YIELDED' OR (o.status = 'FINISHED' AND t.yield_upon_finish IS TRUE)
                   THEN coalesce(t.track_yielded, false) ELSE false END,
    yield_upon_finish = NULL
    FROM o
   WHERE t.task_id = o.task_id AND t.attempt = o.attempt AND t.node = $1::text
     AND t.consumed IS NOT NULL AND t.processed IS NULL AND t.yielded IS NULL
  RETURNING t.task_id, t.attempt, t.processed IS NULL AS yielded, coalesce(t.track_yielded, false) AS hold)
SELECT u.task_id, u.attempt, u.yielded, u.hold FROM u
