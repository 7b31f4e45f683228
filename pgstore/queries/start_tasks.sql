-- A node marks its claimed attempts started; fenced on (task_id, attempt,
-- node) and on the attempt still being RUNNING and not yet started.
-- $1 node, $2 task ids, ascending and each once, $3 their attempts.
-- The state test is written with coalesce() on purpose: spelled as
-- "processed IS NULL AND yielded IS NULL" it lets the planner use
-- task_running_idx and join every running task against every given id
-- (a generic plan did: 46 ms instead of 7 ms for 300 of 1000 running).
-- This way the only path is task_pkey per given id.
-- No join with the ids: they are the index condition on task_pkey, so no
-- plan reads the table beyond them. Joined with unnest($2, $3) on
-- "t.task_id = r.task_id", a generic plan built on the statistics of a
-- table analysed while nearly empty read all of task_pkey and compared
-- every row with every id (1539.8 ms instead of 1.3 ms for 250 ids among
-- 40,000 rows). Each row finds its attempt by the position of its id:
-- width_bucket() over ascending ids that hold each id once is that
-- position, found by binary search (pgstore.StartTasks sorts them, and
-- sends an id given twice in a statement of its own).
-- The targets' connection strings come in rows of their own after the
-- tasks' (task_id NULL), one per target the started tasks name, read with
-- one index probe per distinct target (the array's duplicates are dropped
-- by the index scan). Joined per row, as until 2026-12-07, each started
-- task looked its target up in target_pkey: one node's start cost its
-- backend 7.75 µs a row against 6.50 this way (medians of seven series of
-- 40,000 rows alone in one session; docs/performance.md, twenty-fourth
-- session). pgstore.StartTasks pairs them up; a task whose target row is
-- gone (the target triggers refuse to remove or rename a target that has
-- unfinished tasks) comes back with its connection string unknown.
WITH s AS (
  UPDATE async.task t SET started = clock_timestamp()
   WHERE t.task_id = ANY($2::bigint[])
     AND t.attempt = ($3::int[])[width_bucket(t.task_id, $2::bigint[])]
     AND t.node = $1::text
     AND t.consumed IS NOT NULL AND coalesce(t.processed, t.yielded, t.started) IS NULL
  RETURNING t.task_id, t.attempt, coalesce(t.query, '') AS query, t.target,
            coalesce(t.asynchronous_finish, false) AS async, t.times_up)
SELECT s.task_id, s.attempt, s.query, s.target, NULL::text AS connection_string, s.async, s.times_up
  FROM s
UNION ALL
SELECT NULL, NULL, NULL, tg.target, tg.connection_string, NULL, NULL
  FROM async.target tg
 WHERE tg.target = ANY (ARRAY(SELECT s.target FROM s))
