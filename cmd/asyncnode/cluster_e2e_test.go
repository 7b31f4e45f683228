package main

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// startCluster starts n nodes: the first bootstraps, the others join it
// through gossip. It waits until every node is registered and one leads.
func startCluster(t *testing.T, dsn string, n int, extra ...string) []*node {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("n%d", i+1)
	}
	nodes := newNodes(t, dsn, ids, func(i int, before []*node) []string {
		if i == 0 {
			return extra
		}
		return append([]string{"--join", before[0].gossip}, extra...)
	})
	nodes[0].start()
	nodes[0].waitDispatching()
	for i := 1; i < n; i++ {
		nodes[i].start()
	}
	waitMembers(t, nodes, n)
	return nodes
}

// waitMembers waits until some live node reports want members, all alive,
// and a leader.
func waitMembers(t *testing.T, nodes []*node, want int) {
	t.Helper()
	var last string
	ok := assertEventually(func() bool {
		for _, nd := range nodes {
			if nd.cmd == nil {
				continue
			}
			rep, err := nd.status()
			if err != nil {
				last = err.Error()
				continue
			}
			alive := 0
			for _, m := range rep.Members {
				// Registered: the leader can give it tasks.
				if m.Health == "alive" && m.Registered {
					alive++
				}
			}
			last = fmt.Sprintf("%s sees %d members, %d alive and registered, leader %q", nd.id, len(rep.Members), alive, rep.Leader)
			return alive == want && rep.Leader != ""
		}
		return false
	}, 60*time.Second)
	require.True(t, ok, "cluster never reached %d live members: %s", want, last)
}

func assertEventually(cond func() bool, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return cond()
}

// leaderOf returns the node that currently leads and dispatches.
func leaderOf(t *testing.T, nodes []*node) *node {
	t.Helper()
	var found *node
	ok := assertEventually(func() bool {
		for _, nd := range nodes {
			if nd.cmd == nil {
				continue
			}
			if rep, err := nd.status(); err == nil && rep.Scheduler.Dispatching {
				found = nd
				return true
			}
		}
		return false
	}, 60*time.Second)
	require.True(t, ok, "no node leads and dispatches")
	return found
}

// checkLedger verifies every task against the ledger on the target: a
// FINISHED task ran exactly once to the end; a FAILED one only because its
// node was lost, and ran at most once; nothing else. It returns the number
// of tasks per node that ran them.
func checkLedger(t *testing.T, db *pgxpool.Pool, total int) map[string]int {
	t.Helper()
	ctx := context.Background()
	rows, err := db.Query(ctx, `select t.task_id, t.finish_status::text, coalesce(t.processing_error, ''), coalesce(t.node, ''),
		(select count(*) from ledger l where l.task_id = t.task_id and l.ended is not null)
		from async.task t order by t.task_id`)
	require.NoError(t, err)
	defer rows.Close()
	perNode := map[string]int{}
	n, lost := 0, 0
	for rows.Next() {
		var id int64
		var st, perr, nodeID string
		var runs int
		require.NoError(t, rows.Scan(&id, &st, &perr, &nodeID, &runs))
		n++
		switch st {
		case "FINISHED":
			require.Equal(t, 1, runs, "task %d FINISHED but its ledger shows %d complete runs", id, runs)
			perNode[nodeID]++
		case "FAILED":
			require.True(t, strings.Contains(perr, "was lost"), "task %d failed for another reason: %s", id, perr)
			require.LessOrEqual(t, runs, 1, "task %d ran %d times", id, runs)
			lost++
		default:
			t.Fatalf("task %d ended %s (%s)", id, st, perr)
		}
	}
	require.NoError(t, rows.Err())
	require.Equal(t, total, n)
	t.Logf("%d tasks: finished per node %v, failed as lost %d", n, perNode, lost)
	return perNode
}

