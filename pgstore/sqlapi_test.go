package pgstore_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// The pgasync README examples, verbatim.
func TestReadmeExamples(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	ctx := ctxT(t)

	ids := queryIDs(t, c, `SELECT async.push_tasks(array[async.task('select 0', 'SELF')]);`)
	require.Len(t, ids, 1)

	// The second README example is broken in pgasync itself: its sub-select
	// names no column "t" (the column is called "task"), so PostgreSQL
	// rejects it before async.push_tasks is called. Verbatim it fails the
	// same way here; with the alias it was meant to have, it pushes 1000.
	_, err := c.Exec(ctx, `SELECT async.push_tasks(array_agg(t)) FROM (SELECT async.task('select 0', 'SELF') FROM generate_series(1,1000)) q;`)
	requireSQLError(t, err, "42703", `column "t" does not exist`)
	ids = queryIDs(t, c, `SELECT async.push_tasks(array_agg(t)) FROM (SELECT async.task('select 0', 'SELF') t FROM generate_series(1,1000)) q;`)
	require.Len(t, ids, 1000)
	require.EqualValues(t, 1001, queryInt(t, c, `SELECT count(*) FROM async.task WHERE target = 'SELF' AND query = 'select 0'
	                                              AND async.task_execution_state(task) = 'READY'`))
}

func TestTaskConstructorIsPure(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	got := queryStrings(t, c, `SELECT async.task('select 1', 'SELF', '{"a":1}', 5, 'p', '1 minute', true)::text`)
	require.Equal(t, []string{`("{""a"": 1}",SELF,5,"select 1",p,00:01:00,t)`}, got)
	// Defaults, and no validation at all (an unknown target is fine here).
	got = queryStrings(t, c, `SELECT async.task(NULL, 'nowhere')::text`)
	require.Equal(t, []string{`(,nowhere,0,,,,)`}, got)
	require.Equal(t, []string{"i"}, queryStrings(t, c,
		`SELECT provolatile::text FROM pg_proc WHERE oid = 'async.task(text,text,jsonb,int,text,interval,bool)'::regprocedure`))
}

// D1 and the other push validations: a clear error, nothing inserted.
func TestPushTasksValidation(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	ctx := ctxT(t)
	push(t, c, "SELF", 2, "select 1") // some existing rows
	big := strings.Repeat("x", 1048577)
	for _, tc := range []struct {
		name, sql string
		args      []any
		code      string
		want      []string
	}{
		{"unknown target", `SELECT async.push_tasks(array[async.task('select 0', 'SELF'), async.task('select 0', 'nope')])`, nil,
			"42704", []string{"task 2", "unknown target 'nope'", "nothing was pushed"}},
		{"NULL target", `SELECT async.push_tasks(array[async.task('select 0', NULL)])`, nil,
			"22004", []string{"task 1", "NULL target"}},
		{"internal self target", `SELECT async.push_tasks(array[async.task('select 0', 'async.self')])`, nil,
			"22023", []string{"task 1", "'async.self'", "internal self target"}},
		{"NULL array", `SELECT async.push_tasks(NULL)`, nil, "22004", []string{"task array is NULL"}},
		{"NULL element", `SELECT async.push_tasks(array[async.task('select 0', 'SELF'), NULL, async.task('select 0', 'SELF')])`, nil,
			"22004", []string{"task 2 of the array is NULL"}},
		{"NULL run type", `SELECT async.push_tasks(array[async.task('select 0', 'SELF')], NULL)`, nil,
			"22004", []string{"run type is NULL"}},
		{"query over 1 MiB", `SELECT async.push_tasks(array[async.task($1, 'SELF')])`, []any{big},
			"54000", []string{"task 1", "1048577 bytes", "1048576-byte (1 MiB) cap"}},
		{"zero manual_timeout", `SELECT async.push_tasks(array[async.task('select 0', 'SELF', manual_timeout := '0')])`, nil,
			"22023", []string{"task 1", "manual_timeout", "greater than zero"}},
		{"negative manual_timeout", `SELECT async.push_tasks(array[async.task('select 0', 'SELF', manual_timeout := '-1 hour')])`, nil,
			"22023", []string{"manual_timeout", "greater than zero"}},
		{"push_task unknown target", `SELECT async.push_task(async.task('select 0', 'nope'))`, nil,
			"42704", []string{"unknown target 'nope'"}},
		{"push_task NULL task", `SELECT async.push_task(NULL)`, nil, "22004", []string{"is NULL"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, c)
			_, err := c.Exec(ctx, tc.sql, tc.args...)
			requireSQLError(t, err, tc.code, tc.want...)
			require.Equal(t, before, snapshot(t, c), "a refused push must change nothing")
		})
	}
	// Exactly 1 MiB is accepted.
	queryIDs(t, c, `SELECT async.push_tasks(array[async.task($1, 'SELF')])`, strings.Repeat("x", 1048576))
}

