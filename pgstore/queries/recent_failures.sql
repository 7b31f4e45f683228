-- The newest failed tasks (task_history_idx, newest first). $1 limit.
SELECT t.task_id, coalesce(t.finish_status::text, ''), coalesce(t.processing_error, ''), t.processed
  FROM async.task t
 WHERE t.processed IS NOT NULL AND t.failed
 ORDER BY t.processed DESC
 LIMIT $1::int
