-- The leader's view of the given tasks. $1 task ids.
SELECT t.task_id, t.attempt, coalesce(t.node, ''), async.task_execution_state(t)::text,
       t.started IS NOT NULL, t.query IS NULL, coalesce(t.track_yielded, false), t.concurrency_pool, t.times_up
  FROM async.task t
 WHERE t.task_id = ANY($1::bigint[])
