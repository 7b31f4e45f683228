-- The claim's second statement, in the transaction of claim_select.sql,
-- whose rows it updates (they are locked): a new attempt, consumed now,
-- not started, times_up now + (the task's manual_timeout, else the time-out
-- claim_select found), node, tracked.
--   $1 now (timestamptz)
--   $2 task ids, $3 their nodes (NULL for external tasks), $4 their
--      time-outs (bigint[], text[], interval[])
-- The ids come as arrays and each is looked up in task_pkey, as the lookups
-- do (start_tasks.sql): the plan is cached and must not depend on how many
-- rows the statistics say the table holds.
UPDATE async.task t SET
  attempt = t.attempt + 1,
  consumed = $1::timestamptz,
  started = NULL,
  times_up = $1::timestamptz + coalesce(t.manual_timeout, n.timeout),
  node = n.node,
  tracked = true
  FROM unnest($2::bigint[], $3::text[], $4::interval[]) AS n(task_id, node, timeout)
 WHERE t.task_id = n.task_id
RETURNING t.task_id, t.attempt, coalesce(t.node, ''), t.concurrency_pool, t.target, t.times_up,
          t.query IS NULL AS external
