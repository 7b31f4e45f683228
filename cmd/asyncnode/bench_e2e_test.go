package main

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// TestBenchPrintsEveryFigure runs a small `asyncnode bench` (its own
// throwaway PostgreSQL and node) and checks that every figure is printed
// with a positive value and the summary line closes the run. It checks the
// benchmark works, not how fast anything is.
func TestBenchPrintsEveryFigure(t *testing.T) {
	out, errOut, code := runCLI(t, nil, "bench", "--tasks", "500", "--samples", "5", "--clients", "2", "--push-for", "1s",
		"--rounds", "2", "--history", "2000", "--scale-out", "--sleep-tasks", "24", "--per-node", "2", "--soak", "2s", "--soak-rate", "100")
	require.Equal(t, 0, code, "bench failed:\n%s\n%s", out, errOut)
	for _, fig := range []string{"limit_roundtrips", "limit_bookkeeping", "limit_plain_node", "throughput_vs_plain_node_limit", "plain_node_vs_bookkeeping_limit", "throughput_empty", "continuous", "throughput_history",
		"history_vs_empty", "scale_out_1_nodes", "scale_out_3_nodes", "scale_out_speedup", "throughput_vs_bookkeeping_limit",
		"soak_tasks", "soak_rss_node1", "soak_rss_growth_max"} {
		m := regexp.MustCompile(`(?m)^bench figure=` + fig + ` value=([0-9.e+]+) `).FindStringSubmatch(out)
		require.NotNil(t, m, "figure %s missing:\n%s", fig, out)
		v, err := strconv.ParseFloat(m[1], 64)
		require.NoError(t, err)
		require.Positive(t, v, "figure %s", fig)
	}
	// Each throughput figure, and each limit it is compared with, is the
	// median of its rounds (the lower one of two).
	for _, fig := range []string{"throughput_empty", "throughput_history", "limit_bookkeeping", "limit_plain_node"} {
		m := regexp.MustCompile(`(?m)^bench figure=` + fig + ` value=(\d+) unit=tasks/s (?:nodes=1 )?tasks=500 rounds=2 each=(\d+),(\d+) `).FindStringSubmatch(out)
		require.NotNil(t, m, "figure %s without its two rounds:\n%s", fig, out)
		require.Equal(t, strconv.Itoa(min(atoi(t, m[2]), atoi(t, m[3]))), m[1], "figure %s is not the median of its rounds", fig)
	}
	// Each ratio to a limit is the median of the rounds' own ratios:
	// throughput_empty's round i over the limit's round i (measured side by
	// side), not the ratio of the two medians.
	// So is history_vs_empty, from the two databases' rounds.
	for _, r := range [][3]string{
		{"throughput_vs_bookkeeping_limit", "throughput_empty", "limit_bookkeeping"},
		{"throughput_vs_plain_node_limit", "throughput_empty", "limit_plain_node"},
		{"plain_node_vs_bookkeeping_limit", "limit_plain_node", "limit_bookkeeping"},
		{"history_vs_empty", "throughput_history", "throughput_empty"},
	} {
		fig, a, c := r[0], roundRates(t, out, r[1]), roundRates(t, out, r[2])
		m := regexp.MustCompile(`(?m)^bench figure=` + fig + ` value=(\S+) rounds=2 each=(\S+),(\S+) `).FindStringSubmatch(out)
		require.NotNil(t, m, "figure %s without its two rounds:\n%s", fig, out)
		each := []float64{atof(t, m[2]), atof(t, m[3])}
		for i := range each {
			// The rates are printed rounded to whole tasks/s.
			require.InEpsilon(t, a[i]/c[i], each[i], 0.01, "%s round %d is not %s / %s of that round", fig, i, r[1], r[2])
		}
		require.Equal(t, min(each[0], each[1]), atof(t, m[1]), "figure %s is not the median of its rounds", fig)
	}
	// CPU per task (Linux /proc): the nodes' and the throwaway server's; a
	// round of 500 tasks costs the server tens of milliseconds.
	for _, fig := range []string{"throughput_empty", "throughput_history"} {
		m := regexp.MustCompile(`(?m)^bench figure=` + fig + ` value=.* node_cpu_us_per_task=([0-9.e+]+) server_cpu_us_per_task=([0-9.e+]+)` +
			` node_reads_per_task=([0-9.e+]+) node_writes_per_task=([0-9.e+]+)$`).FindStringSubmatch(out)
		require.NotNil(t, m, "figure %s without its CPU and system calls per task:\n%s", fig, out)
		server, err := strconv.ParseFloat(m[2], 64)
		require.NoError(t, err)
		require.Positive(t, server, "figure %s: server CPU per task", fig)
		// Every task is at least one write (its text and the session reset)
		// and one read (its answer) on a connection of its own.
		require.GreaterOrEqual(t, atof(t, m[3]), 1.0, "figure %s: node reads per task", fig)
		require.GreaterOrEqual(t, atof(t, m[4]), 1.0, "figure %s: node writes per task", fig)
		// The push is part of the round: sent first, acknowledged before
		// the drain is seen.
		w := regexp.MustCompile(`(?m)^bench figure=` + fig + ` value=.* wall=(\S+) push=(\S+) `).FindStringSubmatch(out)
		require.NotNil(t, w, "figure %s without its push time:\n%s", fig, out)
		wall, err := time.ParseDuration(w[1])
		require.NoError(t, err)
		push, err := time.ParseDuration(w[2])
		require.NoError(t, err)
		require.Positive(t, push, "figure %s: push time", fig)
		require.LessOrEqual(t, push, wall, "figure %s: push time within the round's", fig)
	}
	require.Regexp(t, `(?m)^bench figure=limit_bookkeeping value=.* no query run\) server_cpu_us_per_task=[0-9.e+]+$`, out)
	// The plain program ran every task (it fails otherwise), on as many
	// sessions as a node uses for short tasks; bench's own CPU plays the node's.
	require.Regexp(t, `(?m)^bench figure=limit_plain_node value=\S+ unit=tasks/s tasks=500 rounds=2 each=\S+ task_sessions=16 .* node_cpu_us_per_task=[0-9.e+]+ server_cpu_us_per_task=[0-9.e+]+ node_reads_per_task=[0-9.e+]+ node_writes_per_task=[0-9.e+]+$`, out)
	require.Regexp(t, `(?m)^bench figure=latency_push_to_consumed unit=ms nodes=1 samples=5 p50=`, out)
	require.Regexp(t, `(?m)^bench figure=latency_push_to_processed_history unit=ms`, out)
	require.Regexp(t, `(?m)^bench figure=soak_rss_node1 value=\S+ \(anonymous RSS at end / after 1s\) anon_kib=[1-9]\d*,[1-9]\d* file_kib=\d+,\d+ rss_kib=[1-9]\d*,[1-9]\d* `, out)
	require.Contains(t, out, "\nbench: server connections over TCP to 127.0.0.1\n")
	require.Regexp(t, `(?m)^bench summary nodes=\d+ transport=tcp throughput_empty=`, out)
	// The summary repeats the ratio the contract itself reaches against
	// the bookkeeping limit, as its figure line prints it.
	fig := regexp.MustCompile(`(?m)^bench figure=plain_node_vs_bookkeeping_limit value=(\S+) `).FindStringSubmatch(out)
	require.NotNil(t, fig, out)
	require.Regexp(t, `(?m)^bench summary .* throughput_vs_plain_node_limit=\S+ plain_node_vs_bookkeeping_limit=`+regexp.QuoteMeta(fig[1])+` `, out)
}