// TestThreeNodesShareWorkAndSurviveLeaderKill runs a 3-node cluster of the
// built binary: work is spread over every node, the leader is killed -9
// twice under load, and afterwards every task ended exactly once (from the
// target's own ledger) and the pool limit held at every instant.
func TestThreeNodesShareWorkAndSurviveLeaderKill(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	createLedger(t, db)
	const limit = 6
	_, err := db.Exec(ctx, fmt.Sprintf(`select async.configure('{"targets":[{"target":"SELF","max_concurrency":%d}]}')`, limit))
	require.NoError(t, err)

	nodes := startCluster(t, dsn, 3, "--lost-after", "6s")
	const total = 600
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task($1, 'SELF'))) from generate_series(1, $2)`, ledgerTask("0.05"), total)
	require.NoError(t, err)

	for round := 0; round < 2; round++ {
		var done int
		require.Eventually(t, func() bool {
			_ = db.QueryRow(ctx, "select count(*) from async.task where processed is not null").Scan(&done)
			return done >= (round+1)*150
		}, 90*time.Second, 20*time.Millisecond)
		old := leaderOf(t, nodes)
		old.kill()
		// Another node takes over and dispatches.
		next := leaderOf(t, nodes)
		require.NotEqual(t, old.id, next.id)
		old.extra = append(old.extra, "--join", next.gossip)
		old.start()
		waitMembers(t, nodes, 3)
	}
	waitAllDone(t, db, 180*time.Second)

	perNode := checkLedger(t, db, total)
	ran := 0
	for _, c := range perNode {
		if c > 0 {
			ran++
		}
	}
	require.GreaterOrEqual(t, ran, 2, "work was not spread over the nodes: %v", perNode)
	over := maxOverlap(t, db)
	require.LessOrEqual(t, over, limit, "pool limit exceeded on the target")
	require.Equal(t, limit, over, "pool limit never reached")
}

// TestFollowerKillAndGracefulLeave kills a follower under load (its tasks
// are resolved, the rest run elsewhere) and lets another node leave
// gracefully.
func TestFollowerKillAndGracefulLeave(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	createLedger(t, db)
	const limit = 6
	_, err := db.Exec(ctx, fmt.Sprintf(`select async.configure('{"targets":[{"target":"SELF","max_concurrency":%d}]}')`, limit))
	require.NoError(t, err)
	nodes := startCluster(t, dsn, 3, "--lost-after", "6s")
	const total = 300
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task($1, 'SELF'))) from generate_series(1, $2)`, ledgerTask("0.05"), total)
	require.NoError(t, err)

	var victim *node
	leader := leaderOf(t, nodes)
	for _, nd := range nodes {
		if nd != leader {
			victim = nd
			break
		}
	}
	// Wait until the victim runs something, then kill it.
	require.Eventually(t, func() bool {
		var n int
		_ = db.QueryRow(ctx, "select count(*) from async.task where node = $1 and processed is null and started is not null", victim.id).Scan(&n)
		return n > 0
	}, 60*time.Second, 10*time.Millisecond)
	victim.kill()
	waitAllDone(t, db, 180*time.Second)
	checkLedger(t, db, total)
	require.LessOrEqual(t, maxOverlap(t, db), limit)

	// The killed node comes back from its data dir, and is asked to rejoin
	// gossip with `asyncnode join`.
	victim.start()
	require.Eventually(t, func() bool { _, err := victim.status(); return err == nil }, 30*time.Second, 50*time.Millisecond)
	out, errOut, code := runCLI(t, nil, "join", "--http-addr", victim.api, leader.gossip)
	require.Equal(t, 0, code, "join: %s %s", out, errOut)
	waitMembers(t, nodes, 3)

	// The third node leaves gracefully: the command returns, the process
	// exits, and the others see two members.
	var leaver *node
	for _, nd := range nodes {
		if nd != leader && nd != victim {
			leaver = nd
		}
	}
	out, errOut, code = runCLI(t, nil, "leave", "--http-addr", leaver.api)
	require.Equal(t, 0, code, "leave: %s %s", out, errOut)
	select {
	case <-leaver.done:
		leaver.cmd = nil
	case <-time.After(60 * time.Second):
		t.Fatalf("%s still runs after leave", leaver.id)
	}
	// The remaining leader still dispatches.
	_, err = db.Exec(ctx, "select async.push_tasks(array[async.task('select 0', 'SELF')])")
	require.NoError(t, err)
	waitAllDone(t, db, 60*time.Second)
}