// D2: ids, entered and dispatch order follow the array order.
func TestPushTasksOrder(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `ANALYZE async.target`) // the plan must not matter
	ids := queryIDs(t, c, `SELECT async.push_tasks(array_agg(async.task('select ' || i, 'SELF') ORDER BY i))
	                         FROM generate_series(1, 1000) i`)
	require.Len(t, ids, 1000)
	type row struct {
		id      int64
		q       string
		entered time.Time
	}
	rows, err := c.Query(ctx, `SELECT task_id, query, entered FROM async.task WHERE task_id = ANY($1) ORDER BY task_id`, ids)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.id, &x.q, &x.entered)
	})
	require.NoError(t, err)
	for i, r := range got {
		require.Equal(t, ids[i], r.id, "ids returned in array order")
		require.Equal(t, "select "+strconv.Itoa(i+1), r.q, "element %d got id %d", i+1, r.id)
		if i > 0 {
			require.Greater(t, r.id, got[i-1].id)
			require.False(t, r.entered.Before(got[i-1].entered), "entered follows the array order")
		}
	}
	// Dispatch order: (priority, entered, task_id) = array order.
	takeLead(t, s, 1)
	exec(t, c, `UPDATE async.target SET max_concurrency = 1000 WHERE target = 'SELF'`)
	claimed := claim(t, s, 1, 1000, nil)
	require.Len(t, claimed, 1000)
	for i, cl := range claimed {
		require.Equal(t, ids[i], cl.TaskID)
	}
}

