package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/cluster"
)

// Partition scenarios: a node is cut off from its peers (not from the
// databases) in network namespaces (see netLab). They need root, so they
// run only with ASYNCNODE_FAULT_PARTITIONS=1 (`make test-faults` sets it),
// and then fail, never skip, when the machine cannot build the network.

const partitionsEnv = "ASYNCNODE_FAULT_PARTITIONS"

// Shape of the partition scenarios.
const (
	partitionLease = 2 * time.Second  // --lease of faultNodeFlags
	partitionHold  = 9 * time.Second  // at least: past --lost-after (5 s) and gossip's dead verdict
	partitionSlow  = 12 * time.Second // sleep of the slow tasks running across the cut
	// stopSlack is how long after its lease the isolated node may still
	// show a running task query on the target: the lease check's period
	// plus cancelling. It keeps the stop before --lost-after (5 s), so the
	// leader's re-run cannot overlap.
	stopSlack = 2 * time.Second
	// partitionRejoin bounds heal -> the isolated node runs tasks again.
	partitionRejoin = 20 * time.Second
)

// partitionsOn reports whether the partition scenarios should run, and
// says how to run them when not.
func partitionsOn(t *testing.T) bool {
	if os.Getenv(partitionsEnv) != "1" {
		t.Logf("partition scenarios not run: they need root and network namespaces; run them with %s=1 (make test-faults sets it)", partitionsEnv)
		return false
	}
	return true
}

// newPartitionEnv builds the network (names starting with prefix, subnets
// 10.77.cnet.0/24 and 10.77.dnet.0/24) and a scenario of nodes nodes in it
// with voters Raft voters (when not the default 3, the nodes run with
// --voters and the scenario waits until that many vote), with a third pool
// "slow" (one slot per node, no retry) of tasks that run across the cut;
// it starts the load and pushes one slow task per node. (Placement is
// least-loaded first: with fewer slow tasks than nodes the same nodes
// would get them every time.)
func newPartitionEnv(t *testing.T, name, prefix string, cnet, dnet, nodes, voters int) (*faultEnv, *netLab) {
	t.Helper()
	lab := newNetLab(t, prefix, cnet, dnet, nodes)
	place := lab.place()
	if voters != cluster.DefaultVoters {
		place.cluster = func(t *testing.T, dsn string, n int, extra ...string) []*node {
			t.Helper()
			nodes := lab.startCluster(t, dsn, n, append(slices.Clone(extra), "--voters", strconv.Itoa(voters))...)
			waitVoters(t, nodes, voters)
			return nodes
		}
	}
	e := newFaultEnvAt(t, name, place, nodes,
		map[string]any{"target": "slow", "connection_string": "", "max_concurrency": nodes, "max_retries": 0})
	e.rounds = 1
	e.startLoad()
	e.waitProgress(60)
	require.NoError(t, e.push(context.Background(), "slow", nodes, partitionSlow, 0))
	return e, lab
}

// waitVoters waits until the leader reports want voters (itself included)
// in the Raft configuration.
func waitVoters(t *testing.T, nodes []*node, want int) {
	t.Helper()
	var roles map[string]cluster.Role
	require.True(t, assertEventually(func() bool {
		var ok bool
		roles, ok = raftRoles(leaderOf(t, nodes))
		return ok && voterCount(roles) == want
	}, 60*time.Second), "the cluster never had %d voters: %v", want, roles)
}

// raftRoles returns every member's Raft role as n's /v1/status reports it
// (false: n did not answer).
func raftRoles(n *node) (map[string]cluster.Role, bool) {
	rep, err := n.status()
	if err != nil {
		return nil, false
	}
	roles := map[string]cluster.Role{}
	for _, m := range rep.Members {
		roles[m.ID] = m.Role
	}
	return roles, true
}

// voterCount counts the voters (the leader included) in roles.
func voterCount(roles map[string]cluster.Role) int {
	n := 0
	for _, r := range roles {
		if r == cluster.RoleLeader || r == cluster.RoleVoter {
			n++
		}
	}
	return n
}

// TestFaultPartitionLeader cuts the leader off from its peers under load
// for longer than --lost-after, then heals: the majority elects a new
// leader that dispatches; the isolated old leader stops its tasks after its
// lease and its attempts are resolved (D13); after the heal it rejoins as a
// follower and runs tasks again.
func TestFaultPartitionLeader(t *testing.T) {
	if !partitionsOn(t) {
		return
	}
	e, lab := newPartitionEnv(t, "partition-leader", "anpl", 1, 2, 3, 3)
	e.waitRunning("slow", nil)
	e.partitionRound(lab, []*node{leaderOf(t, e.nodes)}, false)
	e.waitProgress(40)
	e.finish()
}

