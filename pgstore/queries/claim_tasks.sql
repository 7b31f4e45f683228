-- Claim READY, eligible tasks in (priority, entered, task_id) order under the
-- pool limits and the global limit, in one statement.
--   $1 now (timestamptz)
--   $2 slots: the node of each free global worker slot (text[]); its length
--      is the global limit, the i-th claimed query task goes to $2[i]
--   $3, $4 pool names and the slots they hold now (text[], int[])
--   $5 task ids not to claim now (bigint[]: their old attempt still holds a slot)
-- Pools with READY rows are found by a loose index scan (recursive CTE) over
-- task_ready_idx; each pool then reads at most its free room from the same
-- index. Finished history is never touched.
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
               cardinality($2::text[])) AS n
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
   LIMIT cardinality($2::text[])),
numbered AS (
  SELECT picked.task_id, picked.external, picked.target,
         row_number() OVER (PARTITION BY picked.external
                            ORDER BY picked.priority, picked.entered, picked.task_id) AS qpos
    FROM picked),
-- The update reads the claimed ids from arrays, not from a join with
-- "numbered": a generic plan guesses thousands of rows for that join and
-- hashes a sequential scan of the whole task table (history included);
-- unnest() is guessed small, so every id is one task_pkey lookup.
-- Each task's target default time-out is joined here (in the plans seen, a
-- hash of async.target built once per claim), not looked up by a subquery
-- per updated row: that subquery scanned the target table once per claimed
-- task, every dead row version of it included (a tiny table is vacuumed
-- only after 50 dead versions), and cost 2.5 to 4 us of backend CPU per
-- claimed task with no dead version, 7.5 to 9 us with 36
-- (docs/performance.md).
ids AS (
  SELECT array_agg(n.task_id ORDER BY n.task_id) AS task_ids,
         array_agg(CASE WHEN n.external THEN NULL ELSE ($2::text[])[n.qpos::int] END ORDER BY n.task_id) AS nodes,
         array_agg(n.external ORDER BY n.task_id) AS externals,
         array_agg(tg.default_timeout ORDER BY n.task_id) AS timeouts
    FROM numbered n
    LEFT JOIN async.target tg ON tg.target = n.target),
upd AS (
  UPDATE async.task t SET
    attempt = t.attempt + 1,
    consumed = $1::timestamptz,
    started = NULL,
    times_up = $1::timestamptz + coalesce(t.manual_timeout, n.target_timeout, (SELECT ctl.default_timeout FROM ctl)),
    node = n.node,
    tracked = true
    FROM ids CROSS JOIN LATERAL unnest(ids.task_ids, ids.nodes, ids.externals, ids.timeouts) AS n(task_id, node, external, target_timeout)
   WHERE t.task_id = n.task_id
  RETURNING t.task_id, t.attempt, t.node, t.concurrency_pool, t.target, t.times_up, n.external,
            t.priority, t.entered)
SELECT upd.task_id, upd.attempt, coalesce(upd.node, ''), upd.concurrency_pool, upd.target, upd.times_up,
       upd.external
  FROM upd
 ORDER BY upd.priority, upd.entered, upd.task_id
