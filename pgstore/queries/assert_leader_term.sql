-- Fence for leader writes: share-locks async.leader and raises SQLSTATE
-- AS001 unless its term is $1. Queued first in the same batch (one implicit
-- transaction) as the write it guards.
SELECT async.assert_leader_term($1::bigint)
