package executor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/asyncnode/asyncnode/internal/faultproxy"
	"github.com/asyncnode/asyncnode/internal/pglocal"
	"github.com/asyncnode/asyncnode/pgstore"
)

// srv is the one PostgreSQL server of this package's tests: the target of
// every task. Each test gets its own database.
var srv *pglocal.Server

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	s, err := pglocal.Start(ctx, pglocal.Options{})
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "executor tests need PostgreSQL: %v\n", err)
		os.Exit(1)
	}
	srv = s
	if err := setupCluster(); err != nil {
		_ = s.Stop()
		fmt.Fprintf(os.Stderr, "setup: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	if err := s.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "stop postgres: %v\n", err)
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// setupCluster creates the cluster-wide objects the tests use.
func setupCluster() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, srv.DSN("postgres"))
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, `CREATE ROLE lowpriv; CREATE ROLE lowlogin LOGIN`)
	return err
}

var dbSeq atomic.Int64

// newDB creates an empty database for one test and returns its DSN.
func newDB(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("t%d_%s", dbSeq.Add(1), strings.ToLower(strings.NewReplacer("/", "_", "-", "_").Replace(t.Name())))
	if len(name) > 60 {
		name = name[:60]
	}
	require.NoError(t, srv.CreateDatabase(context.Background(), name, ""))
	return srv.DSN(name)
}

// sqlExec runs setup or check SQL on dsn.
func sqlExec(t *testing.T, dsn, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	require.NoError(t, err)
	defer c.Close(ctx)
	_, err = c.Exec(ctx, sql, args...)
	require.NoError(t, err)
}

// sqlInt returns the single integer a query yields.
func sqlInt(t *testing.T, dsn, sql string, args ...any) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	require.NoError(t, err)
	defer c.Close(ctx)
	var n int64
	require.NoError(t, c.QueryRow(ctx, sql, args...).Scan(&n))
	return n
}

// fakeStore is an in-memory Store: StartTasks returns the rows prepared with
// add (the fence), FinishTasks records outcomes.
type fakeStore struct {
	mu         sync.Mutex
	tasks      map[pgstore.Ref]pgstore.StartedTask
	yielded    map[pgstore.Ref]pgstore.Finished // FinishTasks answer override
	startCalls [][]pgstore.Ref
	finishes   map[pgstore.Ref][]pgstore.Outcome // every write, to detect duplicates
	failStart  int                               // fail this many StartTasks calls
	failFinish int
	startGate  chan struct{} // when set, StartTasks waits on it
	changed    chan struct{}
}

func newFakeStore() *fakeStore {
	return &fakeStore{
		tasks:    make(map[pgstore.Ref]pgstore.StartedTask),
		yielded:  make(map[pgstore.Ref]pgstore.Finished),
		finishes: make(map[pgstore.Ref][]pgstore.Outcome),
		changed:  make(chan struct{}, 1),
	}
}

func (s *fakeStore) add(st pgstore.StartedTask) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tasks[pgstore.Ref{TaskID: st.TaskID, Attempt: st.Attempt}] = st
}

func (s *fakeStore) StartTasks(ctx context.Context, node string, refs []pgstore.Ref) ([]pgstore.StartedTask, error) {
	s.mu.Lock()
	gate := s.startGate
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.startCalls = append(s.startCalls, append([]pgstore.Ref(nil), refs...))
	if s.failStart > 0 {
		s.failStart--
		return nil, errors.New("server database unavailable (injected)")
	}
	var out []pgstore.StartedTask
	for _, r := range refs {
		if st, ok := s.tasks[r]; ok {
			out = append(out, st)
		}
	}
	return out, nil
}

func (s *fakeStore) FinishTasks(ctx context.Context, node string, outs []pgstore.Outcome) ([]pgstore.Finished, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failFinish > 0 {
		s.failFinish--
		return nil, errors.New("server database unavailable (injected)")
	}
	res := make([]pgstore.Finished, 0, len(outs))
	for _, o := range outs {
		s.finishes[o.Ref] = append(s.finishes[o.Ref], o)
		f := pgstore.Finished{Ref: o.Ref, Applied: true, Yielded: o.Status == pgstore.StatusYielded}
		if y, ok := s.yielded[o.Ref]; ok {
			f = y
		}
		res = append(res, f)
	}
	select {
	case s.changed <- struct{}{}:
	default:
	}
	return res, nil
}

func (s *fakeStore) outcome(ref pgstore.Ref) (pgstore.Outcome, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.finishes[ref]
	if len(o) == 0 {
		return pgstore.Outcome{}, false
	}
	return o[0], true
}

// fakeReporter records Done batches.
type fakeReporter struct {
	mu      sync.Mutex
	done    map[pgstore.Ref][]Done
	calls   int
	fail    int
	changed chan struct{}
}

func newFakeReporter() *fakeReporter {
	return &fakeReporter{done: make(map[pgstore.Ref][]Done), changed: make(chan struct{}, 1)}
}

func (r *fakeReporter) Report(ctx context.Context, done []Done) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if r.fail > 0 {
		r.fail--
		return errors.New("raft apply failed (injected)")
	}
	for _, d := range done {
		r.done[d.Ref] = append(r.done[d.Ref], d)
	}
	select {
	case r.changed <- struct{}{}:
	default:
	}
	return nil
}

func (r *fakeReporter) get(ref pgstore.Ref) ([]Done, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.done[ref]
	return d, ok
}

// syncBuffer collects log output safely.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type harness struct {
	t     *testing.T
	dsn   string
	ex    *Executor
	store *fakeStore
	rep   *fakeReporter
	logs  *syncBuffer
	stop  context.CancelFunc
	done  chan error
	next  atomic.Int64
}

