-- A node marks its claimed attempts started; fenced on (task_id, attempt,
-- node) and on the attempt still being RUNNING and not yet started.
-- $1 node, $2 task ids, $3 attempts.
-- The state test is written with coalesce() on purpose: spelled as
-- "processed IS NULL AND yielded IS NULL" it lets the planner use
-- task_running_idx and join every running task against every given id
-- (a generic plan did: 46 ms instead of 7 ms for 300 of 1000 running).
-- This way the only path is task_pkey per given id.
UPDATE async.task t SET started = clock_timestamp()
  FROM unnest($2::bigint[], $3::int[]) AS r(task_id, attempt), async.target tg
 WHERE t.task_id = r.task_id AND t.attempt = r.attempt AND t.node = $1::text
   AND t.consumed IS NOT NULL AND coalesce(t.processed, t.yielded, t.started) IS NULL
   AND tg.target = t.target
RETURNING t.task_id, t.attempt, coalesce(t.query, ''), t.target, tg.connection_string,
          coalesce(t.asynchronous_finish, false), t.times_up
