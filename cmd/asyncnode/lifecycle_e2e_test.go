package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// taskState reads a task's outcome columns.
func taskState(t *testing.T, db *pgxpool.Pool, id int64) (status, perr string, failed *bool, yielded, processed bool) {
	t.Helper()
	require.NoError(t, db.QueryRow(context.Background(), `select coalesce(finish_status::text, ''), coalesce(processing_error, ''),
		failed, yielded is not null, processed is not null from async.task where task_id = $1`, id).
		Scan(&status, &perr, &failed, &yielded, &processed))
	return
}

func pushOne(t *testing.T, db *pgxpool.Pool, taskExpr string, args ...any) int64 {
	t.Helper()
	var id int64
	require.NoError(t, db.QueryRow(context.Background(), "select async.push_task("+taskExpr+")", args...).Scan(&id))
	return id
}

// backends counts the target backends of asyncnode running a query that
// contains marker.
func backends(t *testing.T, db *pgxpool.Pool, marker string) int {
	t.Helper()
	var n int
	require.NoError(t, db.QueryRow(context.Background(), `select count(*) from pg_stat_activity
		where application_name like 'asyncnode/%' and state = 'active' and strpos(query, $1) > 0`, marker).Scan(&n))
	return n
}

// TestTaskLifecyclesThroughTheBinary drives the built binary from SQL:
// timeouts (D10), cancel of a running task (D8), asynchronous targets and
// async.finish, non-query tasks with get_tasks, deferral, pause/resume (D15).
func TestTaskLifecyclesThroughTheBinary(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	_, err := db.Exec(ctx, `select async.configure($1::jsonb)`, fmt.Sprintf(
		`{"targets":[{"target":"ext","connection_string":%q,"asynchronous_finish":true}]}`, dsn))
	require.NoError(t, err)
	n := newNode(t, dsn, "n1", "--voters", "1")
	n.start()
	n.waitDispatching()

	t.Run("timeout stops the query and ends TIMED_OUT", func(t *testing.T) {
		id := pushOne(t, db, `async.task('select pg_sleep(60) /* timeout-marker */', 'SELF', manual_timeout => '1 second')`)
		require.Eventually(t, func() bool { _, _, _, _, p := taskState(t, db, id); return p }, 30*time.Second, 20*time.Millisecond)
		st, perr, failed, _, _ := taskState(t, db, id)
		require.Equal(t, "TIMED_OUT", st)
		require.Equal(t, "Canceling due to time out", perr)
		require.True(t, *failed)
		require.Eventually(t, func() bool { return backends(t, db, "timeout-marker") == 0 }, 10*time.Second, 20*time.Millisecond)
	})

	t.Run("cancel of a running task stops its query", func(t *testing.T) {
		id := pushOne(t, db, `async.task('select pg_sleep(60) /* cancel-marker */', 'SELF')`)
		require.Eventually(t, func() bool { return backends(t, db, "cancel-marker") == 1 }, 30*time.Second, 20*time.Millisecond)
		_, err := db.Exec(ctx, `select async.cancel(array[$1::bigint])`, id)
		require.NoError(t, err)
		cancelled := time.Now()
		require.Eventually(t, func() bool { return backends(t, db, "cancel-marker") == 0 }, 10*time.Second, 20*time.Millisecond)
		t.Logf("query stopped %s after async.cancel committed", time.Since(cancelled).Round(time.Millisecond))
		st, perr, failed, _, _ := taskState(t, db, id)
		require.Equal(t, "CANCELED", st)
		require.Equal(t, "manual cancel", perr)
		require.True(t, *failed)
	})

	t.Run("asynchronous target yields until async.finish", func(t *testing.T) {
		id := pushOne(t, db, `async.task('select 1', 'ext')`)
		require.Eventually(t, func() bool { _, _, _, y, _ := taskState(t, db, id); return y }, 30*time.Second, 20*time.Millisecond)
		_, _, _, _, processed := taskState(t, db, id)
		require.False(t, processed)
		_, err := db.Exec(ctx, `select async.finish(array[$1::bigint], 'FINISHED', NULL)`, id)
		require.NoError(t, err)
		st, _, failed, _, processed := taskState(t, db, id)
		require.Equal(t, "FINISHED", st)
		require.False(t, *failed)
		require.True(t, processed)
	})

	t.Run("non-query task handed out by get_tasks", func(t *testing.T) {
		id := pushOne(t, db, `async.task(NULL, 'ext', task_data => '{"job": 7}')`)
		var got int64
		var data string
		require.Eventually(t, func() bool {
			err := db.QueryRow(ctx, `select task_id, task_data::text from async.get_tasks('ext', 1, '1 second')`).Scan(&got, &data)
			return err == nil
		}, 30*time.Second, 20*time.Millisecond)
		require.Equal(t, id, got)
		require.JSONEq(t, `{"job": 7}`, data)
		_, err := db.Exec(ctx, `select async.finish(array[$1::bigint], 'FINISHED', NULL)`, id)
		require.NoError(t, err)
		st, _, _, _, processed := taskState(t, db, id)
		require.Equal(t, "FINISHED", st)
		require.True(t, processed)
	})

	t.Run("deferred task runs again after its delay", func(t *testing.T) {
		_, err := db.Exec(ctx, `create table defer_runs(at timestamptz)`)
		require.NoError(t, err)
		id := pushOne(t, db, `async.task($1, 'SELF')`,
			`insert into defer_runs values (clock_timestamp()); select async.defer(array[##flow.TASK_ID##], '1 second') where (select count(*) from defer_runs) = 1`)
		require.Eventually(t, func() bool { _, _, _, _, p := taskState(t, db, id); return p }, 30*time.Second, 20*time.Millisecond)
		var runs int
		var gap float64
		require.NoError(t, db.QueryRow(ctx, `select count(*), extract(epoch from max(at) - min(at)) from defer_runs`).Scan(&runs, &gap))
		require.Equal(t, 2, runs)
		require.GreaterOrEqual(t, gap, 1.0)
		st, _, _, _, _ := taskState(t, db, id)
		require.Equal(t, "FINISHED", st)
	})

	t.Run("pause holds new tasks, resume runs them", func(t *testing.T) {
		_, err := db.Exec(ctx, `select async.pause()`)
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			rep, err := n.status()
			return err == nil && !rep.Scheduler.Dispatching && strings.Contains(rep.Scheduler.Reason, "paused")
		}, 10*time.Second, 20*time.Millisecond)
		id := pushOne(t, db, `async.task('select 0', 'SELF')`)
		// While paused, several scheduling passes go by without a dispatch.
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) {
			var consumed bool
			require.NoError(t, db.QueryRow(ctx, `select consumed is not null from async.task where task_id = $1`, id).Scan(&consumed))
			require.False(t, consumed, "dispatched while paused")
			time.Sleep(50 * time.Millisecond)
		}
		_, err = db.Exec(ctx, `select async.resume()`)
		require.NoError(t, err)
		require.Eventually(t, func() bool { _, _, _, _, p := taskState(t, db, id); return p }, 30*time.Second, 20*time.Millisecond)
	})
}
