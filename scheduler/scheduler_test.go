package scheduler

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/fsm"
	"github.com/asyncnode/asyncnode/pgstore"
)

func all(fsm.Assignment) bool { return true }

// D2 + invariant 1: tasks are dispatched in (priority, entered, task_id)
// order, and a task is only claimed (RUNNING, not started) in Postgres when
// its assignment appears in the FSM: only the assigned node can start it.
func TestDispatchOrderAndAssignmentBeforeStart(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"control": {"workers": 1}}`)
	p := e.pushExprs(
		`async.task('select 0', 'SELF', priority => 5)`,
		`async.task('select 1', 'SELF', priority => 1)`,
		`async.task('select 2', 'SELF', priority => 1)`,
		`async.task('select 3', 'SELF', priority => 0)`,
		`async.task('select 4', 'SELF', priority => 5)`,
		`async.task('select 5', 'SELF', priority => 1)`)
	late := e.pushExprs(`async.task('select 6', 'SELF', priority => 0)`)[0]
	// p[1] and p[5] share the newest entered of the priority-1 tasks: p[2]
	// comes first (older entered), then the tie is broken by task_id.
	e.exec(`UPDATE async.task SET entered = (SELECT entered FROM async.task WHERE task_id = $1) WHERE task_id = $2`, p[5], p[1])
	want := []int64{p[3], late, p[2], p[1], p[5], p[0], p[4]}

	e.start()
	for i, id := range want {
		as := e.waitCount("the next task", 1, all)
		a := as[0]
		require.Equal(t, id, a.TaskID, "dispatch #%d: want task %d (order %v), got %d", i, id, want, a.TaskID)
		require.Equal(t, "a", a.Node)
		require.Equal(t, "a-1", a.Incarnation, "the assignment carries the node's incarnation")
		require.Equal(t, "SELF", a.Pool)
		// Claimed in Postgres for exactly this attempt and node, not started.
		row := e.task(id)
		require.Equal(t, "RUNNING", row.State)
		require.False(t, row.Started, "nothing starts a task but its node")
		require.Equal(t, a.Attempt, row.Attempt)
		require.Equal(t, a.Node, row.Node)
		require.NotNil(t, row.TimesUp)
		require.Equal(t, row.TimesUp.UnixMilli(), a.Deadline)
		// Fencing: another node cannot start it; the assigned node can.
		got, err := e.store.StartTasks(context.Background(), "intruder", refsOf(as))
		require.NoError(t, err)
		require.Empty(t, got)
		e.startTasks("a", as)
		e.finishTasks("a", pgstore.StatusFinished, as)
		e.waitTask(id, "FINISHED", func(r taskRow) bool { return r.State == "FINISHED" })
	}
	require.Equal(t, want, e.obs.assignedIDs(), "assignment order")
	workers, _, _ := e.obs.maxima()
	require.Equal(t, 1, workers, "control.workers = 1 was exceeded")
	require.EqualValues(t, len(want), e.sched.Status().Dispatched)
}

// Invariant 5: a pool's limit and control.workers are never exceeded (counted
// in the FSM while tasks are held running) and are reached.
func TestPoolAndWorkerLimits(t *testing.T) {
	e := newEnv(t)
	// Pool ext: 3; pool SELF: control.self_concurrency = 4; workers: 5.
	e.configure(`{"control": {"workers": 5}, "targets": [{"target": "ext", "max_concurrency": 3}]}`)
	ext := e.push("ext", 6, "select 1")
	self := e.push("SELF", 6, "select 1")
	isExt := func(a fsm.Assignment) bool { return a.Pool == "ext" }
	isSelf := func(a fsm.Assignment) bool { return a.Pool == "SELF" }
	e.start()

	// Workers binding: 3 ext (pool full) + 2 SELF = 5.
	held := e.waitCount("5 workers", 5, all)
	e.startTasks("a", held)
	require.Len(t, e.assignments(isExt), 3)
	require.Len(t, e.assignments(isSelf), 2)
	e.never("a sixth task while all 5 workers are held", func() bool { return e.fsm.Counts().Total != 5 })
	require.EqualValues(t, 7, e.countState("READY"))

	// Free 3 ext slots: ext tasks come first in order and refill the pool.
	e.finishTasks("a", pgstore.StatusFinished, e.assignments(isExt))
	held = e.waitCount("ext refilled", 3, isExt)
	e.startTasks("a", held)
	e.waitCount("5 workers again", 5, all)

	// ext is drained: SELF now binds at its pool limit 4, below workers.
	e.finishTasks("a", pgstore.StatusFinished, e.assignments(isExt))
	e.waitCount("SELF at its pool limit", 4, isSelf)
	e.startTasks("a", e.assignments(func(a fsm.Assignment) bool { return isSelf(a) && !started(e, a) }))
	e.never("a fifth SELF task", func() bool { return len(e.assignments(isSelf)) != 4 || e.fsm.Counts().Total != 4 })

	// Drain the rest.
	e.finishTasks("a", pgstore.StatusFinished, e.assignments(isSelf))
	rest := e.waitCount("the last 2 SELF tasks", 2, isSelf)
	e.startTasks("a", rest)
	e.finishTasks("a", pgstore.StatusFinished, rest)
	for _, id := range append(ext, self...) {
		e.waitTask(id, "FINISHED", func(r taskRow) bool { return r.State == "FINISHED" && r.FinishStatus == "FINISHED" })
	}

	workers, pools, _ := e.obs.maxima()
	require.Equal(t, 5, workers, "control.workers: reached, never exceeded")
	require.Equal(t, 3, pools["ext"], "pool ext: reached, never exceeded")
	require.Equal(t, 4, pools["SELF"], "pool SELF: reached, never exceeded")
}

func started(e *env, a fsm.Assignment) bool { return e.task(a.TaskID).Started }

// Per-node MaxTasks caps and least-loaded spreading across two nodes.
func TestNodeMaxTasksAndLeastLoaded(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "ext", "max_concurrency": 50}]}`)
	e.register("b", "b-1")
	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: true})
	e.start()

	// Equal load: spread evenly.
	e.push("ext", 6, "select 1")
	held := e.waitCount("6 tasks", 6, all)
	require.Equal(t, map[string]int{"a": 3, "b": 3}, perNode(held))
	for _, b := range []string{"a", "b"} {
		e.startTasks(b, e.running(b))
		require.Equal(t, b+"-1", e.running(b)[0].Incarnation)
	}

	// Caps: a may hold 4, b 5 (a holds 3, b 3 already).
	e.setNodes(NodeInfo{ID: "a", Alive: true, MaxTasks: 4}, NodeInfo{ID: "b", Alive: true, MaxTasks: 5})
	e.settle()
	e.push("ext", 10, "select 1")
	held = e.waitCount("both nodes at their caps", 9, all)
	require.Equal(t, map[string]int{"a": 4, "b": 5}, perNode(held))
	e.never("a task beyond the node caps", func() bool { return e.fsm.Counts().Total != 9 })
	require.EqualValues(t, 7, e.countState("READY"))
	for _, b := range []string{"a", "b"} {
		e.startTasks(b, e.assignments(func(a fsm.Assignment) bool { return a.Node == b && !started(e, a) }))
	}

	// a=1 (room 3), b=3 (room 2): 5 free slots, 7 queued tasks: both
	// nodes are filled to their caps again.
	e.finishAcross(pgstore.StatusFinished, append(e.running("a")[:3], e.running("b")[:2]...))
	held = e.waitCount("caps again", 9, all)
	require.Equal(t, map[string]int{"a": 4, "b": 5}, perNode(held))
	require.EqualValues(t, 2, e.countState("READY"))
	for _, b := range []string{"a", "b"} {
		e.startTasks(b, e.assignments(func(a fsm.Assignment) bool { return a.Node == b && !started(e, a) }))
	}

	// a=3, b=1 and 2 queued tasks: the least-loaded node takes both (slots
	// b, b, then the a/b tie at 3 goes to a by id, then b, b).
	e.finishAcross(pgstore.StatusFinished, append(e.running("a")[:1], e.running("b")[:4]...))
	held = e.waitCount("the last 2 tasks", 6, all)
	require.Equal(t, map[string]int{"a": 3, "b": 3}, perNode(held))
	require.EqualValues(t, 0, e.countState("READY"))

	_, _, nodes := e.obs.maxima()
	require.Equal(t, 4, nodes["a"], "node a: MaxTasks reached, never exceeded")
	require.Equal(t, 5, nodes["b"], "node b: MaxTasks reached, never exceeded")
}

