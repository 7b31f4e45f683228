package pgstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

func TestOpenErrors(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, err := pgstore.Open(ctx, "host=127.0.0.1 port=notaport password=hunter2", nil)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "hunter2")
	_, err = pgstore.Open(ctx, "host=127.0.0.1 password='un terminated hunter2", nil)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "hunter2")
	_, err = pgstore.Open(ctx, "postgres://u:hunter2@127.0.0.1:1/db?connect_timeout=2", nil)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "hunter2")
	require.Contains(t, err.Error(), "xxxxx")
	_, err = pgstore.Migrate(ctx, "postgres://u:hunter2@127.0.0.1:1/db?connect_timeout=2", nil)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "hunter2")
}

func TestCheckSchema(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	empty := h.EmptyDB(t)
	s, err := pgstore.Open(ctx, empty, nil)
	require.NoError(t, err)
	defer s.Close()
	require.ErrorIs(t, s.CheckSchema(ctx), pgstore.ErrSchemaMissing)
	_, err = s.LoadConfig(ctx)
	require.ErrorIs(t, err, pgstore.ErrSchemaMissing, "a missing schema is reported as such by every call")

	_, s, c := newDB(t)
	require.NoError(t, s.CheckSchema(ctx))
	exec(t, c, `DELETE FROM async.schema_migrations WHERE version = $1`, pgstore.CurrentVersion())
	require.ErrorIs(t, s.CheckSchema(ctx), pgstore.ErrSchemaOutdated)
	exec(t, c, `INSERT INTO async.schema_migrations (version, name) VALUES ($1, 'x'), ($2, 'future')`,
		pgstore.CurrentVersion(), pgstore.CurrentVersion()+1)
	require.ErrorIs(t, s.CheckSchema(ctx), pgstore.ErrSchemaTooNew)
}

func TestClaimOrderAndLimits(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"control": {"default_concurrency_pool_workers": 2},
	    "targets": [{"target": "SELF", "max_concurrency": 3}, {"target": "t2", "max_concurrency": 10}],
	    "concurrency_pools": [{"concurrency_pool": "big", "max_workers": 100}]}')`)
	takeLead(t, s, 7)
	// Priorities across pools, FIFO within a priority.
	a := queryIDs(t, c, `SELECT async.push_tasks(array[
	    async.task('a1', 'SELF', priority := 5), async.task('a2', 'SELF', priority := 1), async.task('a3', 'SELF', priority := 1),
	    async.task('a4', 'SELF', priority := 1), async.task('a5', 'SELF', priority := 0)])`)
	b := queryIDs(t, c, `SELECT async.push_tasks(array[
	    async.task('b1', 't2', priority := 1), async.task('b2', 't2', priority := 9),
	    async.task('u1', 't2', concurrency_pool := 'unconfigured'), async.task('u2', 't2', concurrency_pool := 'unconfigured'),
	    async.task('u3', 't2', concurrency_pool := 'unconfigured'),
	    async.task(NULL, 't2', priority := 1)])`)

	now := time.Now().Truncate(time.Microsecond)
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 7, Slots: []string{"x", "y", "z", "x", "y", "z", "x", "y", "z", "x"}, Now: now})
	require.NoError(t, err)
	// SELF gives 3 (limit), unconfigured gives 2 (default), t2 gives all.
	var got []int64
	for _, x := range cl {
		got = append(got, x.TaskID)
	}
	// order: a5 (p0), u1, u2 (p0), a2, a3 (p1; a4 over SELF's limit), b1, ext (p1), a1 (p5), b2 (p9)
	require.Equal(t, []int64{a[4], b[2], b[3], a[1], a[2], b[0], b[5], b[1]}, got)
	wantNodes := []string{"x", "y", "z", "x", "y", "z", "", "x"}
	for i, x := range cl {
		require.Equal(t, wantNodes[i], x.Node, "task %d", i)
		require.Equal(t, x.Node == "", x.External)
		require.EqualValues(t, 1, x.Attempt)
		require.WithinDuration(t, now.Add(time.Hour), x.Deadline, time.Millisecond, "control default_timeout")
	}
	require.Equal(t, "unconfigured", cl[1].Pool)
	require.Equal(t, "t2", cl[1].Target)
	var consumed time.Time
	var tracked bool
	require.NoError(t, c.QueryRow(ctx, `SELECT consumed, tracked FROM async.task WHERE task_id = $1`, a[4]).Scan(&consumed, &tracked))
	require.True(t, consumed.Equal(now))
	require.True(t, tracked)

	// Nothing left within the limits, even with free slots.
	require.Empty(t, claim(t, s, 7, 10, map[string]int{"SELF": 3, "unconfigured": 2}))
	// PoolRunning below the real number: room = limit - PoolRunning.
	cl = claim(t, s, 7, 10, map[string]int{"SELF": 2, "unconfigured": 1, "t2": 10})
	require.Len(t, cl, 2)
	require.Equal(t, b[4], cl[0].TaskID, "u3, priority 0")
	require.Equal(t, a[3], cl[1].TaskID, "a4, priority 1")
}

func TestClaimGlobalLimitAndTimeouts(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "SELF", "max_concurrency": 50, "default_timeout": "10 minutes"}]}')`)
	takeLead(t, s, 1)
	ids := push(t, c, "SELF", 10, "select 1")
	timed := queryIDs(t, c, `SELECT async.push_tasks(array[async.task('t', 'SELF', manual_timeout := '3 seconds')])`)
	now := time.Now()
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(4), Now: now})
	require.NoError(t, err)
	require.Len(t, cl, 4, "len(Slots) is the global limit")
	for i, x := range cl {
		require.Equal(t, ids[i], x.TaskID)
		require.WithinDuration(t, now.Add(10*time.Minute), x.Deadline, time.Millisecond, "target default_timeout")
	}
	cl = claim(t, s, 1, 100, nil)
	require.Len(t, cl, 7)
	require.Equal(t, timed[0], cl[6].TaskID)
	require.WithinDuration(t, time.Now().Add(3*time.Second), cl[6].Deadline, time.Second, "manual_timeout wins")
	cl, err = s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Now: time.Now()})
	require.NoError(t, err)
	require.Empty(t, cl, "no slots, no claim")
}

// Each claimed task gets its own target's default time-out, whatever the
// other tasks in the same claim (the claim joins the targets once).
func TestClaimTimeoutPerTarget(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	exec(t, c, `SELECT async.configure('{"targets": [
	    {"target": "SELF", "max_concurrency": 50, "default_timeout": "10 minutes"},
	    {"target": "t2", "max_concurrency": 50, "default_timeout": "2 minutes"},
	    {"target": "t3", "max_concurrency": 50}]}')`)
	takeLead(t, s, 1)
	targets := []struct {
		name    string
		timeout time.Duration // its default_timeout, else control's (1 hour)
	}{{"SELF", 10 * time.Minute}, {"t2", 2 * time.Minute}, {"t3", time.Hour}}
	want := map[int64]time.Duration{}
	for i := range 12 { // interleaved, so one claim mixes the three
		tg := targets[i%len(targets)]
		for _, id := range queryIDs(t, c, `SELECT async.push_tasks(array[async.task('select 1', $1)])`, tg.name) {
			want[id] = tg.timeout
		}
	}
	now := time.Now()
	cl, err := s.ClaimTasks(ctxT(t), pgstore.ClaimRequest{Term: 1, Slots: slots(20), Now: now})
	require.NoError(t, err)
	require.Len(t, cl, len(want))
	for _, x := range cl {
		require.WithinDuration(t, now.Add(want[x.TaskID]), x.Deadline, time.Millisecond, "task %d on %s", x.TaskID, x.Target)
	}
}

