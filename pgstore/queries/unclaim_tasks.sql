-- Put claimed-but-never-started attempts back to READY (attempt is kept;
-- the next claim increments it). $1 task ids, $2 attempts.
UPDATE async.task t SET
  consumed = NULL,
  times_up = NULL,
  node = NULL,
  tracked = false
  FROM unnest($1::bigint[], $2::int[]) AS r(task_id, attempt)
 WHERE t.task_id = r.task_id AND t.attempt = r.attempt
   AND t.started IS NULL AND t.consumed IS NOT NULL AND t.processed IS NULL AND t.yielded IS NULL