// Draining and dead nodes are given nothing.
func TestDrainingAndDeadNodesGetNothing(t *testing.T) {
	e := newEnv(t)
	e.register("b", "b-1")
	e.register("c", "c-1")
	e.configure(`{"targets": [{"target": "ext", "max_concurrency": 50}]}`)
	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: true, Draining: true}, NodeInfo{ID: "c", Alive: false})
	e.start()

	e.push("ext", 6, "select 1")
	held := e.waitCount("6 tasks", 6, all)
	require.Equal(t, map[string]int{"a": 6}, perNode(held))
	e.finishTasks("a", pgstore.StatusFinished, held)

	// Every node draining or dead: nothing is dispatched.
	e.setNodes(NodeInfo{ID: "a", Alive: true, Draining: true}, NodeInfo{ID: "b", Alive: true, Draining: true}, NodeInfo{ID: "c", Alive: false})
	e.waitCount("slots released", 0, all)
	e.settle()
	queued := e.push("ext", 3, "select 1")
	e.never("a task on a draining or dead node", func() bool { return e.fsm.Counts().Total > 0 })
	require.EqualValues(t, 3, e.countState("READY"))
	require.True(t, e.sched.Status().Dispatching)

	// b stops draining: it takes them.
	e.setNodes(NodeInfo{ID: "a", Alive: true, Draining: true}, NodeInfo{ID: "b", Alive: true}, NodeInfo{ID: "c", Alive: false})
	held = e.waitCount("3 tasks on b", 3, all)
	require.Equal(t, map[string]int{"b": 3}, perNode(held))
	require.Equal(t, queued, ids(held))
}

// D15: async.pause() stops new dispatch (Status says why); async.resume()
// restarts it.
func TestPauseResume(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.waitDispatching()

	e.exec(`SELECT async.pause()`)
	st := e.waitStatus("paused", func(s Status) bool { return strings.Contains(s.Reason, "paused") })
	require.False(t, st.Dispatching)
	require.True(t, st.Leading)
	queued := e.push("SELF", 3, "select 1")
	e.never("dispatch while paused", func() bool { return e.fsm.Counts().Total > 0 })
	require.EqualValues(t, 3, e.countState("READY"))

	e.exec(`SELECT async.resume()`)
	held := e.waitCount("3 tasks after resume", 3, all)
	require.Equal(t, queued, ids(held))
	st = e.sched.Status()
	require.True(t, st.Dispatching)
	require.Empty(t, st.Reason)
}

