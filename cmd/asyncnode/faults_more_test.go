package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/cluster"
)

// More fault scenarios: a target that runs out of connections, and a node
// that left the cluster coming back with its old data dir.

// connLimitError matches the server's refusal of a connection because every
// slot is taken: the role's CONNECTION LIMIT (what this scenario does) or
// max_connections; SQLSTATE 53300 either way.
var connLimitError = regexp.MustCompile(`too many connections for role|too many clients already|connection limit exceeded|SQLSTATE 53300`)

// Shape of target-conn-exhaustion: the role "capped" may hold
// cappedSlots connections; the test takes them all.
const (
	cappedSlots   = 9 // 3 nodes x the limit of cx: the nodes' idle pooled connections can never starve one of them
	exhaustHold   = 6 * time.Second
	doomedTimeout = 3 * time.Second
)

// TestFaultTargetConnExhaustion takes every connection slot of a target's
// role (CONNECTION LIMIT, the slots held by other clients) while tasks
// are pushed for it. As documented (D12, executor/target.go), a refused
// connection marks the target unhealthy and its tasks wait and retry with
// backoff, up to 60 s or until just before their deadline: tasks with a
// deadline shorter than the fault end FAILED with the server's error
// ("too many connections for role"), never TIMED_OUT and never run;
// the others wait and all run once the slots are free. The targets of
// other roles (t0 and t1, same server) are unaffected throughout.
func TestFaultTargetConnExhaustion(t *testing.T) {
	e := newFaultEnv(t, "target-conn-exhaustion", 3)
	e.rounds = 1
	ctx := context.Background()
	_, err := e.tdb.Exec(ctx, fmt.Sprintf(`create role capped login connection limit %d;
		grant select, insert, update on ledger to capped; grant usage on sequence ledger_id_seq to capped`, cappedSlots))
	require.NoError(t, err)
	cappedDSN := strings.Replace(e.targetDSN, "user=postgres", "user=capped", 1)
	require.NotEqual(t, e.targetDSN, cappedDSN)
	// cx waits for the slots; cxd's tasks have a deadline shorter than the
	// fault. A distinct connection string: a pool of its own on each node.
	e.addTarget(map[string]any{"target": "cx", "connection_string": cappedDSN, "max_concurrency": 3, "max_retries": 0})
	e.addTarget(map[string]any{"target": "cxd", "connection_string": cappedDSN + " connect_timeout=10", "max_concurrency": 3, "max_retries": 0})
	e.configure()
	e.expect["cxd"] = "refused"
	e.allowed["refused"] = connLimitError
	e.startLoad()
	e.waitProgress(20)

	// The fault: other clients hold every slot of the role.
	hogs := holdSlots(t, cappedDSN, cappedSlots)
	at := time.Now()
	require.NoError(t, e.push(ctx, "cxd", 3, faultSleep, doomedTimeout))
	require.NoError(t, e.push(ctx, "cx", 12, faultSleep, 0))
	count := func(q string, args ...any) int {
		var n int
		require.NoError(t, e.db.QueryRow(ctx, q, args...).Scan(&n))
		return n
	}
	require.True(t, assertEventually(func() bool {
		return count(`select count(*) from async.task where target = 'cxd' and processed is null`) == 0
	}, 30*time.Second), "the tasks whose deadline falls within the fault never ended")
	require.True(t, assertEventually(func() bool {
		return count(`select count(*) from async.task where target = 'cx' and started is not null`) >= 3
	}, 30*time.Second), "no cx task was started on a node during the fault")
	// Hold the fault; meanwhile the cx tasks wait, and t0 and t1 go on.
	hold(at, exhaustHold)
	var ran int
	require.NoError(t, e.tdb.QueryRow(ctx, `select count(*) from ledger where pool in ('cx', 'cxd')`).Scan(&ran))
	require.Zero(t, ran, "a task of the exhausted role ran during the fault: the fault was not in place")
	waiting := count(`select count(*) from async.task where target = 'cx' and started is not null and processed is null`)
	require.Positive(t, waiting, "no cx task was waiting for a connection at the end of the fault")
	others := count(`select count(*) from async.task where target in ('t0', 't1') and processed > $1`, at)
	require.GreaterOrEqual(t, others, 30, "the other targets made little progress while one role had no connection left")

	up := time.Now()
	for _, c := range hogs {
		_ = c.Close(ctx)
	}
	// Recovery: slots free -> first cx run on the target.
	var first *time.Time
	require.True(t, assertEventually(func() bool {
		_ = e.tdb.QueryRow(ctx, `select min(started) from ledger where pool = 'cx'`).Scan(&first)
		return first != nil
	}, 30*time.Second), "the waiting tasks never ran once the connections were free")
	e.recovery = append(e.recovery, first.Sub(up))
	require.True(t, assertEventually(func() bool {
		return count(`select count(*) from async.task where target = 'cx' and processed is null`) == 0
	}, 60*time.Second), "the waiting tasks never all ended")
	e.waitProgress(10)
	rep := e.finish()
	require.Equal(t, 3, rep.Failed, "exactly the 3 tasks whose deadline fell within the fault fail (with the server's error)")
	require.Equal(t, 12, count(`select count(*) from async.task where target = 'cx' and finish_status = 'FINISHED'`),
		"every task that could wait for a connection finished")
	var cxdErr string
	var cxdTook time.Duration
	require.NoError(t, e.db.QueryRow(ctx, `select processing_error, processed - started from async.task
		where target = 'cxd' order by task_id limit 1`).Scan(&cxdErr, &cxdTook))
	t.Logf("%s: %d t0/t1 tasks ended during the %s fault; %d cx tasks were waiting for a connection at its end; a cxd task ended after %s: %s",
		e.name, others, exhaustHold, waiting, cxdTook.Round(time.Millisecond), cxdErr)
}