// D6: limit changes apply at the next claim.
func TestClaimLimitChangeAppliesAtOnce(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	takeLead(t, s, 1)
	push(t, c, "SELF", 20, "select 1")
	push(t, c, "SELF", 20, "")
	exec(t, c, `UPDATE async.task SET concurrency_pool = 'p' WHERE query IS NULL`)
	require.Len(t, claim(t, s, 1, 100, map[string]int{"p": 4}), 4, "SELF 4, p at its default 4 and full")
	exec(t, c, `SELECT async.configure('{"control": {"self_concurrency": 6, "default_concurrency_pool_workers": 5},
	    "concurrency_pools": [{"concurrency_pool": "p", "max_workers": 7}]}')`)
	cl := claim(t, s, 1, 100, map[string]int{"SELF": 4, "p": 4})
	pools := map[string]int{}
	for _, x := range cl {
		pools[x.Pool]++
	}
	require.Equal(t, map[string]int{"SELF": 2, "p": 3}, pools)
	exec(t, c, `SELECT async.configure('{"concurrency_pools": []}')`)
	cl = claim(t, s, 1, 100, map[string]int{"SELF": 6, "p": 4})
	require.Len(t, cl, 1, "p back to the default (now 5)")
	require.Equal(t, "p", cl[0].Pool)
}

func TestClaimEligibleWhen(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	takeLead(t, s, 1)
	ids := push(t, c, "SELF", 2, "select 1")
	exec(t, c, `SELECT async.defer(array[$1::bigint], '1 hour')`, ids[0])
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(4), Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, cl, 1)
	require.Equal(t, ids[1], cl[0].TaskID)
	cl, err = s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(4), Now: time.Now().Add(2 * time.Hour)})
	require.NoError(t, err)
	require.Len(t, cl, 1, "eligible once Now passes eligible_when")
	require.Equal(t, ids[0], cl[0].TaskID)
	// Once it ran again, the deferral is used up.
	_, err = s.StartTasks(ctx, cl[0].Node, refs(ref(cl[0])))
	require.NoError(t, err)
	finish(t, s, cl[0].Node, ref(cl[0]), pgstore.StatusFinished)
	require.Nil(t, getTask(t, c, ids[0]).EligibleIn)
}

// The claim reads only the partial indexes of unfinished rows: a large
// history does not change its plan (D18).
func TestClaimPlanIgnoresHistory(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	exec(t, c, `INSERT INTO async.task (target, concurrency_pool, query, consumed, processed, finish_status, failed)
	            SELECT 'SELF', 'SELF', 'select 0', now(), now(), 'FINISHED', false FROM generate_series(1, 200000)`)
	push(t, c, "SELF", 100, "select 1")
	exec(t, c, `ANALYZE async.task`)
	plan := explainClaim(t, c, "", 1000)
	require.NotContains(t, plan, "Seq Scan on task", plan)
	require.Contains(t, plan, "task_ready_idx", plan)
}

// Until vacuum removes them, the task_ready_idx entries of claimed tasks
// stay in front of the READY ones. The claim walks them once, in the probe
// that finds the pools with READY rows; the pool's own scan starts at the
// first READY row that probe found, so it reads a few pages however many
// there are (docs/performance.md: 3264 instead of 6500 buffers per claim
// with 1.77 million dead rows).
func TestClaimWalksClaimedEntriesOnce(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `ALTER TABLE async.task SET (autovacuum_enabled = false)`)
	exec(t, c, `UPDATE async.target SET max_concurrency = 10000 WHERE target = 'SELF'`)
	push(t, c, "SELF", 5000, "select 1")
	takeLead(t, s, 1)
	for claimed := 0; claimed < 5000; {
		cl := claim(t, s, 1, 1000, nil)
		require.NotEmpty(t, cl)
		claimed += len(cl)
	}
	push(t, c, "SELF", 1, "select 1")

	tx, err := c.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	var plan []map[string]any
	require.NoError(t, json.Unmarshal([]byte(explainClaim(t, tx, "ANALYZE, BUFFERS, FORMAT JSON", 1)), &plan))
	reads := map[string]float64{} // node type → most buffers one such node read in task_ready_idx
	var walk func(n map[string]any)
	walk = func(n map[string]any) {
		if n["Index Name"] == "task_ready_idx" {
			typ := n["Node Type"].(string)
			reads[typ] = max(reads[typ], n["Shared Hit Blocks"].(float64)+n["Shared Read Blocks"].(float64))
		}
		if kids, ok := n["Plans"].([]any); ok {
			for _, k := range kids {
				walk(k.(map[string]any))
			}
		}
	}
	walk(plan[0]["Plan"].(map[string]any))
	t.Logf("buffers read in task_ready_idx: %v", reads)
	require.Greater(t, reads["Index Only Scan"], 10.0, "the probe did not walk the claimed entries: %v", reads)
	require.LessOrEqual(t, reads["Index Scan"], 5.0, "the pool's scan walked the claimed entries again: %v", reads)
}

// TestStartIsAHeapOnlyUpdate pushes enough tasks to fill many heap pages,
// claims, starts and finishes them as the cluster does, and checks that a
// good share of the starts were heap-only updates (no index entries
// written). That needs the start to change no indexed column and no column
// of a partial-index predicate: an index on "started" makes it fail (0 of
// 3000). How many are HOT also depends on room on the pages (migration 0006
// keeps some) and on what else the server runs, so the bound is loose.
func TestStartIsAHeapOnlyUpdate(t *testing.T) {
	t.Parallel()
	const tasks, batch = 3000, 300
	dsn, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `UPDATE async.target SET max_concurrency = $1 WHERE target = 'SELF'`, batch)
	push(t, c, "SELF", tasks, "select 1")
	takeLead(t, s, 1)
	// As in a busy cluster, the leader claims the next batch before the
	// nodes start the last one, so new row versions of both share pages.
	started := 0
	next := claim(t, s, 1, batch, nil)
	for len(next) > 0 {
		cl := next
		next = claim(t, s, 1, batch, nil)
		byNode := refsByNode(cl)
		for node, rs := range byNode {
			st, err := s.StartTasks(ctx, node, rs)
			require.NoError(t, err)
			require.Len(t, st, len(rs))
			started += len(st)
		}
		for node, rs := range byNode {
			_, err := s.FinishTasks(ctx, node, finished(rs))
			require.NoError(t, err)
		}
	}
	require.Equal(t, tasks, started)
	// Sessions report their statistics when they end (an idle one may wait
	// 10 s).
	s.Close()
	require.NoError(t, c.Close(ctx))
	stats := connect(t, dsn)
	var upd, hot int64
	waitFor(t, "the statistics of all updates", func() bool {
		require.NoError(t, stats.QueryRow(ctx, `SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
		                                       WHERE relid = 'async.task'::regclass`).Scan(&upd, &hot))
		return upd >= 3*tasks // claim, start, finish
	})
	require.GreaterOrEqual(t, hot, int64(tasks/10), "of %d starts only %d updates were heap-only (%d updates)", tasks, hot, upd)
}