// Invariant 2: a second cluster on the same server database cannot take the
// advisory lock and says so; it takes over when the first stops, and
// reconciles what the first left behind.
func TestSecondClusterWaitsForTheLock(t *testing.T) {
	e1 := newEnv(t)
	e1.configure(`{"targets": [{"target": "once", "max_concurrency": 10}]}`)
	e1.start()
	e1.waitDispatching()

	e2 := newEnvOn(t, e1.dsn, "m1")
	require.NotEqual(t, e1.fsm.ClusterID(), "", "the first leader created its cluster id")
	e2.start()
	st := e2.waitStatus("lock held by the other cluster", func(s Status) bool { return strings.Contains(s.Reason, "advisory lock") })
	require.True(t, st.Leading)
	require.False(t, st.Dispatching)
	t.Logf("second cluster: %s", st.Reason)

	tasks := e1.push("once", 2, "select 1")
	held := e1.waitCount("2 tasks in the first cluster", 2, all)
	e1.startTasks("a", held[:1]) // tasks[0] runs, tasks[1] is only claimed
	e2.never("the second cluster dispatching", func() bool {
		return e2.fsm.Counts().Total > 0 || e2.sched.Status().Dispatching
	})
	require.Equal(t, e1.fsm.ClusterID(), queryString(e1, `SELECT cluster_id FROM async.leader`))

	token1 := e1.queryInt(`SELECT term FROM async.leader`)
	e1.stop()
	e2.waitDispatching()
	require.Equal(t, "m1", queryString(e2, `SELECT node FROM async.leader`))
	// Another cluster's leader writes with a fencing token above the last
	// one, whatever its Raft term (which may well be lower or equal).
	require.Greater(t, e2.queryInt(`SELECT term FROM async.leader`), token1)
	require.Equal(t, e2.fsm.ClusterID(), queryString(e2, `SELECT cluster_id FROM async.leader`))
	// Started under the first cluster, unknown to the second: lost (no retries).
	e2.waitTask(tasks[0], "FAILED naming node a", func(r taskRow) bool {
		return r.FinishStatus == "FAILED" && r.Failed && strings.Contains(r.Error, "node a")
	})
	// Claimed but never started: requeued and run by the second cluster.
	a := e2.waitAssigned(tasks[1], 2)
	require.Equal(t, "a", a.Node)
	e2.startTasks("a", []fsm.Assignment{a})
	require.Equal(t, 1, e2.fsm.Counts().Total)
}

func queryString(e *env, sql string) string {
	e.t.Helper()
	var s string
	require.NoError(e.t, e.db.QueryRow(context.Background(), sql).Scan(&s), sql)
	return s
}

// D8: async.cancel and async.defer on a running task revoke its attempt;
// its slot is held until the node releases it. A deferred task is run again
// once eligible, with a new attempt and a fresh deadline (D10).
func TestSweepRevokesCancelledAndDeferred(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"control": {"workers": 1}}`)
	p := e.push("SELF", 2, "select 1")
	e.start()

	a := e.waitAssigned(p[0], 1)
	e.startTasks("a", []fsm.Assignment{a})
	e.exec(`SELECT async.cancel(ARRAY[$1::bigint])`, p[0])
	eventually(t, func() bool { x, ok := e.fsm.Get(p[0]); return ok && x.Revoked }, text("cancelled task not revoked"))
	require.Equal(t, "CANCELED", e.task(p[0]).FinishStatus)
	e.never("dispatch into a revoked but unreleased slot", func() bool { _, ok := e.fsm.Get(p[1]); return ok })
	e.release(a) // the node stopped the query

	b := e.waitAssigned(p[1], 1)
	e.startTasks("a", []fsm.Assignment{b})
	first := e.task(p[1]).TimesUp
	e.exec(`SELECT async.defer(ARRAY[$1::bigint], '1 hour')`, p[1])
	eventually(t, func() bool { x, ok := e.fsm.Get(p[1]); return ok && x.Revoked }, text("deferred task not revoked"))
	e.release(b)
	e.waitCount("slot released", 0, all)
	e.never("a deferred task dispatched before it is eligible", func() bool { return e.fsm.Counts().Total > 0 })

	e.clock.Advance(2 * time.Hour)
	c := e.waitAssigned(p[1], 2)
	row := e.task(p[1])
	require.Equal(t, "RUNNING", row.State)
	require.True(t, row.TimesUp.After(*first), "a re-dispatched deferred task gets a fresh deadline")
	require.Equal(t, row.TimesUp.UnixMilli(), c.Deadline)
}

// A yielded task that keeps its pool slot (concurrency_track_yielded)
// releases it when async.finish ends it.
func TestSweepReleasesFinishedYieldedTask(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "asy", "max_concurrency": 1, "asynchronous_finish": true, "concurrency_track_yielded": true}]}`)
	p := e.push("asy", 2, "select 1")
	e.start()

	a := e.waitAssigned(p[0], 1)
	e.startTasks("a", []fsm.Assignment{a})
	fin := e.finishTasks("a", pgstore.StatusYielded, []fsm.Assignment{a})
	require.True(t, fin[0].Applied && fin[0].Yielded && fin[0].HoldPool, "%+v", fin[0])
	y, ok := e.fsm.Get(p[0])
	require.True(t, ok && y.Yielded, "the yielded task keeps its pool slot")
	c := e.fsm.Counts()
	require.Equal(t, 0, c.Workers)
	require.Equal(t, 1, c.Pools["asy"])
	e.never("a second task in a pool held by a yielded task", func() bool { _, ok := e.fsm.Get(p[1]); return ok })

	e.exec(`SELECT async.finish(ARRAY[$1::bigint], 'FINISHED', NULL)`, p[0])
	e.waitAssigned(p[1], 1)
	_, ok = e.fsm.Get(p[0])
	require.False(t, ok, "the finished yielded task's slot is released")
}

