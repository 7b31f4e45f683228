-- Record the new leader (Raft term $1, node $2, cluster $3) and return its
-- fencing token, unless a newer leader of the same cluster took over
-- already (no row). See migration 0005 for the token.
UPDATE async.leader l SET
  term_offset = n.off,
  term = $1::bigint + n.off,
  raft_term = $1::bigint,
  node = $2::text, cluster_id = $3::text, holder_pid = pg_backend_pid(), since = now()
  FROM (SELECT CASE WHEN x.cluster_id IS NULL THEN 0  -- never led: tokens are Raft terms
                    WHEN x.cluster_id <> $3::text THEN greatest(x.term + 1 - $1::bigint, 0)
                    ELSE x.term_offset END AS off
          FROM async.leader x) n
 WHERE $1::bigint + n.off >= l.term
RETURNING l.term
