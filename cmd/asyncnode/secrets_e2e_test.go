package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestCanaryPasswordsNeverShow gives the node a server DSN and a target a
// connection string that both carry a canary password, makes the target
// fail, and checks that neither canary appears in the task's error, the
// node's log (debug level), or status (text and JSON).
func TestCanaryPasswordsNeverShow(t *testing.T) {
	const nodeCanary, targetCanary = "canary-node-Pw1", "canary-target-Pw2"
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	closed := freeAddr(t) // nothing listens there
	host, port, _ := strings.Cut(closed, ":")
	_, err := db.Exec(ctx, `select async.configure($1::jsonb)`, fmt.Sprintf(
		`{"targets":[{"target":"gone","connection_string":"host=%s port=%s user=u password=%s dbname=x connect_timeout=1"}]}`,
		host, port, targetCanary))
	require.NoError(t, err)
	// The throwaway server trusts local connections, so the password is
	// sent but not needed.
	n := newNode(t, dsn+" password="+nodeCanary, "n1", "--voters", "1")
	n.start()
	n.waitDispatching()
	var id int64
	require.NoError(t, db.QueryRow(ctx, `select async.push_task(async.task('select 1', 'gone', manual_timeout => '2 seconds'))`).Scan(&id))
	waitAllDone(t, db, 60*time.Second)
	var status, perr string
	require.NoError(t, db.QueryRow(ctx, `select finish_status::text, coalesce(processing_error, '') from async.task where task_id = $1`, id).Scan(&status, &perr))
	require.Equal(t, "FAILED", status, "the unreachable target fails the task: %s", perr)
	require.NotEmpty(t, perr)

	out, _, code := runCLI(t, nil, "status", "--http-addr", n.api)
	require.Equal(t, 0, code)
	js, _, code := runCLI(t, nil, "status", "--http-addr", n.api, "--json")
	require.Equal(t, 0, code)
	require.Contains(t, out, "FAILED", "status lists the failure")
	n.stop()
	logs, err := os.ReadFile(n.logPath)
	require.NoError(t, err)
	require.Contains(t, string(logs), "target unreachable", "the log covers the failure")
	for _, canary := range []string{nodeCanary, targetCanary} {
		for where, text := range map[string]string{"processing_error": perr, "status": out, "status --json": js, "node log": string(logs)} {
			require.NotContains(t, text, canary, "%s shows a password", where)
		}
	}
}
