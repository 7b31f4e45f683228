package pgstore

import (
	"context"

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
// meanwhile may read every entry of task_pkey for each id a statement
// looks up, as a claim did for 3 to 6 s per call (docs/performance.md,
// "Plans on the statistics of an emptied table").
type TaskStatistics struct {
	// PlannerRows is the row count the planner works with; -1 when
	// pg_class holds no pages for the table (the planner then assumes full
	// pages, which overestimates).
	PlannerRows float64
	// LiveRows is n_live_tup of the cumulative statistics (it lags the
	// sessions' writes by up to about ten seconds).
	LiveRows int64
	// MayAnalyze tells whether this session's role may ANALYZE the table
	// (it owns the table or the database, or is a superuser).
	MayAnalyze bool
}

// Stale reports whether the planner expects far fewer rows than the table
// holds: fewer than a quarter of at least 1000 live rows.
func (t TaskStatistics) Stale() bool {
	return t.PlannerRows >= 0 && t.LiveRows >= staleMinRows && t.PlannerRows*staleFactor < float64(t.LiveRows)
}

// TaskStatistics reads the planner's estimate and the live row count of
// async.task.
func (s *Store) TaskStatistics(ctx context.Context) (TaskStatistics, error) {
	var t TaskStatistics
	var planner *float64
	if err := s.pool.QueryRow(ctx, qTaskStatistics).Scan(&planner, &t.LiveRows, &t.MayAnalyze); err != nil {
		return TaskStatistics{}, s.wrap("read task table statistics", err)
	}
	t.PlannerRows = -1
	if planner != nil {
		t.PlannerRows = *planner
	}
	return t, nil
}

// AnalyzeTasks runs ANALYZE on async.task, which also replaces the plans
// sessions cached for it. It skips the table, without an error, while
// another ANALYZE or a VACUUM holds it (autovacuum refreshes the estimate
// then), and when the role may not analyse it (the server only warns).
func (s *Store) AnalyzeTasks(ctx context.Context) error {
	if _, err := s.pool.Exec(ctx, qAnalyzeTasks, pgx.QueryExecModeSimpleProtocol); err != nil {
		return s.wrap("analyze the task table", err)
	}
	return nil
}
