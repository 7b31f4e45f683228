package pgstore_test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/pgstore"
)

// emptiedTaskTable leaves the task table as an ANALYZE of an emptied table
// does (pages kept, no rows), then pushes n tasks from a session that ends
// at once, so that the cumulative statistics count them without waiting for
// a session to go idle, and waits until they do. Autovacuum is off for the
// table: it would repair the estimate at a time of its own.
func emptiedTaskTable(t *testing.T, dsn string, s *pgstore.Store, n int) {
	t.Helper()
	c := connect(t, dsn)
	exec(t, c, `ALTER TABLE async.task SET (autovacuum_enabled = off)`)
	push(t, c, "SELF", 200, "select 1")
	exec(t, c, `DELETE FROM async.task`)
	exec(t, c, `ANALYZE async.task`)
	require.Positive(t, queryInt(t, c, `SELECT relpages FROM pg_class WHERE oid = 'async.task'::regclass`),
		"an ANALYZE of the emptied table keeps its pages")
	pusher := connect(t, dsn)
	push(t, pusher, "SELF", n, "select 1")
	require.NoError(t, pusher.Close(context.Background()))
	waitFor(t, "the pushed tasks in n_live_tup", func() bool {
		st, err := s.TaskStatistics(ctxT(t))
		require.NoError(t, err)
		return st.LiveRows >= int64(n)
	})
}

func TestTaskStatisticsNeverAnalysed(t *testing.T) {
	_, s, c := newDB(t)
	// Autovacuum would analyse the pushed rows at a time of its own.
	exec(t, c, `ALTER TABLE async.task SET (autovacuum_enabled = off)`)
	push(t, c, "SELF", 3000, "select 1")
	st, err := s.TaskStatistics(ctxT(t))
	require.NoError(t, err)
	require.EqualValues(t, -1, st.PlannerRows, "no pages in pg_class: the planner assumes full pages")
	require.False(t, st.Stale(), "%+v", st)
	require.True(t, st.MayAnalyze, "the test's superuser")
}

func TestAnalyzeTasksRepairsAnEmptiedTablesEstimate(t *testing.T) {
	dsn, s, c := newDB(t)
	const n = 3000
	emptiedTaskTable(t, dsn, s, n)

	st, err := s.TaskStatistics(ctxT(t))
	require.NoError(t, err)
	require.Less(t, st.PlannerRows, float64(n)/4, "the planner expects the emptied table's density: %+v", st)
	require.True(t, st.Stale(), "%+v", st)

	done, err := s.AnalyzeTasks(ctxT(t))
	require.NoError(t, err)
	require.True(t, done)
	st, err = s.TaskStatistics(ctxT(t))
	require.NoError(t, err)
	require.InDelta(t, n, st.PlannerRows, n/10, "%+v", st)
	require.False(t, st.Stale(), "%+v", st)
	require.EqualValues(t, n, queryInt(t, c, `SELECT reltuples::bigint FROM pg_class WHERE oid = 'async.task'::regclass`))
}

// A role that neither owns the table nor the database is told so, and an
// ANALYZE it runs anyway is no error (the server skips the table and warns).
func TestAnalyzeTasksWithoutOwnership(t *testing.T) {
	dsn, s, c := newDB(t)
	exec(t, c, `DO $$ BEGIN CREATE ROLE async_stats_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$`)
	exec(t, c, `GRANT USAGE ON SCHEMA async TO async_stats_reader`)
	const n = 2000
	emptiedTaskTable(t, dsn, s, n)

	other, err := pgstore.Open(context.Background(), dsn+" user=async_stats_reader", testLogger(t))
	require.NoError(t, err)
	t.Cleanup(other.Close)
	st, err := other.TaskStatistics(ctxT(t))
	require.NoError(t, err)
	require.False(t, st.MayAnalyze, "%+v", st)
	require.True(t, st.Stale(), "%+v", st)
	done, err := other.AnalyzeTasks(ctxT(t))
	require.NoError(t, err)
	require.False(t, done)
	require.Zero(t, queryInt(t, c, `SELECT reltuples::bigint FROM pg_class WHERE oid = 'async.task'::regclass`),
		"the table was not analysed")
}