// newHarness starts an executor whose SELF target is a fresh database.
func newHarness(t *testing.T, tweak func(*Config)) *harness {
	t.Helper()
	h := &harness{t: t, dsn: newDB(t), store: newFakeStore(), rep: newFakeReporter(), logs: &syncBuffer{}}
	h.next.Store(1000)
	cfg := Config{
		Node:           "node-1",
		Incarnation:    fmt.Sprintf("inc%d", dbSeq.Add(1)),
		ServerDSN:      h.dsn,
		TerminateAfter: 500 * time.Millisecond,
		Log: hclog.New(&hclog.LoggerOptions{
			Name: "test", Level: hclog.Debug, Output: io.MultiWriter(h.logs, testWriter{t}),
		}),
	}
	if tweak != nil {
		tweak(&cfg)
	}
	ex, err := New(cfg, h.store, h.rep)
	require.NoError(t, err)
	h.ex = ex
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- ex.Run(ctx) }()
	t.Cleanup(h.shutdown)
	return h
}

// shutdown stops Run and waits for it (idempotent).
func (h *harness) shutdown() {
	h.stop()
	select {
	case err, ok := <-h.done:
		if ok {
			require.NoError(h.t, err)
			close(h.done)
		}
	case <-time.After(30 * time.Second):
		h.t.Fatal("Run did not return")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// task describes one task to push through the harness.
type task struct {
	query   string
	connStr *string
	async   bool
	timeout time.Duration // 0: 30s
	noStart bool          // fenced out: StartTasks will not return it
	gone    bool          // StartTasks found no row of its target
	attempt int32
	taskID  int64
}

// submit prepares the StartedTask rows and submits the work; it returns the refs.
func (h *harness) submit(tasks ...task) []pgstore.Ref {
	var work []Work
	var refs []pgstore.Ref
	for _, tk := range tasks {
		id := tk.taskID
		if id == 0 {
			id = h.next.Add(1)
		}
		att := tk.attempt
		if att == 0 {
			att = 1
		}
		timeout := tk.timeout
		if timeout == 0 {
			timeout = 30 * time.Second
		}
		deadline := time.Now().Add(timeout)
		ref := pgstore.Ref{TaskID: id, Attempt: att}
		if !tk.noStart {
			h.store.add(pgstore.StartedTask{TaskID: id, Attempt: att, Query: tk.query, Target: "SELF",
				ConnStr: tk.connStr, Async: tk.async, Deadline: deadline, TargetGone: tk.gone})
		}
		work = append(work, Work{Ref: ref, Deadline: deadline})
		refs = append(refs, ref)
	}
	h.ex.Submit(work)
	return refs
}

// waitDone waits until ref is reported Done and returns the Done and the
// outcome written for it (ok false: none).
func (h *harness) waitDone(ref pgstore.Ref, within time.Duration) (Done, pgstore.Outcome, bool) {
	h.t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		if d, ok := h.rep.get(ref); ok {
			require.Len(h.t, d, 1, "reported Done more than once")
			o, ok := h.store.outcome(ref)
			return d[0], o, ok
		}
		select {
		case <-h.rep.changed:
		case <-timer.C:
			h.t.Fatalf("task %d attempt %d not reported Done within %s", ref.TaskID, ref.Attempt, within)
		}
	}
}

// run submits one task and returns its outcome.
func (h *harness) run(tk task) pgstore.Outcome {
	h.t.Helper()
	ref := h.submit(tk)[0]
	_, o, ok := h.waitDone(ref, 60*time.Second)
	require.True(h.t, ok, "no outcome written")
	return o
}

func errText(o pgstore.Outcome) string {
	if o.Error == nil {
		return ""
	}
	return *o.Error
}

func requireFinished(t *testing.T, o pgstore.Outcome) {
	t.Helper()
	require.Equal(t, pgstore.StatusFinished, o.Status, "error: %s", errText(o))
	require.Nil(t, o.Error)
}

func TestTaskRuns(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(app text, check_interval text)`)
	o := h.run(task{query: `insert into t select current_setting('application_name'), current_setting('client_connection_check_interval')`})
	requireFinished(t, o)
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t where app = $1`, h.ex.ApplicationName()))
	// The target checks for a dead client while a task's query runs, so a
	// query orphaned by a killed node stops by itself.
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t where check_interval = '1s'`))
	d, _, _ := h.waitDone(o.Ref, time.Second)
	require.Equal(t, Done{Ref: o.Ref}, d)
	require.Eventually(t, func() bool { return len(h.ex.Running()) == 0 }, 5*time.Second, time.Millisecond)
}

func TestTargetConnStr(t *testing.T) {
	h := newHarness(t, nil)
	other := newDB(t)
	sqlExec(t, other, `CREATE TABLE t(a int)`)
	o := h.run(task{query: `insert into t values (1)`, connStr: &other})
	requireFinished(t, o)
	require.Equal(t, int64(1), sqlInt(t, other, `select count(*) from t`))
}

// TestTargetGoneFails: a started task whose target row was not found (a
// bypass of the target triggers) fails with a message naming the target,
// without running its text anywhere.
func TestTargetGoneFails(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)
	o := h.run(task{query: `insert into t values (1)`, gone: true})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, `target "SELF" no longer exists in async.target`, errText(o))
	require.Equal(t, int64(0), sqlInt(t, h.dsn, `select count(*) from t`))
	requireFinished(t, h.run(task{query: `insert into t values (2)`}))
}

// TestNonSuperuserTarget: the session reset, CALL and timeouts work for a
// target whose user is not a superuser.
func TestNonSuperuserTarget(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.TerminateAfter = 300 * time.Millisecond })
	sqlExec(t, h.dsn, `CREATE TABLE t(a int); GRANT ALL ON t TO lowlogin;
		CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN INSERT INTO t VALUES (2); COMMIT; END $$`)
	low := strings.Replace(h.dsn, "user=postgres", "user=lowlogin", 1)
	requireFinished(t, h.run(task{connStr: &low, query: `SET search_path = pg_catalog; CREATE TEMP TABLE tt(a int);
		SELECT pg_advisory_lock(1); PREPARE q AS SELECT 1; insert into public.t values (1)`}))
	requireFinished(t, h.run(task{connStr: &low, query: `CALL public.p()`}))
	require.Equal(t, int64(2), sqlInt(t, h.dsn, `select count(*) from t`))
	o := h.run(task{connStr: &low, timeout: 300 * time.Millisecond, query: `do $$ begin
		loop begin perform pg_sleep(30); exception when query_canceled then null; end; end loop; end $$`})
	require.Equal(t, pgstore.StatusTimedOut, o.Status)
	require.Contains(t, h.logs.String(), "backend terminated")
}

func TestTaskIDSubstitution(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(id bigint, s text)`)
	o := h.run(task{taskID: 4242, query: `insert into t values (##flow.TASK_ID##, 'id=##flow.TASK_ID##')`})
	requireFinished(t, o)
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t where id = 4242 and s = 'id=4242'`))
}

func TestMultiStatementIsOneTransaction(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)

	o := h.run(task{query: "insert into t values (1);\ninsert into t values (2); -- two rows"})
	requireFinished(t, o)
	require.Equal(t, int64(2), sqlInt(t, h.dsn, `select count(*) from t`))

	o = h.run(task{query: `insert into t values (3); select 1/0; insert into t values (4)`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, "ERROR:  division by zero", errText(o))
	require.Equal(t, int64(2), sqlInt(t, h.dsn, `select count(*) from t`), "first statement must be rolled back")
}

func TestErrorTextHasDetailHintContext(t *testing.T) {
	h := newHarness(t, nil)
	o := h.run(task{query: `do $$ begin raise exception 'boom' using detail = 'the detail', hint = 'the hint'; end $$`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, "ERROR:  boom\nDETAIL:  the detail\nHINT:  the hint\nCONTEXT:  PL/pgSQL function inline_code_block line 1 at RAISE", errText(o))

	o = h.run(task{query: `select * from no_such_table`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, `ERROR:  relation "no_such_table" does not exist`, errText(o))
}

func TestCallProcedureThatCommits(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int);
		CREATE PROCEDURE p(x int) LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO t VALUES (x); COMMIT;
			INSERT INTO t VALUES (x + 1); COMMIT;
		END $$`)
	o := h.run(task{query: "/* run p */ -- with a comment\n  call p(##flow.TASK_ID##);"})
	requireFinished(t, o)
	require.Equal(t, int64(2), sqlInt(t, h.dsn, `select count(*) from t where a in ($1, $1 + 1)`, o.TaskID))

	// The same CALL among other statements runs in one transaction, where a
	// procedure may not commit.
	o = h.run(task{query: `select 1; call p(1)`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Contains(t, errText(o), "invalid transaction termination")
}

func TestVacuum(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int); INSERT INTO t SELECT generate_series(1, 1000); DELETE FROM t`)
	o := h.run(task{query: `VACUUM (ANALYZE) t`})
	requireFinished(t, o)
	require.Equal(t, int64(1), sqlInt(t, h.dsn,
		`select count(*) from pg_stat_user_tables where relname = 't' and (last_vacuum is not null or vacuum_count > 0)`))

	o = h.run(task{query: `vacuum t; select 1`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Contains(t, errText(o), "VACUUM cannot run inside a transaction block")
}

func TestSessionStateDoesNotLeak(t *testing.T) {
	// One connection per target: every task runs on the same backend.
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 1 })
	sqlExec(t, h.dsn, `CREATE SCHEMA x; CREATE TABLE public.pids(pid int);
		CREATE TABLE public.obs(pid int, search_path text, usr text, temps int, prepared int, listens int, timeout text, locks int);
		GRANT ALL ON public.pids, public.obs TO lowpriv; GRANT USAGE ON SCHEMA x TO lowpriv`)
	observe := h.submit(task{query: `insert into public.obs select pg_backend_pid(), current_setting('search_path'), current_user,
		(select count(*) from pg_class where relpersistence = 't'), (select count(*) from pg_prepared_statements),
		(select count(*) from pg_listening_channels()), current_setting('statement_timeout'),
		(select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())`})
	_, o, _ := h.waitDone(observe[0], 30*time.Second)
	requireFinished(t, o)

	for _, dirty := range []string{
		`insert into pids values (pg_backend_pid()); SET search_path = x; SET statement_timeout = '5min';
		 CREATE TEMP TABLE tt(a int); PREPARE q AS SELECT 1; LISTEN chan; SELECT pg_advisory_lock(42);
		 SET ROLE lowpriv`,
		`insert into pids values (pg_backend_pid()); SET SESSION AUTHORIZATION lowpriv; SET search_path = x;
		 CREATE TEMP TABLE tt2(a int)`,
		`insert into pids values (pg_backend_pid()); select set_config('search_path', 'x', false);
		 DECLARE c CURSOR WITH HOLD FOR SELECT 1`,
		// One statement runs outside a transaction block; the reset follows it all the same.
		`select set_config('search_path', 'x', false), set_config('statement_timeout', '7min', false), pg_advisory_lock(43)`,
	} {
		requireFinished(t, h.run(task{query: dirty}))
		o := h.run(task{query: `insert into public.obs select pg_backend_pid(), current_setting('search_path'), current_user,
		(select count(*) from pg_class where relpersistence = 't'), (select count(*) from pg_prepared_statements),
		(select count(*) from pg_listening_channels()), current_setting('statement_timeout'),
		(select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())`})
		requireFinished(t, o)
	}
	// Every observation equals the first (defaults), on the very same backend.
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(distinct (pid, search_path, usr, temps, prepared, listens, timeout, locks)) from obs`))
	require.Equal(t, int64(5), sqlInt(t, h.dsn, `select count(*) from obs where search_path = '"$user", public' and usr = 'postgres'
		and temps = 0 and prepared = 0 and listens = 0 and timeout = '0' and locks = 0`))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(distinct pid) from (select pid from obs union all select pid from pids) s`))
}

func TestOpenTransactionFailsAndConnectionIsNotReused(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 1 })
	sqlExec(t, h.dsn, `CREATE TABLE t(a int); CREATE TABLE pids(pid int)`)
	o := h.run(task{query: `insert into pids values (pg_backend_pid()); commit; BEGIN; insert into t values (1)`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, OpenTransactionError, errText(o))
	require.Equal(t, int64(0), sqlInt(t, h.dsn, `select count(*) from t`), "open transaction must be rolled back")
	first := sqlInt(t, h.dsn, `select pid from pids`)

	requireFinished(t, h.run(task{query: `insert into pids values (pg_backend_pid()); insert into t values (2)`}))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t where a = 2`))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from pids where pid <> $1`, first), "a new connection")
	require.Eventually(t, func() bool {
		return sqlInt(t, h.dsn, `select count(*) from pg_stat_activity where pid = $1`, first) == 0
	}, 10*time.Second, 20*time.Millisecond, "the dirty backend must be closed")
}

// A text of one statement runs outside a transaction block (as pgx's Exec
// sends it), so statements that refuse one work; in a longer text they do
// not. The session reset, a query of its own, follows either.
func TestLoneStatementRunsOutsideATransactionBlock(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 1 })
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)
	requireFinished(t, h.run(task{query: `CREATE INDEX CONCURRENTLY t_a ON t (a)`}))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from pg_indexes where indexname = 't_a'`))

	o := h.run(task{query: `CREATE INDEX CONCURRENTLY t_a2 ON t (a); select 1`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Contains(t, errText(o), "CREATE INDEX CONCURRENTLY cannot run inside a transaction block")

	// The other way round: alone, a statement that needs a transaction block fails.
	o = h.run(task{query: `LOCK TABLE t`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, "ERROR:  LOCK TABLE can only be used in transaction blocks", errText(o))

	// A lone BEGIN leaves a transaction open: the reset cannot run in it.
	o = h.run(task{query: `BEGIN`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, OpenTransactionError, errText(o))
}

// COPY FROM STDIN waits for data no task sends: the reset query written
// after the text reaches the server in its place, and the server ends the
// session, so the task fails at once instead of waiting until its time-out.
func TestCopyFromStdinFails(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)
	o := h.run(task{query: `COPY t FROM STDIN`, timeout: 10 * time.Minute})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Equal(t, "FATAL:  terminating connection because protocol synchronization was lost", errText(o))
	requireFinished(t, h.run(task{query: `insert into t values (1)`}))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t`))
}

func TestFailedTaskConnectionIsNotReused(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 1 })
	sqlExec(t, h.dsn, `CREATE TABLE pids(pid int)`)
	requireFinished(t, h.run(task{query: `insert into pids values (pg_backend_pid())`}))
	first := sqlInt(t, h.dsn, `select pid from pids`)
	o := h.run(task{query: `select 1/0`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Contains(t, errText(o), "division by zero")
	requireFinished(t, h.run(task{query: `insert into pids values (pg_backend_pid())`}))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from pids where pid <> $1`, first))
}

