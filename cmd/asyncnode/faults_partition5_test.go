package main

import (
	"context"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/cluster"
)

// 5-node partition scenarios: the cluster network is split in two sides
// that each still talk among themselves (netLab.split), two nodes on one
// side and three on the other, under the usual load plus slow tasks.
//
// The nodes run with --voters 5, so all five vote and the quorum is 3:
// whichever two nodes are split off hold 2 of the 5 votes and can neither
// keep nor elect a leader, and the three others can. (With the default
// --voters 3 the other two would be non-voters, and a side would hold a
// quorum only with 2 of the 3 voters: splitting off the leader with a
// voter would leave the three others, with one vote, unable to elect.)
// The sides are therefore chosen from the suffrage the leader reports in
// /v1/status (pickMinority), not assumed: the split-off side must hold
// fewer voters than a quorum and the other side a quorum, and the scenario
// fails at setup if no such choice exists.
//
// The split-off side goes to the second cluster bridge, which the test
// cannot reach: during the partition it watches those nodes through the
// databases only (their task queries on the target, their attempts in the
// task log), and asks only the majority's APIs who leads.

// partition5Nodes and partition5Voters shape the 5-node scenarios.
const (
	partition5Nodes  = 5
	partition5Voters = 5
)

// TestFaultPartitionMinorityLeader splits the leader and one follower off
// from the three other nodes, under load, for longer than --lost-after,
// then heals: the three elect a new leader that dispatches; the old leader
// and its follower, which still reach each other but not a quorum, stop
// their task queries within their lease and their attempts are resolved
// (D13); after the heal all five are live members and the two follow the
// new leader and run tasks again.
func TestFaultPartitionMinorityLeader(t *testing.T) {
	if !partitionsOn(t) {
		return
	}
	minoritySplit(t, "partition-minority-leader", "anpm", 5, 6, true)
}

// TestFaultPartitionMinorityFollowers splits two followers off from the
// leader and the two others, under load, for longer than --lost-after,
// then heals: the leader keeps its quorum and does not change; the two
// stop their task queries within their lease and their attempts are
// resolved (D13); after the heal they follow the leader and run tasks
// again.
func TestFaultPartitionMinorityFollowers(t *testing.T) {
	if !partitionsOn(t) {
		return
	}
	minoritySplit(t, "partition-minority-followers", "anpn", 7, 8, false)
}

// minoritySplit runs one 5-node scenario (network names prefix, subnets
// cnet and dnet): it splits off two nodes, the leader and a follower when
// withLeader is set, else two followers, holds and heals the split
// (partitionRound), and checks the history.
func minoritySplit(t *testing.T, name, prefix string, cnet, dnet int, withLeader bool) {
	t.Helper()
	e, lab := newPartitionEnv(t, name, prefix, cnet, dnet, partition5Nodes, partition5Voters)
	leader := leaderOf(t, e.nodes)
	// A follower that runs a slow task, so that the split-off side's lease
	// is seen stopping a long query.
	e.waitRunning("slow", nodesExcept(e.nodes, leader))
	must, more := []*node(nil), 2
	if withLeader {
		must, more = []*node{leader}, 1
	}
	e.partitionRound(lab, e.pickMinority(leader, must, more), true)
	e.waitProgress(40)
	e.finish()
}

// pickMinority returns the side to split off: must, plus more followers of
// leader, chosen so that the side holds fewer voters than a quorum and the
// other nodes hold a quorum, by the Raft roles leader reports. Followers
// that run slow tasks come first (their lease must stop a long query),
// then by id. It fails the test when no choice fits.
func (e *faultEnv) pickMinority(leader *node, must []*node, more int) []*node {
	t := e.t
	t.Helper()
	roles, ok := raftRoles(leader)
	require.True(t, ok, "%s does not answer", leader.id)
	voters := voterCount(roles)
	quorum := voters/2 + 1
	isVoter := func(n *node) int {
		if r := roles[n.id]; r == cluster.RoleLeader || r == cluster.RoleVoter {
			return 1
		}
		return 0
	}
	side := slices.Clone(must)
	held := 0 // voters on the side
	for _, n := range side {
		held += isVoter(n)
	}
	slow := map[string]int{}
	rows, err := e.db.Query(context.Background(), `select node, count(*) from async.task where target = 'slow'
		and processed is null and started is not null group by node`)
	require.NoError(t, err)
	for rows.Next() {
		var id string
		var c int
		require.NoError(t, rows.Scan(&id, &c))
		slow[id] = c
	}
	require.NoError(t, rows.Err())
	cands := slices.DeleteFunc(nodesExcept(e.nodes, leader), func(n *node) bool { return slices.Contains(side, n) })
	slices.SortStableFunc(cands, func(a, b *node) int { return min(slow[b.id], 1) - min(slow[a.id], 1) })
	for _, n := range cands {
		if len(side) == len(must)+more {
			break
		}
		// The side stays below a quorum and leaves one to the others.
		if held+isVoter(n) <= voters-quorum {
			side = append(side, n)
			held += isVoter(n)
		}
	}
	require.Len(t, side, len(must)+more, "no split leaves the side without a quorum of voters and the others with one: roles %v", roles)
	require.Less(t, held, quorum)
	require.GreaterOrEqual(t, voters-held, quorum)
	t.Logf("split off %v (%d of %d voters, quorum %d); roles %v, slow tasks per node %v", nodeIDs(side), held, voters, quorum, roles, slow)
	return side
}

// nodeIDs returns the ids of nodes.
func nodeIDs(nodes []*node) []string {
	ids := make([]string, len(nodes))
	for i, n := range nodes {
		ids[i] = n.id
	}
	return ids
}