// signal sends sig to the node's process.
func (n *node) signal(sig syscall.Signal) {
	n.t.Helper()
	require.NotNil(n.t, n.cmd, "%s is not running", n.id)
	require.NoError(n.t, n.cmd.Process.Signal(sig))
}

// TestLeaseStopsTasksWithoutQuorum freezes both followers (SIGSTOP): the
// leader loses its quorum, and once its lease runs out it stops its running
// queries on the target and records them lost: re-queued, since they allow
// a retry. When the followers resume, the cluster runs them again.
func TestLeaseStopsTasksWithoutQuorum(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `create table runs(task_id bigint, n int)`)
	require.NoError(t, err)
	_, err = db.Exec(ctx, `select async.configure($1::jsonb)`, fmt.Sprintf(
		`{"targets":[{"target":"again","connection_string":%q,"max_concurrency":9,"max_retries":1}]}`, dsn))
	require.NoError(t, err)
	nodes := startCluster(t, dsn, 3, "--lost-after", "4s", "--lease", "2s")
	leader := leaderOf(t, nodes)

	// The first run of each task sleeps long; the re-run is quick. Runs are
	// counted outside the task's transaction by a second statement that
	// commits on its own (the task is one transaction, so count first).
	_, err = db.Exec(ctx, `create function run_once(id bigint) returns void language plpgsql as $$
	begin
	  if exists (select 1 from runs where task_id = id) then return; end if;
	  perform pg_sleep(60);
	end $$`)
	require.NoError(t, err)
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task('select run_once(##flow.TASK_ID##)', 'again'))) from generate_series(1, 9)`)
	require.NoError(t, err)
	// Wait until all nine sleep (past run_once's check: a query that is
	// merely active may not have read "runs" yet and would see the marks
	// below), then mark the leader's so that their re-run is quick.
	require.Eventually(t, func() bool {
		var active int
		_ = db.QueryRow(ctx, `select count(*) from pg_stat_activity where application_name like 'asyncnode/%' and query like 'select run_once%'
			and wait_event = 'PgSleep'`).Scan(&active)
		return active == 9
	}, 60*time.Second, 20*time.Millisecond, "the nine tasks never ran at once")
	tag, err := db.Exec(ctx, `insert into runs select task_id, 1 from async.task where node = $1 and processed is null`, leader.id)
	require.NoError(t, err)
	onLeader := int(tag.RowsAffected())
	require.Positive(t, onLeader, "the leader runs none of the tasks")

	followers := nodesExcept(nodes, leader)
	for _, f := range followers {
		f.signal(syscall.SIGSTOP)
	}
	t.Cleanup(func() {
		for _, f := range followers {
			if f.cmd != nil {
				_ = f.cmd.Process.Signal(syscall.SIGCONT)
			}
		}
	})
	frozeAt := time.Now()
	// The leader's queries stop on the target and its tasks are re-queued.
	require.Eventually(t, func() bool {
		var active, requeued int
		_ = db.QueryRow(ctx, `select count(*) from pg_stat_activity where application_name like $1 and query like 'select run_once%'`,
			"asyncnode/"+leader.id+"/%").Scan(&active)
		_ = db.QueryRow(ctx, `select count(*) from async.task t join runs r using (task_id) where t.consumed is null and t.retries = 1`).Scan(&requeued)
		return active == 0 && requeued == onLeader
	}, 30*time.Second, 50*time.Millisecond, "the cut-off leader did not give up its %d tasks", onLeader)
	stoppedAfter := time.Since(frozeAt)
	t.Logf("the leader without quorum stopped its %d tasks %s after the followers froze", onLeader, stoppedAfter.Round(time.Millisecond))
	require.GreaterOrEqual(t, stoppedAfter, 2*time.Second, "tasks stopped before the lease ran out")

	for _, f := range followers {
		f.signal(syscall.SIGCONT)
	}
	// The followers' own tasks were out of contact too; the leader's re-queued
	// ones run again quickly. Everything ends; nothing fails for other reasons.
	_, err = db.Exec(ctx, `insert into runs select task_id, 1 from async.task where processed is null on conflict do nothing`)
	require.NoError(t, err)
	waitAllDone(t, db, 120*time.Second)
	rows, err := db.Query(ctx, `select task_id, finish_status::text, coalesce(processing_error, '') from async.task`)
	require.NoError(t, err)
	defer rows.Close()
	for rows.Next() {
		var id int64
		var st, perr string
		require.NoError(t, rows.Scan(&id, &st, &perr))
		require.True(t, st == "FINISHED" || strings.Contains(perr, "was lost"), "task %d: %s %s", id, st, perr)
	}
	require.NoError(t, rows.Err())
}

// TestNonVoterRunsTasks starts four nodes with three voters: the node that
// joins last becomes a non-voter, shows as such in status, and runs tasks.
func TestNonVoterRunsTasks(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `select async.configure('{"targets":[{"target":"SELF","max_concurrency":8}]}')`)
	require.NoError(t, err)
	nodes := startCluster(t, dsn, 4, "--voters", "3")
	// Three voters (the first to join) and one non-voter.
	var nonvoter string
	var roles map[string]string
	require.Eventually(t, func() bool {
		rep, err := nodes[3].status()
		if err != nil {
			return false
		}
		roles = map[string]string{}
		count := map[string]int{}
		for _, m := range rep.Members {
			roles[m.ID] = string(m.Role)
			count[string(m.Role)]++
			if m.Role == "nonvoter" {
				nonvoter = m.ID
			}
		}
		return count["leader"] == 1 && count["voter"] == 2 && count["nonvoter"] == 1
	}, 30*time.Second, 50*time.Millisecond, "roles: %v", roles)
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task('select pg_sleep(0.05)', 'SELF'))) from generate_series(1, 200)`)
	require.NoError(t, err)
	waitAllDone(t, db, 120*time.Second)
	var onNV, finished int
	require.NoError(t, db.QueryRow(ctx, `select count(*) filter (where node = $1), count(*) filter (where finish_status = 'FINISHED') from async.task`, nonvoter).Scan(&onNV, &finished))
	require.Equal(t, 200, finished)
	require.Positive(t, onNV, "the non-voter %s ran no task", nonvoter)
	out, _, code := runCLI(t, nil, "status", "--http-addr", nodes[0].api)
	require.Equal(t, 0, code)
	require.Regexp(t, `(?m)^`+nonvoter+`\s+nonvoter\s+alive`, out)
}