func TestPushTasksColumns(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "SELF"},
	  {"target": "asy", "asynchronous_finish": true, "concurrency_track_yielded": true, "max_retries": 2},
	  {"target": "plain"}]}')`)
	l := listen(t, dsn)

	ids := queryIDs(t, c, `SELECT async.push_tasks(array[
	    async.task('q1', 'asy'),
	    async.task('q2', 'asy', '{"k": 1}', NULL, 'pool1', '5 minutes', false),
	    async.task(NULL, 'plain', priority := -3)], 'EXECUTE', 'my source')`)
	require.Len(t, ids, 3)
	require.Equal(t, "push", l.next(), "one notification per push call")
	l.none(100 * time.Millisecond)

	type row struct {
		target, pool, source, state string
		priority                    int32
		async, track                bool
		retries                     int32
		query, data                 *string
		timeout                     *time.Duration
	}
	get := func(id int64) row {
		var r row
		require.NoError(t, c.QueryRow(ctx, `SELECT target, concurrency_pool, coalesce(source, ''), async.task_execution_state(t)::text,
		    priority, asynchronous_finish, track_yielded, max_retries, query, task_data::text, manual_timeout
		    FROM async.task t WHERE task_id = $1`, id).
			Scan(&r.target, &r.pool, &r.source, &r.state, &r.priority, &r.async, &r.track, &r.retries, &r.query, &r.data, &r.timeout))
		return r
	}
	r := get(ids[0])
	require.Equal(t, "asy", r.pool, "pool defaults to the target name")
	require.Equal(t, "my source", r.source)
	require.Equal(t, "READY", r.state)
	require.True(t, r.async, "asynchronous_finish copied from the target")
	require.True(t, r.track, "track_yielded defaults to the target's concurrency_track_yielded")
	require.EqualValues(t, 2, r.retries, "max_retries copied from the target")
	require.EqualValues(t, 0, r.priority)
	r = get(ids[1])
	require.Equal(t, "pool1", r.pool)
	require.False(t, r.track, "an explicit track_yielded wins")
	require.Equal(t, `{"k": 1}`, *r.data)
	require.Equal(t, 5*time.Minute, *r.timeout)
	require.EqualValues(t, 0, r.priority, "NULL priority is 0")
	r = get(ids[2])
	require.Nil(t, r.query, "a NULL query makes a non-query task")
	require.False(t, r.async)
	require.False(t, r.track, "no setting anywhere: false")
	require.EqualValues(t, -3, r.priority)

	// Run types.
	noasync := queryIDs(t, c, `SELECT async.push_tasks(array[async.task('q', 'asy')], 'EXECUTE_NOASYNC')`)
	require.False(t, get(noasync[0]).async, "EXECUTE_NOASYNC ignores the target flag")
	var doa, empty int64
	require.NoError(t, c.QueryRow(ctx, `SELECT async.push_task(async.task('q', 'asy'), 'DOA')`).Scan(&doa))
	require.NoError(t, c.QueryRow(ctx, `SELECT async.push_task(async.task('q', 'asy'), 'EMPTY')`).Scan(&empty))
	for _, tc := range []struct {
		id     int64
		status string
		failed bool
	}{{doa, "DOA", true}, {empty, "FINISHED", false}} {
		var status, source string
		var failed, same bool
		require.NoError(t, c.QueryRow(ctx, `SELECT finish_status::text, failed, consumed = processed AND processed IS NOT NULL, source
		    FROM async.task WHERE task_id = $1`, tc.id).Scan(&status, &failed, &same, &source))
		require.Equal(t, tc.status, status)
		require.Equal(t, tc.failed, failed)
		require.True(t, same, "consumed = processed = now")
		require.Equal(t, "manual push", source, "push_task's default source")
	}
	require.False(t, get(empty).async, "EMPTY is never asynchronous")

	// An empty array pushes nothing and wakes nobody.
	require.Empty(t, queryIDs(t, c, `SELECT async.push_tasks('{}'::async.task_push_t[])`))
	for range 3 {
		require.Equal(t, "push", l.next())
	}
	l.none(100 * time.Millisecond)
}

// Pushes are transactional on the server database: a rollback leaves nothing.
func TestPushIsTransactional(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ctx := ctxT(t)
	l := listen(t, dsn)
	tx, err := c.Begin(ctx)
	require.NoError(t, err)
	_, err = tx.Exec(ctx, `SELECT async.push_tasks(array[async.task('select 0', 'SELF')])`)
	require.NoError(t, err)
	require.NoError(t, tx.Rollback(ctx))
	require.Zero(t, queryInt(t, c, `SELECT count(*) FROM async.task`))
	l.none(100 * time.Millisecond)
}

type taskRow struct {
	State, Status, Error string
	Failed               *bool
	Processed, Yielded   bool
	Consumed             bool
	EligibleIn           *time.Duration
	YieldUponFinish      *bool
}

func getTask(t testing.TB, c interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, id int64) taskRow {
	t.Helper()
	var r taskRow
	var eligible *float64
	require.NoError(t, c.QueryRow(context.Background(), `SELECT async.task_execution_state(t)::text, coalesce(finish_status::text, ''),
	    coalesce(processing_error, ''), failed, processed IS NOT NULL, yielded IS NOT NULL, consumed IS NOT NULL,
	    extract(epoch FROM eligible_when - now())::float8, yield_upon_finish
	    FROM async.task t WHERE task_id = $1`, id).
		Scan(&r.State, &r.Status, &r.Error, &r.Failed, &r.Processed, &r.Yielded, &r.Consumed, &eligible, &r.YieldUponFinish))
	if eligible != nil {
		d := time.Duration(*eligible * float64(time.Second))
		r.EligibleIn = &d
	}
	return r
}

