package scheduler

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/asyncnode/asyncnode/fsm"
	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/asyncnode/asyncnode/pgstore/pgtest"
)

// h is the package's throwaway PostgreSQL with a migrated template database.
var h *pgtest.Harness

// TestMain starts PostgreSQL (a failure to start fails the run: tests are
// never skipped) and checks for leaked goroutines after the tests.
func TestMain(m *testing.M) {
	code := pgtest.Main(m, &h)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// Upper bound of wait-for-condition helpers, and their polling interval.
const (
	wait = 10 * time.Second
	poll = 10 * time.Millisecond
	// quiet is how long negative checks (stays) watch: several
	// sweep (100 ms), check (250 ms) and idle (100 ms) periods.
	quiet = 800 * time.Millisecond
)

// eventually polls cond on the calling goroutine until it holds, and fails
// the test with msg() (evaluated then, so it can show the last state seen)
// if it does not within wait. Unlike require.Eventually, no check is left
// running when it returns, so cond may use the test's SQL connection.
func eventually(t testing.TB, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(wait)
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %s", wait, msg())
		}
		<-tick.C
	}
}

func text(format string, args ...any) func() string {
	return func() string { return fmt.Sprintf(format, args...) }
}

// stays asserts that cond stays false for the quiet period (a negative
// check), polling on the calling goroutine.
func stays(t testing.TB, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(quiet)
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		if cond() {
			t.Fatalf("unexpected: "+msg, args...)
		}
		<-tick.C
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t testing.TB, name string, level hclog.Level) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: level, Output: testWriter{t}})
}

// clock is the wall clock plus an offset the test moves forward, so that
// deadlines, LostAfter and maintenance periods pass without sleeping.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// raftNode is a real one-voter hashicorp/raft (in-memory stores and
// transport) wrapped like cluster.Node implements scheduler.Raft.
type raftNode struct {
	r        *raft.Raft
	leaderCh chan bool
	stop     chan struct{}
	done     chan struct{}

	mu sync.Mutex
	// failApply, when set, is asked before each Apply; a non-nil error is
	// returned without submitting the command (fault injection).
	failApply func(cmd []byte) error
	// termBump is added to the real term (simulated newer terms).
	termBump uint64
}

func newRaft(t *testing.T, id string, f *fsm.FSM) *raftNode {
	t.Helper()
	cfg := raft.DefaultConfig()
	cfg.LocalID = raft.ServerID(id)
	cfg.HeartbeatTimeout = 50 * time.Millisecond
	cfg.ElectionTimeout = 50 * time.Millisecond
	cfg.LeaderLeaseTimeout = 50 * time.Millisecond
	cfg.CommitTimeout = 5 * time.Millisecond
	cfg.Logger = testLogger(t, "raft-"+id, hclog.Warn)
	logs := raft.NewInmemStore()
	snaps := raft.NewInmemSnapshotStore()
	addr, trans := raft.NewInmemTransport("")
	require.NoError(t, raft.BootstrapCluster(cfg, logs, logs, snaps, trans, raft.Configuration{
		Servers: []raft.Server{{Suffrage: raft.Voter, ID: cfg.LocalID, Address: addr}}}))
	r, err := raft.NewRaft(cfg, f, logs, logs, snaps, trans)
	require.NoError(t, err)
	n := &raftNode{r: r, leaderCh: make(chan bool, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go n.monitor()
	t.Cleanup(func() {
		close(n.stop)
		<-n.done
		require.NoError(t, r.Shutdown().Error())
		_ = trans.Close()
	})
	eventually(t, n.IsLeader, text("the one-voter raft did not elect itself"))
	return n
}

// monitor forwards raft's leadership changes to leaderCh, replacing a value
// the consumer has not taken yet (as cluster.Node.monitorLeadership does).
func (n *raftNode) monitor() {
	defer close(n.done)
	ch := n.r.LeaderCh()
	for {
		select {
		case <-n.stop:
			return
		case v := <-ch:
			n.signal(v)
		}
	}
}

// signal delivers a leadership change; tests also use it to simulate a loss
// and regain of leadership.
func (n *raftNode) signal(v bool) {
	select {
	case n.leaderCh <- v:
	default:
		select {
		case <-n.leaderCh:
		default:
		}
		select {
		case n.leaderCh <- v:
		default:
		}
	}
}

func waitFuture(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func timeoutOf(ctx context.Context) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		return time.Until(dl)
	}
	return 5 * time.Second
}

// Apply commits cmd and returns the FSM's response bytes.
func (n *raftNode) Apply(ctx context.Context, cmd []byte) ([]byte, error) {
	n.mu.Lock()
	fail := n.failApply
	n.mu.Unlock()
	if fail != nil {
		if err := fail(cmd); err != nil {
			return nil, err
		}
	}
	f := n.r.Apply(cmd, timeoutOf(ctx))
	if err := waitFuture(ctx, f); err != nil {
		return nil, err
	}
	switch r := f.Response().(type) {
	case nil:
		return nil, nil
	case []byte:
		return r, nil
	case error:
		return nil, r
	default:
		return nil, fmt.Errorf("the fsm returned %T", r)
	}
}

func (n *raftNode) Term() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.r.CurrentTerm() + n.termBump
}

