-- D10 for tasks no node is running: YIELDED tasks and RUNNING non-query
-- tasks past their deadline end TIMED_OUT. $1 now.
UPDATE async.task t SET
  processed = $1::timestamptz,
  finish_status = 'TIMED_OUT',
  failed = true,
  processing_error = 'Canceling due to time out',
  tracked = false,
  yield_upon_finish = NULL
 WHERE t.processed IS NULL AND (t.consumed IS NOT NULL OR t.yielded IS NOT NULL)
   AND t.times_up <= $1::timestamptz
   AND (t.yielded IS NOT NULL OR t.query IS NULL)
RETURNING t.task_id, t.attempt
