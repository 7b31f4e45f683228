package main

import (
	"context"
	"fmt"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/internal/faultproxy"
	"github.com/asyncnode/asyncnode/internal/pglocal"
)

// Fault scenarios on PostgreSQL: the server database and the targets.

// pgDownFor is how long a restarted PostgreSQL stays down: the fault itself.
const pgDownFor = 2 * time.Second

// restartPG stops s in mode, keeps it down for pgDownFor, and starts it
// again; it returns when it accepts connections again.
func restartPG(t *testing.T, s *pglocal.Server, mode pglocal.StopMode) time.Time {
	t.Helper()
	require.NoError(t, s.Halt(mode))
	down := time.Now()
	hold(down, pgDownFor)
	require.NoError(t, s.Start(context.Background()))
	return time.Now()
}

// TestFaultServerPGRestart restarts the server database's PostgreSQL under
// load, with a fast shutdown, then an immediate one (crash recovery), and
// so on for more rounds. Tasks run on another server, so nothing may fail:
// outcomes are written once the server is back.
func TestFaultServerPGRestart(t *testing.T) {
	e := newFaultEnv(t, "server-pg-restart", 3)
	e.rounds = faultRounds(t, 2, 6)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(60)
		mode := []pglocal.StopMode{pglocal.Fast, pglocal.Immediate}[r%2]
		up := restartPG(t, e.server, mode)
		e.recovered(up)
	}
	e.waitProgress(60)
	e.finish()
}

// targetGone matches the errors of a task whose target server went away
// under it: the only failures a target restart explains.
var targetGone = regexp.MustCompile(`terminating connection due to administrator command|` +
	`server closed the connection unexpectedly|unexpected EOF|connection reset by peer|broken pipe|` +
	`the database system is (shutting down|starting up|in recovery mode)|connection refused|SQLSTATE 57P0[123]`)

// TestFaultTargetPGRestart restarts the target PostgreSQL under load (fast,
// then immediate): running tasks fail with the server's error, tasks
// dispatched while it is down wait for it, and the ledger holds.
func TestFaultTargetPGRestart(t *testing.T) {
	e := newFaultEnv(t, "target-pg-restart", 3)
	e.allowed["ok"] = targetGone
	e.rounds = faultRounds(t, 2, 6)
	e.startLoad()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(60)
		mode := []pglocal.StopMode{pglocal.Fast, pglocal.Immediate}[r%2]
		up := restartPG(t, e.target, mode)
		// Recovery: target back -> first run recorded on it.
		var first *time.Time
		require.True(t, assertEventually(func() bool {
			_ = e.tdb.QueryRow(context.Background(), `select min(started) from ledger where started > $1`, up).Scan(&first)
			return first != nil
		}, 60*time.Second), "nothing ran on the target after its restart")
		e.recovery = append(e.recovery, first.Sub(up))
	}
	e.waitProgress(60)
	e.finish()
}

// unreachable matches the errors of a task whose target never answers.
var unreachable = regexp.MustCompile(`(?i)timeout|timed out|deadline|unreachable|connect`)

// TestFaultTargetBlackhole adds a target whose server accepts TCP and never
// answers: its tasks must end (TIMED_OUT, or FAILED with a connection
// error) by their deadline, and the other targets' load is unaffected.
func TestFaultTargetBlackhole(t *testing.T) {
	hole, err := faultproxy.Listen("127.0.0.1:0", "")
	require.NoError(t, err)
	t.Cleanup(func() { _ = hole.Close() })
	holeDSN := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=tgt sslmode=disable", hole.Addr().Port)
	e := newFaultEnv(t, "target-blackhole", 3,
		map[string]any{"target": "hole", "connection_string": holeDSN, "max_concurrency": 2, "max_retries": 0})
	e.expect["hole"] = "unreachable"
	e.allowed["unreachable"] = unreachable
	e.rounds = faultRounds(t, 1, 3)
	e.startLoad()
	ctx := context.Background()
	for r := 0; r < e.rounds; r++ {
		e.waitProgress(40)
		at := time.Now()
		require.NoError(t, e.push(ctx, "hole", 4, faultSleep, 4*time.Second))
		require.True(t, assertEventually(func() bool {
			var n int
			err := e.db.QueryRow(ctx, `select count(*) from async.task where target = 'hole' and processed is null`).Scan(&n)
			return err == nil && n == 0
		}, 60*time.Second), "the black-holed target's tasks never ended")
		// Recovery here: push -> every black-holed task ended.
		e.recovery = append(e.recovery, time.Since(at))
	}
	e.waitProgress(40)
	rep := e.finish()
	require.Equal(t, 4*e.rounds, rep.Failed+rep.TimedOut, "only the black-holed tasks may fail or time out")
}