func boolp(b bool) *bool { return &b }

// async.finish on READY, RUNNING and YIELDED tasks, status by status.
func TestFinishEffects(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)

	// start: a task in the given state
	start := func(state string) int64 {
		id := push(t, c, "SELF", 1, "select 1")[0]
		if state == "READY" {
			return id
		}
		exec(t, c, `UPDATE async.task SET consumed = now(), attempt = 1, node = 'n1', started = now(), times_up = now() + '1 hour' WHERE task_id = $1`, id)
		if state == "YIELDED" {
			exec(t, c, `UPDATE async.task SET yielded = now(), finish_status = 'YIELDED' WHERE task_id = $1`, id)
		}
		return id
	}
	for _, from := range []string{"READY", "RUNNING", "YIELDED"} {
		for _, tc := range []struct {
			status   string
			msg      any
			duration any
			want     taskRow
		}{
			{"FINISHED", nil, nil, taskRow{State: "FINISHED", Status: "FINISHED", Failed: boolp(false), Processed: true}},
			{"FAILED", "boom", nil, taskRow{State: "FINISHED", Status: "FAILED", Error: "boom", Failed: boolp(true), Processed: true}},
			{"CANCELED", "stop", nil, taskRow{State: "FINISHED", Status: "CANCELED", Error: "stop", Failed: boolp(true), Processed: true}},
			{"TIMED_OUT", "late", nil, taskRow{State: "FINISHED", Status: "TIMED_OUT", Error: "late", Failed: boolp(true), Processed: true}},
			{"DOA", nil, nil, taskRow{State: "FINISHED", Status: "DOA", Failed: boolp(false), Processed: true}},
			{"YIELDED", nil, nil, taskRow{State: "YIELDED", Status: "YIELDED", Failed: boolp(false), Yielded: true}},
			{"PAUSED", nil, nil, taskRow{State: "READY", Failed: boolp(false)}},
			{"DEFERRED", nil, "1 hour", taskRow{State: "READY", Status: "DEFERRED", Failed: boolp(false)}},
			{"DEFERRED", nil, nil, taskRow{State: "READY", Status: "DEFERRED", Failed: boolp(false)}},
		} {
			t.Run(from+"_"+tc.status, func(t *testing.T) {
				id := start(from)
				exec(t, c, `SELECT async.finish(array[$1::bigint], $2::async.finish_status_t, $3::text, $4::interval)`, id, tc.status, tc.msg, tc.duration)
				got := getTask(t, c, id)
				eligible := got.EligibleIn
				got.EligibleIn = nil
				want := tc.want
				if from == "YIELDED" && want.State == "FINISHED" {
					want.Yielded = true // the yield time is kept on a final finish (documented divergence)
				}
				if want.State != "READY" {
					want.Consumed = from != "READY"
				}
				require.Equal(t, want, got)
				if tc.duration != nil {
					require.NotNil(t, eligible)
					require.InDelta(t, time.Hour.Seconds(), eligible.Seconds(), 60)
				} else {
					require.Nil(t, eligible)
				}
			})
		}
	}
}

func TestFinishYieldUponFinish(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	id := push(t, c, "SELF", 1, "select 1")[0]
	exec(t, c, `UPDATE async.task SET consumed = now(), yield_upon_finish = true, track_yielded = true WHERE task_id = $1`, id)
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FINISHED', NULL)`, id)
	got := getTask(t, c, id)
	require.Equal(t, "YIELDED", got.State)
	require.Equal(t, "", got.Status, "finish_status NULL")
	require.Nil(t, got.YieldUponFinish, "one shot: the flag is cleared")
	require.EqualValues(t, 1, queryInt(t, c, `SELECT count(*) FROM async.task WHERE task_id = $1 AND tracked`, id))
	// The next FINISHED finishes for real.
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FINISHED', NULL)`, id)
	got = getTask(t, c, id)
	require.Equal(t, "FINISHED", got.State)
	require.Equal(t, "FINISHED", got.Status)
}

