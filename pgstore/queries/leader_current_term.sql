SELECT l.term FROM async.leader l