// bumpTerm makes Term report d more (a simulated newer term).
func (n *raftNode) bumpTerm(d uint64) {
	n.mu.Lock()
	n.termBump += d
	n.mu.Unlock()
}

func (n *raftNode) Barrier(ctx context.Context) error {
	return waitFuture(ctx, n.r.Barrier(timeoutOf(ctx)))
}

func (n *raftNode) LeaderCh() <-chan bool { return n.leaderCh }

func (n *raftNode) IsLeader() bool { return n.r.State() == raft.Leader }

func (n *raftNode) setFailApply(fn func(cmd []byte) error) {
	n.mu.Lock()
	n.failApply = fn
	n.mu.Unlock()
}

// observer records committed assignments and the highest slot counts ever
// seen right after an Assign, and wakes the scheduler on releases (as the
// agent does).
type observer struct {
	mu         sync.Mutex
	f          *fsm.FSM
	sched      *Scheduler
	assigned   []fsm.Assignment
	revoked    []fsm.Assignment
	maxWorkers int
	maxPool    map[string]int
	maxNode    map[string]int
	// entryOf: the log index of the entry that last assigned (task id)
	// or released (ref) each.
	assignedIn map[int64]uint64
	releasedIn map[fsm.Ref]uint64
}

func (o *observer) Assigned(items []fsm.Assignment) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.assigned = append(o.assigned, items...)
	for _, a := range items {
		o.assignedIn[a.TaskID] = o.f.Applied()
	}
	// Apply has released the FSM lock before notifying: Counts is the state
	// right after this entry (entries are applied one at a time).
	c := o.f.Counts()
	o.maxWorkers = max(o.maxWorkers, c.Workers)
	for p, n := range c.Pools {
		o.maxPool[p] = max(o.maxPool[p], n)
	}
	for id, n := range c.PerNode {
		o.maxNode[id] = max(o.maxNode[id], n)
	}
}

func (o *observer) Revoked(items []fsm.Assignment) {
	o.mu.Lock()
	o.revoked = append(o.revoked, items...)
	o.mu.Unlock()
}

func (o *observer) Released(refs []fsm.Ref) {
	o.mu.Lock()
	for _, r := range refs {
		o.releasedIn[r] = o.f.Applied()
	}
	s := o.sched
	o.mu.Unlock()
	if s != nil {
		s.Wake()
	}
}

// entries returns the log index of the entry that released ref and of the
// one that last assigned task id (0: none).
func (o *observer) entries(ref fsm.Ref, id int64) (released, assigned uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.releasedIn[ref], o.assignedIn[id]
}

func (o *observer) assignedIDs() []int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]int64, len(o.assigned))
	for i, a := range o.assigned {
		out[i] = a.TaskID
	}
	return out
}

func (o *observer) maxima() (workers int, pools, nodes map[string]int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	pools, nodes = map[string]int{}, map[string]int{}
	for k, v := range o.maxPool {
		pools[k] = v
	}
	for k, v := range o.maxNode {
		nodes[k] = v
	}
	return o.maxWorkers, pools, nodes
}

// env is one scheduler on a real migrated database, a real store, FSM and
// one-voter Raft. The test plays the task-running nodes.
type env struct {
	t     *testing.T
	dsn   string
	store *pgstore.Store
	db    *pgx.Conn // the test's own SQL connection (test goroutine only)
	fsm   *fsm.FSM
	obs   *observer
	raft  *raftNode
	clock *clock
	sched *Scheduler

	mu    sync.Mutex
	nodes []NodeInfo

	cancel context.CancelFunc
	done   chan struct{}
}

