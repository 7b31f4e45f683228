package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/internal/pglocal"
)

// The fault-injection suite (issue #4): each scenario runs a cluster of the
// built binary against two throwaway PostgreSQL servers of its own — the
// server database, and a separate target server that can be restarted
// independently — drives a steady load of tasks that write a ledger on the
// target, injects its fault, and judges the history with checkHistory. It
// prints one summary line per scenario and fails on any lost, duplicated
// or overlapping run, limit violation or wrong outcome.
//
// ASYNCNODE_FAULT_ROUNDS sets the rounds of the repeated faults;
// ASYNCNODE_FAULT_SOAK=1 runs the long tier (more rounds, longer load).

// Pools of the load: t0 allows no retry, t1 one retry after a lost node.
const (
	faultLimitT0 = 4
	faultLimitT1 = 3
	faultSleep   = 50 * time.Millisecond
	faultSlow    = 30 * time.Second // the sleep of tasks built to time out
)

// faultNodeFlags are the flags of every node of the suite: failures are
// resolved quickly.
var faultNodeFlags = []string{"--lost-after", "5s", "--lease", "2s", "--shutdown-timeout", "3s"}

// faultEnv is one scenario's world.
type faultEnv struct {
	t         *testing.T
	name      string
	server    *pglocal.Server
	target    *pglocal.Server
	dsn       string // server database
	targetDSN string
	db        *pgxpool.Pool // server database
	tdb       *pgxpool.Pool // target database
	nodes     []*node
	limits    map[string]int
	expect    map[string]string // target -> Expect of its tasks
	allowed   map[string]*regexp.Regexp
	targets   []map[string]any
	recovery  []time.Duration
	rounds    int

	loadCancel context.CancelFunc
	loadDone   chan struct{}
	loadMu     sync.Mutex
	loadErrs   int
	lastErr    string
}

// faultRounds is the number of rounds of a repeated fault: short by
// default, more in the soak tier, ASYNCNODE_FAULT_ROUNDS wins.
func faultRounds(t *testing.T, short, soak int) int {
	t.Helper()
	if v := os.Getenv("ASYNCNODE_FAULT_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "ASYNCNODE_FAULT_ROUNDS")
		require.Positive(t, n, "ASYNCNODE_FAULT_ROUNDS")
		return n
	}
	if faultSoak() {
		return soak
	}
	return short
}

func faultSoak() bool { return os.Getenv("ASYNCNODE_FAULT_SOAK") == "1" }

// startPG starts a throwaway PostgreSQL server for one scenario.
func startPG(t *testing.T, opts pglocal.Options) *pglocal.Server {
	t.Helper()
	s, err := pglocal.Start(context.Background(), opts)
	require.NoError(t, err, "a throwaway PostgreSQL must start")
	t.Cleanup(func() { _ = s.Stop() })
	return s
}

// faultPlace says where a scenario's world runs; the zero value is the
// usual one: everything on 127.0.0.1.
type faultPlace struct {
	pg pglocal.Options // of both PostgreSQL servers
	// cluster starts the nodes; nil means startCluster.
	cluster func(t *testing.T, dsn string, n int, extra ...string) []*node
}

// newFaultEnv starts the two PostgreSQL servers, installs the schema, the
// ledger and the targets t0 and t1 (plus extra ones: an empty
// connection_string means the target server), and starts a cluster of
// nodes nodes.
func newFaultEnv(t *testing.T, name string, nodes int, extraTargets ...map[string]any) *faultEnv {
	t.Helper()
	return newFaultEnvAt(t, name, faultPlace{}, nodes, extraTargets...)
}

// newFaultEnvAt is newFaultEnv with the servers and nodes placed by at.
func newFaultEnvAt(t *testing.T, name string, at faultPlace, nodes int, extraTargets ...map[string]any) *faultEnv {
	t.Helper()
	ctx := context.Background()
	e := &faultEnv{t: t, name: name,
		limits:  map[string]int{"t0": faultLimitT0, "t1": faultLimitT1},
		expect:  map[string]string{"t0": "ok", "t1": "ok"},
		allowed: map[string]*regexp.Regexp{},
	}
	e.server = startPG(t, at.pg)
	e.target = startPG(t, at.pg)
	require.NoError(t, e.server.CreateDatabase(ctx, "app", ""))
	require.NoError(t, e.target.CreateDatabase(ctx, "tgt", ""))
	e.dsn = e.server.DSN("app")
	e.targetDSN = e.target.DSN("tgt")
	initDB(t, e.dsn)
	e.db = pool(t, e.dsn)
	e.tdb = pool(t, e.targetDSN)
	_, err := e.tdb.Exec(ctx, `create table ledger(id bigserial primary key, task_id bigint not null, pool text not null,
		app text not null, pid int not null, planned_ms int not null, started timestamptz not null, ended timestamptz)`)
	require.NoError(t, err)
	e.targets = []map[string]any{
		{"target": "t0", "connection_string": e.targetDSN, "max_concurrency": faultLimitT0, "max_retries": 0},
		{"target": "t1", "connection_string": e.targetDSN, "max_concurrency": faultLimitT1, "max_retries": 1},
	}
	for _, x := range extraTargets {
		e.addTarget(x)
	}
	e.configure()
	if at.cluster == nil {
		at.cluster = startCluster
	}
	e.nodes = at.cluster(t, e.dsn, nodes, faultNodeFlags...)
	return e
}