// D8: the change happens in the caller's transaction, visible at commit, and
// the cluster is woken at commit.
func TestFinishInCallersTransaction(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ctx := ctxT(t)
	id := push(t, c, "SELF", 1, "select 1")[0]
	l := listen(t, dsn)
	other := connect(t, dsn)

	tx, err := c.Begin(ctx)
	require.NoError(t, err)
	_, err = tx.Exec(ctx, `SELECT async.cancel(array[$1::bigint])`, id)
	require.NoError(t, err)
	require.Equal(t, "FINISHED", getTask(t, tx, id).State, "visible in the caller's transaction")
	require.Equal(t, "READY", getTask(t, other, id).State, "not visible to others before commit")
	l.none(100 * time.Millisecond)
	// The row is locked: a concurrent finish waits for the commit.
	done := make(chan error, 1)
	go func() {
		_, err := other.Exec(context.Background(), `SELECT async.finish(array[$1::bigint], 'FAILED', 'late')`, id)
		done <- err
	}()
	mon := connect(t, dsn)
	waitFor(t, "the concurrent finish to block on the row lock", func() bool {
		return queryInt(t, mon, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%late%'`) == 1
	})
	require.NoError(t, tx.Commit(ctx))
	require.NoError(t, <-done)
	require.Equal(t, "finish", l.next())
	got := getTask(t, c, id)
	require.Equal(t, "CANCELED", got.Status, "the later finish found a terminal state and changed nothing (D9)")
	require.Equal(t, "manual cancel", got.Error)
}

// D9: terminal states are final; unknown ids and finished tasks get a WARNING.
func TestFinishTerminalIsFinal(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ids := push(t, c, "SELF", 3, "select 1")
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FAILED', 'first')`, ids[0])
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FINISHED', NULL)`, ids[1])
	wc, n := connectNotices(t, dsn)
	before := queryStrings(t, c, `SELECT t::text FROM async.task t WHERE task_id = ANY($1) ORDER BY task_id`, ids[:2])
	for _, st := range []string{"FINISHED", "FAILED", "CANCELED", "DEFERRED", "PAUSED", "YIELDED"} {
		exec(t, wc, `SELECT async.finish($1::bigint[], $2::async.finish_status_t, 'again', NULL)`, append(ids[:2:2], 999999), st)
	}
	require.Equal(t, before, queryStrings(t, c, `SELECT t::text FROM async.task t WHERE task_id = ANY($1) ORDER BY task_id`, ids[:2]))
	require.Contains(t, n.list, "WARNING: async.finish: no task with id 999999; ignored")
	require.Contains(t, n.list, "WARNING: async.finish: task "+strconv.Itoa(int(ids[0]))+" is already finished (FAILED); terminal states are final, CANCELED not applied")
	require.Contains(t, n.list, "WARNING: async.finish: task "+strconv.Itoa(int(ids[1]))+" is already finished (FINISHED); terminal states are final, FAILED not applied")
	// The third task, unfinished, in the same call is still applied.
	exec(t, wc, `SELECT async.finish($1::bigint[], 'CANCELED', 'x')`, ids)
	require.Equal(t, "CANCELED", getTask(t, c, ids[2]).Status)
}

func TestFinishValidation(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	ctx := ctxT(t)
	id := push(t, c, "SELF", 1, "select 1")[0]
	for _, tc := range []struct {
		name, sql string
		code      string
		want      []string
	}{
		{"NULL ids", `SELECT async.finish(NULL, 'FINISHED', NULL, NULL)`, "22004", []string{"task id array is NULL"}},
		{"NULL status", `SELECT async.finish(array[$1::bigint], NULL, NULL, NULL)`, "22004", []string{"status is NULL"}},
		{"NULL element", `SELECT async.finish(array[$1::bigint, NULL], 'FINISHED', NULL)`, "22004", []string{"task id 2 of the array is NULL"}},
		{"negative duration", `SELECT async.finish(array[$1::bigint], 'DEFERRED', NULL, '-1 minute')`, "22023", []string{"duration", "negative"}},
		{"defer negative", `SELECT async.defer(array[$1::bigint], '-1 minute')`, "22023", []string{"negative"}},
		{"cancel NULL", `SELECT async.cancel(NULL)`, "22004", []string{"task id array is NULL"}},
		{"bad status", `SELECT async.finish(array[$1::bigint], 'DONE', NULL)`, "22P02", []string{"finish_status_t"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, c)
			var err error
			if strings.Contains(tc.sql, "$1") {
				_, err = c.Exec(ctx, tc.sql, id)
			} else {
				_, err = c.Exec(ctx, tc.sql)
			}
			requireSQLError(t, err, tc.code, tc.want...)
			require.Equal(t, before, snapshot(t, c))
		})
	}
}

