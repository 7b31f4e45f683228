-- The claim's first statement: finds and locks the READY, eligible tasks to
-- claim, in (priority, entered, task_id) order, under the pool limits and
-- the global limit. claim_update.sql then updates them, in the same
-- transaction (pgstore.ClaimTasks). The rows stay locked (FOR UPDATE) until
-- that transaction ends.
--   $1 now (timestamptz)
--   $2 the free global worker slots (int): the global limit (the i-th
--      claimed query task goes to the i-th slot's node: pgstore.ClaimTasks
--      assigns them)
--   $3, $4 pool names and the slots they hold now (text[], int[])
--   $5 task ids not to claim now (bigint[]: their old attempt still holds a slot)
-- Returns each task's id, whether it is external (NULL query: no node), and
-- the time-out it gets unless it has its own (manual_timeout): its target's
-- default, else control.default_timeout.
-- Pools with READY rows are found by a loose index scan (recursive CTE) over
-- task_ready_idx; each pool then reads at most its free room from the same
-- index. Finished history is never touched.
--
-- It runs as a prepared statement on a cached generic plan (planning the
-- claim at every call, as one statement, took 0.74 ms of a 250-task claim
-- that ran in 3.34 ms), in sessions whose planner may use neither
-- sequential nor bitmap scans nor hash or merge joins
-- (pgstore.claimSettings): every plan it can build reads task_ready_idx in
-- order, pool by pool, whatever the statistics say (docs/performance.md,
-- seventeenth session).
WITH RECURSIVE
ctl AS (
  -- Nothing is claimed while paused or disabled, as seen by this
  -- statement's own snapshot: a task pushed after async.pause() committed
  -- never starts, whatever configuration the leader last read (D15).
  SELECT c.default_concurrency_pool_workers AS pool_default, c.default_timeout
    FROM async.control c
   WHERE c.enabled AND NOT c.paused
   LIMIT 1),
-- Each step also keeps the index key of the pool's first READY row (first
-- in index order, as this statement's snapshot sees it): the pool's scan
-- in "cand" starts there instead of at the start of the pool, so it does
-- not walk again the entries of tasks claimed since the last vacuum, which
-- lie before it (dead, but still in the index until vacuum removes them).
pools AS (
  SELECT f.pool, f.priority, f.entered, f.task_id
    FROM (SELECT t.concurrency_pool AS pool, t.priority, t.entered, t.task_id FROM async.task t
           WHERE t.consumed IS NULL AND t.processed IS NULL AND t.yielded IS NULL
           ORDER BY t.concurrency_pool, t.priority, t.entered, t.task_id
           LIMIT 1) f
  UNION ALL
  SELECT n.pool, n.priority, n.entered, n.task_id
    FROM pools p
   CROSS JOIN LATERAL (
     SELECT t.concurrency_pool AS pool, t.priority, t.entered, t.task_id FROM async.task t
      WHERE t.consumed IS NULL AND t.processed IS NULL AND t.yielded IS NULL
        AND t.concurrency_pool > p.pool
      ORDER BY t.concurrency_pool, t.priority, t.entered, t.task_id
      LIMIT 1) n),
room AS (
  SELECT p.pool, p.priority, p.entered, p.task_id,
         least(coalesce(cp.max_workers, ctl.pool_default, 0) - coalesce(r.running, 0),
               $2::int) AS n
    FROM pools p
   CROSS JOIN ctl
    LEFT JOIN async.concurrency_pool cp ON cp.concurrency_pool = p.pool
    LEFT JOIN unnest($3::text[], $4::int[]) AS r(pool, running) ON r.pool = p.pool),
cand AS (
  SELECT c.task_id, c.priority, c.entered, c.external, c.target
    FROM room
   CROSS JOIN LATERAL (
     SELECT t.task_id, t.priority, t.entered, t.query IS NULL AS external, t.target
       FROM async.task t
      WHERE t.concurrency_pool = room.pool
        AND (t.priority, t.entered, t.task_id) >= (room.priority, room.entered, room.task_id)
        AND t.consumed IS NULL AND t.processed IS NULL AND t.yielded IS NULL
        AND (t.eligible_when IS NULL OR t.eligible_when <= $1::timestamptz)
        AND t.task_id <> ALL($5::bigint[])
      ORDER BY t.priority, t.entered, t.task_id
      LIMIT greatest(room.n, 0)
        FOR UPDATE OF t SKIP LOCKED) c),
picked AS (
  SELECT cand.task_id, cand.priority, cand.entered, cand.external, cand.target
    FROM cand
   ORDER BY cand.priority, cand.entered, cand.task_id
   LIMIT $2::int)
SELECT picked.task_id, picked.external,
       coalesce(tg.default_timeout, (SELECT ctl.default_timeout FROM ctl)) AS timeout
  FROM picked
  LEFT JOIN async.target tg ON tg.target = picked.target
 ORDER BY picked.priority, picked.entered, picked.task_id
