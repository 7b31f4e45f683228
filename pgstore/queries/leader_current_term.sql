SELECT l.raft_term FROM async.leader l