// newEnv builds a scheduler "n1" on a fresh database; see newEnvOn.
func newEnv(t *testing.T, opts ...func(*Config)) *env {
	t.Helper()
	return newEnvOn(t, h.DB(t), "n1", opts...)
}

// newEnvOn builds a scheduler named id (with its own FSM and Raft, i.e. its
// own cluster) on the database dsn. Node "a" (incarnation "a-1") is
// registered in the FSM and listed alive. Nothing runs until start.
func newEnvOn(t *testing.T, dsn, id string, opts ...func(*Config)) *env {
	t.Helper()
	log := testLogger(t, id, hclog.Info)
	store, err := pgstore.Open(context.Background(), dsn+" pool_max_conns=6", log)
	require.NoError(t, err)
	t.Cleanup(store.Close)
	db, err := pgx.Connect(context.Background(), dsn)
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close(context.Background()) })

	obs := &observer{maxPool: map[string]int{}, maxNode: map[string]int{},
		assignedIn: map[int64]uint64{}, releasedIn: map[fsm.Ref]uint64{}}
	f := fsm.New(obs)
	obs.f = f
	e := &env{t: t, dsn: dsn, store: store, db: db, fsm: f, obs: obs, clock: &clock{}}
	e.raft = newRaft(t, id, f)
	cfg := Config{
		NodeID: id, Store: store, Raft: e.raft, FSM: f, Nodes: e.listNodes, Log: log, Now: e.clock.Now,
		ConfigRefresh: 200 * time.Millisecond, SweepEvery: 100 * time.Millisecond,
		RevokeGrace: time.Minute, LostAfter: 10 * time.Minute,
	}
	for _, o := range opts {
		o(&cfg)
	}
	e.sched, err = New(cfg)
	require.NoError(t, err)
	obs.mu.Lock()
	obs.sched = e.sched
	obs.mu.Unlock()
	e.register("a", "a-1")
	e.setNodes(NodeInfo{ID: "a", Alive: true})
	return e
}

// start runs the scheduler and the wake-up listener, like the agent does,
// until stop or the end of the test.
func (e *env) start() {
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.done = make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = e.store.Listen(ctx, e.sched.Notify) }()
	go func() { defer wg.Done(); _ = e.sched.Run(ctx) }()
	go func() { wg.Wait(); close(e.done) }()
	e.t.Cleanup(e.stop)
}

// stop stops the scheduler (it releases the leadership lock) and waits.
func (e *env) stop() {
	if e.cancel == nil {
		return
	}
	e.cancel()
	<-e.done
	e.cancel = nil
}

func (e *env) listNodes() []NodeInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]NodeInfo(nil), e.nodes...)
}

func (e *env) setNodes(nodes ...NodeInfo) {
	e.mu.Lock()
	e.nodes = nodes
	e.mu.Unlock()
}

// apply commits a command through Raft, as a node or the leader would.
func (e *env) apply(typ fsm.MessageType, v any) fsm.Result {
	e.t.Helper()
	b, err := fsm.Encode(typ, v)
	require.NoError(e.t, err)
	out, err := e.raft.Apply(context.Background(), b)
	require.NoError(e.t, err)
	res, err := fsm.DecodeResult(out)
	require.NoError(e.t, err)
	return res
}

// register announces a node process (MsgRegister), as the agent does.
func (e *env) register(node, inc string) {
	e.t.Helper()
	e.apply(fsm.MsgRegister, fsm.Register{Node: node, Incarnation: inc})
}

// waitStatus waits until the scheduler's status satisfies cond.
func (e *env) waitStatus(what string, cond func(Status) bool) Status {
	e.t.Helper()
	var st Status
	eventually(e.t, func() bool {
		st = e.sched.Status()
		return cond(st)
	}, func() string { return fmt.Sprintf("scheduler status: want %s, have %+v", what, st) })
	return st
}

func (e *env) waitDispatching() {
	e.t.Helper()
	e.waitStatus("dispatching", func(s Status) bool { return s.Leading && s.Dispatching })
}