// TestFaultPartitionFollower cuts off a follower that runs a slow task,
// for longer than --lost-after, then heals: the leader is unchanged and
// keeps dispatching; the follower stops its tasks after its lease, its
// attempts are resolved (D13), and after the heal it rejoins.
func TestFaultPartitionFollower(t *testing.T) {
	if !partitionsOn(t) {
		return
	}
	e, lab := newPartitionEnv(t, "partition-follower", "anpf", 3, 4, 3, 3)
	leader := leaderOf(t, e.nodes)
	victim := e.waitRunning("slow", nodesExcept(e.nodes, leader))
	e.partitionRound(lab, []*node{victim}, false)
	e.waitProgress(40)
	e.finish()
}

// waitRunning waits until one of among (nil: any node) runs a task of
// target, and returns it.
func (e *faultEnv) waitRunning(target string, among []*node) *node {
	e.t.Helper()
	if among == nil {
		among = e.nodes
	}
	var found *node
	require.True(e.t, assertEventually(func() bool {
		for _, n := range among {
			var c int
			_ = e.db.QueryRow(context.Background(), `select count(*) from async.task where node = $1 and target = $2
				and processed is null and started is not null`, n.id, target).Scan(&c)
			if c > 0 {
				found = n
				return true
			}
		}
		return false
	}, 60*time.Second), "no node runs a %s task", target)
	return found
}

