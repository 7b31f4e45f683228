-- D18: delete one batch of finished tasks older than task_keep_duration
-- (task_history_idx). Unfinished tasks are never deleted. $1 now, $2 batch size.
WITH doomed AS (
  SELECT t.task_id FROM async.task t
   WHERE t.processed IS NOT NULL
     AND t.processed < $1::timestamptz - (SELECT c.task_keep_duration FROM async.control c)
   ORDER BY t.processed
   LIMIT $2::int
     FOR UPDATE SKIP LOCKED)
DELETE FROM async.task t USING doomed d WHERE t.task_id = d.task_id
