package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/internal/pglocal"
)

// TestMain lets the test binary play riverbench's child processes.
func TestMain(m *testing.M) {
	if isChild() {
		os.Exit(runChild(context.Background()))
	}
	os.Exit(m.Run())
}

func TestParseFlagsRefusesBadInput(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--jobs", "0"}, "--jobs must be between 1 and 10000000, got 0"},
		{[]string{"--rounds", "21"}, "--rounds must be between 1 and 20, got 21"},
		{[]string{"--workers", "0"}, "--workers must be between 1 and 10000, got 0"},
		{[]string{"--processes", "10"}, "--processes must be between 1 and 9, got 10"},
		{[]string{"--conns", "-1"}, "--conns must be between 0 and 1000, got -1"},
		{[]string{"--fetch-cooldown", "500us"}, "--fetch-cooldown must be at least 1ms, got 500µs"},
		{[]string{"--fetch-poll", "1ms"}, "--fetch-poll (1ms) must not be shorter than --fetch-cooldown (2ms)"},
		{[]string{"--dsn", "host=h password=hunter2 port=nope"}, "--dsn host=h password=xxxxx port=nope: cannot parse it"},
		{[]string{"--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"more"}, `unexpected argument "more"`},
	} {
		var errOut bytes.Buffer
		_, err := parseFlags(tc.args, &errOut)
		require.EqualError(t, err, tc.want, "args %q", tc.args)
		require.NotContains(t, err.Error(), "hunter2")
		require.Empty(t, errOut.String(), "a bad flag is one line, without the usage")
	}
}

func TestParseFlagsDefaultsAreRiverBenchmarks(t *testing.T) {
	o, err := parseFlags(nil, io.Discard)
	require.NoError(t, err)
	require.Equal(t, options{jobs: 20000, rounds: 3, processes: 1, workers: 2000, cooldown: 2 * time.Millisecond, poll: 20 * time.Millisecond}, o)
}

// figureLine is the median line of one figure.
var figureLine = regexp.MustCompile(`(?m)^riverbench figure=(\w+) value=(\d+) unit=jobs/s rounds=(\d+) each=([\d,]+) jobs=(\d+) processes=(\d+) process_cpu_us_per_job=[\d.]+ \(`)

// TestRunDrainsEveryJobAndRefusesForeignJobs runs two rounds with two
// child processes on a database of a throwaway server, checks that each
// figure is the median of its rounds, that every job completed and that both
// children's clients worked jobs, then that a database holding a job of
// another kind is refused and keeps it.
func TestRunDrainsEveryJobAndRefusesForeignJobs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg, err := pglocal.Start(ctx, pglocal.Options{})
	require.NoError(t, err, "riverbench's tests need the PostgreSQL server binaries")
	defer func() { _ = pg.Stop() }()
	dsn := pg.DSN("postgres")

	var out bytes.Buffer
	o := options{dsn: dsn, jobs: 300, rounds: 2, processes: 2, workers: 10, cooldown: 2 * time.Millisecond, poll: 20 * time.Millisecond}
	require.NoError(t, run(ctx, o, &out))
	text := out.String()
	t.Log(text)
	require.Contains(t, text, "riverbench: River v")
	m := figureLine.FindAllStringSubmatch(text, -1)
	require.Len(t, m, 2, "one median line per figure")
	summary := "riverbench summary"
	for i, name := range []string{"river_select_0", "river_noop"} {
		require.Equal(t, name, m[i][1])
		require.Equal(t, "2", m[i][3])
		require.Equal(t, "300", m[i][5])
		require.Equal(t, "2", m[i][6], "processes")
		each := strings.Split(m[i][4], ",")
		require.Len(t, each, 2)
		rounds := regexp.MustCompile(`(?m)^riverbench round=\d figure=`+name+` value=(\d+) `).FindAllStringSubmatch(text, -1)
		require.Len(t, rounds, 2)
		lo := min(atoi(t, rounds[0][1]), atoi(t, rounds[1][1]))
		require.Equal(t, lo, atoi(t, m[i][2]), "%s: the lower middle round of two", name)
		require.Positive(t, lo)
		summary += " " + name + "=" + m[i][2]
	}
	require.Contains(t, text, summary+"\n")

	conn, err := pgx.Connect(ctx, dsn)
	require.NoError(t, err)
	defer func() { _ = conn.Close(ctx) }()
	var completed, total int
	require.NoError(t, conn.QueryRow(ctx, "select count(*) filter (where state = 'completed'), count(*) from river_job").Scan(&completed, &total))
	require.Equal(t, 300, total, "the last round's jobs are still there")
	require.Equal(t, 300, completed)
	var workedBy int
	require.NoError(t, conn.QueryRow(ctx, "select count(distinct attempted_by[1]) from river_job").Scan(&workedBy))
	require.Equal(t, 2, workedBy, "both children's clients worked jobs of the last round")

	_, err = conn.Exec(ctx, "insert into river_job (kind, args, max_attempts) values ('someone_else', '{}', 25)")
	require.NoError(t, err)
	err = run(ctx, o, io.Discard)
	require.EqualError(t, err, "river_job already holds 1 jobs that are not riverbench's; riverbench empties that table, so give it a database of its own")
	require.NoError(t, conn.QueryRow(ctx, "select count(*) from river_job where kind = 'someone_else'").Scan(&total))
	require.Equal(t, 1, total, "the refused run left the other job alone")
}

// On a throwaway server riverbench also gives the server's CPU per job, and
// a server that runs jobs uses some.
func TestRunOnAThrowawayServerGivesItsCPU(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	o := options{jobs: 2000, rounds: 1, processes: 1, workers: 50, cooldown: 2 * time.Millisecond, poll: 20 * time.Millisecond}
	require.NoError(t, run(ctx, o, &out))
	t.Log(out.String())
	require.Contains(t, out.String(), "on a throwaway PostgreSQL")
	m := regexp.MustCompile(`(?m)^riverbench figure=(\w+) value=\d+ .* process_cpu_us_per_job=([\d.]+) server_cpu_us_per_job=([\d.]+) \(`).FindAllStringSubmatch(out.String(), -1)
	require.Len(t, m, 2)
	for _, f := range m {
		v, err := strconv.ParseFloat(f[3], 64)
		require.NoError(t, err)
		require.Positive(t, v, "%s: the server's CPU per job", f[1])
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	require.NoError(t, err)
	return n
}

// A child that fails is an error that says which child, when, and what it
// wrote on its standard error; riverbench does not wait for its jobs.
func TestDrainProcessesReportsAFailedChild(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Nothing listens on that port: the children get as far as starting
	// their clients.
	dsn := "host=127.0.0.1 port=1 user=postgres dbname=none connect_timeout=5"
	o := options{jobs: 10, rounds: 1, processes: 2, workers: 5, cooldown: 2 * time.Millisecond, poll: 20 * time.Millisecond}
	_, err := drainProcesses(ctx, dsn, o, "select 0", 0)
	require.Error(t, err)
	require.Regexp(t, `^child [12] ended while riverbench waited for the jobs to complete: riverbench child: start the client: `, err.Error())
}
