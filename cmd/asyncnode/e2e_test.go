package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestBadFlagsExitTwoWithOneLine(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"nosuch"}, "unknown command"},
		{[]string{"run", "--data-dir", "/tmp/x"}, "--node-id is required"},
		{[]string{"run", "--node-id", "a b", "--data-dir", "/tmp/x"}, "--node-id"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--http-addr", "nope"}, "--http-addr"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--voters", "0"}, "--voters"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--gossip-key", "!!"}, "--gossip-key"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--tls-cert", "c"}, "--tls-cert"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--lost-after", "-1s"}, "--lost-after"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--lost-after", "800ms"}, "--lease"},
		{[]string{"bench", "--tasks", "0"}, "--tasks"},
		{[]string{"bench", "--rounds", "0"}, "--rounds"},
		{[]string{"bench", "--rounds", "21"}, "--rounds"},
		{[]string{"bench", "--profile-seconds", "5"}, "--profile-seconds"},
		{[]string{"bench", "--profile-dir", "/dev/null/profiles"}, "--profile-dir"},
		{[]string{"bench", "--soak", "50ms"}, "--soak"},
		{[]string{"bench", "--socket", "--bench-dsn", "host=127.0.0.1 dbname=x"}, "give the socket directory as its host"},
		{[]string{"bench", "--node-flag", "target-short-conns=0"}, "--target-short-conns must be between 1 and"},
		{[]string{"bench", "--node-flag", "http-addr=127.0.0.1:1"}, "bench sets --http-addr"},
		{[]string{"bench", "--node-flag", "tls-cert=/c.pem,tls-key=/k.pem,tls-ca=/ca.pem"}, "cannot run them with --tls-cert"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--raft-commit-timeout", "0s"}, "--raft-commit-timeout"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--raft-commit-timeout", "20s"}, "--raft-commit-timeout"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--lost-after", "2s", "--lease", "3s"}, "--lease"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--log-level", "loud"}, "--log-level"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--target-conns", "0"}, "--target-conns"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--target-conns", "20000"}, "--target-conns"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--target-short-conns", "0"}, "--target-short-conns"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--target-short-conns", "-3"}, "--target-short-conns"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--target-long-after", "0s"}, "--target-long-after"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--target-long-after", "2h"}, "--target-long-after"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--gc-headroom-mib", "-1"}, "--gc-headroom-mib"},
		{[]string{"run", "--node-id", "a", "--data-dir", "/tmp/x", "--gc-headroom-mib", "65537"}, "--gc-headroom-mib"},
		{[]string{"run", "--bogus"}, "bogus"},
		{[]string{"dev", "--nodes", "0"}, "--nodes"},
		{[]string{"join", "--http-addr", "127.0.0.1:1"}, "gossip address"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			_, stderr, code := runCLI(t, nil, c.args...)
			require.Equal(t, 2, code, "stderr: %s", stderr)
			require.Contains(t, stderr, c.want)
			require.Equal(t, 1, strings.Count(strings.TrimSpace(stderr), "\n")+1, "one line expected, got %q", stderr)
		})
	}
	// Env vars are read, and a bad one is refused the same way.
	_, stderr, code := runCLI(t, []string{"ASYNCNODE_VOTERS=x"}, "run", "--node-id", "a", "--data-dir", "/tmp/x")
	require.Equal(t, 2, code)
	require.Contains(t, stderr, "ASYNCNODE_VOTERS")
	// --help prints the command's help once and exits 0.
	for _, cmd := range []string{"run", "status", "bench", "leave"} {
		out, _, code := runCLI(t, nil, cmd, "--help")
		require.Equal(t, 0, code)
		require.Equal(t, 1, strings.Count(out, "Flags:"), "%s --help:\n%s", cmd, out)
	}
}

func TestInitIsIdempotentAndMasksPasswords(t *testing.T) {
	dsn := newDB(t)
	out, errOut, code := runCLI(t, nil, "init", "--dsn", dsn)
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "applied migrations")
	db := pool(t, dsn)
	var before int
	require.NoError(t, db.QueryRow(context.Background(), "select count(*) from async.schema_migrations").Scan(&before))
	out, errOut, code = runCLI(t, nil, "init", "--dsn", dsn)
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "up to date")
	var after int
	require.NoError(t, db.QueryRow(context.Background(), "select count(*) from async.schema_migrations").Scan(&after))
	require.Equal(t, before, after)

	// A DSN with a password that cannot connect: the error never shows it.
	bad := fmt.Sprintf("host=127.0.0.1 port=%d user=nobody password=canary-s3cret dbname=x connect_timeout=2", testPG.Port())
	_, errOut, code = runCLI(t, nil, "init", "--dsn", bad)
	require.Equal(t, 1, code)
	require.NotContains(t, errOut, "canary-s3cret")
	// PG* variables are honoured when --dsn is absent.
	_, errOut, code = runCLI(t, []string{"PGHOST=127.0.0.1", fmt.Sprintf("PGPORT=%d", testPG.Port()), "PGUSER=postgres", "PGDATABASE=" + dbName(dsn)}, "init")
	require.Equal(t, 0, code, errOut)
}

