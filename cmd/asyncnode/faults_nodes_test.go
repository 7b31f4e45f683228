package main

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Fault scenarios on the node processes: kills, freezes, restarts.

// TestFaultLeaderKill kills the leader with SIGKILL under load, round after
// round, and restarts it from its data dir.
func TestFaultLeaderKill(t *testing.T) {
	e := newFaultEnv(t, "leader-kill", 3)
	e.rounds = faultRounds(t, 2, 10)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(60)
		old := leaderOf(t, e.nodes)
		at := time.Now()
		old.kill()
		e.recovered(at)
		e.restart(old)
		waitMembers(t, e.nodes, 3)
	}
	e.waitProgress(60)
	e.finish()
}

// TestFaultFollowerKill kills a follower that runs tasks and keeps it down
// until the leader resolved its attempts (after --lost-after), then brings
// it back.
func TestFaultFollowerKill(t *testing.T) {
	e := newFaultEnv(t, "follower-kill", 3)
	e.rounds = faultRounds(t, 1, 5)
	e.startLoad()
	ctx := context.Background()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(60)
		victim := e.runningFollower()
		at := time.Now()
		victim.kill()
		e.recovered(at)
		require.True(t, assertEventually(func() bool {
			var n int
			err := e.db.QueryRow(ctx, `select count(*) from async.task where node = $1 and processed is null`, victim.id).Scan(&n)
			return err == nil && n == 0
		}, 90*time.Second), "the killed follower's tasks were never resolved")
		e.restart(victim)
		waitMembers(t, e.nodes, 3)
	}
	e.waitProgress(60)
	e.finish()
}

// runningFollower waits for a follower that runs a task and returns it.
func (e *faultEnv) runningFollower() *node {
	e.t.Helper()
	leader := leaderOf(e.t, e.nodes)
	var found *node
	require.True(e.t, assertEventually(func() bool {
		for _, n := range nodesExcept(e.live(), leader) {
			var c int
			_ = e.db.QueryRow(context.Background(), `select count(*) from async.task where node = $1 and processed is null and started is not null`, n.id).Scan(&c)
			if c > 0 {
				found = n
				return true
			}
		}
		return false
	}, 60*time.Second), "no follower runs a task")
	return found
}

// TestFaultClusterKill kills every node at once with SIGKILL under load
// and restarts them all from their data dirs (no --join: each finds its
// peers in its data dir).
func TestFaultClusterKill(t *testing.T) {
	e := newFaultEnv(t, "cluster-kill", 3)
	e.rounds = faultRounds(t, 1, 5)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(60)
		for _, n := range e.nodes {
			n.kill()
		}
		at := time.Now()
		for _, n := range e.nodes {
			e.restartRemembered(n)
		}
		e.recovered(at)
		waitMembers(t, e.nodes, 3)
	}
	e.waitProgress(60)
	e.finish()
}

// restartRemembered starts a stopped node from its data dir without --join.
func (e *faultEnv) restartRemembered(n *node) {
	n.extra = withoutJoin(n.extra)
	n.start()
}

// freeze sends SIGSTOP to n, and SIGCONT at the end of the test if it is
// still frozen then.
func freeze(t *testing.T, n *node) {
	t.Helper()
	n.signal(syscall.SIGSTOP)
	t.Cleanup(func() {
		if n.cmd != nil {
			_ = n.cmd.Process.Signal(syscall.SIGCONT)
		}
	})
}

// TestFaultSigstopLeader freezes the leader (SIGSTOP) under load for longer
// than the election timeout, its lease and --lost-after, then resumes it:
// the others elect a new leader and fence the old one; the resumed zombie
// leader must neither dispatch nor write anything that counts.
func TestFaultSigstopLeader(t *testing.T) {
	e := newFaultEnv(t, "sigstop-leader", 3)
	e.rounds = faultRounds(t, 1, 5)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(60)
		old := leaderOf(t, e.nodes)
		at := time.Now()
		freeze(t, old)
		e.recovered(at)
		// Past --lost-after (5s): the new leader fences the frozen one's
		// sessions and resolves its attempts.
		require.True(t, assertEventually(func() bool {
			var n int
			err := e.db.QueryRow(context.Background(), `select count(*) from async.task where node = $1 and processed is null`, old.id).Scan(&n)
			return err == nil && n == 0 && time.Since(at) > 8*time.Second
		}, 90*time.Second), "the frozen leader's tasks were never resolved")
		old.signal(syscall.SIGCONT)
		// It learns it no longer leads, and does not dispatch.
		require.True(t, assertEventually(func() bool {
			rep, err := old.status()
			return err == nil && rep.Leader != "" && rep.Leader != old.id && !rep.Scheduler.Dispatching
		}, 60*time.Second), "the resumed old leader still believes it leads")
		waitMembers(t, e.nodes, 3)
	}
	e.waitProgress(60)
	e.finish()
}