// A text that catches the cancel sent at its deadline still finishes, but
// the cancel request was sent on its session: the session is closed, not
// handed to the next task, which a late cancel could otherwise hit.
func TestSessionStoppedAsItsTextFinishedIsNotReused(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 1 })
	sqlExec(t, h.dsn, `CREATE TABLE pids(pid int)`)
	// Warm: the tested task must reach its text well before its deadline.
	requireFinished(t, h.run(task{query: `select 1`}))
	o := h.run(task{timeout: time.Second, query: `insert into pids values (pg_backend_pid());
		do $$ begin perform pg_sleep(10); exception when query_canceled then null; end $$`})
	requireFinished(t, o) // it did finish: the cancel was caught
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from pids`), "the text ran to its end")
	first := sqlInt(t, h.dsn, `select pid from pids`)
	requireFinished(t, h.run(task{query: `insert into pids values (pg_backend_pid())`}))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from pids where pid <> $1`, first))
}

// activeBackend returns the pid of our backend running a query containing
// marker (0 if none).
func activeBackend(t *testing.T, h *harness, marker string) int64 {
	return sqlInt(t, h.dsn, `select coalesce(max(pid), 0) from pg_stat_activity
		where application_name = $1 and state = 'active' and strpos(query, $2) > 0`, h.ex.ApplicationName(), marker)
}