// start_tasks.sql finds each row's attempt by the position of its id in
// ascending ids that hold each id once: StartTasks must sort the refs and
// send an id given twice in a statement of its own, whatever order and
// repeats it is given.
func TestStartTasksFindsEachAttemptInAnyOrder(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `UPDATE async.target SET max_concurrency = 20 WHERE target = 'SELF'`)
	push(t, c, "SELF", 20, "select 1")
	takeLead(t, s, 1)
	n1 := make([]string, 20)
	for i := range n1 {
		n1[i] = "n1"
	}
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: n1, Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, cl, 20)
	// Newest first, and for every third task a wrong attempt of it too,
	// before or after the right one.
	var rs, want []pgstore.Ref
	for i := len(cl) - 1; i >= 0; i-- {
		r := ref(cl[i])
		wrong := pgstore.Ref{TaskID: r.TaskID, Attempt: r.Attempt + 1}
		switch i % 3 {
		case 0:
			rs = append(rs, wrong, r)
		case 1:
			rs = append(rs, r, wrong)
		default:
			rs = append(rs, r)
		}
		want = append(want, r)
	}
	st, err := s.StartTasks(ctx, "n1", rs)
	require.NoError(t, err)
	got := make([]pgstore.Ref, len(st))
	for i, x := range st {
		got[i] = pgstore.Ref{TaskID: x.TaskID, Attempt: x.Attempt}
	}
	require.Equal(t, want, got, "every right attempt started, in the order given")
	require.EqualValues(t, 20, queryInt(t, c, `SELECT count(*) FROM async.task WHERE started IS NOT NULL`))
}

func TestIDRuns(t *testing.T) {
	t.Parallel()
	r := func(id int64, attempt int32) pgstore.Ref { return pgstore.Ref{TaskID: id, Attempt: attempt} }
	require.Nil(t, pgstore.IDRuns(nil))
	require.Equal(t, [][]pgstore.Ref{{r(3, 1), r(4, 1), r(5, 1)}},
		pgstore.IDRuns([]pgstore.Ref{r(5, 1), r(3, 1), r(4, 1)}))
	require.Equal(t, [][]pgstore.Ref{{r(3, 1), r(4, 1), r(5, 2)}, {r(4, 2), r(5, 1)}, {r(5, 3)}},
		pgstore.IDRuns([]pgstore.Ref{r(5, 2), r(4, 1), r(3, 1), r(5, 1), r(5, 3), r(4, 2)}))
}

// TestBatchRowsKeepTheirOwnValues: the claim, the start and the finish scan
// each batch's rows into variables declared once per batch; every row must
// still come back with its own values, a NULL connection string (SELF) as
// nil and every other one apart.
func TestBatchRowsKeepTheirOwnValues(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [
	    {"target": "a", "connection_string": "host=a", "default_timeout": "1 minute"},
	    {"target": "b", "connection_string": "host=b", "default_timeout": "2 minutes"}]}')`)
	takeLead(t, s, 1)
	want := map[int64]string{} // task id -> target
	for _, tg := range []string{"b", "SELF", "a", "b", "a", "SELF"} {
		for _, id := range push(t, c, tg, 1, "select 1") {
			want[id] = tg
		}
	}
	// External tasks (no query) in between: they get no node.
	external := map[int64]bool{}
	for _, tg := range []string{"a", "SELF"} {
		for _, id := range push(t, c, tg, 1, "") {
			want[id], external[id] = tg, true
		}
	}
	node := make([]string, len(want))
	for i := range node {
		node[i] = "n0"
	}
	now := time.Now()
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: node, Now: now})
	require.NoError(t, err)
	require.Len(t, cl, len(want))
	timeout := map[string]time.Duration{"a": time.Minute, "b": 2 * time.Minute}
	var rs []pgstore.Ref
	for _, x := range cl {
		require.Equal(t, want[x.TaskID], x.Target, "task %d", x.TaskID)
		if d, ok := timeout[x.Target]; ok {
			require.WithinDuration(t, now.Add(d), x.Deadline, time.Second, "task %d", x.TaskID)
		}
		require.Equal(t, external[x.TaskID], x.External, "task %d", x.TaskID)
		if x.External {
			require.Empty(t, x.Node, "task %d", x.TaskID)
			continue
		}
		require.Equal(t, "n0", x.Node, "task %d", x.TaskID)
		rs = append(rs, ref(x))
	}
	st, err := s.StartTasks(ctx, "n0", rs)
	require.NoError(t, err)
	require.Len(t, st, len(rs))
	var outs []pgstore.Outcome
	for _, x := range st {
		require.Equal(t, want[x.TaskID], x.Target, "task %d", x.TaskID)
		require.False(t, x.TargetGone, "task %d", x.TaskID)
		if x.Target == "SELF" {
			require.Nil(t, x.ConnStr, "task %d", x.TaskID)
		} else {
			require.NotNil(t, x.ConnStr, "task %d", x.TaskID)
			require.Equal(t, "host="+x.Target, *x.ConnStr, "task %d", x.TaskID)
		}
		outs = append(outs, pgstore.Outcome{Ref: pgstore.Ref{TaskID: x.TaskID, Attempt: x.Attempt},
			Status: pgstore.StatusFinished, At: time.Now()})
	}
	// A ref that is not this node's comes back not applied, among applied ones.
	outs = append(outs, pgstore.Outcome{Ref: pgstore.Ref{TaskID: st[0].TaskID, Attempt: st[0].Attempt + 1},
		Status: pgstore.StatusFinished, At: time.Now()})
	f, err := s.FinishTasks(ctx, "n0", outs)
	require.NoError(t, err)
	require.Len(t, f, len(outs))
	for i, x := range f {
		require.Equal(t, outs[i].Ref, x.Ref)
		require.Equal(t, i < len(st), x.Applied, "outcome %d", i)
	}
}

// TestStartTargetGone: a task whose target row is gone (only possible past
// the target triggers) is still started, flagged TargetGone with no
// connection string, beside tasks of other targets that keep theirs.
func TestStartTargetGone(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a", "connection_string": "host=a"},
	    {"target": "b", "connection_string": "host=b"}]}')`)
	takeLead(t, s, 1)
	push(t, c, "a", 2, "select 1")
	push(t, c, "b", 2, "select 1")
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: []string{"n0", "n0", "n0", "n0"}, Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, cl, 4)
	exec(t, c, `ALTER TABLE async.target DISABLE TRIGGER USER`)
	exec(t, c, `DELETE FROM async.target WHERE target = 'a'`)
	exec(t, c, `ALTER TABLE async.target ENABLE TRIGGER USER`)
	var rs []pgstore.Ref
	for _, x := range cl {
		rs = append(rs, ref(x))
	}
	st, err := s.StartTasks(ctx, "n0", rs)
	require.NoError(t, err)
	require.Len(t, st, 4)
	for _, x := range st {
		if x.Target == "a" {
			require.True(t, x.TargetGone, "task %d", x.TaskID)
			require.Nil(t, x.ConnStr, "task %d", x.TaskID)
			continue
		}
		require.False(t, x.TargetGone, "task %d", x.TaskID)
		require.NotNil(t, x.ConnStr, "task %d", x.TaskID)
		require.Equal(t, "host=b", *x.ConnStr, "task %d", x.TaskID)
	}
}