// addTarget adds a target to the configuration (applied by the next
// configure): an empty connection_string means the target server. Its
// tasks are expected to run to the end ("ok") unless the scenario says
// otherwise in e.expect.
func (e *faultEnv) addTarget(x map[string]any) {
	if x["connection_string"] == "" {
		x["connection_string"] = e.targetDSN
	}
	name := x["target"].(string)
	e.targets = append(e.targets, x)
	e.limits[name] = x["max_concurrency"].(int)
	e.expect[name] = "ok"
}

// configure writes the targets to async.target.
func (e *faultEnv) configure() {
	e.t.Helper()
	b, err := json.Marshal(map[string]any{"targets": e.targets})
	require.NoError(e.t, err)
	_, err = e.db.Exec(context.Background(), `select async.configure($1::jsonb)`, string(b))
	require.NoError(e.t, err)
}

// ledgerTaskFor is a task that records its run in the ledger: the start is
// committed on its own (so a run that is killed still shows), then it
// sleeps and records its end.
func ledgerTaskFor(pool string, sleep time.Duration) string {
	return fmt.Sprintf(`insert into ledger(task_id, pool, app, pid, planned_ms, started)
values (##flow.TASK_ID##, '%s', current_setting('application_name'), pg_backend_pid(), %d, clock_timestamp());
commit;
select pg_sleep(%g);
update ledger set ended = clock_timestamp() where task_id = ##flow.TASK_ID## and pid = pg_backend_pid() and ended is null`,
		pool, sleep.Milliseconds(), sleep.Seconds())
}

// push pushes n tasks of target, with an optional timeout.
func (e *faultEnv) push(ctx context.Context, target string, n int, sleep time.Duration, timeout time.Duration) error {
	var to *string
	if timeout > 0 {
		s := fmt.Sprintf("%d milliseconds", timeout.Milliseconds())
		to = &s
	}
	_, err := e.db.Exec(ctx, `select async.push_tasks(array_agg(async.task($1, $2, manual_timeout => $3::interval))) from generate_series(1, $4)`,
		ledgerTaskFor(target, sleep), target, to, n)
	return err
}

// startLoad keeps the queue of t0 and t1 topped up until stopLoad, so that
// both pools run at their limit throughout the scenario. Pushes that fail
// (the server database is down) are counted and retried.
func (e *faultEnv) startLoad() {
	ctx, cancel := context.WithCancel(context.Background())
	e.loadCancel, e.loadDone = cancel, make(chan struct{})
	go func() {
		defer close(e.loadDone)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			qctx, qcancel := context.WithTimeout(ctx, 2*time.Second)
			var queued int
			err := e.db.QueryRow(qctx, `select count(*) from async.task where processed is null and consumed is null`).Scan(&queued)
			if err == nil && queued < 40 {
				err = e.push(qctx, "t0", 10, faultSleep, 0)
				if err == nil {
					err = e.push(qctx, "t1", 10, faultSleep, 0)
				}
			}
			qcancel()
			if err != nil && ctx.Err() == nil {
				e.loadMu.Lock()
				e.loadErrs++
				e.lastErr = err.Error()
				e.loadMu.Unlock()
			}
		}
	}()
	e.t.Cleanup(e.stopLoad)
}

func (e *faultEnv) stopLoad() {
	if e.loadCancel == nil {
		return
	}
	e.loadCancel()
	<-e.loadDone
	e.loadCancel = nil
}

// waitProgress waits until n more tasks ended than at the call.
func (e *faultEnv) waitProgress(n int) {
	e.t.Helper()
	ctx := context.Background()
	var base, done int
	require.NoError(e.t, e.db.QueryRow(ctx, `select count(*) from async.task where processed is not null`).Scan(&base))
	require.True(e.t, assertEventually(func() bool {
		_ = e.db.QueryRow(ctx, `select count(*) from async.task where processed is not null`).Scan(&done)
		return done >= base+n
	}, 120*time.Second), "%s: no progress: %d of %d more tasks ended", e.name, done-base, n)
}

// recovered records the time from since to the first task dispatched after
// it, waiting for it.
func (e *faultEnv) recovered(since time.Time) time.Duration {
	e.t.Helper()
	var first *time.Time
	require.True(e.t, assertEventually(func() bool {
		// Only dispatches that took effect: a leader cut off from its peers
		// still claims rows (consumed is set before the Raft commit) and
		// puts them back when the commit fails; a started attempt was
		// committed.
		_ = e.db.QueryRow(context.Background(), "select min(consumed) from async.task where consumed > $1 and started is not null", since).Scan(&first)
		return first != nil
	}, 120*time.Second), "%s: nothing was dispatched after the fault", e.name)
	d := first.Sub(since)
	e.recovery = append(e.recovery, d)
	return d
}