// TestFrozenNodeIsFencedOnTheTarget freezes a follower (SIGSTOP) while it
// runs tasks: the leader declares it lost, ends its sessions on the target,
// and only then re-runs its tasks elsewhere; at no instant do two runs of
// one task overlap on the target. When the node resumes it writes nothing
// for the attempts it lost.
func TestFrozenNodeIsFencedOnTheTarget(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `create table runs(task_id bigint primary key)`)
	require.NoError(t, err)
	// The first run sleeps a minute; a re-run sleeps two seconds, long
	// enough that an overlap with a still-running first run is seen.
	_, err = db.Exec(ctx, `create function run_once(id bigint) returns void language plpgsql as $$
	begin
	  if exists (select 1 from runs where task_id = id) then perform pg_sleep(2); return; end if;
	  perform pg_sleep(60);
	end $$`)
	require.NoError(t, err)
	_, err = db.Exec(ctx, `select async.configure($1::jsonb)`, fmt.Sprintf(
		`{"targets":[{"target":"again","connection_string":%q,"max_concurrency":9,"max_retries":1}]}`, dsn))
	require.NoError(t, err)
	nodes := startCluster(t, dsn, 3, "--lost-after", "3s")
	leader := leaderOf(t, nodes)
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task('select run_once(##flow.TASK_ID##)', 'again'))) from generate_series(1, 6)`)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		var active int
		_ = db.QueryRow(ctx, `select count(*) from pg_stat_activity where application_name like 'asyncnode/%' and query like 'select run_once%'`).Scan(&active)
		return active == 6
	}, 60*time.Second, 20*time.Millisecond, "the six tasks never ran at once")
	var victim *node
	var victimTasks int
	for _, nd := range nodesExcept(nodes, leader) {
		_ = db.QueryRow(ctx, `select count(*) from async.task where node = $1 and processed is null`, nd.id).Scan(&victimTasks)
		if victimTasks > 0 {
			victim = nd
			break
		}
	}
	require.NotNil(t, victim, "no follower runs a task")
	_, err = db.Exec(ctx, `insert into runs select task_id from async.task where node = $1 and processed is null`, victim.id)
	require.NoError(t, err)
	victim.signal(syscall.SIGSTOP)
	t.Cleanup(func() {
		if victim.cmd != nil {
			_ = victim.cmd.Process.Signal(syscall.SIGCONT)
		}
	})

	// Watch the target until the victim's tasks were re-run and finished.
	overlaps := 0
	deadline := time.Now().Add(90 * time.Second)
	for {
		var dup int
		require.NoError(t, db.QueryRow(ctx, `select count(*) from (select query from pg_stat_activity
			where application_name like 'asyncnode/%' and query like 'select run_once%' and state = 'active'
			group by query having count(*) > 1) d`).Scan(&dup))
		overlaps += dup
		var rerun int
		require.NoError(t, db.QueryRow(ctx, `select count(*) from async.task t join runs r using (task_id)
			where t.finish_status = 'FINISHED' and t.retries = 1`).Scan(&rerun))
		if rerun == victimTasks {
			break
		}
		require.True(t, time.Now().Before(deadline), "the frozen node's %d tasks were not re-run (%d so far)", victimTasks, rerun)
		time.Sleep(20 * time.Millisecond)
	}
	require.Zero(t, overlaps, "two runs of one task overlapped on the target")
	var left int
	require.NoError(t, db.QueryRow(ctx, `select count(*) from pg_stat_activity where application_name like $1`,
		"asyncnode/"+victim.id+"/%").Scan(&left))
	require.Zero(t, left, "the frozen node's sessions are gone from the target")

	// It resumes: nothing it writes changes the re-run tasks.
	victim.signal(syscall.SIGCONT)
	var before string
	require.NoError(t, db.QueryRow(ctx, `select string_agg(task_id || ':' || attempt || ':' || finish_status, ',' order by task_id) from async.task t join runs using (task_id)`).Scan(&before))
	require.Eventually(t, func() bool { _, err := victim.status(); return err == nil }, 30*time.Second, 50*time.Millisecond,
		"the resumed node does not answer")
	var after string
	require.NoError(t, db.QueryRow(ctx, `select string_agg(task_id || ':' || attempt || ':' || finish_status, ',' order by task_id) from async.task t join runs using (task_id)`).Scan(&after))
	require.Equal(t, before, after)
}

// TestFollowersStartAssignmentsWithoutWaitingForRaft: the leader pushes
// committed assignments to followers, so a follower starts its tasks at
// once instead of when Raft next tells it the commit index. With a 5 s
// commit timeout and an otherwise idle cluster, a follower that waited for
// Raft would start its tasks only when the leader's own tasks end (their
// releases are the next entries), 1 s later.
func TestFollowersStartAssignmentsWithoutWaitingForRaft(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `select async.configure('{"targets":[{"target":"SELF","max_concurrency":9}]}')`)
	require.NoError(t, err)
	nodes := startCluster(t, dsn, 3, "--raft-commit-timeout", "5s")
	leader := leaderOf(t, nodes)
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task('select pg_sleep(1)', 'SELF'))) from generate_series(1, 9)`)
	require.NoError(t, err)
	waitAllDone(t, db, 60*time.Second)
	rows, err := db.Query(ctx, `select node, count(*), max(extract(epoch from started - consumed))::float8
		from async.task where finish_status = 'FINISHED' group by node order by node`)
	require.NoError(t, err)
	followers, total := 0, 0
	for rows.Next() {
		var node string
		var n int
		var wait float64
		require.NoError(t, rows.Scan(&node, &n, &wait))
		total += n
		t.Logf("%s ran %d tasks; longest claim-to-start %.3f s", node, n, wait)
		if node == leader.id {
			continue
		}
		followers += n
		require.Less(t, wait, 0.5, "follower %s waited %.3f s to start a task it was assigned", node, wait)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, 9, total, "not every task FINISHED")
	require.Positive(t, followers, "no task ran on a follower")
}