func TestCancelDeferLatch(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ids := push(t, c, "SELF", 2, "select 1")
	l := listen(t, dsn)
	exec(t, c, `SELECT async.cancel(array[$1::bigint])`, ids[0])
	require.Equal(t, "finish", l.next())
	got := getTask(t, c, ids[0])
	require.Equal(t, "CANCELED", got.Status)
	require.Equal(t, "manual cancel", got.Error)
	require.Equal(t, true, *got.Failed)
	exec(t, c, `SELECT async.cancel(array[$1::bigint], 'because')`, ids[1])
	require.Equal(t, "because", getTask(t, c, ids[1]).Error)

	id := push(t, c, "SELF", 1, "select 1")[0]
	start := time.Now()
	exec(t, c, `SELECT async.defer(array[$1::bigint], '10 minutes')`, id)
	exec(t, c, `SELECT async.wait_for_latch()`)
	require.Less(t, time.Since(start), 5*time.Second, "defer and wait_for_latch return at once")
	got = getTask(t, c, id)
	require.Equal(t, "READY", got.State)
	require.Equal(t, "DEFERRED", got.Status)
	require.InDelta(t, 600, got.EligibleIn.Seconds(), 60)
}

// D11: PAUSED returns the task to the queue with no attempt left behind.
func TestPausedReturnsToQueue(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	takeLead(t, s, 1)
	id := push(t, c, "SELF", 1, "select 1")[0]
	cl := claim(t, s, 1, 1, nil)
	require.Len(t, cl, 1)
	ref := ref(cl[0])
	_, err := s.StartTasks(ctx, "n0", refs(ref))
	require.NoError(t, err)
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'PAUSED', NULL)`, id)
	got := getTask(t, c, id)
	require.Equal(t, "READY", got.State)
	require.Equal(t, "", got.Status)
	require.Nil(t, got.EligibleIn)
	require.EqualValues(t, 0, queryInt(t, c, `SELECT count(*) FROM async.task WHERE task_id = $1 AND (node IS NOT NULL OR started IS NOT NULL OR times_up IS NOT NULL OR tracked)`, id))
	// The running attempt is fenced out; the task is claimable again as attempt 2.
	fin := finish(t, s, "n0", ref, "FINISHED")
	require.False(t, fin.Applied)
	cl = claim(t, s, 1, 1, nil)
	require.Len(t, cl, 1)
	require.EqualValues(t, 2, cl[0].Attempt)
}

// D14.
func TestRestartTask(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ids := push(t, c, "SELF", 2, "select 1")
	exec(t, c, `UPDATE async.task SET consumed = now(), started = now(), node = 'n', times_up = now(), attempt = 1, retries = 1 WHERE task_id = $1`, ids[0])
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FAILED', 'boom')`, ids[0])
	l := listen(t, dsn)
	exec(t, c, `SELECT async.restart_task($1)`, ids[0])
	require.Equal(t, "push", l.next())
	var source string
	var failed *bool
	var nulls bool
	require.NoError(t, c.QueryRow(ctxT(t), `SELECT source, failed, processed IS NULL AND yielded IS NULL AND consumed IS NULL
	    AND eligible_when IS NULL AND finish_status IS NULL AND processing_error IS NULL AND times_up IS NULL
	    AND started IS NULL AND node IS NULL AND tracked = false AND retries = 0 AND attempt = 1
	    FROM async.task WHERE task_id = $1`, ids[0]).Scan(&source, &failed, &nulls))
	require.Equal(t, "async.restart_task", source)
	require.Nil(t, failed)
	require.True(t, nulls)
	require.Equal(t, "READY", getTask(t, c, ids[0]).State)

	wc, n := connectNotices(t, dsn)
	before := snapshot(t, c)
	exec(t, wc, `SELECT async.restart_task($1)`, ids[1]) // READY: not finished
	exec(t, wc, `SELECT async.restart_task(424242)`)
	require.Equal(t, before, snapshot(t, c))
	require.Equal(t, []string{
		"WARNING: async.restart_task: task " + strconv.Itoa(int(ids[1])) + " is not finished (it is READY); only finished tasks can be restarted",
		"WARNING: async.restart_task: no task with id 424242; nothing restarted",
	}, n.list)
	_, err := c.Exec(ctxT(t), `SELECT async.restart_task(NULL)`)
	requireSQLError(t, err, "22004", "task id is NULL")
}

