-- async.leader.term becomes a fencing token that grows across clusters.
--
-- Every leader write checks async.leader.term (async.assert_leader_term).
-- It used to be the Raft term itself, so a cluster rebuilt from empty data
-- directories (its Raft terms start again at 1) could never lead a server
-- database an older cluster had led: its terms were all "stale". Now:
--   raft_term    the Raft term of the leader that took over last;
--   term_offset  added to its cluster's Raft terms;
--   term         raft_term + term_offset, the token leader writes carry.
-- A leader of the same cluster keeps the offset (tokens follow Raft terms);
-- a leader of another cluster (it holds the advisory lock, so the old one
-- is not leading) gets the offset that makes its token the old token + 1.
-- Tokens only ever grow, so a paused leader of any cluster stays fenced.

ALTER TABLE async.leader
  ADD COLUMN raft_term BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN term_offset BIGINT NOT NULL DEFAULT 0;

UPDATE async.leader SET raft_term = term;
