package pgstore

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// Counts are the unfinished tasks by state, for `asyncnode status`.
type Counts struct {
	Queued  int64 `json:"queued"`  // READY (including deferred ones not yet eligible)
	Running int64 `json:"running"` // RUNNING (claimed, query or non-query)
	Yielded int64 `json:"yielded"` // YIELDED, waiting for async.finish
}

// Failure is one recently failed task.
type Failure struct {
	TaskID       int64     `json:"task_id"`
	FinishStatus string    `json:"finish_status"` // FAILED, CANCELED, TIMED_OUT, ... ("" if none)
	Error        string    `json:"error"`         // processing_error
	Processed    time.Time `json:"processed"`
}

// Counts returns the number of queued, running and yielded tasks.
func (s *Store) Counts(ctx context.Context) (Counts, error) {
	var c Counts
	if err := s.pool.QueryRow(ctx, qCounts).Scan(&c.Queued, &c.Running, &c.Yielded); err != nil {
		return Counts{}, s.wrap("count tasks", err)
	}
	return c, nil
}

// RecentFailures returns the n most recently finished failed tasks, newest first.
func (s *Store) RecentFailures(ctx context.Context, n int) ([]Failure, error) {
	if n <= 0 {
		return nil, nil
	}
	rows, err := s.pool.Query(ctx, qRecentFailures, n)
	if err != nil {
		return nil, s.wrap("recent failures", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Failure, error) {
		var f Failure
		err := r.Scan(&f.TaskID, &f.FinishStatus, &f.Error, &f.Processed)
		return f, err
	})
	if err != nil {
		return nil, s.wrap("recent failures", err)
	}
	return out, nil
}