func backendGone(t *testing.T, h *harness, pid int64) func() bool {
	return func() bool {
		return sqlInt(t, h.dsn, `select count(*) from pg_stat_activity where pid = $1`, pid) == 0
	}
}

func TestTimeoutCancelsQuery(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.TerminateAfter = 10 * time.Second })
	start := time.Now()
	// The deadline leaves the poll below time to see the query running: with
	// 500 ms a loaded machine (a CI run under -race) missed it once.
	ref := h.submit(task{query: `select pg_sleep(30) /* timeout-marker */`, timeout: 2 * time.Second})[0]
	var pid int64
	require.Eventually(t, func() bool { pid = activeBackend(t, h, "timeout-marker"); return pid != 0 },
		10*time.Second, 10*time.Millisecond)
	_, o, ok := h.waitDone(ref, 20*time.Second)
	require.True(t, ok)
	require.Equal(t, pgstore.StatusTimedOut, o.Status)
	require.Equal(t, "Canceling due to time out", errText(o))
	// The cancel request stopped it: far sooner than the terminate step
	// (10 s after the deadline).
	require.Less(t, time.Since(start), 6*time.Second)
	require.Eventually(t, backendGone(t, h, pid), 5*time.Second, 20*time.Millisecond)
	require.NotContains(t, h.logs.String(), "terminating its backend")
}

func TestTimeoutTerminatesQueryIgnoringCancel(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.TerminateAfter = 300 * time.Millisecond })
	// The task records its backend first (committed on its own): the
	// stubborn query is only visible for about 800 ms, which a poll of
	// pg_stat_activity can miss on a loaded machine.
	sqlExec(t, h.dsn, `create table stubborn_pid(pid int)`)
	for try := 1; ; try++ {
		sqlExec(t, h.dsn, `truncate stubborn_pid`)
		start := time.Now()
		ref := h.submit(task{query: `insert into stubborn_pid values (pg_backend_pid()); commit;
			do $$ /* stubborn-marker */ begin
			loop begin perform pg_sleep(30); exception when query_canceled then null; end; end loop; end $$`,
			timeout: 500 * time.Millisecond})[0]
		_, o, ok := h.waitDone(ref, 30*time.Second)
		pid := sqlInt(t, h.dsn, `select coalesce(max(pid), 0) from stubborn_pid`)
		require.NotZero(t, pid, "the task never ran")
		require.True(t, ok)
		require.Equal(t, pgstore.StatusTimedOut, o.Status)
		require.Equal(t, TimeoutError, errText(o))
		if !strings.Contains(h.logs.String(), "backend terminated") {
			// On a loaded machine the cancel can land before the block that
			// catches it was entered: the query then ends as a plain
			// timeout, and the case under test needs another try.
			require.Less(t, try, 3, "the query never outlived its cancel in %d tries", try)
			continue
		}
		require.GreaterOrEqual(t, time.Since(start), 800*time.Millisecond)
		require.Eventually(t, backendGone(t, h, pid), 5*time.Second, 20*time.Millisecond)
		return
	}
}