// partitionRound cuts victims off from the other nodes, holds the
// partition past --lost-after until their attempts are resolved, and
// checks that each victim stopped its task queries on the target within
// its lease (plus stopSlack) and ran no slow task to its end, and that the
// other nodes lead: if the leader was among the victims a new one
// dispatches (recovery: cut -> its first dispatch), else the leader is
// unchanged (recovery: cut -> the victims' attempts all resolved). Then it
// heals and waits until every node is a live, registered member again and
// each victim follows the leader and runs tasks.
//
// together: the victims move together to the other side of a split
// (netLab.split) and still reach each other; else each loses its cluster
// link (netLab.cut) and is alone. Either way the test cannot reach the
// victims' APIs until the heal, so it watches them through the databases.
//
// It prints one line; with several victims the per-node figures are
// comma-separated in the order of isolated.
func (e *faultEnv) partitionRound(lab *netLab, victims []*node, together bool) {
	t := e.t
	t.Helper()
	ctx := context.Background()
	idx := make([]int, len(victims))
	ids := make([]string, len(victims))
	for k, v := range victims {
		idx[k] = slices.Index(e.nodes, v)
		require.GreaterOrEqual(t, idx[k], 0)
		ids[k] = v.id
	}
	others := slices.DeleteFunc(slices.Clone(e.nodes), func(n *node) bool { return slices.Contains(victims, n) })
	require.NotEmpty(t, others)
	before := leaderOf(t, e.nodes)
	wasLeader := slices.Contains(victims, before)
	watches := make([]*sessionWatch, len(victims))
	for k, v := range victims {
		watches[k] = watchSessions(t, e.tdb, "asyncnode/"+v.id+"/%")
	}
	var running int
	_ = e.db.QueryRow(ctx, `select count(*) from async.task where node = any($1) and target = 'slow'
		and processed is null and started is not null`, ids).Scan(&running)
	t.Logf("cutting off %v (together: %v, leader %s); they run %d slow tasks", ids, together, before.id, running)

	at := time.Now()
	if together {
		lab.split(idx)
	} else {
		for _, i := range idx {
			lab.cut(i)
		}
	}
	cutDone := time.Now() // the old leader may dispatch until the links are cut
	healed := false
	heal := func() {
		if together {
			lab.unsplit(idx)
		} else {
			for _, i := range idx {
				lab.heal(i)
			}
		}
		healed = true
	}
	t.Cleanup(func() {
		if !healed {
			heal()
		}
	})

	leader := leaderOf(t, others)
	if wasLeader {
		e.recovered(cutDone) // cut -> first dispatch by the new leader
	} else {
		check(t, leader == before, "the leader changed from %s to %s although it was not cut off", before.id, leader.id)
	}
	// resolved[k]: when victim k last had no unresolved attempt.
	resolved := make([]time.Duration, len(victims))
	require.True(t, assertEventually(func() bool {
		all := true
		for k, v := range victims {
			var n int
			err := e.db.QueryRow(ctx, `select count(*) from async.task where node = $1 and processed is null`, v.id).Scan(&n)
			switch {
			case err != nil || n > 0:
				resolved[k], all = 0, false
			case resolved[k] == 0:
				resolved[k] = time.Since(at)
			}
		}
		return all
	}, 90*time.Second), "the attempts of the isolated %v were never resolved", ids)
	if !wasLeader {
		e.recovery = append(e.recovery, slices.Max(resolved)) // cut -> their attempts resolved
	}
	hold(at, partitionHold) // hold the partition
	stopped := make([]time.Duration, len(victims))
	for k, v := range victims {
		// Last sign of a task query of v: sampled in pg_stat_activity, or
		// a start or end in the ledger (exact, but a run that was stopped
		// has no end). Clamped at the cut: 0 means none after it.
		last := watches[k].lastActive()
		var lastRun *time.Time
		require.NoError(t, e.tdb.QueryRow(ctx, `select max(greatest(started, ended)) from ledger where app like $1`,
			"asyncnode/"+v.id+"/%").Scan(&lastRun))
		if lastRun != nil && lastRun.After(last) {
			last = *lastRun
		}
		stopped[k] = max(last.Sub(at), 0)
		check(t, stopped[k] <= partitionLease+stopSlack,
			"the isolated %s still ran task queries on the target %s after the cut (lease %s)", v.id, stopped[k], partitionLease)
		var slowDone int
		require.NoError(t, e.tdb.QueryRow(ctx, `select count(*) from ledger where pool = 'slow' and app like $1 and ended is not null`,
			"asyncnode/"+v.id+"/%").Scan(&slowDone))
		check(t, slowDone == 0, "the isolated %s ran %d slow tasks to their end across the cut", v.id, slowDone)
	}

	heal()
	up := time.Now()
	waitMembers(t, e.nodes, len(e.nodes))
	rejoined := make([]time.Duration, len(victims))
	for k, v := range victims {
		require.True(t, assertEventually(func() bool {
			rep, err := v.status()
			return err == nil && rep.Leader == leader.id && !rep.Scheduler.Dispatching
		}, 60*time.Second), "after the heal %s does not follow %s", v.id, leader.id)
		// Heal -> the first attempt it was given that took effect
		// (started), read from the task log: it does not depend on when
		// this loop looks.
		var first *time.Time
		require.True(t, assertEventually(func() bool {
			err := e.db.QueryRow(ctx, `select min(consumed) from async.task where node = $1 and consumed > $2 and started is not null`,
				v.id, up).Scan(&first)
			return err == nil && first != nil
		}, 60*time.Second), "after the heal %s never ran a task again", v.id)
		rejoined[k] = first.Sub(up)
		// Gossip heals within seconds (cluster's reconnect loop); without it
		// the node stayed dead to its peers for about 45 s.
		check(t, rejoined[k] <= partitionRejoin, "after the heal %s took %s to run tasks again (want at most %s)", v.id, rejoined[k], partitionRejoin)
	}
	fmt.Printf("scenario=%s isolated=%s was_leader=%v leader_after=%s stopped_after_ms=%s resolved_after_ms=%s rejoined_after_ms=%s\n",
		e.name, strings.Join(ids, ","), wasLeader, leader.id, msList(stopped), msList(resolved), msList(rejoined))
}

// msList formats durations as comma-separated milliseconds.
func msList(ds []time.Duration) string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = strconv.FormatInt(d.Milliseconds(), 10)
	}
	return strings.Join(s, ",")
}

// sessionWatch samples the target's pg_stat_activity for active task
// queries of some node process, and remembers when it last saw one.
type sessionWatch struct {
	*sampler
	mu   sync.Mutex
	last time.Time
}

// watchSessions starts a sessionWatch over the sessions whose
// application_name is like app.
func watchSessions(t *testing.T, db *pgxpool.Pool, app string) *sessionWatch {
	w := &sessionWatch{}
	w.sampler = sample(t, 50*time.Millisecond, func() {
		var n int
		err := db.QueryRow(context.Background(), `select count(*) from pg_stat_activity where application_name like $1
			and state = 'active' and query like '%ledger%' and pid <> pg_backend_pid()`, app).Scan(&n)
		if err == nil && n > 0 {
			w.mu.Lock()
			w.last = time.Now()
			w.mu.Unlock()
		}
	})
	return w
}

// lastActive stops the watch and returns when a task query was last seen
// (zero: never).
func (w *sessionWatch) lastActive() time.Time {
	w.stop()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last
}