func TestStartAndFinishFencing(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "ext", "connection_string": "host=ext", "asynchronous_finish": true,
	    "concurrency_track_yielded": true}]}')`)
	takeLead(t, s, 1)
	ids := push(t, c, "SELF", 3, "select ##flow.TASK_ID##")
	asy := push(t, c, "ext", 1, "select 2")
	cl := claim(t, s, 1, 4, nil)
	require.Len(t, cl, 4)
	r0, r1, r2, r3 := ref(cl[0]), ref(cl[1]), ref(cl[2]), ref(cl[3])
	require.Equal(t, []string{"n0", "n1", "n2", "n3"}, []string{cl[0].Node, cl[1].Node, cl[2].Node, cl[3].Node})

	before := snapshot(t, c)
	st, err := s.StartTasks(ctx, "n1", refs(r0))
	require.NoError(t, err)
	require.Empty(t, st, "wrong node")
	st, err = s.StartTasks(ctx, "n0", refs(pgstore.Ref{TaskID: r0.TaskID, Attempt: 2}))
	require.NoError(t, err)
	require.Empty(t, st, "wrong attempt")
	f, err := s.FinishTasks(ctx, "n1", []pgstore.Outcome{{Ref: r0, Status: pgstore.StatusFinished, At: time.Now()}})
	require.NoError(t, err)
	require.Equal(t, []pgstore.Finished{{Ref: r0}}, f, "wrong node writes nothing")
	f, err = s.FinishTasks(ctx, "n0", []pgstore.Outcome{{Ref: pgstore.Ref{TaskID: r0.TaskID, Attempt: 0}, Status: pgstore.StatusFailed, At: time.Now()}})
	require.NoError(t, err)
	require.False(t, f[0].Applied, "wrong attempt writes nothing")
	require.Equal(t, before, snapshot(t, c))

	st, err = s.StartTasks(ctx, "n0", refs(r0))
	require.NoError(t, err)
	require.Len(t, st, 1)
	require.Equal(t, pgstore.StartedTask{TaskID: ids[0], Attempt: 1, Query: "select ##flow.TASK_ID##", Target: "SELF",
		Deadline: cl[0].Deadline}, st[0])
	st, err = s.StartTasks(ctx, "n0", refs(r0))
	require.NoError(t, err)
	require.Empty(t, st, "started only once")
	st, err = s.StartTasks(ctx, "n3", refs(r3))
	require.NoError(t, err)
	require.Len(t, st, 1)
	require.Equal(t, asy[0], st[0].TaskID)
	require.Equal(t, "host=ext", *st[0].ConnStr)
	require.True(t, st[0].Async)
	// several in one call come back in the order asked
	st, err = s.StartTasks(ctx, "n1", refs(r2, r1))
	require.NoError(t, err)
	require.Len(t, st, 1, "r2 belongs to n2")
	require.Equal(t, r1.TaskID, st[0].TaskID)

	msg := "ERROR: boom"
	at := time.Now().Truncate(time.Microsecond)
	f, err = s.FinishTasks(ctx, "n0", []pgstore.Outcome{
		{Ref: r0, Status: pgstore.StatusFinished, At: at},
		{Ref: r0, Status: pgstore.StatusFailed, At: at}, // repeated: reported not applied
	})
	require.NoError(t, err)
	require.Equal(t, []pgstore.Finished{{Ref: r0, Applied: true}, {Ref: r0}}, f)
	got := getTask(t, c, ids[0])
	require.Equal(t, "FINISHED", got.Status)
	require.Equal(t, false, *got.Failed)
	f, err = s.FinishTasks(ctx, "n1", []pgstore.Outcome{{Ref: r1, Status: pgstore.StatusFailed, Error: &msg, At: at}})
	require.NoError(t, err)
	require.True(t, f[0].Applied)
	got = getTask(t, c, ids[1])
	require.Equal(t, "FAILED", got.Status)
	require.Equal(t, msg, got.Error)
	var processed time.Time
	require.NoError(t, c.QueryRow(ctx, `SELECT processed FROM async.task WHERE task_id = $1`, ids[1]).Scan(&processed))
	require.True(t, processed.Equal(at))
	// A finished attempt cannot be finished again.
	f, err = s.FinishTasks(ctx, "n1", []pgstore.Outcome{{Ref: r1, Status: pgstore.StatusFinished, At: at}})
	require.NoError(t, err)
	require.False(t, f[0].Applied)
	// Asynchronous target: YIELDED keeps the pool slot when track_yielded.
	f, err = s.FinishTasks(ctx, "n3", []pgstore.Outcome{{Ref: r3, Status: pgstore.StatusYielded, At: at}})
	require.NoError(t, err)
	require.Equal(t, pgstore.Finished{Ref: r3, Applied: true, Yielded: true, HoldPool: true}, f[0])
	got = getTask(t, c, asy[0])
	require.Equal(t, "YIELDED", got.State)
	require.Equal(t, "YIELDED", got.Status)
	// yield_upon_finish turns FINISHED into a yield.
	exec(t, c, `UPDATE async.task SET yield_upon_finish = true WHERE task_id = $1`, ids[2])
	f, err = s.FinishTasks(ctx, "n2", []pgstore.Outcome{{Ref: r2, Status: pgstore.StatusFinished, At: at}})
	require.NoError(t, err)
	require.Equal(t, pgstore.Finished{Ref: r2, Applied: true, Yielded: true}, f[0])
	got = getTask(t, c, ids[2])
	require.Equal(t, "YIELDED", got.State)
	require.Equal(t, "", got.Status)
	require.Nil(t, got.YieldUponFinish)
	// A cancelled task fences its node out.
	id := push(t, c, "SELF", 1, "select 3")[0]
	cl = claim(t, s, 1, 1, nil)
	exec(t, c, `SELECT async.cancel(array[$1::bigint])`, id)
	st, err = s.StartTasks(ctx, "n0", refs(ref(cl[0])))
	require.NoError(t, err)
	require.Empty(t, st)
	require.False(t, finish(t, s, "n0", ref(cl[0]), pgstore.StatusFinished).Applied)
	require.Equal(t, "CANCELED", getTask(t, c, id).Status)

	_, err = s.FinishTasks(ctx, "n0", []pgstore.Outcome{{Ref: r0, Status: "DONE"}})
	require.ErrorContains(t, err, `invalid status "DONE"`)
}

func TestUnclaim(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	takeLead(t, s, 1)
	ids := push(t, c, "SELF", 2, "select 1")
	cl := claim(t, s, 1, 2, nil)
	_, err := s.StartTasks(ctx, "n1", refs(ref(cl[1])))
	require.NoError(t, err)
	require.NoError(t, s.Unclaim(ctx, 1, refs(ref(cl[0]), ref(cl[1]))))
	require.Equal(t, "READY", getTask(t, c, ids[0]).State)
	require.Equal(t, "RUNNING", getTask(t, c, ids[1]).State, "a started attempt is not unclaimed")
	require.EqualValues(t, 1, queryInt(t, c, `SELECT attempt FROM async.task WHERE task_id = $1 AND node IS NULL AND times_up IS NULL`, ids[0]))
	cl = claim(t, s, 1, 2, nil)
	require.Len(t, cl, 1)
	require.EqualValues(t, 2, cl[0].Attempt)
	require.ErrorIs(t, s.Unclaim(ctx, 2, refs(ref(cl[0]))), pgstore.ErrStaleTerm)
}