// The leader revokes an attempt that ran past its deadline because its
// node could not stop it (here: the query ignores cancel and terminating is
// slow): the attempt still ends TIMED_OUT instead of staying RUNNING.
func TestRevokePastDeadlineWritesTimedOut(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.TerminateAfter = time.Minute })
	var ref pgstore.Ref
	var pid int64
	for try := 1; ; try++ {
		ref = h.submit(task{query: `do $$ /* late-marker */ begin
			loop begin perform pg_sleep(30); exception when query_canceled then null; end; end loop; end $$`,
			timeout: 300 * time.Millisecond})[0]
		require.Eventually(t, func() bool { pid = activeBackend(t, h, "late-marker"); return pid != 0 },
			10*time.Second, 10*time.Millisecond)
		time.Sleep(500 * time.Millisecond) // past the deadline
		if activeBackend(t, h, "late-marker") != 0 {
			break // the cancel was ignored: the case under test
		}
		// On a loaded machine the cancel can land before the block that
		// catches it was entered: the query then ends as a plain timeout,
		// and the case under test needs another try.
		_, o, wrote := h.waitDone(ref, 30*time.Second)
		require.True(t, wrote)
		require.Equal(t, pgstore.StatusTimedOut, o.Status)
		require.Less(t, try, 3, "the query never outlived its cancel in %d tries", try)
	}
	h.ex.Revoke([]pgstore.Ref{ref})
	// Revoking cancels nothing new; terminate the backend as a stuck
	// target finally would, and the attempt ends.
	sqlExec(t, h.dsn, `select pg_terminate_backend($1)`, pid)
	_, o, wrote := h.waitDone(ref, 30*time.Second)
	require.True(t, wrote, "a revoked attempt past its deadline writes TIMED_OUT")
	require.Equal(t, pgstore.StatusTimedOut, o.Status)
	require.Equal(t, TimeoutError, errText(o))
}

// TerminateSessions ends every session of another node process on a
// target, and nothing else.
func TestTerminateSessions(t *testing.T) {
	h := newHarness(t, nil)
	other, err := pgx.Connect(context.Background(), h.dsn+" application_name=asyncnode/gone/0123")
	require.NoError(t, err)
	defer other.Close(context.Background())
	bystander, err := pgx.Connect(context.Background(), h.dsn+" application_name=someone-else")
	require.NoError(t, err)
	defer bystander.Close(context.Background())
	n, err := h.ex.TerminateSessions(context.Background(), nil, "asyncnode/gone/0123")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Error(t, other.Ping(context.Background()), "the lost node's session is gone")
	require.NoError(t, bystander.Ping(context.Background()), "other sessions are untouched")
	n, err = h.ex.TerminateSessions(context.Background(), nil, "asyncnode/gone/0123")
	require.NoError(t, err)
	require.Zero(t, n)
}

func TestRevokeRunning(t *testing.T) {
	h := newHarness(t, nil)
	ref := h.submit(task{query: `select pg_sleep(30) /* revoke-marker */`})[0]
	var pid int64
	require.Eventually(t, func() bool { pid = activeBackend(t, h, "revoke-marker"); return pid != 0 },
		10*time.Second, 10*time.Millisecond)
	require.Equal(t, []pgstore.Ref{ref}, h.ex.Running())
	h.ex.Revoke([]pgstore.Ref{ref})
	d, _, wrote := h.waitDone(ref, 10*time.Second)
	require.False(t, wrote, "a revoked attempt writes no outcome")
	require.Equal(t, Done{Ref: ref}, d)
	require.Eventually(t, backendGone(t, h, pid), 5*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { return len(h.ex.Running()) == 0 }, 5*time.Second, 10*time.Millisecond)
}

func TestRevokeQueuedAndStarting(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a bigint)`)
	gate := make(chan struct{})
	h.store.mu.Lock()
	h.store.startGate = gate
	h.store.mu.Unlock()

	starting := h.submit(task{query: `insert into t values (##flow.TASK_ID##)`})[0]
	require.Eventually(t, func() bool {
		h.ex.mu.Lock()
		defer h.ex.mu.Unlock()
		return h.ex.attempts[starting].phase == phaseStarting
	}, 5*time.Second, time.Millisecond)
	queued := h.submit(task{query: `insert into t values (##flow.TASK_ID##)`})[0]

	h.ex.Revoke([]pgstore.Ref{queued, starting})
	d, _, wrote := h.waitDone(queued, 5*time.Second)
	require.False(t, wrote)
	require.Equal(t, Done{Ref: queued}, d)

	close(gate)
	d, _, wrote = h.waitDone(starting, 5*time.Second)
	require.False(t, wrote)
	require.Equal(t, Done{Ref: starting}, d)
	require.Equal(t, int64(0), sqlInt(t, h.dsn, `select count(*) from t`), "revoked attempts must not run")
	h.store.mu.Lock()
	defer h.store.mu.Unlock()
	for _, call := range h.store.startCalls {
		require.NotContains(t, call, queued, "a revoked queued attempt is never started")
	}
}