// TestFaultSigstopFollowerTimeout freezes a follower that runs a task built
// to time out, for longer than the task's timeout and --lost-after: the task
// must still end (TIMED_OUT, or FAILED as lost), its query must really stop
// on the target, and the load goes on elsewhere.
func TestFaultSigstopFollowerTimeout(t *testing.T) {
	e := newFaultEnv(t, "sigstop-follower", 3,
		map[string]any{"target": "slow", "connection_string": "", "max_concurrency": 3, "max_retries": 0})
	e.expect["slow"] = "timeout"
	e.rounds = faultRounds(t, 1, 3)
	e.startLoad()
	ctx := context.Background()
	for r := 0; r < e.rounds; r++ {
		require.NoError(t, e.push(ctx, "slow", 3, faultSlow, 2*time.Second))
		victim := e.waitRunning("slow", nodesExcept(e.live(), leaderOf(t, e.nodes)))
		at := time.Now()
		freeze(t, victim)
		require.True(t, assertEventually(func() bool {
			var n int
			err := e.db.QueryRow(ctx, `select count(*) from async.task where node = $1 and processed is null`, victim.id).Scan(&n)
			return err == nil && n == 0
		}, 90*time.Second), "the frozen follower's tasks were never resolved")
		// Recovery here: freeze -> its attempts resolved.
		e.recovery = append(e.recovery, time.Since(at))
		// Stay frozen past the slow task's timeout and --lost-after.
		hold(at, 8*time.Second)
		victim.signal(syscall.SIGCONT)
		waitMembers(t, e.nodes, 3)
	}
	e.waitProgress(60)
	e.finish()
}

// TestFaultRollingRestart restarts every node in turn with SIGTERM under
// load, followers first and the leader last, as in an upgrade: a node
// drains, stops, comes back from its data dir and rejoins before the next
// one goes.
func TestFaultRollingRestart(t *testing.T) {
	e := newFaultEnv(t, "rolling-restart", 3)
	e.rounds = faultRounds(t, 1, 3)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		leader := leaderOf(t, e.nodes)
		order := append(nodesExcept(e.nodes, leader), leader)
		for _, n := range order {
			e.waitProgress(30)
			at := time.Now()
			n.stop()
			e.restart(n)
			// Recovery here: SIGTERM -> the restarted node runs tasks again.
			require.True(t, assertEventually(func() bool {
				var c int
				err := e.db.QueryRow(context.Background(), `select count(*) from async.task where node = $1 and consumed > $2`, n.id, at).Scan(&c)
				return err == nil && c > 0
			}, 60*time.Second), "%s never ran a task after its restart", n.id)
			e.recovery = append(e.recovery, time.Since(at))
			waitMembers(t, e.nodes, 3)
		}
	}
	e.waitProgress(30)
	e.finish()
}

// TestFaultMembershipChurn changes the membership under load: a fourth
// node joins (a non-voter), a voter leaves gracefully, a fifth node joins,
// and the leader leaves.
func TestFaultMembershipChurn(t *testing.T) {
	e := newFaultEnv(t, "membership-churn", 3)
	e.rounds = 1
	e.startLoad()
	join := func(id string) {
		n := newNode(t, e.dsn, id, append([]string{"--join", e.live()[0].gossip}, faultNodeFlags...)...)
		n.start()
		e.nodes = append(e.nodes, n)
		waitMembers(t, e.nodes, len(e.live()))
		e.waitProgress(30)
	}
	leave := func(n *node) {
		at := time.Now()
		out, errOut, code := runCLI(t, nil, "leave", "--http-addr", n.api)
		require.Equal(t, 0, code, "leave %s: %s %s", n.id, out, errOut)
		select {
		case <-n.done:
			n.cmd = nil
		case <-time.After(60 * time.Second):
			t.Fatalf("%s still runs after leave", n.id)
		}
		e.recovery = append(e.recovery, time.Since(at))
		waitMembers(t, e.nodes, len(e.live()))
		e.waitProgress(30)
	}
	e.waitProgress(30)
	join("n4")
	leave(nodesExcept(e.live(), leaderOf(t, e.nodes))[0])
	join("n5")
	leave(leaderOf(t, e.nodes))
	e.finish()
}