func TestTaskStates(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "ext", "asynchronous_finish": true, "concurrency_track_yielded": true}]}')`)
	takeLead(t, s, 1)
	ready := push(t, c, "SELF", 1, "select 1")[0]
	exec(t, c, `SELECT async.defer(array[$1::bigint], '1 hour')`, ready)
	run := push(t, c, "SELF", 1, "select 1")[0]
	ext := push(t, c, "ext", 1, "")[0]
	y := push(t, c, "ext", 1, "select 1")[0]
	cl := claim(t, s, 1, 3, nil)
	require.Len(t, cl, 3)
	_, err := s.StartTasks(ctx, "n0", refs(ref(cl[0])))
	require.NoError(t, err)
	_, err = s.StartTasks(ctx, "n1", refs(ref(cl[2])))
	require.NoError(t, err)
	finish(t, s, "n1", ref(cl[2]), pgstore.StatusYielded)
	done := push(t, c, "SELF", 1, "select 1")[0]
	exec(t, c, `SELECT async.cancel(array[$1::bigint])`, done)

	st, err := s.TaskStates(ctx, []int64{ready, run, ext, y, done, 123456})
	require.NoError(t, err)
	require.Equal(t, pgstore.StateReady, st[ready].State)
	require.Equal(t, normalize(pgstore.TaskState{TaskID: run, Attempt: 1, Node: "n0", State: pgstore.StateRunning, Started: true,
		Pool: "SELF", TimesUp: &cl[0].Deadline}), normalize(st[run]))
	require.Equal(t, normalize(pgstore.TaskState{TaskID: ext, Attempt: 1, State: pgstore.StateRunning, External: true, TrackYielded: true,
		Pool: "ext", TimesUp: &cl[1].Deadline}), normalize(st[ext]))
	require.Equal(t, pgstore.StateYielded, st[y].State)
	require.True(t, st[y].TrackYielded)
	require.Equal(t, pgstore.StateFinished, st[done].State)
	require.Equal(t, pgstore.TaskState{TaskID: 123456, State: pgstore.StateMissing}, st[123456])

	fl, err := s.InFlightTasks(ctx)
	require.NoError(t, err)
	var got []int64
	for _, x := range fl {
		got = append(got, x.TaskID)
	}
	require.Equal(t, []int64{run, ext, y}, got)
}

func normalize(ts pgstore.TaskState) pgstore.TaskState {
	if ts.TimesUp != nil {
		u := ts.TimesUp.UTC()
		ts.TimesUp = &u
	}
	return ts
}

func TestResolveLost(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "SELF", "max_concurrency": 10}, {"target": "retry", "max_retries": 1}]}')`)
	takeLead(t, s, 3)
	notStarted := push(t, c, "SELF", 1, "a")[0]
	noRetry := push(t, c, "SELF", 1, "b")[0]
	late := push(t, c, "SELF", 1, "c")[0]
	retry := push(t, c, "retry", 1, "d")[0]
	finished := push(t, c, "SELF", 1, "e")[0]
	yielded := push(t, c, "SELF", 1, "f")[0]
	cl := claim(t, s, 3, 10, nil)
	require.Len(t, cl, 6)
	byID := map[int64]pgstore.Claimed{}
	for _, x := range cl {
		byID[x.TaskID] = x
	}
	for _, id := range []int64{noRetry, late, retry, finished, yielded} {
		x := byID[id]
		st, err := s.StartTasks(ctx, x.Node, refs(ref(x)))
		require.NoError(t, err)
		require.Len(t, st, 1)
	}
	finish(t, s, byID[finished].Node, ref(byID[finished]), pgstore.StatusFinished)
	finish(t, s, byID[yielded].Node, ref(byID[yielded]), pgstore.StatusYielded)
	exec(t, c, `UPDATE async.task SET times_up = now() - interval '1 second' WHERE task_id = $1`, late)

	now := time.Now()
	in := refs(ref(byID[notStarted]), ref(byID[noRetry]), ref(byID[late]), ref(byID[retry]), ref(byID[finished]),
		ref(byID[yielded]), pgstore.Ref{TaskID: noRetry, Attempt: 9}, pgstore.Ref{TaskID: 999999, Attempt: 1})
	res, err := s.ResolveLost(ctx, 3, "node n1 was lost", in, now)
	require.NoError(t, err)
	var outcomes []string
	for _, r := range res {
		outcomes = append(outcomes, r.Outcome)
	}
	require.Equal(t, []string{"requeued", "failed", "timed_out", "requeued", "skipped", "skipped", "skipped", "skipped"}, outcomes)
	for i, r := range res {
		require.Equal(t, in[i], r.Ref)
	}

	require.Equal(t, "READY", getTask(t, c, notStarted).State)
	g := getTask(t, c, noRetry)
	require.Equal(t, "FAILED", g.Status)
	require.Equal(t, "node n1 was lost", g.Error)
	require.True(t, *g.Failed)
	g = getTask(t, c, late)
	require.Equal(t, "TIMED_OUT", g.Status)
	require.Equal(t, "Canceling due to time out", g.Error)
	require.True(t, *g.Failed)
	require.Equal(t, "READY", getTask(t, c, retry).State)
	require.EqualValues(t, 1, queryInt(t, c, `SELECT retries FROM async.task WHERE task_id = $1 AND started IS NULL AND node IS NULL`, retry))
	require.Equal(t, "YIELDED", getTask(t, c, yielded).State)

	// The retry is used up: the next loss fails the task (never both).
	cl = claim(t, s, 3, 10, nil)
	require.Len(t, cl, 2)
	for _, x := range cl {
		_, err := s.StartTasks(ctx, x.Node, refs(ref(x)))
		require.NoError(t, err)
	}
	res, err = s.ResolveLost(ctx, 3, "node n0 was lost", refs(ref(cl[0]), ref(cl[1])), time.Now())
	require.NoError(t, err)
	got := map[int64]string{}
	for _, r := range res {
		got[r.TaskID] = r.Outcome
	}
	require.Equal(t, map[int64]string{notStarted: "failed", retry: "failed"}, got)
	_, err = s.ResolveLost(ctx, 2, "x", refs(ref(cl[0])), time.Now())
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
}

func TestTimeOutTasks(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "ext", "asynchronous_finish": true}]}')`)
	takeLead(t, s, 1)
	q := push(t, c, "SELF", 1, "select 1")[0]     // query task: its node times it out
	ext := push(t, c, "SELF", 1, "")[0]           // non-query RUNNING
	y := push(t, c, "ext", 1, "select 1")[0]      // will be YIELDED
	fresh := push(t, c, "SELF", 1, "")[0]         // not yet due
	ready := push(t, c, "SELF", 1, "select 1")[0] // READY: never times out
	cl := claim(t, s, 1, 4, nil)
	require.Len(t, cl, 4)
	var yc pgstore.Claimed
	for _, x := range cl {
		if x.TaskID == y {
			yc = x
		}
	}
	_, err := s.StartTasks(ctx, yc.Node, refs(ref(yc)))
	require.NoError(t, err)
	finish(t, s, yc.Node, ref(yc), pgstore.StatusYielded)
	exec(t, c, `UPDATE async.task SET times_up = now() + interval '1 hour' WHERE task_id = $1`, fresh)
	exec(t, c, `UPDATE async.task SET times_up = now() - interval '1 minute' WHERE task_id <> $1`, fresh)

	now := time.Now()
	out, err := s.TimeOutTasks(ctx, 1, now)
	require.NoError(t, err)
	got := map[int64]bool{}
	for _, r := range out {
		got[r.TaskID] = true
	}
	require.Equal(t, map[int64]bool{ext: true, y: true}, got)
	for _, id := range []int64{ext, y} {
		g := getTask(t, c, id)
		require.Equal(t, "TIMED_OUT", g.Status)
		require.Equal(t, "Canceling due to time out", g.Error)
		require.True(t, *g.Failed)
	}
	require.Equal(t, "RUNNING", getTask(t, c, q).State)
	require.Equal(t, "RUNNING", getTask(t, c, fresh).State)
	require.Equal(t, "READY", getTask(t, c, ready).State)
	out, err = s.TimeOutTasks(ctx, 1, now)
	require.NoError(t, err)
	require.Empty(t, out)
}