// Abandon (lease lost) stops running and queued attempts and writes a LOST
// outcome with the reason for each; the query really stops on the target.
func TestAbandonStopsAndReportsLost(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a bigint)`)
	running := h.submit(task{query: `select pg_sleep(30) /* abandon-marker */`})[0]
	var pid int64
	require.Eventually(t, func() bool { pid = activeBackend(t, h, "abandon-marker"); return pid != 0 },
		10*time.Second, 10*time.Millisecond)
	gate := make(chan struct{})
	h.store.mu.Lock()
	h.store.startGate = gate
	h.store.mu.Unlock()
	starting := h.submit(task{query: `insert into t values (##flow.TASK_ID##)`})[0]
	require.Eventually(t, func() bool {
		h.ex.mu.Lock()
		defer h.ex.mu.Unlock()
		return h.ex.attempts[starting].phase == phaseStarting
	}, 5*time.Second, time.Millisecond)
	queued := h.submit(task{query: `insert into t values (##flow.TASK_ID##)`})[0]

	const reason = "node n1 lost contact with the leader"
	require.Equal(t, 3, h.ex.Abandon(reason))
	require.Equal(t, 0, h.ex.Abandon(reason), "already given up")
	close(gate)
	for _, ref := range []pgstore.Ref{running, starting, queued} {
		d, o, wrote := h.waitDone(ref, 10*time.Second)
		require.True(t, wrote, "attempt %v writes its LOST outcome", ref)
		require.Equal(t, pgstore.StatusLost, o.Status)
		require.Equal(t, reason, *o.Error)
		require.Equal(t, Done{Ref: ref}, d)
	}
	require.Eventually(t, backendGone(t, h, pid), 5*time.Second, 20*time.Millisecond)
	require.Equal(t, int64(0), sqlInt(t, h.dsn, `select count(*) from t`), "abandoned attempts must not run")
	require.Eventually(t, func() bool { return len(h.ex.Running()) == 0 }, 5*time.Second, 10*time.Millisecond)
}

func TestFencedOutRefsAreReportedWithoutRunning(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a bigint)`)
	refs := h.submit(
		task{query: `insert into t values (##flow.TASK_ID##)`},
		task{query: `insert into t values (##flow.TASK_ID##)`, noStart: true},
	)
	d, _, wrote := h.waitDone(refs[1], 10*time.Second)
	require.False(t, wrote)
	require.Equal(t, Done{Ref: refs[1]}, d)
	_, o, wrote := h.waitDone(refs[0], 10*time.Second)
	require.True(t, wrote)
	requireFinished(t, o)
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t`))
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t where a = $1`, refs[0].TaskID))
}

func TestAsyncTargetYields(t *testing.T) {
	h := newHarness(t, nil)
	h.store.mu.Lock()
	h.store.yielded[pgstore.Ref{TaskID: 2002, Attempt: 1}] = pgstore.Finished{Ref: pgstore.Ref{TaskID: 2002, Attempt: 1},
		Applied: true, Yielded: true, HoldPool: true}
	h.store.yielded[pgstore.Ref{TaskID: 2004, Attempt: 1}] = pgstore.Finished{Ref: pgstore.Ref{TaskID: 2004, Attempt: 1},
		Applied: false, Yielded: true, HoldPool: true} // fenced out: says nothing about the slot
	h.store.mu.Unlock()
	refs := h.submit(task{taskID: 2001, query: `select 1`, async: true}, task{taskID: 2002, query: `select 1`, async: true},
		task{taskID: 2003, query: `select 1/0`, async: true}, task{taskID: 2004, query: `select 1`, async: true})

	d, o, _ := h.waitDone(refs[0], 10*time.Second)
	require.Equal(t, pgstore.StatusYielded, o.Status)
	require.Nil(t, o.Error)
	require.Equal(t, Done{Ref: refs[0], Yielded: true}, d)

	d, o, _ = h.waitDone(refs[1], 10*time.Second)
	require.Equal(t, pgstore.StatusYielded, o.Status)
	require.Equal(t, Done{Ref: refs[1], Yielded: true, HoldPool: true}, d)

	d, o, _ = h.waitDone(refs[2], 10*time.Second)
	require.Equal(t, pgstore.StatusFailed, o.Status, "a failing query of an async target fails, it does not yield")
	require.Equal(t, Done{Ref: refs[2]}, d)

	d, o, _ = h.waitDone(refs[3], 10*time.Second)
	require.Equal(t, pgstore.StatusYielded, o.Status)
	require.Equal(t, Done{Ref: refs[3]}, d, "a fenced-out outcome is reported as a plain Done")
}

func TestUnreachableTargetWaitsThenFailsMasked(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.UnreachableWait = time.Second })
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)
	port, err := pglocal.FreePort() // nothing listens there
	require.NoError(t, err)
	kv := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres password=Sup3rSecretPw dbname=x sslmode=disable", port)
	url := fmt.Sprintf("postgres://postgres:Sup3rSecretPw@127.0.0.1:%d/x?sslmode=disable", port)

	start := time.Now()
	refs := h.submit(task{query: `select 1`, connStr: &kv}, task{query: `select 1`, connStr: &url})
	// Another target is unaffected meanwhile.
	requireFinished(t, h.run(task{query: `insert into t values (1)`}))
	for _, ref := range refs {
		_, done := h.rep.get(ref)
		require.False(t, done, "the unreachable target's tasks are still waiting")
	}

	for _, ref := range refs {
		_, o, ok := h.waitDone(ref, 30*time.Second)
		require.True(t, ok)
		require.Equal(t, pgstore.StatusFailed, o.Status)
		require.GreaterOrEqual(t, time.Since(start), time.Second, "must wait for the target")
		msg := errText(o)
		require.Contains(t, msg, "connect")
		require.NotContains(t, msg, "Sup3rSecretPw")
	}
	require.NotContains(t, h.logs.String(), "Sup3rSecretPw")
	require.Contains(t, h.logs.String(), "target unreachable")
}

func TestUnreachableTargetBoundedByDeadline(t *testing.T) {
	h := newHarness(t, nil) // UnreachableWait 60s
	port, err := pglocal.FreePort()
	require.NoError(t, err)
	dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=x sslmode=disable", port)
	start := time.Now()
	o := h.run(task{query: `select 1`, connStr: &dsn, timeout: 1500 * time.Millisecond})
	require.Equal(t, pgstore.StatusFailed, o.Status, "fails with the connection error just before the deadline")
	require.Contains(t, errText(o), "connect")
	el := time.Since(start)
	require.GreaterOrEqual(t, el, 900*time.Millisecond)
	require.Less(t, el, 10*time.Second)
}