// TestTargetConnsCapsTaskSessions: --target-conns caps the sessions a node
// opens to one target; its tasks beyond the cap wait for a connection and
// still run.
func TestTargetConnsCapsTaskSessions(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `select async.configure('{"targets":[{"target":"SELF","max_concurrency":6}]}')`)
	require.NoError(t, err)
	startCluster(t, dsn, 1, "--target-conns", "2")
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task('select pg_sleep(0.3)', 'SELF'))) from generate_series(1, 6)`)
	require.NoError(t, err)
	peak := 0
	deadline := time.Now().Add(60 * time.Second)
	for {
		var sessions, left int
		require.NoError(t, db.QueryRow(ctx, `select count(*) from pg_stat_activity
			where application_name like 'asyncnode/%' and backend_type = 'client backend' and query like 'select pg_sleep%'`).Scan(&sessions))
		peak = max(peak, sessions)
		require.NoError(t, db.QueryRow(ctx, `select count(*) from async.task where processed is null`).Scan(&left))
		if left == 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "%d tasks still unfinished", left)
		time.Sleep(20 * time.Millisecond)
	}
	require.Equal(t, 2, peak, "task sessions on the target at once")
	var finished int
	require.NoError(t, db.QueryRow(ctx, `select count(*) from async.task where finish_status = 'FINISHED'`).Scan(&finished))
	require.Equal(t, 6, finished)
}

// TestTargetShortConnsBoundsSessionsOfShortTasks: --target-short-conns
// and --target-long-after reach the executor: 60 trivial tasks, 6 allowed
// at once, run on one session when one is allowed for short tasks.
func TestTargetShortConnsBoundsSessionsOfShortTasks(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `create table short_runs(pid int);
		select async.configure('{"targets":[{"target":"SELF","max_concurrency":6}]}')`)
	require.NoError(t, err)
	// A long --target-long-after: no insert counts as long on a slow CI.
	startCluster(t, dsn, 1, "--target-short-conns", "1", "--target-long-after", "10s")
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task('insert into short_runs values (pg_backend_pid())', 'SELF'))) from generate_series(1, 60)`)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		var left int
		require.NoError(t, db.QueryRow(ctx, `select count(*) from async.task where processed is null`).Scan(&left))
		return left == 0
	}, 60*time.Second, 20*time.Millisecond, "tasks still unfinished")
	var finished, sessions int
	require.NoError(t, db.QueryRow(ctx, `select count(*) filter (where finish_status = 'FINISHED'),
		(select count(distinct pid) from short_runs) from async.task`).Scan(&finished, &sessions))
	require.Equal(t, 60, finished)
	require.Equal(t, 1, sessions, "sessions that ran the short tasks")
}