// holdSlots opens n connections with dsn and checks that one more is
// refused with the connection-limit error: the slots are all taken. The
// connections are closed at the end of the test at the latest.
func holdSlots(t *testing.T, dsn string, n int) []*pgx.Conn {
	t.Helper()
	ctx := context.Background()
	var conns []*pgx.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			_ = c.Close(ctx)
		}
	})
	// Connections of the nodes (none yet: the role is not used before)
	// would make some of these fail; retry until n are held.
	require.True(t, assertEventually(func() bool {
		c, err := pgx.Connect(ctx, dsn)
		if err == nil {
			conns = append(conns, c)
		}
		return len(conns) == n
	}, 20*time.Second), "could hold only %d of %d connection slots", len(conns), n)
	_, err := pgx.Connect(ctx, dsn)
	var pgErr *pgconn.PgError
	require.True(t, errors.As(err, &pgErr) && pgErr.Code == "53300", "one connection more than the limit must be refused with SQLSTATE 53300, got %v", err)
	return conns
}

// TestFaultRemovedNodeReturns makes a follower leave the cluster (it is
// removed from Raft and gossip) under load, then starts its old process
// again on its OLD data dir, same node id and addresses: first without
// --join (it finds its peers in the data dir), then, after another leave,
// with --join as an operator might; in the soak tier also after it was
// killed and removed from Raft as a dead member. It must either rejoin
// cleanly (as docs/operations.md says: it is added back) or refuse with a
// one-line error, and never disrupt the cluster: no second leader, no new
// term, no task run twice.
func TestFaultRemovedNodeReturns(t *testing.T) {
	e := newFaultEnv(t, "removed-node-returns", 3)
	// Rounds cycle through: leave then no --join, leave then --join, and
	// (from the third round: soak tier) killed and kept down until the
	// leader removed it from Raft (30 s), then no --join.
	e.rounds = faultRounds(t, 2, 3)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(15)
		leader := leaderOf(t, e.nodes)
		victim := nodesExcept(e.live(), leader)[0]
		kind := r % 3
		if kind < 2 {
			e.leave(victim)
		} else {
			e.reaped(victim, leader)
		}
		waitMembers(t, e.nodes, 2)
		e.waitProgress(15)
		before, err := leader.status()
		require.NoError(t, err)

		w := watchLeaders(t, e.nodes)
		at := time.Now()
		var how string
		switch kind {
		case 0:
			how = "left; old data dir, no --join"
			e.restartRemembered(victim)
		case 1:
			how = "left; old data dir, --join " + leader.gossip
			e.restart(victim)
		default:
			how = "killed and removed from Raft; old data dir, no --join"
			e.restartRemembered(victim)
		}
		// Either it is back and runs tasks, or it refused and exited.
		var exited bool
		require.True(t, assertEventually(func() bool {
			select {
			case <-victim.done:
				exited = true
				return true
			default:
			}
			var c int
			err := e.db.QueryRow(context.Background(), `select count(*) from async.task where node = $1 and consumed > $2`, victim.id, at).Scan(&c)
			return err == nil && c > 0
		}, 60*time.Second), "%s (%s) neither ran a task nor exited", victim.id, how)
		if exited {
			code := victim.cmd.ProcessState.ExitCode()
			victim.cmd = nil
			last := lastLogLine(t, victim)
			fmt.Printf("scenario=removed-node-returns round=%d restart=%q outcome=refused exit=%d error=%q\n", r+1, how, code, last)
			check(t, code == 1 && strings.HasPrefix(last, "asyncnode run: "),
				"%s (%s) exited with %d and no one-line error: %q", victim.id, how, code, last)
			// What an operator does after a refusal: rejoin as a new
			// member on an empty data dir.
			require.NoError(t, os.Rename(victim.dataDir, victim.dataDir+".refused"))
			e.restart(victim)
		} else {
			e.recovery = append(e.recovery, time.Since(at))
			fmt.Printf("scenario=removed-node-returns round=%d restart=%q outcome=rejoined after_ms=%d\n", r+1, how, time.Since(at).Milliseconds())
		}
		waitMembers(t, e.nodes, 3)
		e.waitProgress(10)
		samples, most, leaders := w.result()
		after, err := leader.status()
		require.NoError(t, err)
		check(t, most <= 1, "%s came back (%s): %d nodes dispatched at once", victim.id, how, most)
		check(t, len(leaders) == 1 && leaders[leader.id], "%s came back (%s): leaders seen %v, want only %s", victim.id, how, leaders, leader.id)
		check(t, after.Term == before.Term, "%s came back (%s): the term moved from %d to %d (an election)", victim.id, how, before.Term, after.Term)
		t.Logf("round %d: %d status samples, leader %s, term %d", r+1, samples, leader.id, after.Term)
	}
	e.finish()
}