func TestGetTasks(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "ext", "asynchronous_finish": true, "max_concurrency": 10},
	    {"target": "sync", "max_concurrency": 10}]}')`)
	takeLead(t, s, 1)
	syncIDs := queryIDs(t, c, `SELECT async.push_tasks(array[async.task(NULL, 'sync', '{"n": 1}', 5),
	    async.task(NULL, 'sync', '{"n": 2}', 1), async.task(NULL, 'sync', '{"n": 3}', 1)])`)
	asyncIDs := push(t, c, "ext", 2, "")
	// Not yet dispatched: nothing to hand out.
	rows, err := c.Query(ctx, `SELECT task_id FROM async.get_tasks('sync', 10, '0')`)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	require.Empty(t, got)

	cl := claim(t, s, 1, 10, nil)
	require.Len(t, cl, 5)
	for _, x := range cl {
		require.True(t, x.External)
		require.Empty(t, x.Node)
	}
	l := listen(t, dsn)
	type out struct {
		id       int64
		priority int32
		timesUp  time.Time
		data     string
	}
	rows, err = c.Query(ctx, `SELECT task_id, priority, times_up, task_data::text FROM async.get_tasks('sync', 2)`)
	require.NoError(t, err)
	handed, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (out, error) {
		var o out
		return o, r.Scan(&o.id, &o.priority, &o.timesUp, &o.data)
	})
	require.NoError(t, err)
	require.Len(t, handed, 2)
	require.Equal(t, syncIDs[1], handed[0].id, "(priority, entered, task_id) order")
	require.Equal(t, syncIDs[2], handed[1].id)
	require.Equal(t, `{"n": 2}`, handed[0].data)
	require.False(t, handed[0].timesUp.IsZero())
	require.Equal(t, "finish", l.next())
	g := getTask(t, c, syncIDs[1])
	require.Equal(t, "FINISHED", g.State, "a non-asynchronous hand-out finishes the task")
	require.Equal(t, "FINISHED", g.Status)
	require.Equal(t, false, *g.Failed)

	rows, err = c.Query(ctx, `SELECT task_id FROM async.get_tasks('ext', 5)`)
	require.NoError(t, err)
	got, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	require.Equal(t, asyncIDs, got)
	g = getTask(t, c, asyncIDs[0])
	require.Equal(t, "YIELDED", g.State, "an asynchronous hand-out yields: the consumer must finish it")
	require.Equal(t, "YIELDED", g.Status)

	// A waiting caller gets a task dispatched while it waits.
	res := make(chan []int64, 1)
	go func() {
		c := connect(t, dsn)
		rows, err := c.Query(context.Background(), `SELECT task_id FROM async.get_tasks('sync', 1, '20 seconds')`)
		if err != nil {
			res <- nil
			return
		}
		got, _ := pgx.CollectRows(rows, pgx.RowTo[int64])
		res <- got
	}()
	late := push(t, c, "sync", 1, "")[0]
	_ = late
	// the remaining older one (priority 5) is handed out first
	require.Equal(t, []int64{syncIDs[0]}, <-res)

	// Empty after the timeout.
	start := time.Now()
	rows, err = c.Query(ctx, `SELECT task_id FROM async.get_tasks('nothing', 1, '200 milliseconds')`)
	require.NoError(t, err)
	got, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	require.Empty(t, got)
	require.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond)

	for _, tc := range []struct {
		sql  string
		want string
	}{
		{`SELECT * FROM async.get_tasks(NULL)`, "target (concurrency pool) is NULL"},
		{`SELECT * FROM async.get_tasks('sync', 0)`, "limit must be at least 1, got 0"},
		{`SELECT * FROM async.get_tasks('sync', NULL)`, "limit must be at least 1, got NULL"},
		{`SELECT * FROM async.get_tasks('sync', 1, '-1 second')`, "timeout must be zero or positive"},
	} {
		before := snapshot(t, c)
		_, err := c.Exec(ctx, tc.sql)
		requireSQLError(t, err, "", tc.want)
		require.Equal(t, before, snapshot(t, c))
	}
}