// An attempt past its deadline is revoked by the leader only after
// RevokeGrace (its node normally times it out itself).
func TestDeadlineRevokesAfterGrace(t *testing.T) {
	e := newEnv(t) // RevokeGrace: 1 minute
	p := e.pushExprs(`async.task('select 1', 'SELF', manual_timeout => '10 minutes')`)
	e.start()
	a := e.waitAssigned(p[0], 1)
	e.startTasks("a", []fsm.Assignment{a})
	require.InDelta(t, e.clock.Now().Add(10*time.Minute).UnixMilli(), a.Deadline, float64(5*time.Second/time.Millisecond))

	e.clock.Advance(10*time.Minute + 30*time.Second)
	e.never("revoked within the grace period", func() bool { x, _ := e.fsm.Get(p[0]); return x.Revoked })
	e.clock.Advance(time.Minute)
	eventually(t, func() bool { x, ok := e.fsm.Get(p[0]); return ok && x.Revoked }, text("not revoked past deadline + grace"))
	require.Equal(t, "RUNNING", e.task(p[0]).State, "the node, not the leader, ends a query task")
}

// D10: yielded tasks (whether or not they keep a pool slot) and non-query
// tasks nobody fetched end TIMED_OUT at their deadline, and free their slots.
func TestDeadlineTimesOutYieldedAndExternalTasks(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [
		{"target": "tracked", "asynchronous_finish": true, "concurrency_track_yielded": true},
		{"target": "untracked", "asynchronous_finish": true},
		{"target": "ext"}]}`)
	e.start()

	// A yielded task that holds no slot: the FSM does not know it at all.
	u := e.pushExprs(`async.task('select 1', 'untracked', manual_timeout => '10 minutes')`)[0]
	a := e.waitAssigned(u, 1)
	e.startTasks("a", []fsm.Assignment{a})
	e.finishTasks("a", pgstore.StatusYielded, []fsm.Assignment{a})
	e.waitCount("no slot held", 0, all)
	require.Equal(t, "YIELDED", e.task(u).State)
	e.clock.Advance(9 * time.Minute)
	e.never("timed out before the deadline", func() bool { return e.task(u).State != "YIELDED" })
	e.clock.Advance(2 * time.Minute)
	e.waitTask(u, "TIMED_OUT", func(r taskRow) bool {
		return r.FinishStatus == "TIMED_OUT" && r.Failed && r.Error == "Canceling due to time out"
	})

	// A yielded task holding its pool slot, and a non-query task nobody
	// fetched with async.get_tasks.
	p := e.pushExprs(
		`async.task('select 1', 'tracked', manual_timeout => '10 minutes')`,
		`async.task(NULL, 'ext', manual_timeout => '10 minutes')`)
	e.waitCount("2 tasks", 2, all)
	x, _ := e.fsm.Get(p[1])
	require.True(t, x.External)
	require.Empty(t, x.Node)
	q := e.running("a")
	require.Len(t, q, 1)
	e.startTasks("a", q)
	e.finishTasks("a", pgstore.StatusYielded, q)
	y, _ := e.fsm.Get(p[0])
	require.True(t, y.Yielded, "the tracked yielded task keeps its pool slot")
	e.clock.Advance(9 * time.Minute)
	e.never("timed out before the deadline", func() bool { return e.countState("FINISHED") > 1 })
	e.clock.Advance(2 * time.Minute)
	for _, id := range p {
		e.waitTask(id, "TIMED_OUT", func(r taskRow) bool {
			return r.FinishStatus == "TIMED_OUT" && r.Failed && r.Error == "Canceling due to time out"
		})
	}
	e.waitCount("slots released", 0, all)
}

// D13: a node that comes back with a new incarnation lost its attempts: a
// started task with a retry left runs again, one without ends FAILED naming
// the node, one never started is simply re-dispatched; the slots are freed.
func TestLostNodeNewIncarnation(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "retry", "max_retries": 1}, {"target": "once"}]}`)
	e.register("b", "b-1")
	e.setNodes(NodeInfo{ID: "b", Alive: true})
	p := e.pushExprs(`async.task('select 1', 'retry')`, `async.task('select 1', 'once')`, `async.task('select 1', 'once')`)
	e.start()
	held := e.waitCount("3 tasks on b", 3, all)
	require.Equal(t, map[string]int{"b": 3}, perNode(held))
	e.startTasks("b", held[:2]) // p[0], p[1] run; p[2] is only claimed

	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: true})
	e.register("b", "b-2") // b restarted

	e.waitTask(p[1], "FAILED naming node b", func(r taskRow) bool {
		return r.FinishStatus == "FAILED" && r.Failed && strings.Contains(r.Error, "node b")
	})
	r0 := e.waitAssigned(p[0], 2)
	r2 := e.waitAssigned(p[2], 2)
	require.EqualValues(t, 1, e.task(p[0]).Retries, "the re-run is counted")
	require.EqualValues(t, 0, e.task(p[2]).Retries, "a task that never started is not a retry")
	for _, a := range []fsm.Assignment{r0, r2} {
		require.NotEqual(t, "b-1", a.Incarnation, "nothing is given to the old process")
	}
	_, ok := e.fsm.Get(p[1])
	require.False(t, ok, "the failed task's slot is released")
	require.Equal(t, 2, e.fsm.Counts().Total)
}

