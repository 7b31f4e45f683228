-- The claim's second statement, in the transaction of claim_select.sql,
-- whose rows it updates (they are locked): a new attempt, consumed now,
-- not started, times_up now + (the task's manual_timeout, else the time-out
-- claim_select found), node, tracked. One call per (node, time-out) of the
-- claimed tasks, all sent at once.
--   $1 now (timestamptz)
--   $2 task ids (bigint[])
--   $3 their node (text; NULL for external tasks)
--   $4 their time-out (interval)
-- No join: the ids are an index condition on task_pkey, so no plan can read
-- the table beyond them. A join with the ids (UPDATE ... FROM unnest(ids,
-- ...) WHERE t.task_id = n.task_id) lets a generic plan built on the
-- statistics of a table analysed while empty scan all of task_pkey and
-- compare every row with every id: one such claim took 6.6 s, and a claim
-- planned per call with that join took 92 s (docs/performance.md,
-- seventeenth session). The lookups, which need a value per id, join with
-- a clause that cannot be merged (finish_tasks.sql).
UPDATE async.task t SET
  attempt = t.attempt + 1,
  consumed = $1::timestamptz,
  started = NULL,
  times_up = $1::timestamptz + coalesce(t.manual_timeout, $4::interval),
  node = $3::text,
  tracked = true
 WHERE t.task_id = ANY($2::bigint[])
RETURNING t.task_id, t.attempt, coalesce(t.node, ''), t.concurrency_pool, t.target, t.times_up,
          t.query IS NULL AS external