func TestMainPauseResume(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	ctx := ctxT(t)
	wc, n := connectNotices(t, dsn)
	start := time.Now()
	exec(t, wc, `CALL async.main()`)
	exec(t, wc, `CALL async.main(true, true)`)
	require.Less(t, time.Since(start), 5*time.Second)
	require.Len(t, n.list, 2)
	require.Contains(t, n.list[0], "asyncnode cluster is the orchestrator")

	l := listen(t, dsn)
	exec(t, c, `SELECT async.pause()`)
	require.Equal(t, "control", l.next())
	cfg, err := s.LoadConfig(ctx)
	require.NoError(t, err)
	require.True(t, cfg.Control.Paused)
	exec(t, c, `SELECT async.resume()`)
	require.Equal(t, "control", l.next())
	cfg, err = s.LoadConfig(ctx)
	require.NoError(t, err)
	require.False(t, cfg.Control.Paused)
	// A plain UPDATE wakes the cluster too.
	exec(t, c, `UPDATE async.control SET enabled = false`)
	require.Equal(t, "control", l.next())
	cfg, err = s.LoadConfig(ctx)
	require.NoError(t, err)
	require.False(t, cfg.Control.Enabled)
}

func TestViews(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	takeLead(t, s, 1)
	push(t, c, "SELF", 6, "select 1")
	claim(t, s, 1, 2, nil)
	require.Equal(t, []string{"SELF 2 4 0"}, queryStrings(t, c,
		`SELECT target || ' ' || running || ' ' || queued || ' ' || yielded FROM async.v_target`))
	require.Equal(t, []string{"SELF 4 2 4"}, queryStrings(t, c,
		`SELECT concurrency_pool || ' ' || max_workers || ' ' || running || ' ' || queued FROM async.v_concurrency_pool`))
	require.Equal(t, []string{"RUNNING n0", "RUNNING n1"}, queryStrings(t, c,
		`SELECT state || ' ' || node FROM async.v_running_task ORDER BY node`))
	require.Equal(t, []string{"SELF 6 4 2"}, queryStrings(t, c,
		`SELECT target || ' ' || tasks_entered_24h || ' ' || tasks_pending || ' ' || concurency_assigned_workers FROM async.v_target_status`))
}