// D18: purge keeps unfinished and recent tasks.
func TestPurgeHistory(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"control": {"task_keep_duration": "1 day"}}')`)
	takeLead(t, s, 1)
	exec(t, c, `INSERT INTO async.task (target, concurrency_pool, query, consumed, processed, finish_status, failed)
	            SELECT 'SELF', 'SELF', 'old', now() - interval '3 days', now() - interval '2 days', 'FINISHED', false
	              FROM generate_series(1, 25000)`)
	recent := push(t, c, "SELF", 3, "recent")
	exec(t, c, `SELECT async.finish($1::bigint[], 'FAILED', 'x')`, recent)
	oldUnfinished := push(t, c, "SELF", 2, "old but unfinished")
	exec(t, c, `UPDATE async.task SET entered = now() - interval '1 year' WHERE task_id = ANY($1)`, oldUnfinished)
	now := time.Now()
	n, err := s.PurgeHistory(ctx, 1, now)
	require.NoError(t, err)
	require.EqualValues(t, 25000, n, "several batches")
	require.EqualValues(t, 5, queryInt(t, c, `SELECT count(*) FROM async.task`))
	cfg, err := s.LoadConfig(ctx)
	require.NoError(t, err)
	require.NotNil(t, cfg.Control.LastHeavyMaintenance)
	require.WithinDuration(t, now, *cfg.Control.LastHeavyMaintenance, time.Millisecond)
	n, err = s.PurgeHistory(ctx, 1, now.Add(36*time.Hour))
	require.NoError(t, err)
	require.EqualValues(t, 3, n)
	require.Equal(t, oldUnfinished, queryIDs(t, c, `SELECT task_id FROM async.task ORDER BY task_id`))
	_, err = s.PurgeHistory(ctx, 2, now)
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
}

func TestCountsAndRecentFailures(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "SELF", "max_concurrency": 10}]}')`)
	takeLead(t, s, 1)
	ids := push(t, c, "SELF", 10, "select 1")
	claim(t, s, 1, 3, nil)
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'YIELDED', NULL)`, ids[9])
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FAILED', 'first')`, ids[8])
	exec(t, c, `SELECT async.cancel(array[$1::bigint], 'second')`, ids[7])
	exec(t, c, `SELECT async.finish(array[$1::bigint], 'FINISHED', NULL)`, ids[6])
	cnt, err := s.Counts(ctx)
	require.NoError(t, err)
	require.Equal(t, pgstore.Counts{Queued: 3, Running: 3, Yielded: 1}, cnt)
	f, err := s.RecentFailures(ctx, 5)
	require.NoError(t, err)
	require.Len(t, f, 2)
	require.Equal(t, ids[7], f[0].TaskID)
	require.Equal(t, "CANCELED", f[0].FinishStatus)
	require.Equal(t, "second", f[0].Error)
	require.Equal(t, ids[8], f[1].TaskID)
	f, err = s.RecentFailures(ctx, 1)
	require.NoError(t, err)
	require.Len(t, f, 1)
}