// hold keeps a fault in place until d after since. The fault's duration is
// part of the scenario, not a condition to wait for, so this is a plain
// sleep.
func hold(since time.Time, d time.Duration) { time.Sleep(time.Until(since.Add(d))) }

// live returns the running nodes.
func (e *faultEnv) live() []*node {
	var out []*node
	for _, n := range e.nodes {
		if n.cmd != nil {
			out = append(out, n)
		}
	}
	return out
}

// restart starts a stopped node again from its data dir, joining through a
// live node's gossip address.
func (e *faultEnv) restart(n *node) {
	e.t.Helper()
	keep := withoutJoin(n.extra)
	if live := e.live(); len(live) > 0 {
		keep = append(keep, "--join", live[0].gossip)
	}
	n.extra = keep
	n.start()
}

// withoutJoin returns flags without their --join pairs.
func withoutJoin(flags []string) []string {
	var keep []string
	for i := 0; i < len(flags); i++ {
		if flags[i] == "--join" {
			i++
			continue
		}
		keep = append(keep, flags[i])
	}
	return keep
}

// finish stops the load, waits until every task has ended, judges the
// history, prints the summary line and fails on any violation.
func (e *faultEnv) finish() faultReport {
	e.t.Helper()
	e.stopLoad()
	ctx := context.Background()
	var left int
	settled := assertEventually(func() bool {
		err := e.db.QueryRow(ctx, "select count(*) from async.task where processed is null").Scan(&left)
		return err == nil && left == 0
	}, 180*time.Second)
	if !settled {
		e.t.Logf("%s: %d tasks still unfinished after 180s", e.name, left)
	}
	rep := e.history()
	// Everything is settled: no task query may still run on the target.
	var zombies int
	require.NoError(e.t, e.tdb.QueryRow(ctx, `select count(*) from pg_stat_activity
		where application_name like 'asyncnode/%' and state = 'active' and query like '%ledger%'`).Scan(&zombies))
	if zombies > 0 {
		rep.WrongOutcome += zombies
		rep.note("%d task queries still run on the target after every task ended", zombies)
	}
	e.loadMu.Lock()
	loadErrs, lastErr := e.loadErrs, e.lastErr
	e.loadMu.Unlock()
	rec := "recovery"
	if e.name == "leader-kill" {
		rec = "failover"
	}
	var p50ms, maxms int64 = -1, -1
	if len(e.recovery) > 0 {
		p50ms, maxms = p50(e.recovery).Milliseconds(), slices.Max(e.recovery).Milliseconds()
	}
	fmt.Printf("scenario=%s rounds=%d tasks=%d lost=%d dup=%d overlap=%d limit_violations=%d wrong_outcome=%d finished=%d failed_as_lost=%d failed_other=%d timed_out=%d push_errors=%d peak=%s %s_p50_ms=%d %s_max_ms=%d\n",
		e.name, e.rounds, rep.Tasks, rep.Lost, rep.Dup, rep.Overlap, rep.LimitViolations, rep.WrongOutcome,
		rep.Finished, rep.FailedLost, rep.Failed, rep.TimedOut, loadErrs, peaks(rep.Peak), rec, p50ms, rec, maxms)
	if loadErrs > 0 {
		e.t.Logf("%s: %d pushes failed during the fault, last: %s", e.name, loadErrs, lastErr)
	}
	if rep.violations() > 0 {
		e.t.Errorf("%s: %d violations:\n  %s", e.name, rep.violations(), strings.Join(rep.Notes, "\n  "))
	} else if len(rep.Notes) > 0 {
		e.t.Logf("%s notes:\n  %s", e.name, strings.Join(rep.Notes, "\n  "))
	}
	return rep
}

// history reads the task log and the ledger and judges them.
func (e *faultEnv) history() faultReport {
	e.t.Helper()
	ctx := context.Background()
	rows, err := e.db.Query(ctx, `select task_id, target, max_retries, coalesce(finish_status::text, ''),
		coalesce(processing_error, ''), processed from async.task order by task_id`)
	require.NoError(e.t, err)
	var tasks []histTask
	for rows.Next() {
		var h histTask
		require.NoError(e.t, rows.Scan(&h.ID, &h.Target, &h.MaxRetries, &h.Status, &h.Error, &h.Processed))
		h.Expect = e.expect[h.Target]
		tasks = append(tasks, h)
	}
	require.NoError(e.t, rows.Err())
	rows, err = e.tdb.Query(ctx, `select task_id, pool, app, planned_ms, started, ended from ledger`)
	require.NoError(e.t, err)
	var runs []histRun
	for rows.Next() {
		var r histRun
		var ms int
		require.NoError(e.t, rows.Scan(&r.TaskID, &r.Pool, &r.App, &ms, &r.Started, &r.Ended))
		r.Planned = time.Duration(ms) * time.Millisecond
		runs = append(runs, r)
	}
	require.NoError(e.t, rows.Err())
	return checkHistory(tasks, runs, e.limits, e.allowed)
}

// peaks formats the most runs at once per pool, e.g. "t0:4,t1:3".
func peaks(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s:%d", k, m[k])
	}
	return b.String()
}