// A yielded task holding its pool slot (track_yielded) runs on no node: a
// restart of the node that yielded it must not free its slot.
func TestLostNodeKeepsYieldedPoolSlot(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "asy", "max_concurrency": 1, "asynchronous_finish": true, "concurrency_track_yielded": true}]}`)
	e.register("b", "b-1")
	e.setNodes(NodeInfo{ID: "b", Alive: true})
	p := e.push("asy", 2, "select 1")
	e.start()
	a := e.waitAssigned(p[0], 1)
	e.startTasks("b", []fsm.Assignment{a})
	e.finishTasks("b", pgstore.StatusYielded, []fsm.Assignment{a})

	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: true})
	e.register("b", "b-2")
	e.never("the pool limit exceeded after a node restart", func() bool {
		_, ok := e.fsm.Get(p[1])
		return ok || e.fsm.Counts().Pools["asy"] != 1
	})
	require.Equal(t, "YIELDED", e.task(p[0]).State)

	e.exec(`SELECT async.finish(ARRAY[$1::bigint], 'FINISHED', NULL)`, p[0])
	e.waitAssigned(p[1], 1)
	_, pools, _ := e.obs.maxima()
	require.Equal(t, 1, pools["asy"])
}

// D13: a node dead for longer than LostAfter lost its attempts; not before.
func TestLostNodeDeadLongerThanLostAfter(t *testing.T) {
	e := newEnv(t) // LostAfter: 10 minutes
	e.configure(`{"targets": [{"target": "once"}]}`)
	e.register("b", "b-1")
	e.setNodes(NodeInfo{ID: "b", Alive: true})
	p := e.push("once", 2, "select 1")
	e.start()
	held := e.waitCount("2 tasks on b", 2, all)
	e.startTasks("b", held[:1])

	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: false})
	eventually(t, func() bool { _, ok := e.sched.deadSince("b"); return ok }, text("node b never seen dead"))
	e.clock.Advance(5 * time.Minute)
	e.never("attempts resolved before LostAfter", func() bool {
		return e.task(p[0]).State != "RUNNING" || e.fsm.Counts().Total != 2
	})

	e.clock.Advance(6 * time.Minute)
	e.waitTask(p[0], "FAILED naming node b", func(r taskRow) bool {
		return r.FinishStatus == "FAILED" && strings.Contains(r.Error, "node b was lost")
	})
	a := e.waitAssigned(p[1], 2)
	require.Equal(t, "a", a.Node)
	require.Equal(t, 1, e.fsm.Counts().Total)
}

// A task cancelled while its node is dead (but not yet lost) keeps its slot
// until the node is declared lost: the node may still be running the query,
// so giving the slot away would exceed the pool limit (invariant 5).
func TestCancelledTaskOfDeadNodeHoldsSlotUntilLost(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "one", "max_concurrency": 1}]}`)
	e.register("b", "b-1")
	e.setNodes(NodeInfo{ID: "b", Alive: true})
	p := e.push("one", 2, "select 1")
	e.start()
	a := e.waitAssigned(p[0], 1)
	e.startTasks("b", []fsm.Assignment{a})

	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: false})
	eventually(t, func() bool { _, ok := e.sched.deadSince("b"); return ok }, text("node b never seen dead"))
	e.exec(`SELECT async.cancel(ARRAY[$1::bigint])`, p[0])
	e.never("the slot of a possibly still running query given away", func() bool {
		_, ok := e.fsm.Get(p[1])
		_, held := e.fsm.Get(p[0])
		return ok || !held
	})

	e.clock.Advance(11 * time.Minute)
	b := e.waitAssigned(p[1], 1)
	require.Equal(t, "a", b.Node)
	require.Equal(t, "CANCELED", e.task(p[0]).FinishStatus, "the cancel stands")
	_, pools, _ := e.obs.maxima()
	require.Equal(t, 1, pools["one"])
}

