-- Who holds the session advisory lock $1 in this database? PostgreSQL splits
-- a bigint key into classid (high 32 bits) and objid (low 32 bits), objsubid 1.
-- Also returns the recorded leader (its Raft term), to recognise a stale
-- holder of our cluster.
SELECT l.pid, coalesce(a.application_name, ''),
       coalesce(ld.cluster_id, ''), coalesce(ld.holder_pid, 0), ld.raft_term
  FROM pg_locks l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
  LEFT JOIN async.leader ld ON true
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
   AND l.classid::int8 = (($1::bigint >> 32) & 4294967295)
   AND l.objid::int8 = ($1::bigint & 4294967295)
   AND l.objsubid = 1
 LIMIT 1