func dbName(dsn string) string {
	for _, f := range strings.Fields(dsn) {
		if strings.HasPrefix(f, "dbname=") {
			return strings.TrimPrefix(f, "dbname=")
		}
	}
	return ""
}

func TestSingleNodeRunsReadmeExamples(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	n := newNode(t, dsn, "n1", "--voters", "1")
	n.start()
	n.waitDispatching()
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, "SELECT async.push_tasks(array[async.task('select 0', 'SELF')]);")
	require.NoError(t, err)
	// pgasync's README example verbatim is rejected by PostgreSQL itself
	// (its sub-select has no column "t"); with the alias it was meant to
	// have it pushes 1000 tasks.
	_, err = db.Exec(ctx, `SELECT async.push_tasks(array_agg(t))
FROM
(
SELECT async.task('select 0', 'SELF')
FROM generate_series(1,1000)
) q;`)
	require.ErrorContains(t, err, `column "t" does not exist`)
	_, err = db.Exec(ctx, `SELECT async.push_tasks(array_agg(t))
FROM
(
SELECT async.task('select 0', 'SELF') t
FROM generate_series(1,1000)
) q;`)
	require.NoError(t, err)
	waitAllDone(t, db, 60*time.Second)
	var total, finished int
	require.NoError(t, db.QueryRow(ctx, `select count(*), count(*) filter (where finish_status = 'FINISHED' and not failed and consumed is not null and processed >= consumed) from async.task`).Scan(&total, &finished))
	require.Equal(t, 1001, total)
	require.Equal(t, 1001, finished)

	// status, text and JSON, from the CLI.
	out, errOut, code := runCLI(t, nil, "status", "--http-addr", n.api)
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "leader n1")
	require.Contains(t, out, "SELF")
	out, _, code = runCLI(t, nil, "status", "--http-addr", n.api, "--json")
	require.Equal(t, 0, code)
	require.Contains(t, out, `"leader": "n1"`)

	// A failing task ends FAILED with the server's error text.
	var id int64
	require.NoError(t, db.QueryRow(ctx, "select async.push_task(async.task('select 1/0', 'SELF'))").Scan(&id))
	waitAllDone(t, db, 30*time.Second)
	var status, perr string
	require.NoError(t, db.QueryRow(ctx, "select finish_status::text, processing_error from async.task where task_id=$1", id).Scan(&status, &perr))
	require.Equal(t, "FAILED", status)
	require.Contains(t, perr, "division by zero")

	// The only server cannot leave; it says so and keeps working.
	out, errOut, code = runCLI(t, nil, "leave", "--http-addr", n.api)
	require.Equal(t, 1, code, "%s %s", out, errOut)
	require.Contains(t, errOut, "only server of the cluster")
	require.NoError(t, db.QueryRow(ctx, "select async.push_task(async.task('select 0', 'SELF'))").Scan(&id))
	waitAllDone(t, db, 30*time.Second)

	// Graceful stop.
	n.stop()
}

// ledgerTask is a task body that records its run in a ledger table on the
// target: start and end timestamps come from the target's clock, in the
// task's own transaction.
func ledgerTask(sleep string) string {
	return fmt.Sprintf(`insert into ledger(task_id, started) values (##flow.TASK_ID##, clock_timestamp());
select pg_sleep(%s);
update ledger set ended = clock_timestamp() where task_id = ##flow.TASK_ID## and ended is null`, sleep)
}

func createLedger(t *testing.T, db *pgxpool.Pool) {
	_, err := db.Exec(context.Background(), `create table ledger(id bigserial primary key, task_id bigint not null, started timestamptz not null, ended timestamptz)`)
	require.NoError(t, err)
}

// maxOverlap computes the most runs of the ledger that overlapped in time.
func maxOverlap(t *testing.T, db *pgxpool.Pool) int {
	best, _ := overlap(t, db, 0)
	return best
}