// A new leadership term does not inherit "dead since" times from an older
// one: the node may have been alive meanwhile, and LostAfter must run from
// this term's first sighting (else a brief failure right after a failover
// counts as a long one and a possibly running task is re-run or failed).
func TestLostAfterCountsFromThisTerm(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "once"}]}`)
	e.register("b", "b-1")
	e.setNodes(NodeInfo{ID: "b", Alive: true})
	p := e.push("once", 1, "select 1")
	e.start()
	a := e.waitAssigned(p[0], 1)
	e.startTasks("b", []fsm.Assignment{a})

	e.setNodes(NodeInfo{ID: "a", Alive: true}, NodeInfo{ID: "b", Alive: false})
	eventually(t, func() bool { _, ok := e.sched.deadSince("b"); return ok }, text("node b never seen dead"))

	// Leadership lost; b recovers meanwhile (unseen), then fails again just
	// as this node leads again, 20 minutes later.
	e.raft.signal(false)
	e.waitStatus("not leading", func(s Status) bool { return !s.Leading })
	e.clock.Advance(20 * time.Minute)
	e.raft.signal(true)
	e.waitDispatching()
	e.never("attempts resolved with a dead time from an older term", func() bool { return e.task(p[0]).State != "RUNNING" })

	e.clock.Advance(11 * time.Minute)
	e.waitTask(p[0], "FAILED naming node b", func(r taskRow) bool { return strings.Contains(r.Error, "node b") })
}

// After a leader crashed between claim and Raft commit, the next leader puts
// the never-started claims back in the queue and resolves started ones that
// have no assignment as lost (retried if allowed, else failed naming the node).
func TestReconcileClaimsWithoutAssignment(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "retry", "max_retries": 1}, {"target": "once"}]}`)
	p := e.pushExprs(`async.task('select 1', 'once')`, `async.task('select 1', 'once')`, `async.task('select 1', 'retry')`)

	// The crashed leader (term 1) claimed all three; node x started two.
	ctx := context.Background()
	old, err := e.store.TakeLeadership(ctx, 1, "old", "old-cluster")
	require.NoError(t, err)
	cl, err := e.store.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: []string{"x", "x", "x"}, Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, cl, 3)
	got, err := e.store.StartTasks(ctx, "x", []pgstore.Ref{{TaskID: p[1], Attempt: 1}, {TaskID: p[2], Attempt: 1}})
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.NoError(t, old.Release(ctx))
	require.Greater(t, e.raft.Term(), uint64(1))

	e.start()
	a := e.waitAssigned(p[0], 2) // requeued, claimed again
	require.Equal(t, "a", a.Node)
	e.waitTask(p[1], "FAILED naming node x", func(r taskRow) bool {
		return r.FinishStatus == "FAILED" && r.Failed && strings.Contains(r.Error, "node x")
	})
	e.waitAssigned(p[2], 2) // retried
	require.EqualValues(t, 1, e.task(p[2]).Retries)
	e.startTasks("a", e.running("a"))
}