// assignments returns the FSM's assignments that match keep (all if nil).
func (e *env) assignments(keep func(fsm.Assignment) bool) []fsm.Assignment {
	var out []fsm.Assignment
	for _, a := range e.fsm.Assignments() {
		if keep == nil || keep(a) {
			out = append(out, a)
		}
	}
	return out
}

// running returns the live (not revoked, not yielded) query assignments of node.
func (e *env) running(node string) []fsm.Assignment {
	return e.assignments(func(a fsm.Assignment) bool {
		return a.Node == node && !a.Revoked && !a.Yielded && !a.External
	})
}

// waitAssigned waits until task id is assigned (any attempt if attempt is 0).
func (e *env) waitAssigned(id int64, attempt int32) fsm.Assignment {
	e.t.Helper()
	var got fsm.Assignment
	eventually(e.t, func() bool {
		a, ok := e.fsm.Get(id)
		got = a
		return ok && (attempt == 0 || a.Attempt == attempt)
	}, func() string {
		return fmt.Sprintf("task %d attempt %d never assigned (FSM: %+v; row: %+v)", id, attempt, e.fsm.Assignments(), e.task(id))
	})
	return got
}

// waitCount waits until exactly n assignments match keep and returns them.
func (e *env) waitCount(what string, n int, keep func(fsm.Assignment) bool) []fsm.Assignment {
	e.t.Helper()
	var got []fsm.Assignment
	eventually(e.t, func() bool {
		got = e.assignments(keep)
		return len(got) == n
	}, func() string {
		return fmt.Sprintf("want %d assignments (%s), FSM has %+v", n, what, e.fsm.Assignments())
	})
	return got
}

// never asserts that cond stays false for the quiet period.
func (e *env) never(what string, cond func() bool) {
	e.t.Helper()
	stays(e.t, cond, "%s", what)
}

func refsOf(as []fsm.Assignment) []pgstore.Ref {
	out := make([]pgstore.Ref, len(as))
	for i, a := range as {
		out[i] = pgstore.Ref{TaskID: a.TaskID, Attempt: a.Attempt}
	}
	return out
}

// startTasks marks node's attempts started, as its executor would after
// seeing the assignments; it requires that all of them start.
func (e *env) startTasks(node string, as []fsm.Assignment) {
	e.t.Helper()
	got, err := e.store.StartTasks(context.Background(), node, refsOf(as))
	require.NoError(e.t, err)
	require.Len(e.t, got, len(as), "node %s could not start all of %+v", node, as)
}

// finishTasks records outcomes for node's attempts and releases their slots
// through Raft with the flags FinishTasks returned, as the executor does.
func (e *env) finishTasks(node string, status pgstore.Status, as []fsm.Assignment) []pgstore.Finished {
	e.t.Helper()
	for _, a := range as {
		require.Equal(e.t, node, a.Node)
	}
	return e.finishAcross(status, as)
}

// finishAcross is finishTasks for attempts of several nodes (each node writes
// its own outcomes), with all the slots released in one Raft entry, so that
// no dispatch pass sees some of them freed and not the others.
func (e *env) finishAcross(status pgstore.Status, as []fsm.Assignment) []pgstore.Finished {
	e.t.Helper()
	if len(as) == 0 {
		return nil
	}
	var all []pgstore.Finished
	byNode := map[string][]pgstore.Outcome{}
	var order []string
	for _, a := range as {
		if _, ok := byNode[a.Node]; !ok {
			order = append(order, a.Node)
		}
		byNode[a.Node] = append(byNode[a.Node], pgstore.Outcome{
			Ref: pgstore.Ref{TaskID: a.TaskID, Attempt: a.Attempt}, Status: status, At: time.Now()})
	}
	for _, node := range order {
		fin, err := e.store.FinishTasks(context.Background(), node, byNode[node])
		require.NoError(e.t, err)
		all = append(all, fin...)
	}
	items := make([]fsm.ReleaseItem, len(all))
	for i, f := range all {
		items[i] = fsm.ReleaseItem{Ref: fsm.Ref{TaskID: f.TaskID, Attempt: f.Attempt}}
		if f.Applied {
			items[i].Yielded, items[i].HoldPool = f.Yielded, f.Yielded && f.HoldPool
		}
	}
	e.apply(fsm.MsgRelease, fsm.Release{Items: items})
	return all
}

