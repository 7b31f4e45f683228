package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// TestFailoverFigures kills the leader of a 3-node cluster of the built
// binary with SIGKILL, round after round, while tasks are queued and
// running. It asserts that no task is lost or run twice and that the pool
// limit holds, and prints the figures of every round and a summary line:
// election time (kill → a surviving node reports a new leader) and kill →
// first task dispatched by the new leader. ASYNCNODE_FAILOVER_ROUNDS sets
// the number of rounds (default 3; `make failover` runs 10 without -race).
func TestFailoverFigures(t *testing.T) {
	rounds := 3
	if v := os.Getenv("ASYNCNODE_FAILOVER_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "ASYNCNODE_FAILOVER_ROUNDS")
		require.Positive(t, n, "ASYNCNODE_FAILOVER_ROUNDS")
		rounds = n
	}
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	createLedger(t, db)
	const limit = 8
	_, err := db.Exec(ctx, fmt.Sprintf(`select async.configure('{"targets":[{"target":"SELF","max_concurrency":%d}]}')`, limit))
	require.NoError(t, err)
	nodes := startCluster(t, dsn, 3, "--lost-after", "6s")

	perRound := 300
	total := rounds * perRound
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task($1, 'SELF'))) from generate_series(1, $2)`, ledgerTask("0.02"), total)
	require.NoError(t, err)

	var elections, dispatches []time.Duration
	for round := 1; round <= rounds; round++ {
		// Kill while the queue still holds work.
		require.Eventually(t, func() bool {
			var done int
			_ = db.QueryRow(ctx, "select count(*) from async.task where processed is not null").Scan(&done)
			return done >= (round-1)*perRound+perRound/3
		}, 120*time.Second, 10*time.Millisecond)
		old := leaderOf(t, nodes)
		oldRep, err := old.status()
		require.NoError(t, err)
		killAt := time.Now()
		old.kill()
		var elected time.Duration
		require.True(t, assertEventually(func() bool {
			for _, nd := range nodes {
				if nd.cmd == nil {
					continue
				}
				if rep, err := nd.status(); err == nil && rep.Leader != "" && rep.Leader != old.id && rep.Term > oldRep.Term {
					elected = time.Since(killAt)
					return true
				}
			}
			return false
		}, 60*time.Second), "round %d: no new leader", round)
		var first *time.Time
		require.True(t, assertEventually(func() bool {
			_ = db.QueryRow(ctx, "select min(consumed) from async.task where consumed > $1", killAt).Scan(&first)
			return first != nil
		}, 60*time.Second), "round %d: the new leader never dispatched", round)
		dispatched := first.Sub(killAt)
		elections = append(elections, elected)
		dispatches = append(dispatches, dispatched)
		fmt.Printf("failover round=%d killed=%s election_ms=%d kill_to_dispatch_ms=%d\n",
			round, old.id, elected.Milliseconds(), dispatched.Milliseconds())
		old.extra = append(old.extra, "--join", nodesExcept(nodes, old)[0].gossip)
		old.start()
		waitMembers(t, nodes, 3)
	}
	waitAllDone(t, db, 300*time.Second)

	lost, dup, failedLost := ledgerCounts(t, db)
	violations := limitViolations(t, db, limit)
	fmt.Printf("failover rounds=%d tasks=%d lost=%d dup=%d limit_violations=%d failed_as_lost=%d election_p50_ms=%d election_max_ms=%d dispatch_p50_ms=%d dispatch_max_ms=%d\n",
		rounds, total, lost, dup, violations, failedLost, p50(elections).Milliseconds(), slices.Max(elections).Milliseconds(),
		p50(dispatches).Milliseconds(), slices.Max(dispatches).Milliseconds())
	require.Zero(t, lost, "tasks lost")
	require.Zero(t, dup, "tasks run twice")
	require.Zero(t, violations, "pool limit exceeded")
	checkLedger(t, db, total)
}

func nodesExcept(nodes []*node, skip *node) []*node {
	var out []*node
	for _, n := range nodes {
		if n != skip {
			out = append(out, n)
		}
	}
	return out
}

func p50(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// ledgerCounts counts, from the task log and the target's ledger: tasks not
// in a terminal state, tasks with more than one complete run, and tasks
// that ended FAILED because their node was lost.
func ledgerCounts(t *testing.T, db *pgxpool.Pool) (lost, dup, failedLost int) {
	t.Helper()
	require.NoError(t, db.QueryRow(context.Background(), `select
		count(*) filter (where t.processed is null),
		count(*) filter (where (select count(*) from ledger l where l.task_id = t.task_id and l.ended is not null) > 1),
		count(*) filter (where t.finish_status = 'FAILED' and t.processing_error like '%was lost%')
		from async.task t`).Scan(&lost, &dup, &failedLost))
	return lost, dup, failedLost
}

// limitViolations counts the ledger starts at which more runs than limit
// were running at once on the target.
func limitViolations(t *testing.T, db *pgxpool.Pool, limit int) int {
	_, bad := overlap(t, db, limit)
	return bad
}
