package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestBadInputIsRefusedAndChangesNothing throws bad input at a running
// node's SQL API: each attempt gets a clear error naming the problem and
// leaves the task table as it was; hostile task text is contained.
func TestBadInputIsRefusedAndChangesNothing(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	db := pool(t, dsn)
	ctx := context.Background()
	n := newNode(t, dsn, "n1", "--voters", "1")
	n.start()
	n.waitDispatching()
	snapshot := func() string {
		var s string
		require.NoError(t, db.QueryRow(ctx, `select count(*) || '/' || coalesce(max(task_id), 0) from async.task`).Scan(&s))
		return s
	}
	refused := []struct {
		name, sql, want string
		args            []any
	}{
		{"10 MB query", `select async.push_tasks(array[async.task(repeat('x', 10 * 1024 * 1024), 'SELF')])`, "1048576-byte", nil},
		{"NUL byte", `select async.push_tasks(array[async.task($1, 'SELF')])`, "0x00", []any{"select 1\x00"}},
		{"invalid UTF-8", `select async.push_tasks(array[async.task($1, 'SELF')])`, "invalid byte sequence for encoding", []any{"select '\xff\xfe'"}},
		{"injection in the target name", `select async.push_tasks(array[async.task('select 1', 'x''; drop table async.task; --')])`, "drop table", nil},
		{"NULL target", `select async.push_tasks(array[async.task('select 1', NULL)])`, "NULL", nil},
		{"non-positive timeout", `select async.push_tasks(array[async.task('select 1', 'SELF', manual_timeout => '-1 second')])`, "manual_timeout", nil},
		{"malformed configuration", `select async.configure('{"targets": [')`, "invalid input syntax for type json", nil},
		{"unknown configuration key", `select async.configure('{"targetz": []}')`, "targetz", nil},
		{"zero limit", `select async.configure('{"targets": [{"target": "SELF", "max_concurrency": 0}]}')`, "max_concurrency", nil},
		{"huge limit", `select async.configure('{"control": {"workers": 99999999999}}')`, "workers", nil},
		{"wrongly typed value", `select async.configure('{"control": {"workers": "many"}}')`, "workers", nil},
	}
	for _, c := range refused {
		t.Run(c.name, func(t *testing.T) {
			before := snapshot()
			_, err := db.Exec(ctx, c.sql, c.args...)
			require.Error(t, err)
			require.Contains(t, err.Error(), c.want)
			require.Equal(t, before, snapshot(), "nothing changed")
		})
	}

	// Hostile task text runs contained: a task that disables its own
	// statement timeout still times out; one that changes its search_path
	// leaves nothing behind for a later task (which may or may not get the
	// same connection here; executor.TestSessionStateDoesNotLeak pins one);
	// an injection-looking task_data is stored verbatim.
	var slow, sneaky, next int64
	require.NoError(t, db.QueryRow(ctx, `select async.push_task(async.task('set statement_timeout = 0; select pg_sleep(30)', 'SELF', manual_timeout => '1 second'))`).Scan(&slow))
	require.NoError(t, db.QueryRow(ctx, `select async.push_task(async.task('set search_path = pg_temp; set application_name = ''x''', 'SELF', task_data => '{"k": "''; drop table async.task; --"}'))`).Scan(&sneaky))
	waitAllDone(t, db, 60*time.Second)
	check := `do $$ begin
	  if current_setting('search_path') <> '"$user", public' then
	    raise exception 'leaked search_path %', current_setting('search_path');
	  end if;
	end $$`
	require.NoError(t, db.QueryRow(ctx, `select async.push_task(async.task($1, 'SELF'))`, check).Scan(&next))
	waitAllDone(t, db, 60*time.Second)
	var st, perr, data string
	require.NoError(t, db.QueryRow(ctx, `select finish_status::text, coalesce(processing_error, '') from async.task where task_id = $1`, slow).Scan(&st, &perr))
	require.Equal(t, "TIMED_OUT", st, perr)
	require.NoError(t, db.QueryRow(ctx, `select finish_status::text, task_data::text from async.task where task_id = $1`, sneaky).Scan(&st, &data))
	require.Equal(t, "FINISHED", st)
	require.True(t, strings.Contains(data, "drop table async.task"), data)
	require.NoError(t, db.QueryRow(ctx, `select finish_status::text, coalesce(processing_error, '') from async.task where task_id = $1`, next).Scan(&st, &perr))
	require.Equal(t, "FINISHED", st, perr)
}