// TestBenchSocket: with --socket, bench and its node reach the throwaway
// PostgreSQL through its Unix-domain socket, and the figures say so.
func TestBenchSocket(t *testing.T) {
	out, errOut, code := runCLI(t, nil, "bench", "--socket", "--tasks", "300", "--samples", "3", "--clients", "2",
		"--push-for", "1s", "--rounds", "1")
	require.Equal(t, 0, code, "bench failed:\n%s\n%s", out, errOut)
	require.Contains(t, out, "\nbench: server connections over a Unix-domain socket\n")
	require.Regexp(t, `(?m)^bench figure=throughput_empty value=[1-9]`, out)
	require.Regexp(t, `(?m)^bench figure=limit_plain_node value=[1-9]`, out)
	require.Regexp(t, `(?m)^bench summary nodes=1 transport=unix throughput_empty=`, out)
}

// roundRates returns the each= list of a figure's line.
func roundRates(t *testing.T, out, fig string) []float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^bench figure=` + fig + ` value=\S+ .*? each=(\S+) `).FindStringSubmatch(out)
	require.NotNil(t, m, "figure %s without its rounds:\n%s", fig, out)
	var rates []float64
	for _, r := range strings.Split(m[1], ",") {
		rates = append(rates, atof(t, r))
	}
	return rates
}

func atof(t *testing.T, s string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(s, 64)
	require.NoError(t, err)
	return v
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	require.NoError(t, err)
	return n
}

// bench --bench-dsn measures a database it did not start, leaves no task
// behind, and refuses one that holds tasks without touching it. The
// test's server runs on this machine, so its CPU is measured too.
func TestBenchOnAGivenDatabase(t *testing.T) {
	dsn := newDB(t)
	out, errOut, code := runCLI(t, nil, "bench", "--bench-dsn", dsn, "--tasks", "300", "--samples", "3", "--clients", "2",
		"--push-for", "1s", "--rounds", "1", "--history", "500")
	require.Equal(t, 0, code, "bench failed:\n%s\n%s", out, errOut)
	require.NotContains(t, out, "starting a throwaway PostgreSQL")
	require.Regexp(t, `(?m)^bench figure=history_vs_empty value=\S+ rounds=1 `, out)
	require.Regexp(t, `(?m)^bench figure=throughput_empty value=.* node_cpu_us_per_task=[0-9.e+]+ server_cpu_us_per_task=[0-9.e+]+ node_reads_per_task=[0-9.e+]+ node_writes_per_task=[0-9.e+]+$`, out)
	require.Regexp(t, `(?m)^bench figure=limit_bookkeeping value=.* server_cpu_us_per_task=[0-9.e+]+$`, out)
	require.Regexp(t, `(?m)^bench summary nodes=1 transport=tcp `, out)

	db := pool(t, dsn)
	ctx := context.Background()
	var left int
	require.NoError(t, db.QueryRow(ctx, `select count(*) from async.task`).Scan(&left))
	require.Zero(t, left, "bench left tasks behind")
	// The history database it created beside the given one is gone.
	var histDBs int
	require.NoError(t, db.QueryRow(ctx, `select count(*) from pg_database where datname = current_database() || '_history'`).Scan(&histDBs))
	require.Zero(t, histDBs, "bench left its history database behind")

	// A history database left behind (an interrupted run) is refused
	// before anything changes, and kept.
	var name string
	require.NoError(t, db.QueryRow(ctx, `select current_database() || '_history'`).Scan(&name))
	_, err := db.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize())
	require.NoError(t, err)
	out, errOut, code = runCLI(t, nil, "bench", "--bench-dsn", dsn, "--tasks", "300", "--history", "500")
	require.NotEqual(t, 0, code, "bench ran beside a leftover history database:\n%s", out)
	require.Contains(t, errOut, "_history\" exists on the benchmark's server")
	require.NoError(t, db.QueryRow(ctx, `select count(*) from pg_database where datname = $1`, name).Scan(&histDBs))
	require.Equal(t, 1, histDBs, "bench dropped a database it had not created")
	_, err = db.Exec(ctx, "drop database "+pgx.Identifier{name}.Sanitize())
	require.NoError(t, err)

	_, err = db.Exec(ctx, `select async.push_tasks(array[async.task('select 1', 'SELF')])`)
	require.NoError(t, err)
	out, errOut, code = runCLI(t, nil, "bench", "--bench-dsn", dsn, "--tasks", "300")
	require.NotEqual(t, 0, code, "bench ran on a database holding a task:\n%s", out)
	require.Contains(t, errOut, "already holds 1 tasks; bench needs one without tasks")
	require.NoError(t, db.QueryRow(ctx, `select count(*) from async.task`).Scan(&left))
	require.Equal(t, 1, left, "the refused database was changed")
}

// withDatabase names another database in either form of connection
// string, leaving the rest as it was.
func TestWithDatabase(t *testing.T) {
	for _, c := range []struct{ dsn, want string }{
		{"host=h port=5 user=u dbname=b", "host=h port=5 user=u dbname=b dbname='b_history'"},
		{"postgres://u:secret@h:5/b?sslmode=disable", "postgres://u:secret@h:5/b_history?sslmode=disable"},
		{"postgresql://h/b", "postgresql://h/b_history"},
	} {
		got, err := withDatabase(c.dsn, "b_history")
		require.NoError(t, err)
		require.Equal(t, c.want, got)
		cfg, err := pgx.ParseConfig(got)
		require.NoError(t, err)
		require.Equal(t, "b_history", cfg.Database, got)
	}
	got, err := withDatabase("host=h dbname=x", `o'd\\b`)
	require.NoError(t, err)
	cfg, err := pgx.ParseConfig(got)
	require.NoError(t, err)
	require.Equal(t, `o'd\\b`, cfg.Database, "a name with a quote and a backslash")
}
