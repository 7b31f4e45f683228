-- Record the new leader's term unless a newer one is recorded already.
UPDATE async.leader l SET
  term = $1::bigint, node = $2::text, cluster_id = $3::text, holder_pid = pg_backend_pid(), since = now()
 WHERE l.term <= $1::bigint
RETURNING l.term