// TestUnreachableTargetRecovers: a task waiting for a down target runs once
// the target comes back.
func TestUnreachableTargetRecovers(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)
	port, err := pglocal.FreePort()
	require.NoError(t, err)
	dsn := strings.Replace(h.dsn, fmt.Sprintf("port=%d", srv.Port()), fmt.Sprintf("port=%d", port), 1)
	ref := h.submit(task{query: `insert into t values (1)`, connStr: &dsn})[0]
	require.Eventually(t, func() bool { return strings.Contains(h.logs.String(), "target unreachable") },
		10*time.Second, 10*time.Millisecond)

	// Bring the target up: a TCP proxy on that port to the real server.
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		h.shutdown() // closes the pool, hence the proxied connections
		_ = ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", srv.Port()))
			if err != nil {
				_ = c.Close()
				continue
			}
			wg.Go(func() { _, _ = io.Copy(up, c); _ = up.Close() })
			wg.Go(func() { _, _ = io.Copy(c, up); _ = c.Close() })
		}
	})
	_, o, ok := h.waitDone(ref, 30*time.Second)
	require.True(t, ok)
	requireFinished(t, o)
	require.Equal(t, int64(1), sqlInt(t, h.dsn, `select count(*) from t`))
	require.Contains(t, h.logs.String(), "target reachable again")
}

func TestStoreAndReporterFailuresAreRetried(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.BatchSize = 5 })
	sqlExec(t, h.dsn, `CREATE TABLE t(a bigint)`)
	h.store.mu.Lock()
	h.store.failStart, h.store.failFinish = 2, 2
	h.store.mu.Unlock()
	h.rep.mu.Lock()
	h.rep.fail = 2
	h.rep.mu.Unlock()

	var tasks []task
	for range 23 {
		tasks = append(tasks, task{query: `insert into t values (##flow.TASK_ID##)`})
	}
	refs := h.submit(tasks...)
	for _, ref := range refs {
		_, o, ok := h.waitDone(ref, 30*time.Second)
		require.True(t, ok)
		requireFinished(t, o)
	}
	require.Equal(t, int64(23), sqlInt(t, h.dsn, `select count(distinct a) from t`))
	h.store.mu.Lock()
	defer h.store.mu.Unlock()
	for _, ref := range refs {
		require.Len(t, h.store.finishes[ref], 1, "exactly one outcome write per attempt")
	}
	for _, call := range h.store.startCalls {
		require.LessOrEqual(t, len(call), 5, "StartTasks batches hold at most BatchSize refs")
	}
	require.Zero(t, h.store.failStart)
	require.Zero(t, h.store.failFinish)
}

func TestDrain(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a bigint)`)
	refs := h.submit(
		task{query: `select pg_sleep(0.3); insert into t values (##flow.TASK_ID##)`},
		task{query: `select pg_sleep(0.2); insert into t values (##flow.TASK_ID##)`},
	)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, h.ex.Drain(ctx))
	for _, ref := range refs {
		_, ok := h.rep.get(ref)
		require.True(t, ok)
	}
	require.Empty(t, h.ex.Running())
	require.Equal(t, int64(2), sqlInt(t, h.dsn, `select count(*) from t`))

	refused := h.submit(task{query: `insert into t values (0)`})[0]
	require.Empty(t, h.ex.Running(), "work is refused while draining")
	require.NoError(t, h.ex.Drain(ctx))
	h.shutdown()
	_, ok := h.rep.get(refused)
	require.False(t, ok)
	require.Equal(t, int64(2), sqlInt(t, h.dsn, `select count(*) from t`))

	// Drain times out while work is held.
	h2 := newHarness(t, nil)
	h2.submit(task{query: `select pg_sleep(30) /* drain-marker */`})
	short, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	require.ErrorIs(t, h2.ex.Drain(short), context.DeadlineExceeded)
}

func TestShutdownStopsRunningQueries(t *testing.T) {
	h := newHarness(t, nil)
	sqlExec(t, h.dsn, `CREATE TABLE t(a int)`)
	fast := h.submit(task{query: `insert into t values (1)`})[0]
	_, o, _ := h.waitDone(fast, 10*time.Second)
	requireFinished(t, o)

	ref := h.submit(task{query: `select pg_sleep(30) /* shutdown-marker */`})[0]
	var pid int64
	require.Eventually(t, func() bool { pid = activeBackend(t, h, "shutdown-marker"); return pid != 0 },
		10*time.Second, 10*time.Millisecond)
	start := time.Now()
	h.shutdown()
	require.Less(t, time.Since(start), 5*time.Second)
	_, wrote := h.store.outcome(ref)
	require.False(t, wrote, "an attempt stopped by shutdown writes no outcome")
	require.Eventually(t, backendGone(t, h, pid), 5*time.Second, 20*time.Millisecond)
	require.Equal(t, int64(0), sqlInt(t, h.dsn, `select count(*) from pg_stat_activity where application_name = $1`,
		h.ex.ApplicationName()), "pools are closed")
	require.ErrorIs(t, h.ex.Run(context.Background()), ErrAlreadyRunning)
}

func TestConnectionKilledMidQuery(t *testing.T) {
	h := newHarness(t, nil)
	ref := h.submit(task{query: `select pg_sleep(30) /* killed-marker */`})[0]
	var pid int64
	require.Eventually(t, func() bool { pid = activeBackend(t, h, "killed-marker"); return pid != 0 },
		10*time.Second, 10*time.Millisecond)
	sqlExec(t, h.dsn, `select pg_terminate_backend($1)`, pid)
	_, o, ok := h.waitDone(ref, 10*time.Second)
	require.True(t, ok)
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Contains(t, errText(o), "terminating connection due to administrator command")
	// The pool recovers.
	requireFinished(t, h.run(task{query: `select 1`}))
}

func TestManyConcurrentTasks(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 8; c.BatchSize = 50 })
	sqlExec(t, h.dsn, `CREATE TABLE t(a bigint primary key)`)
	var tasks []task
	for range 300 {
		tasks = append(tasks, task{query: `insert into t values (##flow.TASK_ID##)`})
	}
	refs := h.submit(tasks...)
	for _, ref := range refs {
		_, o, ok := h.waitDone(ref, 60*time.Second)
		require.True(t, ok)
		requireFinished(t, o)
	}
	require.Equal(t, int64(300), sqlInt(t, h.dsn, `select count(*) from t`))
	require.LessOrEqual(t, sqlInt(t, h.dsn, `select count(*) from pg_stat_activity where application_name = $1`,
		h.ex.ApplicationName()), int64(8))
}