func TestTaskStatisticsStale(t *testing.T) {
	for _, tc := range []struct {
		st    pgstore.TaskStatistics
		stale bool
	}{
		{pgstore.TaskStatistics{PlannerRows: 0, LiveRows: 1000}, true},
		{pgstore.TaskStatistics{PlannerRows: 0, LiveRows: 999}, false},
		{pgstore.TaskStatistics{PlannerRows: 249, LiveRows: 1000}, true},
		{pgstore.TaskStatistics{PlannerRows: 250, LiveRows: 1000}, false},
		{pgstore.TaskStatistics{PlannerRows: -1, LiveRows: 1000000}, false},
		{pgstore.TaskStatistics{PlannerRows: 5000000, LiveRows: 1000}, false},
		// An ANALYZE set LiveRows back; the claims' updates count as changes.
		{pgstore.TaskStatistics{PlannerRows: 0, LiveRows: 0, ChangedRows: 1000}, true},
		{pgstore.TaskStatistics{PlannerRows: 249, LiveRows: 0, ChangedRows: 1000}, true},
		{pgstore.TaskStatistics{PlannerRows: 250, LiveRows: 0, ChangedRows: 1000000}, false},
		{pgstore.TaskStatistics{PlannerRows: 0, LiveRows: 0, ChangedRows: 999}, false},
		{pgstore.TaskStatistics{PlannerRows: -1, LiveRows: 0, ChangedRows: 1000000}, false},
	} {
		require.Equal(t, tc.stale, tc.st.Stale(), "%+v", tc.st)
	}
}

// An ANALYZE that sampled the table before a burst committed sets n_live_tup
// back (here: the table's counters reset); the rows the claims then update
// count as changes, and the estimate is seen to be stale.
func TestTaskStatisticsStaleOnChangesAlone(t *testing.T) {
	dsn, s, c := newDB(t)
	emptiedTaskTable(t, dsn, s, 3000)
	exec(t, c, `SELECT pg_stat_reset_single_table_counters('async.task'::regclass)`)
	updater := connect(t, dsn)
	exec(t, updater, `UPDATE async.task SET priority = priority WHERE task_id IN (SELECT task_id FROM async.task LIMIT 1500)`)
	require.NoError(t, updater.Close(context.Background()))
	var st pgstore.TaskStatistics
	waitFor(t, "the updates in n_mod_since_analyze", func() bool {
		var err error
		st, err = s.TaskStatistics(ctxT(t))
		require.NoError(t, err)
		return st.ChangedRows >= 1500
	})
	require.Zero(t, st.LiveRows, "%+v", st)
	require.True(t, st.Stale(), "%+v", st)
}

// While another session holds the table's ShareUpdateExclusiveLock (as
// autovacuum does), the ANALYZE skips it at once and says so.
func TestAnalyzeTasksSkipsALockedTable(t *testing.T) {
	dsn, s, _ := newDB(t)
	locker := connect(t, dsn)
	exec(t, locker, `BEGIN`)
	exec(t, locker, `LOCK TABLE async.task IN SHARE UPDATE EXCLUSIVE MODE`)
	done, err := s.AnalyzeTasks(ctxT(t))
	require.NoError(t, err)
	require.False(t, done, "analysed a table another session holds")
	exec(t, locker, `ROLLBACK`)
	done, err = s.AnalyzeTasks(ctxT(t))
	require.NoError(t, err)
	require.True(t, done)
}

// What the leader's ANALYZE is for, now that the claim's own sessions
// cannot plan it badly (TestClaimUsesIndexPlansWhateverTheStatistics): every
// session that plans for the table's statistics, such as the SQL API's and
// operators'. Planned for its parameters in a plain session on the
// statistics of a queue analysed with a backlog and then emptied
// (backlogThenEmptied), the claim reads every READY task of the pool and
// sorts them; once the table is analysed, it reads task_ready_idx in order.
func TestAnalyzeTasksRepairsPlansOnAnEmptiedTable(t *testing.T) {
	_, s, c := newDB(t)
	backlogThenEmptied(t, c, 40000)
	// Planned for its parameters at each EXPLAIN, with the statistics of
	// the moment.
	exec(t, c, `SET plan_cache_mode = force_custom_plan`)
	before := genericPlan(t, c, "claim_select", claimSelectParams, claimSelectArgs)
	require.Regexp(t, taskRowsSorted, before,
		"the emptied table's statistics no longer lead the claim to sort every READY task:\n%s", before)

	done, err := s.AnalyzeTasks(ctxT(t))
	require.NoError(t, err)
	require.True(t, done)
	after := strings.Join(queryStrings(t, c, "EXPLAIN EXECUTE claim_select("+claimSelectArgs+")"), "\n")
	require.NotRegexp(t, taskRowsSorted, after)
	require.Contains(t, after, "Index Scan using task_ready_idx on task", after)
}