// leave makes n leave the cluster with `asyncnode leave` and waits for its
// process to exit.
func (e *faultEnv) leave(n *node) {
	e.t.Helper()
	out, errOut, code := runCLI(e.t, nil, "leave", "--http-addr", n.api)
	require.Equal(e.t, 0, code, "leave %s: %s %s", n.id, out, errOut)
	select {
	case <-n.done:
		n.cmd = nil
	case <-time.After(60 * time.Second):
		e.t.Fatalf("%s still runs after leave", n.id)
	}
}

// reaped kills n and waits until leader removed it from the Raft
// configuration (after cluster.DefaultReapDeadAfter dead in gossip).
func (e *faultEnv) reaped(n, leader *node) {
	e.t.Helper()
	n.kill()
	require.True(e.t, assertEventually(func() bool {
		rep, err := leader.status()
		if err != nil {
			return false
		}
		for _, m := range rep.Members {
			if m.ID == n.id && m.Role != cluster.RoleNone {
				return false
			}
		}
		return true
	}, 120*time.Second), "the leader never removed the dead %s from Raft", n.id)
}

// lastLogLine returns the last non-empty line of n's log.
func lastLogLine(t *testing.T, n *node) string {
	t.Helper()
	b, err := os.ReadFile(n.logPath)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return lines[len(lines)-1]
}

// sampler calls a function periodically in a goroutine until stopped.
type sampler struct {
	stopCh chan struct{}
	done   chan struct{}
}

// sample starts calling fn every period, until stop or the end of the
// test.
func sample(t *testing.T, period time.Duration, fn func()) *sampler {
	s := &sampler{stopCh: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			select {
			case <-s.stopCh:
				return
			case <-tick.C:
			}
			fn()
		}
	}()
	t.Cleanup(s.stop)
	return s
}

// stop ends the sampling and waits for the last call to return.
func (s *sampler) stop() {
	select {
	case <-s.stopCh:
	default:
		close(s.stopCh)
	}
	<-s.done
}

// leaderWatch samples every node's status until stopped: how many nodes
// dispatch at once, and which leaders the nodes name.
type leaderWatch struct {
	*sampler
	mu      sync.Mutex
	samples int
	most    int
	leaders map[string]bool
}

// watchLeaders starts a leaderWatch over nodes (those that answer at each
// sample).
func watchLeaders(t *testing.T, nodes []*node) *leaderWatch {
	w := &leaderWatch{leaders: map[string]bool{}}
	w.sampler = sample(t, 100*time.Millisecond, func() {
		dispatching := 0
		var named []string
		for _, n := range nodes {
			// Only the fixed API address is read here (n.cmd belongs to
			// the test goroutine): a stopped node does not answer.
			if rep, err := n.status(); err == nil {
				if rep.Scheduler.Dispatching {
					dispatching++
				}
				if rep.Leader != "" {
					named = append(named, rep.Leader)
				}
			}
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		w.samples++
		w.most = max(w.most, dispatching)
		for _, l := range named {
			w.leaders[l] = true
		}
	})
	return w
}

// result stops the watch and returns the samples taken, the most nodes
// seen dispatching at once and the leaders named.
func (w *leaderWatch) result() (samples, most int, leaders map[string]bool) {
	w.stop()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.samples, w.most, w.leaders
}