// D18: heavy maintenance deletes finished tasks older than
// task_keep_duration, never unfinished ones, at most every
// heavy_maintenance_sleep.
func TestMaintenancePurgesHistory(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"control": {"task_keep_duration": "1 hour", "heavy_maintenance_sleep": "1 hour"}}`)
	p := e.push("SELF", 4, "select 1")
	now := e.clock.Now()
	finish := func(id int64, at time.Time) {
		e.exec(`UPDATE async.task SET consumed = $2, processed = $2, finish_status = 'FINISHED', failed = false
		         WHERE task_id = $1`, id, at)
	}
	finish(p[0], now.Add(-2*time.Hour))    // old: purged
	finish(p[1], now.Add(-10*time.Minute)) // recent: kept for now
	e.exec(`UPDATE async.task SET entered = $2 WHERE task_id = $1`, p[2], now.Add(-3*time.Hour))
	// p[2] (old but unfinished) and p[3] are dispatched and stay running.
	e.start()
	e.waitCount("2 running", 2, all)

	eventually(t, func() bool {
		return e.queryInt(`SELECT count(*) FROM async.task WHERE task_id = $1`, p[0]) == 0
	}, text("old finished task not purged"))
	require.EqualValues(t, 3, e.queryInt(`SELECT count(*) FROM async.task`))
	eventually(t, func() bool {
		return e.queryInt(`SELECT count(*) FROM async.control WHERE last_heavy_maintenance IS NOT NULL`) == 1
	}, text("last_heavy_maintenance not recorded"))

	// Within heavy_maintenance_sleep nothing more is purged.
	var late int64
	require.NoError(t, e.db.QueryRow(context.Background(),
		`SELECT async.push_task(async.task('select 1', 'SELF'), 'EMPTY')`).Scan(&late)) // pushed finished
	finish(late, now.Add(-5*time.Hour))
	e.never("maintenance before heavy_maintenance_sleep", func() bool {
		return e.queryInt(`SELECT count(*) FROM async.task WHERE task_id = $1`, late) == 0
	})

	e.clock.Advance(2 * time.Hour)
	eventually(t, func() bool {
		return e.queryInt(`SELECT count(*) FROM async.task WHERE task_id = ANY($1)`, []int64{late, p[1]}) == 0
	}, text("history not purged after heavy_maintenance_sleep"))
	require.EqualValues(t, 2, e.queryInt(`SELECT count(*) FROM async.task WHERE processed IS NULL`), "unfinished tasks are never purged")
}

// The leader's lock session dies (Postgres restart, admin kill): the leader
// takes the lock again and goes on dispatching instead of wedging.
func TestLostLockSessionIsReestablished(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.waitDispatching()
	pid := e.queryInt(`SELECT pid FROM pg_stat_activity WHERE application_name = 'asyncnode leader n1'`)
	e.exec(`SELECT pg_terminate_backend($1::int)`, pid)
	e.waitStatus("lock session lost", func(s Status) bool {
		return !s.Dispatching && strings.Contains(s.Reason, "lost the server-database leadership session")
	})

	p := e.push("SELF", 1, "select 1")
	e.waitAssigned(p[0], 1)
	e.waitDispatching()
	require.NotEqual(t, pid, e.queryInt(`SELECT pid FROM pg_stat_activity WHERE application_name = 'asyncnode leader n1'`))
}

// A claim whose Raft commit fails while this node stays leader is put back
// in the queue at once (nothing else would: sweeps only see assignments).
func TestUncommittedClaimIsRequeued(t *testing.T) {
	e := newEnv(t)
	failed := make(chan struct{})
	e.raft.setFailApply(func(cmd []byte) error {
		if fsm.MessageType(cmd[0]) != fsm.MsgReleaseAssignPacked {
			return nil
		}
		select {
		case <-failed:
			return nil
		default:
			close(failed)
			return errInjected
		}
	})
	p := e.push("SELF", 1, "select 1")
	e.start()
	a := e.waitAssigned(p[0], 2)
	require.Equal(t, "a", a.Node)
	row := e.task(p[0])
	require.Equal(t, "RUNNING", row.State)
	require.EqualValues(t, 2, row.Attempt)
	e.startTasks("a", []fsm.Assignment{a})
}

// Non-query tasks hold a pool slot (no worker, no node) until async.get_tasks
// hands them out: a plain one is then finished and frees it; an
// asynchronous one keeps it until async.finish (as in pgasync).
func TestNonQueryTasksFetchedByGetTasks(t *testing.T) {
	e := newEnv(t)
	e.configure(`{"targets": [{"target": "x", "max_concurrency": 1},
		{"target": "xa", "max_concurrency": 1, "asynchronous_finish": true}]}`)
	x := e.push("x", 2, "")
	xa := e.push("xa", 2, "")
	e.start()
	held := e.waitCount("one per pool", 2, all)
	require.Equal(t, []int64{x[0], xa[0]}, ids(held))
	c := e.fsm.Counts()
	require.Equal(t, 0, c.Workers, "non-query tasks hold no worker slot")
	require.Equal(t, map[string]int{"x": 1, "xa": 1}, c.Pools)
	e.never("a pool limit exceeded by non-query tasks", func() bool { return e.fsm.Counts().Total != 2 })

	require.EqualValues(t, x[0], e.queryInt(`SELECT task_id FROM async.get_tasks('x', 1, '0 seconds')`))
	e.waitAssigned(x[1], 1)
	_, ok := e.fsm.Get(x[0])
	require.False(t, ok, "a handed-out plain non-query task frees its slot")
	require.Equal(t, "FINISHED", e.task(x[0]).State)

	require.EqualValues(t, xa[0], e.queryInt(`SELECT task_id FROM async.get_tasks('xa', 1, '0 seconds')`))
	require.Equal(t, "YIELDED", e.task(xa[0]).State)
	e.never("the pool slot of an asynchronous non-query task given away before async.finish", func() bool {
		_, ok := e.fsm.Get(xa[1])
		return ok || e.fsm.Counts().Pools["xa"] != 1
	})
	e.exec(`SELECT async.finish(ARRAY[$1::bigint], 'FINISHED', NULL)`, xa[0])
	e.waitAssigned(xa[1], 1)
	_, pools, _ := e.obs.maxima()
	require.Equal(t, 1, pools["xa"])
	require.Equal(t, 1, pools["x"])
}

// Leadership lost and regained in a newer term, seen only as "leader"
// again (the loss was coalesced away): the scheduler establishes again for
// the new term instead of going on with the old one.
func TestRegainedLeadershipInNewTermReestablishes(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.waitDispatching()
	old := e.sched.Status().Term
	e.raft.bumpTerm(5)
	e.raft.signal(true)
	e.waitStatus("re-established in the new term", func(s Status) bool { return s.Dispatching && s.Term == old+5 })
	p := e.push("SELF", 1, "select 1")
	e.waitAssigned(p[0], 1)
}

// A node's release joins the scheduler's next entry, with the assignments
// that reuse the freed slots: one entry, the releases first, the limits
// kept. While paused a release still commits, alone; while the loop does
// not run, Release refuses at once so that the caller applies it itself.
func TestReleaseJoinsTheNextAssignment(t *testing.T) {
	// No periodic sweep: it would release the finished attempts itself.
	e := newEnv(t, func(c *Config) { c.SweepEvery = time.Hour })
	ctx := context.Background()
	require.ErrorIs(t, e.sched.Release(ctx, nil), ErrNotDispatching, "before the loop runs")
	e.configure(`{"control": {"workers": 2}}`)
	pushed := e.push("SELF", 4, "select 1")
	e.start()
	held := e.waitCount("2 workers", 2, all)
	e.startTasks("a", held)

	finish := func(a fsm.Assignment) {
		t.Helper()
		fin, err := e.store.FinishTasks(ctx, "a", []pgstore.Outcome{{
			Ref: pgstore.Ref{TaskID: a.TaskID, Attempt: a.Attempt}, Status: pgstore.StatusFinished, At: time.Now()}})
		require.NoError(t, err)
		require.True(t, len(fin) == 1 && fin[0].Applied, "outcome of %+v not written: %+v", a, fin)
	}
	finish(held[0])
	// A sweep prompted meanwhile (the listener's first "reconnect") may
	// revoke the ended attempt first, in an entry of its own; what counts
	// is that the release and the next assignment share one entry.
	require.NoError(t, e.sched.Release(ctx, []fsm.ReleaseItem{{Ref: held[0].Ref()}}))
	_, still := e.fsm.Get(held[0].TaskID)
	require.False(t, still, "Release returned before its entry was applied")
	next, ok := e.fsm.Get(pushed[2])
	require.True(t, ok, "the third task did not take the freed slot")
	released, assigned := e.obs.entries(held[0].Ref(), pushed[2])
	require.NotZero(t, released)
	require.Equal(t, released, assigned, "the release and the next assignment took more than one entry")
	require.Equal(t, 2, e.fsm.Counts().Workers)
	workers, _, _ := e.obs.maxima()
	require.Equal(t, 2, workers, "control.workers = 2 was exceeded")

	e.exec(`SELECT async.pause()`)
	e.waitStatus("paused", func(s Status) bool { return strings.Contains(s.Reason, "paused") })
	e.startTasks("a", []fsm.Assignment{next})
	finish(next)
	require.NoError(t, e.sched.Release(ctx, []fsm.ReleaseItem{{Ref: next.Ref()}}))
	_, still = e.fsm.Get(next.TaskID)
	require.False(t, still, "a release while paused was not applied")
	e.never("dispatch while paused", func() bool { return e.fsm.Counts().Total != 1 })

	e.stop()
	require.ErrorIs(t, e.sched.Release(ctx, []fsm.ReleaseItem{{Ref: held[1].Ref()}}), ErrNotDispatching, "after the loop stopped")
}

// A periodic sweep gives a node one sweep period to release an attempt
// whose outcome it wrote itself; a prompted sweep revokes at once.
func TestSettleWaitsOnePeriodicSweep(t *testing.T) {
	s := &Scheduler{}
	a, b, c := fsm.Ref{TaskID: 1, Attempt: 1}, fsm.Ref{TaskID: 2, Attempt: 1}, fsm.Ref{TaskID: 3, Attempt: 2}
	require.Empty(t, s.settle([]fsm.Ref{a, b}, false), "first sight: wait for the node's release")
	// b was released meanwhile, c is new.
	require.Equal(t, []fsm.Ref{a}, s.settle([]fsm.Ref{a, c}, false))
	require.Equal(t, []fsm.Ref{c}, s.settle([]fsm.Ref{c}, false))
	require.Empty(t, s.settle(nil, false))
	require.Equal(t, []fsm.Ref{b}, s.settle([]fsm.Ref{b}, true), "a prompted sweep revokes at once")
	require.Empty(t, s.settle([]fsm.Ref{a}, false), "a prompted sweep does not count as a sight")
}

// An attempt whose node wrote its outcome but never released the slot is
// still revoked, by a later periodic sweep, so that the node lets go.
func TestSweepRevokesAnEndedAttemptItsNodeDidNotRelease(t *testing.T) {
	e := newEnv(t) // SweepEvery: 100ms
	e.configure(`{"control": {"workers": 1}}`)
	p := e.push("SELF", 2, "select 1")
	e.start()
	a := e.waitAssigned(p[0], 1)
	e.startTasks("a", []fsm.Assignment{a})
	// The node writes its outcome, and its release never comes.
	fin, err := e.store.FinishTasks(context.Background(), "a", []pgstore.Outcome{
		{Ref: pgstore.Ref{TaskID: a.TaskID, Attempt: a.Attempt}, Status: pgstore.StatusFinished, At: time.Now()}})
	require.NoError(t, err)
	require.True(t, len(fin) == 1 && fin[0].Applied, "%+v", fin)
	eventually(t, func() bool { x, ok := e.fsm.Get(p[0]); return ok && x.Revoked }, text("ended attempt never revoked"))
	e.never("dispatch into a revoked but unreleased slot", func() bool { _, ok := e.fsm.Get(p[1]); return ok })
	e.release(a)
	e.waitAssigned(p[1], 1)
}

// The leader analyses the task table when the planner's estimate, left by
// an ANALYZE of the emptied table, falls far below the tasks it holds
// (autovacuum, off here, would only do so at a time of its own).
func TestLeaderAnalysesAnEmptiedTaskTable(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.StatsEvery = 20 * time.Millisecond })
	e.exec(`ALTER TABLE async.task SET (autovacuum_enabled = off)`)
	e.push("SELF", 200, "select 1")
	e.exec(`DELETE FROM async.task`)
	e.exec(`ANALYZE async.task`)
	reltuples := func() int64 {
		return e.queryInt(`SELECT reltuples::bigint FROM pg_class WHERE oid = 'async.task'::regclass`)
	}
	require.Zero(t, reltuples())
	// Pushed from a session that ends at once: its counts reach the
	// cumulative statistics without waiting for it to go idle.
	pusher, err := pgx.Connect(context.Background(), e.dsn)
	require.NoError(t, err)
	_, err = pusher.Exec(context.Background(), `SELECT async.push_tasks(array_agg(async.task('select 1', 'SELF')))
	                                              FROM generate_series(1, 3000)`)
	require.NoError(t, err)
	require.NoError(t, pusher.Close(context.Background()))

	e.start()
	eventually(t, func() bool { return reltuples() >= 2700 },
		func() string {
			return fmt.Sprintf("pg_class.reltuples of async.task is %d, want about 3000", reltuples())
		})
}