func TestStaleTermFencesLeaderWrites(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	ctx := ctxT(t)
	old := takeLead(t, s, 4)
	push(t, c, "SELF", 2, "select 1")
	require.Len(t, claim(t, s, 4, 1, nil), 1)
	require.NoError(t, old.Release(ctx))

	s2 := openStore(t, dsn)
	takeLead(t, s2, 5)
	before := snapshot(t, c)
	_, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 4, Slots: slots(5), Now: time.Now()})
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
	_, err = s.TimeOutTasks(ctx, 4, time.Now().Add(48*time.Hour))
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
	_, err = s.PurgeHistory(ctx, 4, time.Now())
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
	require.Equal(t, before, snapshot(t, c), "the old term wrote nothing")
	// The newer term works, and an older one cannot take over again.
	require.Len(t, claim(t, s2, 5, 5, nil), 1)
	_, err = s.TakeLeadership(ctx, 4, "old", "test-cluster")
	require.ErrorIs(t, err, pgstore.ErrStaleTerm, "while the term-5 leader holds the lock")
	l5 := takeLead(t, s2, 5) // the same term may take over again (its own stale session)
	require.NoError(t, l5.Release(ctx))
	_, err = s.TakeLeadership(ctx, 4, "old", "test-cluster")
	require.ErrorIs(t, err, pgstore.ErrStaleTerm, "with the lock free, the recorded term still wins")
	require.Contains(t, err.Error(), "records term 5")
	require.Zero(t, queryInt(t, c, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
	    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`), "the refused taker unlocked")
	takeLead(t, s2, 5)
	require.Equal(t, []string{"5 leader-5 test-cluster"}, queryStrings(t, c, `SELECT term || ' ' || node || ' ' || cluster_id FROM async.leader`))
	require.Equal(t, []string{"5 leader-5"}, queryStrings(t, c, `SELECT leader_term || ' ' || leader_node FROM async.control WHERE pid IS NOT NULL AND running_since IS NOT NULL`))
}

func TestLeadershipLock(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	ctx := ctxT(t)

	// An unrelated session holding the lock: ErrLockHeld naming it.
	other := connect(t, dsn)
	exec(t, other, `SET application_name = 'someone else'`)
	exec(t, other, `SELECT pg_advisory_lock(0)`)
	_, err := s.TakeLeadership(ctx, 1, "a", "c1")
	require.ErrorIs(t, err, pgstore.ErrLockHeld)
	require.Contains(t, err.Error(), `application_name "someone else"`)
	require.Contains(t, err.Error(), "pid")
	exec(t, other, `SELECT pg_advisory_unlock(0)`)

	// A configured key: the holder lookup splits a bigint key like PostgreSQL.
	exec(t, c, `SELECT async.configure('{"control": {"advisory_mutex_id": -81985529216486896}}')`)
	exec(t, other, `SELECT pg_advisory_lock(-81985529216486896)`)
	_, err = s.TakeLeadership(ctx, 1, "a", "c1")
	require.ErrorIs(t, err, pgstore.ErrLockHeld)
	require.Contains(t, err.Error(), "someone else")
	exec(t, other, `SELECT pg_advisory_unlock(-81985529216486896)`)

	l1, err := s.TakeLeadership(ctx, 1, "a", "c1")
	require.NoError(t, err)
	require.EqualValues(t, 1, l1.Term())
	// Another cluster cannot take it.
	_, err = s.TakeLeadership(ctx, 2, "b", "c2")
	require.ErrorIs(t, err, pgstore.ErrLockHeld)
	select {
	case <-l1.Lost():
		t.Fatal("leadership lost")
	default:
	}
	// A newer leader of the same cluster terminates the stale holder.
	start := time.Now()
	l2, err := s.TakeLeadership(ctx, 2, "b", "c1")
	require.NoError(t, err)
	require.Less(t, time.Since(start), 5*time.Second)
	select {
	case <-l1.Lost():
	case <-time.After(wait):
		t.Fatal("the stale leader did not notice it lost its connection")
	}
	require.NoError(t, l1.Release(ctx), "release after loss is harmless")
	require.Equal(t, []string{"2 b c1"}, queryStrings(t, c, `SELECT term || ' ' || node || ' ' || cluster_id FROM async.leader`))
	require.EqualValues(t, l2.PID(), queryInt(t, c, `SELECT holder_pid FROM async.leader`))

	// Release frees the lock for anyone.
	require.NoError(t, l2.Release(ctx))
	<-l2.Lost()
	require.NoError(t, l2.Release(ctx), "twice is fine")
	l3, err := s.TakeLeadership(ctx, 3, "c", "c2")
	require.NoError(t, err)
	// Killing the backend is noticed.
	exec(t, c, `SELECT pg_terminate_backend($1::int)`, int(l3.PID()))
	select {
	case <-l3.Lost():
	case <-time.After(wait):
		t.Fatal("Lost not closed after the backend was terminated")
	}
	require.NoError(t, l3.Release(ctx))
}

// stoppedClaim takes the leadership of term 1 on s, pushes 3 tasks and runs
// the claim's first round trip for them on a claim session (after setup,
// if any): a leader stopped between the claim's round trips. It returns
// that session (released at the end of the test) and the claim's second
// round trip.
func stoppedClaim(t *testing.T, s *pgstore.Store, c *pgx.Conn, setup string) (*pgxpool.Conn, func(term int64) error) {
	t.Helper()
	ctx := ctxT(t)
	takeLead(t, s, 1)
	push(t, c, "SELF", 3, "select 1")
	pc, err := s.ClaimsPool().Acquire(ctx)
	require.NoError(t, err)
	t.Cleanup(pc.Release)
	if setup != "" {
		_, err = pc.Exec(ctx, setup)
		require.NoError(t, err)
	}
	ids, commit, err := s.ClaimLock(ctx, pc.Conn(), pgstore.ClaimRequest{Term: 1, Slots: slots(3), Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, ids, 3)
	return pc, commit
}

// A leader that stops between the claim's two round trips (SIGSTOP, a
// stall, a cut connection) holds no lock a takeover needs: the fence's
// share lock on async.leader is taken in the second round trip, which the
// server runs without waiting for the leader. Its successor takes over at
// once, and the stopped claim cannot commit once it resumes.
func TestTakeoverDoesNotWaitForAStoppedClaim(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	ctx := ctxT(t)
	// Only the claim's own statements are under test here: the server
	// must not end this session (TestSuccessorClaimsWhatAStoppedClaimLocked).
	pc, commit := stoppedClaim(t, s, c, "SET idle_in_transaction_session_timeout = 0")
	pid := pc.Conn().PgConn().PID()
	stopped := func() []string {
		return queryStrings(t, c, `SELECT state FROM pg_stat_activity WHERE pid = $1`, int(pid))
	}
	require.Equal(t, []string{"idle in transaction"}, stopped())

	s2 := openStore(t, dsn)
	tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	l2, err := s2.TakeLeadership(tctx, 2, "b", "test-cluster")
	require.NoError(t, err, "the successor waited on the stopped claim")
	defer func() { _ = l2.Release(ctx) }()
	require.Equal(t, []string{"idle in transaction"}, stopped(), "the takeover did not wait for the stopped claim to end")
	require.Equal(t, []string{"2 b"}, queryStrings(t, c, `SELECT term || ' ' || node FROM async.leader`))

	// The stopped leader resumes: its claim is fenced off and leaves the
	// tasks READY for its successor.
	require.ErrorIs(t, commit(1), pgstore.ErrStaleTerm)
	_, err = pc.Exec(ctx, "ROLLBACK")
	require.NoError(t, err)
	require.EqualValues(t, 3, queryInt(t, c, `SELECT count(*) FROM async.task WHERE consumed IS NULL AND attempt = 0`))
	require.Len(t, claim(t, s2, 2, 3, nil), 3)
	// With nothing to claim, the fence still tells a superseded leader.
	_, err = s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(1), Now: time.Now()})
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
}

// The tasks a stopped claim locked in its first round trip are skipped by
// every other claim while its transaction lasts; the claim sessions'
// idle_in_transaction_session_timeout ends it, so the successor claims
// them within about a second instead of after the keepalive time of a cut
// connection.
func TestSuccessorClaimsWhatAStoppedClaimLocked(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	pc, _ := stoppedClaim(t, s, c, "")
	pid := pc.Conn().PgConn().PID()

	s2 := openStore(t, dsn)
	takeLead(t, s2, 2)
	var got []pgstore.Claimed
	waitFor(t, "the successor to claim the stopped claim's tasks", func() bool {
		got = append(got, claim(t, s2, 2, 3, nil)...)
		return len(got) == 3
	})
	require.Zero(t, queryInt(t, c, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, int(pid)),
		"the server ended the stopped claim's session")
}

func TestListen(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx, cancel := context.WithCancel(ctxT(t))
	got := make(chan string, 100)
	done := make(chan error, 1)
	go func() { done <- s.Listen(ctx, func(p string) { got <- p }) }()
	next := func() string {
		select {
		case p := <-got:
			return p
		case <-time.After(wait):
			t.Fatal("no wake-up")
			return ""
		}
	}
	require.Equal(t, "reconnect", next())
	push(t, c, "SELF", 1, "select 1")
	require.Equal(t, "push", next())
	// Kill the listener's backend: it reconnects and says so.
	waitFor(t, "the listener session", func() bool {
		return queryInt(t, c, `SELECT count(*) FROM pg_stat_activity WHERE application_name = 'asyncnode listener' AND datname = current_database()`) == 1
	})
	exec(t, c, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'asyncnode listener' AND datname = current_database()`)
	require.Equal(t, "reconnect", next())
	exec(t, c, `SELECT async.pause()`)
	require.Equal(t, "control", next())
	cancel()
	select {
	case err := <-done:
		require.True(t, errors.Is(err, context.Canceled), "%v", err)
	case <-time.After(wait):
		t.Fatal("Listen did not return")
	}
}

// A node that gives up attempts it had to stop (StatusLost) re-queues the
// ones that allow a retry and fails the others with its error (D13); the
// write is fenced like any outcome.
func TestFinishLostOutcome(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "SELF", "max_concurrency": 10}, {"target": "retry", "max_retries": 1}]}')`)
	takeLead(t, s, 1)
	noRetry := push(t, c, "SELF", 1, "a")[0]
	retry := push(t, c, "retry", 1, "b")[0]
	cl := claim(t, s, 1, 10, nil)
	require.Len(t, cl, 2)
	byID := map[int64]pgstore.Claimed{}
	for _, x := range cl {
		byID[x.TaskID] = x
		st, err := s.StartTasks(ctx, x.Node, refs(ref(x)))
		require.NoError(t, err)
		require.Len(t, st, 1)
	}
	msg := "node n0 lost contact with the leader"
	out := func(id int64, node string) []pgstore.Finished {
		f, err := s.FinishTasks(ctx, node, []pgstore.Outcome{{Ref: ref(byID[id]), Status: pgstore.StatusLost, Error: &msg, At: time.Now()}})
		require.NoError(t, err)
		return f
	}
	require.False(t, out(noRetry, "elsewhere")[0].Applied, "fenced by node")
	require.Equal(t, "RUNNING", getTask(t, c, noRetry).State)

	require.Equal(t, pgstore.Finished{Ref: ref(byID[noRetry]), Applied: true}, out(noRetry, byID[noRetry].Node)[0])
	g := getTask(t, c, noRetry)
	require.Equal(t, "FAILED", g.Status)
	require.Equal(t, msg, g.Error)
	require.True(t, *g.Failed)

	require.Equal(t, pgstore.Finished{Ref: ref(byID[retry]), Applied: true}, out(retry, byID[retry].Node)[0])
	g = getTask(t, c, retry)
	require.Equal(t, "READY", g.State)
	require.False(t, g.Consumed)
	var retries int
	var node *string
	require.NoError(t, c.QueryRow(ctx, `SELECT retries, node FROM async.task WHERE task_id = $1`, retry).Scan(&retries, &node))
	require.Equal(t, 1, retries)
	require.Nil(t, node)
	// The re-queued task is claimed again with a new attempt; the retry is
	// used up, so losing it again fails it.
	again := claim(t, s, 1, 10, nil)
	require.Len(t, again, 1)
	require.Equal(t, retry, again[0].TaskID)
	require.Greater(t, again[0].Attempt, byID[retry].Attempt)
	byID[retry] = again[0]
	_, err := s.StartTasks(ctx, again[0].Node, refs(ref(again[0])))
	require.NoError(t, err)
	require.True(t, out(retry, again[0].Node)[0].Applied)
	require.Equal(t, "FAILED", getTask(t, c, retry).Status)
}