// release gives back slots without an outcome (a node acknowledging a revoke).
func (e *env) release(as ...fsm.Assignment) {
	e.t.Helper()
	items := make([]fsm.ReleaseItem, len(as))
	for i, a := range as {
		items[i] = fsm.ReleaseItem{Ref: a.Ref()}
	}
	e.apply(fsm.MsgRelease, fsm.Release{Items: items})
}

// SQL helpers ------------------------------------------------------------------

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	_, err := e.db.Exec(context.Background(), sql, args...)
	require.NoError(e.t, err, sql)
}

func (e *env) queryInt(sql string, args ...any) int64 {
	e.t.Helper()
	var n int64
	require.NoError(e.t, e.db.QueryRow(context.Background(), sql, args...).Scan(&n), sql)
	return n
}

func (e *env) configure(doc string) {
	e.t.Helper()
	e.exec(`SELECT async.configure($1::jsonb)`, doc)
}

// push pushes n tasks with query q (NULL when q is "") to target and
// returns their ids in push order.
func (e *env) push(target string, n int, q string) []int64 {
	e.t.Helper()
	var query any = q
	if q == "" {
		query = nil
	}
	rows, err := e.db.Query(context.Background(), `SELECT async.push_tasks(array_agg(async.task($1::text, $2)))
	                                                FROM generate_series(1, $3::int)`, query, target, n)
	require.NoError(e.t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(e.t, err)
	require.Len(e.t, ids, n)
	return ids
}

// taskRow is the part of an async.task row the tests look at.
type taskRow struct {
	State        string
	Attempt      int32
	Node         string
	Started      bool
	FinishStatus string
	Failed       bool
	Error        string
	Retries      int32
	TimesUp      *time.Time
}

func (e *env) task(id int64) taskRow {
	e.t.Helper()
	var r taskRow
	err := e.db.QueryRow(context.Background(), `
		SELECT async.task_execution_state(t)::text, t.attempt, coalesce(t.node, ''), t.started IS NOT NULL,
		       coalesce(t.finish_status::text, ''), coalesce(t.failed, false), coalesce(t.processing_error, ''),
		       t.retries, t.times_up
		  FROM async.task t WHERE t.task_id = $1`, id).
		Scan(&r.State, &r.Attempt, &r.Node, &r.Started, &r.FinishStatus, &r.Failed, &r.Error, &r.Retries, &r.TimesUp)
	require.NoError(e.t, err, "task %d", id)
	return r
}

// waitTask waits until task id's row satisfies cond.
func (e *env) waitTask(id int64, what string, cond func(taskRow) bool) taskRow {
	e.t.Helper()
	var r taskRow
	eventually(e.t, func() bool {
		r = e.task(id)
		return cond(r)
	}, func() string { return fmt.Sprintf("task %d: want %s, have %+v", id, what, r) })
	return r
}

func (e *env) countState(state string) int64 {
	e.t.Helper()
	return e.queryInt(`SELECT count(*) FROM async.task t WHERE async.task_execution_state(t)::text = $1`, state)
}

func ids(as []fsm.Assignment) []int64 {
	out := make([]int64, len(as))
	for i, a := range as {
		out[i] = a.TaskID
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func perNode(as []fsm.Assignment) map[string]int {
	out := map[string]int{}
	for _, a := range as {
		out[a.Node]++
	}
	return out
}

// errInjected is returned by fault-injecting raft adapters.
var errInjected = errors.New("injected: raft apply timed out")

// pushExprs pushes the async.task(...) expressions in one push_tasks call
// (test-written SQL, never user input) and returns the ids in array order.
func (e *env) pushExprs(exprs ...string) []int64 {
	e.t.Helper()
	rows, err := e.db.Query(context.Background(), `SELECT async.push_tasks(ARRAY[`+strings.Join(exprs, ", ")+`])`)
	require.NoError(e.t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(e.t, err)
	require.Len(e.t, out, len(exprs))
	return out
}

// deadState returns when the scheduler first saw node dead (internal state).
func (s *Scheduler) deadSince(node string) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.dead[node]
	return t, ok
}

// settle waits until a dispatch pass has started after this call. Passes
// run one at a time, so every later claim sees what the test changed before
// (a pass already under way may still use the old node list).
func (e *env) settle() {
	e.t.Helper()
	mark := e.clock.Now()
	e.waitStatus("a new dispatch pass", func(s Status) bool { return s.LastPass.After(mark) })
}