// overlap replays the ledger's start/end events: it returns the most runs
// at once and how many starts took the count above limit.
func overlap(t *testing.T, db *pgxpool.Pool, limit int) (best, over int) {
	t.Helper()
	rows, err := db.Query(context.Background(), "select started, coalesce(ended, started) from ledger")
	require.NoError(t, err)
	var evs []runEvent
	for rows.Next() {
		var s, e time.Time
		require.NoError(t, rows.Scan(&s, &e))
		evs = append(evs, runEvent{s, 1}, runEvent{e, -1})
	}
	require.NoError(t, rows.Err())
	best, over = 0, 0
	replayRuns(evs, func(e runEvent, cur int) {
		best = max(best, cur)
		if e.delta > 0 && cur > limit {
			over++
		}
	})
	return best, over
}

// runEvent is the start (+1) or end (-1) of one run of a task.
type runEvent struct {
	at    time.Time
	delta int
}

// replayRuns sorts evs by time, ends before starts at the same instant, and
// calls step with each event and the number of runs at once after it.
func replayRuns(evs []runEvent, step func(e runEvent, cur int)) {
	sort.Slice(evs, func(i, j int) bool {
		if !evs[i].at.Equal(evs[j].at) {
			return evs[i].at.Before(evs[j].at)
		}
		return evs[i].delta < evs[j].delta
	})
	cur := 0
	for _, e := range evs {
		cur += e.delta
		step(e, cur)
	}
}

func TestKill9AndRestartLosesNothing(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	createLedger(t, db)
	_, err := db.Exec(ctx, `select async.configure('{"targets":[{"target":"SELF","max_concurrency":4}]}')`)
	require.NoError(t, err)
	const total = 300
	_, err = db.Exec(ctx, `select async.push_tasks(array_agg(async.task($1, 'SELF'))) from generate_series(1, $2)`, ledgerTask("0.02"), total)
	require.NoError(t, err)

	n := newNode(t, dsn, "n1", "--voters", "1")
	n.start()
	// Kill -9 while tasks run, twice.
	for round := 0; round < 2; round++ {
		var done int
		require.Eventually(t, func() bool {
			_ = db.QueryRow(ctx, "select count(*) from async.task where processed is not null").Scan(&done)
			return done >= (round+1)*60
		}, 60*time.Second, 20*time.Millisecond)
		n.kill()
		n.start()
	}
	waitAllDone(t, db, 120*time.Second)

	rows, err := db.Query(ctx, `select t.task_id, t.finish_status::text, coalesce(t.processing_error, ''), (select count(*) from ledger l where l.task_id = t.task_id and l.ended is not null)
		from async.task t order by t.task_id`)
	require.NoError(t, err)
	var finished, lostFailed int
	for rows.Next() {
		var id int64
		var st, perr string
		var runs int
		require.NoError(t, rows.Scan(&id, &st, &perr, &runs))
		switch st {
		case "FINISHED":
			finished++
			require.Equal(t, 1, runs, "task %d FINISHED but ran %d times", id, runs)
		case "FAILED":
			lostFailed++
			require.Contains(t, perr, "node n1 was lost", "task %d failed for another reason: %s", id, perr)
			require.LessOrEqual(t, runs, 1, "task %d ran %d times", id, runs)
		default:
			t.Fatalf("task %d ended %s (%s)", id, st, perr)
		}
	}
	require.NoError(t, rows.Err())
	require.Equal(t, total, finished+lostFailed)
	require.LessOrEqual(t, lostFailed, 8, "only tasks running at a kill (≤4 per kill) may be failed as lost")
	over := maxOverlap(t, db)
	require.LessOrEqual(t, over, 4, "pool limit exceeded")
	require.Equal(t, 4, over, "the pool limit should be reached")
}

func TestSecondClusterOnSameDatabaseDoesNotDispatch(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	a := newNode(t, dsn, "a1", "--voters", "1")
	a.start()
	a.waitDispatching()
	b := newNode(t, dsn, "b1", "--voters", "1")
	b.start()
	var last string
	ok := assert.Eventually(t, func() bool {
		rep, err := b.status()
		if err != nil {
			last = err.Error()
			return false
		}
		raw, _ := json.Marshal(rep)
		last = string(raw)
		return rep.Scheduler.Leading && !rep.Scheduler.Dispatching &&
			strings.Contains(rep.Scheduler.Reason, "advisory lock")
	}, 30*time.Second, 100*time.Millisecond)
	require.True(t, ok, "second cluster must say why it does not dispatch; last status: %s", last)
	// The first cluster still runs tasks.
	db := pool(t, dsn)
	_, err := db.Exec(context.Background(), "SELECT async.push_tasks(array[async.task('select 0', 'SELF')])")
	require.NoError(t, err)
	waitAllDone(t, db, 30*time.Second)
	// When the first stops, the second takes over.
	a.stop()
	b.waitDispatching()
}
