-- Every RUNNING and YIELDED task (task_running_idx), for reconciliation.
SELECT t.task_id, t.attempt, coalesce(t.node, ''), async.task_execution_state(t)::text,
       t.started IS NOT NULL, t.query IS NULL, coalesce(t.track_yielded, false), t.concurrency_pool, t.times_up
  FROM async.task t
 WHERE t.processed IS NULL AND (t.consumed IS NOT NULL OR t.yielded IS NOT NULL)
 ORDER BY t.task_id
