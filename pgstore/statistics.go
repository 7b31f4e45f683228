package pgstore

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// Thresholds of TaskStatistics.Stale.
const (
	// staleMinRows: below this many live rows a plan that reads the whole
	// task table costs little; the table is left to autovacuum.
	staleMinRows = 1000
	// staleFactor: the statistics are stale when the planner expects fewer
	// than 1/staleFactor of the live rows.
	staleFactor = 4
)

// TaskStatistics compares the planner's row estimate for async.task with
// the rows it holds.
//
// The estimate goes wrong when the table is analysed (or vacuumed) while it
// holds almost no rows but keeps its pages, as after a purge of the history
// that vacuum could not truncate: the planner then takes the table's
// density for zero rows per page and expects no rows however many are
// pushed, until autovacuum next analyses it (a minute or more). Plans made
// meanwhile read every READY task at each claim and sort them, or every
// entry of task_pkey for each id a statement looks up (docs/performance.md,
// "The leader analyses an emptied task table").
type TaskStatistics struct {
	// PlannerRows is the row count the planner works with; -1 when
	// pg_class holds no pages for the table (the planner then assumes full
	// pages, which overestimates).
	PlannerRows float64
	// LiveRows is n_live_tup of the cumulative statistics. It lags the
	// sessions' writes by up to about ten seconds, and an ANALYZE that
	// sampled the table before a burst of pushes committed sets it back to
	// what it saw.
	LiveRows int64
	// ChangedRows counts the rows inserted, updated and deleted since the
	// table was last analysed (n_mod_since_analyze).
	ChangedRows int64
	// MayAnalyze tells whether this session's role may ANALYZE the table
	// (it owns the table or the database, or is a superuser).
	MayAnalyze bool
}

// Stale reports whether the planner expects far fewer rows than the table
// holds: fewer than a quarter of at least 1000 live rows; or fewer than
// 250 rows (a quarter of 1000) while at least 1000 rows changed since the
// last ANALYZE, which also catches an ANALYZE that sampled the table just
// before a burst of pushes committed (it sets LiveRows back, the claims'
// updates then count as changes).
func (t TaskStatistics) Stale() bool {
	if t.PlannerRows < 0 {
		return false
	}
	if t.LiveRows >= staleMinRows && t.PlannerRows*staleFactor < float64(t.LiveRows) {
		return true
	}
	return t.PlannerRows*staleFactor < staleMinRows && t.ChangedRows >= staleMinRows
}

// TaskStatistics reads the planner's estimate and the row counts of
// async.task.
func (s *Store) TaskStatistics(ctx context.Context) (TaskStatistics, error) {
	var t TaskStatistics
	var planner *float64
	if err := s.pool.QueryRow(ctx, qTaskStatistics).Scan(&planner, &t.LiveRows, &t.ChangedRows, &t.MayAnalyze); err != nil {
		return TaskStatistics{}, s.wrap("read task table statistics", err)
	}
	t.PlannerRows = -1
	if planner != nil {
		t.PlannerRows = *planner
	}
	return t, nil
}

// AnalyzeTasks runs ANALYZE on async.task, which also replaces the plans
// sessions cached for it, and reports whether it did: the server skips the
// table, without an error, while another ANALYZE or a VACUUM holds it
// (autovacuum refreshes the estimate then) and when the role may not
// analyse it (it only warns). Three round trips, not one batch: a session
// reads the cumulative statistics once per transaction
// (stats_fetch_consistency = cache), so a last-analyse time read after the
// ANALYZE in the same transaction would be the one read before it.
func (s *Store) AnalyzeTasks(ctx context.Context) (bool, error) {
	var before, after *time.Time
	if err := s.pool.QueryRow(ctx, qLastAnalyze).Scan(&before); err != nil {
		return false, s.wrap("analyze the task table", err)
	}
	if _, err := s.pool.Exec(ctx, qAnalyzeTasks, pgx.QueryExecModeSimpleProtocol); err != nil {
		return false, s.wrap("analyze the task table", err)
	}
	if err := s.pool.QueryRow(ctx, qLastAnalyze).Scan(&after); err != nil {
		return false, s.wrap("analyze the task table", err)
	}
	return after != nil && (before == nil || after.After(*before)), nil
}
