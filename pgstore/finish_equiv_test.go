package pgstore_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// The finish statement spells each column's effect out per outcome; the
// reference (testdata) computes the effect once in a CTE. For every mix of
// outcome status, started or not, retries left or not, yield_upon_finish,
// track_yielded, a deferral, and a write that is fenced out or not, both must
// return the same rows and leave the task row the same.
func TestFinishMatchesItsReference(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	ctx := ctxT(t)
	current := querySQL(t, "finish_tasks")
	reference, err := os.ReadFile("testdata/finish_tasks_reference.sql")
	require.NoError(t, err)
	id := push(t, c, "SELF", 1, "select 1")[0]

	// run sets the task up, runs one statement for one outcome and returns
	// what it returned and the whole row after it, then rolls back.
	run := func(stmt string, setup string, node string, attempt int32, status string) (string, error) {
		tx, err := c.Begin(ctx)
		if err != nil {
			return "", err
		}
		defer tx.Rollback(context.WithoutCancel(ctx))
		if _, err := tx.Exec(ctx, setup, id); err != nil {
			return "", fmt.Errorf("setup: %w", err)
		}
		at := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
		rows, err := tx.Query(ctx, stmt, node, []int64{id}, []int32{attempt}, []string{status}, []*string{ptr("the error")}, []time.Time{at})
		if err != nil {
			return "", err
		}
		ret, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
			var tid int64
			var att int32
			var yielded, hold bool
			err := r.Scan(&tid, &att, &yielded, &hold)
			return fmt.Sprint(tid, att, yielded, hold), err
		})
		if err != nil {
			return "", err
		}
		var row string
		if err := tx.QueryRow(ctx, `SELECT row_to_json(t)::text FROM async.task t WHERE task_id = $1`, id).Scan(&row); err != nil {
			return "", err
		}
		return fmt.Sprint(ret, " ", row), nil
	}

	cases := 0
	for _, status := range []string{"FINISHED", "FAILED", "TIMED_OUT", "CANCELED", "YIELDED", "LOST"} {
		for _, started := range []string{"NULL", "'2026-12-05 11:59:59+00'"} {
			for _, retries := range [][2]int{{0, 0}, {0, 1}, {1, 1}, {1, 3}} {
				for _, yuf := range []string{"NULL", "false", "true"} {
					for _, track := range []string{"NULL", "true"} {
						for _, eligible := range []string{"NULL", "'2026-12-05 11:59:00+00'"} {
							for _, fence := range []string{"", "wrong node", "wrong attempt", "already processed"} {
								processed := "NULL"
								if fence == "already processed" {
									processed = "'2026-12-05 11:59:30+00'"
								}
								setup := fmt.Sprintf(`UPDATE async.task SET consumed = '2026-12-05 11:59:58+00', attempt = 2, node = 'n1',
									times_up = '2026-12-05 13:00:00+00', started = %s, retries = %d, max_retries = %d,
									yield_upon_finish = %s, track_yielded = %s, eligible_when = %s, processed = %s,
									finish_status = NULL, failed = NULL, processing_error = 'old error', tracked = true
									WHERE task_id = $1`, started, retries[0], retries[1], yuf, track, eligible, processed)
								node, attempt := "n1", int32(2)
								switch fence {
								case "wrong node":
									node = "n2"
								case "wrong attempt":
									attempt = 1
								}
								want, err := run(string(reference), setup, node, attempt, status)
								require.NoError(t, err)
								got, err := run(current, setup, node, attempt, status)
								require.NoError(t, err)
								require.Equal(t, want, got, "status %s, started %s, retries %v, yield_upon_finish %s, track_yielded %s, eligible_when %s, fence %q",
									status, started, retries, yuf, track, eligible, fence)
								cases++
							}
						}
					}
				}
			}
		}
	}
	require.Equal(t, 6*2*4*3*2*2*4, cases)
}

func ptr(s string) *string { return &s }