// A cluster rebuilt from empty data directories (its Raft terms start
// again) can lead a server database an older cluster led: it gets a fencing
// token larger than any before, and the old cluster's terms stay fenced.
func TestAnotherClusterTakesOverWithALargerToken(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	push(t, c, "SELF", 3, "select 1")
	a, err := s.TakeLeadership(ctx, 9, "a1", "cluster-a")
	require.NoError(t, err)
	require.Equal(t, uint64(9), a.Term(), "first leader: the token is the Raft term")
	require.NoError(t, a.Release(ctx))

	b, err := s.TakeLeadership(ctx, 2, "b1", "cluster-b")
	require.NoError(t, err, "a new cluster with small Raft terms takes over")
	require.Equal(t, uint64(10), b.Term())
	require.Len(t, claim(t, s, b.Term(), 1, nil), 1, "writes carry the token")
	_, err = s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 9, Slots: slots(1), Now: time.Now()})
	require.ErrorIs(t, err, pgstore.ErrStaleTerm, "the old cluster's last term is fenced")
	require.NoError(t, b.Release(ctx))

	b3, err := s.TakeLeadership(ctx, 3, "b2", "cluster-b")
	require.NoError(t, err)
	require.Equal(t, uint64(11), b3.Term(), "the same cluster keeps its offset")
	require.NoError(t, b3.Release(ctx))
	_, err = s.TakeLeadership(ctx, 2, "b1", "cluster-b")
	require.ErrorIs(t, err, pgstore.ErrStaleTerm, "an older term of the same cluster cannot take over")

	a2, err := s.TakeLeadership(ctx, 10, "a1", "cluster-a")
	require.NoError(t, err)
	require.Equal(t, uint64(12), a2.Term(), "tokens only grow, whichever cluster leads")
	require.NoError(t, a2.Release(ctx))
}

// The claim itself honours pause/enabled (its own snapshot, whatever the
// leader last read) and skips excluded tasks (D15).
func TestClaimHonoursPauseAndExclude(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	takeLead(t, s, 1)
	ids := push(t, c, "SELF", 2, "select 1")
	exec(t, c, `SELECT async.pause()`)
	require.Empty(t, claim(t, s, 1, 4, nil), "paused")
	exec(t, c, `SELECT async.resume()`)
	exec(t, c, `UPDATE async.control SET enabled = false`)
	require.Empty(t, claim(t, s, 1, 4, nil), "disabled")
	exec(t, c, `UPDATE async.control SET enabled = true`)
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(4), Now: time.Now(), Exclude: []int64{ids[0]}})
	require.NoError(t, err)
	require.Len(t, cl, 1)
	require.Equal(t, ids[1], cl[0].TaskID)
}

// StartTasks returns the started attempts in the order of the refs asked
// (not in task order) and leaves out the refs it fenced out.
func TestStartTasksKeepsTheOrderAsked(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `UPDATE async.target SET max_concurrency = 6 WHERE target = 'SELF'`)
	takeLead(t, s, 1)
	push(t, c, "SELF", 6, "select 1")
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: []string{"n1", "n1", "n1", "n1", "n1", "n1"}, Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, cl, 6)
	fenced := pgstore.Ref{TaskID: cl[2].TaskID, Attempt: cl[2].Attempt + 1}
	ask := refs(ref(cl[4]), ref(cl[0]), fenced, ref(cl[5]), ref(cl[1]), ref(cl[3]))
	st, err := s.StartTasks(ctx, "n1", ask)
	require.NoError(t, err)
	got := make([]pgstore.Ref, len(st))
	for i, x := range st {
		got[i] = pgstore.Ref{TaskID: x.TaskID, Attempt: x.Attempt}
	}
	require.Equal(t, refs(ref(cl[4]), ref(cl[0]), ref(cl[5]), ref(cl[1]), ref(cl[3])), got)
}

// Whatever order the server returns the started rows in, they are put in
// the order asked; refs without a row, and rows nobody asked for, are
// left out.
func TestInRefOrder(t *testing.T) {
	r := func(id int64) pgstore.Ref { return pgstore.Ref{TaskID: id, Attempt: 1} }
	st := func(id int64) pgstore.StartedTask {
		return pgstore.StartedTask{TaskID: id, Attempt: 1, Query: "select 1"}
	}
	got := pgstore.InRefOrder([]pgstore.Ref{r(5), r(1), r(9), r(3)},
		[]pgstore.StartedTask{st(1), st(3), st(5), st(7)})
	require.Equal(t, []pgstore.StartedTask{st(5), st(1), st(3)}, got)
	require.Empty(t, pgstore.InRefOrder([]pgstore.Ref{r(2)}, nil))
	require.Empty(t, pgstore.InRefOrder(nil, []pgstore.StartedTask{st(2)}))
	// Another attempt of the same task is not the one asked for.
	require.Empty(t, pgstore.InRefOrder([]pgstore.Ref{{TaskID: 4, Attempt: 2}}, []pgstore.StartedTask{st(4)}))
}

// A claim that fails inside its transaction (here, fenced out) ends the
// transaction and keeps its session, whose cached plans the next claim
// reuses; nothing stays idle in a transaction holding the tasks it locked.
func TestFailedClaimEndsItsTransaction(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	takeLead(t, s, 3)
	push(t, c, "SELF", 2, "select 1")
	require.Len(t, claim(t, s, 3, 1, nil), 1)
	backend := func() uint32 {
		pc, err := s.ClaimsPool().Acquire(ctx)
		require.NoError(t, err)
		defer pc.Release()
		return pc.Conn().PgConn().PID()
	}
	pid := backend()
	_, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 2, Slots: slots(1), Now: time.Now()})
	require.ErrorIs(t, err, pgstore.ErrStaleTerm)
	require.Equal(t, pid, backend(), "the failed claim's session was closed instead of rolled back")
	require.Zero(t, queryInt(t, c, `SELECT count(*) FROM pg_stat_activity
	    WHERE datname = current_database() AND state LIKE 'idle in transaction%'`))
	require.Len(t, claim(t, s, 3, 1, nil), 1, "the claim pool works after a failed claim")
}