// fillPool leaves n idle connections in the SELF pool: n tasks that hold
// their connection until all n run at once.
func fillPool(t *testing.T, h *harness, n int) {
	t.Helper()
	sqlExec(t, h.dsn, `CREATE TABLE IF NOT EXISTS pool_fill(i int)`)
	var tasks []task
	for i := 0; i < n; i++ {
		tasks = append(tasks, task{query: fmt.Sprintf(`insert into pool_fill values (%d);
			select pg_sleep(0.01) from generate_series(1, 500) where (select count(*) from pool_fill) < %d`, i, n)})
	}
	for _, ref := range h.submit(tasks...) {
		_, o, ok := h.waitDone(ref, 30*time.Second)
		require.True(t, ok)
		requireFinished(t, o)
	}
}

// The leader fences a node process it declared lost by terminating every
// session with its application_name, idle pooled ones included. Once the
// process learns it was lost (it abandons its attempts), its next tasks
// must run on new sessions, not fail with "terminating connection due to
// administrator command" without having run.
func TestAbandonDropsSessionsTheLeaderFenced(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 4 })
	fillPool(t, h, 4)
	n, err := h.ex.TerminateSessions(context.Background(), nil, h.ex.ApplicationName())
	require.NoError(t, err)
	require.Equal(t, 4, n, "the pool's idle sessions")
	h.ex.Abandon("node node-1 was lost: test")
	for i := 0; i < 4; i++ {
		requireFinished(t, h.run(task{query: `select 1`}))
	}
}

// A task whose session was terminated fails with the server's error, and
// the target's other pooled sessions (terminated alike by a fence or a
// server restart) are not handed to the next tasks.
func TestTerminatedSessionDropsItsSiblings(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConnsPerTarget = 4 })
	fillPool(t, h, 4)
	n, err := h.ex.TerminateSessions(context.Background(), nil, h.ex.ApplicationName())
	require.NoError(t, err)
	require.Equal(t, 4, n)
	o := h.run(task{query: `select 1`})
	require.Equal(t, pgstore.StatusFailed, o.Status)
	require.Contains(t, errText(o), "terminating connection due to administrator command")
	for i := 0; i < 4; i++ {
		requireFinished(t, h.run(task{query: `select 1`}))
	}
}

// Short tasks share a few warm sessions (ShortConnsPerTarget) even when
// the pool may open more; tasks that run long each get a session of their
// own beyond that, up to MaxConnsPerTarget, so they all run at once.
func TestShortTasksShareFewSessionsLongOnesGetTheirOwn(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.MaxConnsPerTarget = 10
		c.ShortConnsPerTarget = 2
		// Long enough that no trivial insert counts as long on a slow CI.
		c.LongTaskAfter = 2 * time.Second
	})
	sqlExec(t, h.dsn, `CREATE TABLE short_runs(pid int)`)
	var tasks []task
	for range 200 {
		tasks = append(tasks, task{query: `insert into short_runs values (pg_backend_pid())`})
	}
	for _, ref := range h.submit(tasks...) {
		_, o, ok := h.waitDone(ref, 60*time.Second)
		require.True(t, ok)
		requireFinished(t, o)
	}
	require.Equal(t, int64(200), sqlInt(t, h.dsn, `select count(*) from short_runs`))
	require.LessOrEqual(t, sqlInt(t, h.dsn, `select count(distinct pid) from short_runs`), int64(2),
		"sessions that ran the 200 short tasks")

	h2 := newHarness(t, func(c *Config) {
		c.MaxConnsPerTarget = 10
		c.ShortConnsPerTarget = 2
		c.LongTaskAfter = 100 * time.Millisecond
	})
	sqlExec(t, h2.dsn, `CREATE TABLE long_runs(pid int, began timestamptz, ended timestamptz)`)
	tasks = nil
	for range 6 {
		tasks = append(tasks, task{query: `insert into long_runs select pg_backend_pid(), clock_timestamp(), null
			from pg_sleep(0) returning 1;
			select pg_sleep(1.5);
			update long_runs set ended = clock_timestamp() where pid = pg_backend_pid() and ended is null`})
	}
	for _, ref := range h2.submit(tasks...) {
		_, o, ok := h2.waitDone(ref, 60*time.Second)
		require.True(t, ok)
		requireFinished(t, o)
	}
	require.Equal(t, int64(6), sqlInt(t, h2.dsn, `select count(distinct pid) from long_runs`))
	require.Equal(t, int64(1), sqlInt(t, h2.dsn,
		`select (max(began) < min(ended))::int from long_runs`),
		"the 6 long tasks did not all run at once with ShortConnsPerTarget 2")
}

// The session reset's answer is read without the attempt's context, so its
// wait is bounded by a read deadline instead: a reset whose answer never
// comes ends in a time-out error, and a reset that answers leaves no
// deadline behind for the session's next query.
func TestResetAnswerWaitIsBounded(t *testing.T) {
	dsn := newDB(t)
	cfg, err := pgconn.ParseConfig(dsn)
	require.NoError(t, err)
	proxy, err := faultproxy.Listen("127.0.0.1:0", net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))))
	require.NoError(t, err)
	t.Cleanup(func() { _ = proxy.Close() })
	cfg.Host, cfg.Port = "127.0.0.1", uint16(proxy.Addr().Port)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	require.NoError(t, err)
	defer pc.Close(ctx)

	const timeout = 300 * time.Millisecond
	sendReset := func() {
		pc.Frontend().Send(&pgproto3.Query{String: SessionReset})
		require.NoError(t, pc.Frontend().Flush())
	}
	sendReset()
	require.NoError(t, readResetAnswer(pc, timeout))
	// A query that outlasts the reset's deadline still gets its answer.
	require.NoError(t, pc.Exec(ctx, "select pg_sleep(0.6)").Close())

	proxy.Blackhole()
	sendReset()
	done := make(chan error, 1)
	go func() { done <- readResetAnswer(pc, timeout) }()
	select {
	case err := <-done:
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		require.True(t, ne.Timeout(), "want a time-out, got %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the wait for the reset's answer was not bounded")
	}
}
