package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
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
// 10.77.cnet.0/24 and 10.77.dnet.0/24) and a 3-node scenario in it, with a
// third pool "slow" (3 slots, no retry) of tasks that run across the cut;
// it starts the load and pushes 3 slow tasks.
func newPartitionEnv(t *testing.T, name, prefix string, cnet, dnet int) (*faultEnv, *netLab) {
	t.Helper()
	lab := newNetLab(t, prefix, cnet, dnet, 3)
	e := newFaultEnvAt(t, name, lab.place(), 3,
		map[string]any{"target": "slow", "connection_string": "", "max_concurrency": 3, "max_retries": 0})
	e.rounds = 1
	e.startLoad()
	e.waitProgress(60)
	require.NoError(t, e.push(context.Background(), "slow", 3, partitionSlow, 0))
	return e, lab
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
	e, lab := newPartitionEnv(t, "partition-leader", "anpl", 1, 2)
	e.waitRunning("slow", nil)
	e.partitionRound(lab, leaderOf(t, e.nodes), true)
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
	e, lab := newPartitionEnv(t, "partition-follower", "anpf", 3, 4)
	leader := leaderOf(t, e.nodes)
	victim := e.waitRunning("slow", nodesExcept(e.nodes, leader))
	e.partitionRound(lab, victim, false)
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

// partitionRound cuts victim off from its peers, holds the partition past
// --lost-after until its attempts are resolved, checks that it stopped its
// task queries after its lease and that the majority leads, then heals and
// waits until it runs tasks again. wasLeader: victim led at the cut.
func (e *faultEnv) partitionRound(lab *netLab, victim *node, wasLeader bool) {
	t := e.t
	t.Helper()
	ctx := context.Background()
	idx := slices.Index(e.nodes, victim)
	require.GreaterOrEqual(t, idx, 0)
	majority := nodesExcept(e.nodes, victim)
	before := victim
	if !wasLeader {
		before = leaderOf(t, majority)
	}
	watch := watchSessions(t, e.tdb, "asyncnode/"+victim.id+"/%")
	at := time.Now()
	lab.cut(idx)
	cutDone := time.Now() // the old leader may dispatch until the link is down
	healed := false
	t.Cleanup(func() {
		if !healed {
			lab.heal(idx)
		}
	})

	leader := leaderOf(t, majority)
	if wasLeader {
		e.recovered(cutDone) // cut -> first dispatch by the new leader
	} else {
		check(t, leader == before, "the leader changed from %s to %s although a follower was cut off", before.id, leader.id)
	}
	require.True(t, assertEventually(func() bool {
		var n int
		err := e.db.QueryRow(ctx, `select count(*) from async.task where node = $1 and processed is null`, victim.id).Scan(&n)
		return err == nil && n == 0
	}, 90*time.Second), "the isolated %s's attempts were never resolved", victim.id)
	resolved := time.Since(at)
	if !wasLeader {
		e.recovery = append(e.recovery, resolved) // cut -> its attempts resolved
	}
	time.Sleep(time.Until(at.Add(partitionHold))) // hold the partition
	lastActive := watch.lastActive()
	stopped := lastActive.Sub(at)
	check(t, stopped <= partitionLease+stopSlack,
		"the isolated %s still ran task queries on the target %s after the cut (lease %s)", victim.id, stopped, partitionLease)
	var slowDone int
	require.NoError(t, e.tdb.QueryRow(ctx, `select count(*) from ledger where pool = 'slow' and app like $1 and ended is not null`,
		"asyncnode/"+victim.id+"/%").Scan(&slowDone))
	check(t, slowDone == 0, "the isolated %s ran %d slow tasks to their end across the cut", victim.id, slowDone)

	lab.heal(idx)
	healed = true
	up := time.Now()
	waitMembers(t, e.nodes, 3)
	require.True(t, assertEventually(func() bool {
		rep, err := victim.status()
		return err == nil && rep.Leader == leader.id && !rep.Scheduler.Dispatching
	}, 60*time.Second), "after the heal %s does not follow %s", victim.id, leader.id)
	require.True(t, assertEventually(func() bool {
		var c int
		err := e.db.QueryRow(ctx, `select count(*) from async.task where node = $1 and consumed > $2`, victim.id, up).Scan(&c)
		return err == nil && c > 0
	}, 60*time.Second), "after the heal %s never ran a task again", victim.id)
	rejoined := time.Since(up)
	// Gossip heals within seconds (cluster's reconnect loop); without it
	// the node stayed dead to its peers for about 45 s.
	check(t, rejoined <= partitionRejoin, "after the heal %s took %s to run tasks again (want at most %s)", victim.id, rejoined, partitionRejoin)
	fmt.Printf("scenario=%s isolated=%s was_leader=%v leader_after=%s stopped_after_ms=%d resolved_after_ms=%d rejoined_after_ms=%d\n",
		e.name, victim.id, wasLeader, leader.id, stopped.Milliseconds(), resolved.Milliseconds(), rejoined.Milliseconds())
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
