// Package cluster owns asyncnode's membership and consensus layer: gossip
// membership (memberlist), Raft (TCP or mutual-TLS transport, raft-boltdb log
// and stable store, file snapshots), joins and graceful leaves, voter and
// non-voter placement, forwarding of writes to the leader, and the node's
// HTTP API (health, apply, join, leave, members) with its token and TLS.
//
// It knows nothing about tasks: the caller supplies the raft.FSM and decides
// what the log entries mean.
//
// # Lifecycle
//
// New validates a Config. Start opens the data directory and:
//
//   - with an empty data directory and no Join addresses, bootstraps a new
//     cluster whose only voter is this node;
//   - with an empty data directory and Join addresses, joins the gossip pool
//     and waits for the leader to add it to Raft;
//   - with a non-empty data directory, resumes from it (never bootstraps
//     again) and rejoins gossip through Join or, failing that, through the
//     gossip peers it remembered in the data directory.
//
// While it runs, a node contacts the members it sees dead every 2 s, so
// that gossip heals within seconds of the end of a partition (memberlist
// alone would keep both sides dead to each other for about 30 s), and, for
// ten minutes after a restart, the remembered peers it has not seen yet.
//
// Stop shuts the node down without leaving: peers see it as failed and keep
// its Raft seat for Config.ReapDeadAfter, so a restart (a rolling upgrade)
// resumes where it was. Leave removes the node for good: leadership is
// transferred away first, the leader removes it from Raft, then it leaves
// the gossip pool.
//
// # Placement
//
// The leader reconciles gossip members with the Raft configuration on every
// membership event and every second: members are de-duplicated by id and by
// Raft address; the first Config.Voters members become voters, later ones
// non-voters; a voter that left (at once) or has been dead for ReapDeadAfter
// is removed and a healthy non-voter is promoted in its place.
package cluster
