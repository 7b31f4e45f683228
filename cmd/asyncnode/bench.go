package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/asyncnode/asyncnode/executor"
	"github.com/asyncnode/asyncnode/internal/pglocal"
	"github.com/asyncnode/asyncnode/pgstore"
)

// benchFlags configures `asyncnode bench`.
type benchFlags struct {
	dsn            string
	nodes          int
	tasks          int
	rounds         int
	clients        int
	push           time.Duration
	samples        int
	history        int
	scaleOut       bool
	sleepTasks     int
	perNode        int
	logLevel       string
	profileSeconds int
	profileDir     string
	soak           time.Duration
	soakRate       int
	nodeFlags      listFlag
	socket         bool
}

// bench is one benchmark run: a server database, a node cluster, figures.
type bench struct {
	f      benchFlags
	out    io.Writer
	db     *pgxpool.Pool // the database of the current figure: main or hist
	dsn    string
	main   benchDB
	hist   benchDB // with --history: a second database, on the same server
	dir    string
	lc     *localCluster
	nodes  int
	lines  []string
	figure map[string]float64
	cpu    cpuMeter
	// nodeFlagArgs are --node-flag's `asyncnode run` arguments, given to
	// every node bench starts (nodeArgs).
	nodeFlagArgs []string
	// transport is how bench and its nodes reach the server: "tcp" or
	// "unix" (a Unix-domain socket), as the server saw bench's connection.
	transport string
}

// benchDB is one database bench measures in.
type benchDB struct {
	dsn string
	db  *pgxpool.Pool
}

// cmdBench measures throughput, latency and the machine's own limit on the
// same PostgreSQL, and prints one line per figure and a summary line.
func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("bench", stdout, "asyncnode bench: measure throughput and latency against the machine's own limit")
	var f benchFlags
	fs.StringVar(&f.dsn, "bench-dsn", "", "server database to benchmark in (it must hold no tasks; bench sets control.workers and SELF's limit to 1000 there; default: a throwaway PostgreSQL)")
	fs.IntVar(&f.nodes, "nodes", 1, "nodes for the throughput and latency figures (1 or more; 3 adds a second round on 3 nodes when 1 is given with --scale-out)")
	fs.IntVar(&f.tasks, "tasks", 20000, "trivial tasks pushed in one statement for the throughput figure")
	fs.IntVar(&f.rounds, "rounds", 3, "rounds of each throughput figure and of limit_bookkeeping and limit_plain_node (1-20); the figure is their median, each round's rate is printed too; throughput_empty and the limits are measured side by side, round by round")
	fs.IntVar(&f.clients, "clients", 4, "connections for the continuous push and the round-trip limit")
	fs.DurationVar(&f.push, "push-for", 5*time.Second, "how long the clients push continuously")
	fs.IntVar(&f.samples, "samples", 200, "single tasks pushed one at a time for the latency figures")
	fs.IntVar(&f.history, "history", 0, "finished tasks in a second database, created beside the benchmark database and dropped at the end, where throughput_history runs round by round beside throughput_empty (e.g. 1000000)")
	fs.BoolVar(&f.scaleOut, "scale-out", false, "also measure 1 node vs 3 nodes on pg_sleep(0.05) tasks with --per-node slots each")
	fs.IntVar(&f.sleepTasks, "sleep-tasks", 600, "pg_sleep(0.05) tasks for the scale-out figure")
	fs.IntVar(&f.perNode, "per-node", 8, "tasks each node runs at once in the scale-out figure (--max-tasks)")
	fs.IntVar(&f.profileSeconds, "profile-seconds", 0, "with --profile-dir: CPU-profile every node for this long during the first round of each throughput figure")
	fs.StringVar(&f.profileDir, "profile-dir", "", "where to write CPU profiles (<node>.<figure>.cpu.prof)")
	fs.StringVar(&f.logLevel, "log-level", "warn", "node log level (logs go to files)")
	fs.DurationVar(&f.soak, "soak", 0, "also push --soak-rate tasks/s for this long and report every node's RSS after the first minute and at the end (e.g. 10m; 0: no soak round)")
	fs.IntVar(&f.soakRate, "soak-rate", 2000, "tasks/s pushed during --soak")
	fs.BoolVar(&f.socket, "socket", false, "reach the throwaway PostgreSQL through its Unix-domain socket instead of TCP on 127.0.0.1, from the nodes (their server and SELF task sessions) and from the limits' programs alike; refused with --bench-dsn, whose host decides")
	fs.Var(&f.nodeFlags, "node-flag", "an `asyncnode run` flag for every node bench starts, as name=value (repeatable or comma-separated, e.g. target-long-after=200ms,target-short-conns=8); not one that bench sets itself; the scale-out figure's --max-tasks (--per-node) wins over one given here")
	if err := parse(fs, args, env); err != nil {
		return err
	}
	switch {
	case f.nodes < 1 || f.nodes > 9:
		return usagef("--nodes must be between 1 and 9, got %d", f.nodes)
	case f.tasks < 1:
		return usagef("--tasks must be positive, got %d", f.tasks)
	case f.rounds < 1 || f.rounds > 20:
		return usagef("--rounds must be between 1 and 20, got %d", f.rounds)
	case f.clients < 1:
		return usagef("--clients must be positive, got %d", f.clients)
	case f.samples < 1:
		return usagef("--samples must be positive, got %d", f.samples)
	case f.history < 0:
		return usagef("--history must not be negative, got %d", f.history)
	case f.perNode < 1:
		return usagef("--per-node must be positive, got %d", f.perNode)
	case f.sleepTasks < 1:
		return usagef("--sleep-tasks must be positive, got %d", f.sleepTasks)
	case f.profileSeconds < 0 || (f.profileSeconds > 0 && f.profileDir == ""):
		return usagef("--profile-seconds needs --profile-dir and must not be negative")
	case f.soak < 0 || (f.soak > 0 && f.soak < time.Second):
		// Shorter, the first memory reading might never be taken.
		return usagef("--soak must be 0 or at least 1s, got %s", f.soak)
	case f.soakRate < 10:
		return usagef("--soak-rate must be at least 10 tasks/s, got %d", f.soakRate)
	case f.socket && f.dsn != "":
		return usagef("--socket is for bench's throwaway PostgreSQL; with --bench-dsn, give the socket directory as its host (host=/var/run/postgresql)")
	}
	if err := positive("push-for", f.push); err != nil {
		return err
	}
	nodeFlagArgs, err := nodeRunArgs(f.nodeFlags)
	if err != nil {
		return err
	}
	if f.profileDir != "" {
		// Found out before the run, not when the first profile is due.
		if err := os.MkdirAll(f.profileDir, 0o755); err != nil {
			return usagef("--profile-dir: %v", err)
		}
	}
	b := &bench{f: f, out: stdout, figure: map[string]float64{}, nodeFlagArgs: nodeFlagArgs}
	return b.run(ctx, stderr)
}

func (b *bench) run(ctx context.Context, stderr io.Writer) error {
	lf := logFlags{level: "warn"}
	log, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	if len(b.nodeFlagArgs) > 0 {
		fmt.Fprintf(b.out, "bench: every node runs with %s\n", strings.Join(shownNodeArgs(b.nodeFlagArgs), " "))
	}
	b.dsn = b.f.dsn
	if b.dsn == "" {
		fmt.Fprintln(b.out, "bench: starting a throwaway PostgreSQL ...")
		pg, err := pglocal.Start(ctx, pglocal.Options{})
		if err != nil {
			return err
		}
		defer pg.Stop()
		if err := pg.CreateDatabase(ctx, "bench", ""); err != nil {
			return err
		}
		b.dsn = pg.DSN("bench")
		if b.f.socket {
			b.dsn = pg.SocketDSN("bench")
		}
		b.cpu.postmaster = pg.PID()
	}
	b.cpu.nodes = b.nodePIDs
	cfg, err := b.poolConfig(b.dsn)
	if err != nil {
		return usagef("--bench-dsn is invalid: %s", pgstore.MaskDSN(err.Error()))
	}
	if b.db, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
		return err
	}
	defer b.db.Close()
	if b.f.dsn != "" {
		b.cpu.postmaster = localPostmaster(ctx, b.db)
	}
	// Refuse a database in use before changing anything in it.
	var rows int64
	if err := b.db.QueryRow(ctx, `select case when to_regclass('async.task') is null then 0
		else (xpath('/row/c/text()', query_to_xml('select count(*) as c from async.task', false, true, '')))[1]::text::bigint end`).Scan(&rows); err != nil {
		return fmt.Errorf("check the benchmark database: %w", err)
	}
	if rows > 0 {
		return fmt.Errorf("the database at %s already holds %d tasks; bench needs one without tasks", pgstore.MaskDSN(b.dsn), rows)
	}
	// How the figures reach the server matters to them: loopback TCP costs
	// both ends more CPU per message than a Unix-domain socket.
	var serverAddr *string
	if err := b.db.QueryRow(ctx, `select host(inet_server_addr())`).Scan(&serverAddr); err != nil {
		return fmt.Errorf("check the benchmark database: %w", err)
	}
	if serverAddr == nil {
		b.transport = "unix"
		fmt.Fprintln(b.out, "bench: server connections over a Unix-domain socket")
	} else {
		b.transport = "tcp"
		fmt.Fprintf(b.out, "bench: server connections over TCP to %s\n", *serverAddr)
	}
	var histName string // with --history: the history database, created by openHistory
	if b.f.history > 0 {
		// A leftover of an interrupted run is refused here, before
		// anything changes.
		var exists bool
		if err := b.db.QueryRow(ctx, `select current_database() || '_history',
			exists (select from pg_database where datname = current_database() || '_history')`).Scan(&histName, &exists); err != nil {
			return fmt.Errorf("check the benchmark database: %w", err)
		}
		if exists {
			return fmt.Errorf("--history: database %s exists on the benchmark's server; bench creates it for the history figures and drops it at the end: drop it first", pgx.Identifier{histName}.Sanitize())
		}
	}
	if _, err := pgstore.Migrate(ctx, b.dsn, log); err != nil {
		return err
	}
	if b.dir, err = os.MkdirTemp("", "asyncnode-bench-"); err != nil {
		return err
	}
	ok := false
	defer func() {
		if ok {
			os.RemoveAll(b.dir)
		} else {
			fmt.Fprintf(b.out, "bench: node logs kept in %s\n", b.dir)
		}
	}()
	if err := configureBench(ctx, b.db); err != nil {
		return err
	}
	b.main = benchDB{dsn: b.dsn, db: b.db}
	if b.f.history > 0 {
		drop, err := b.openHistory(ctx, log, histName)
		if err != nil {
			return err
		}
		defer drop() // after the cluster has stopped (deferred below)
	}
	defer b.stopCluster()

	if err := b.roundTrips(ctx); err != nil {
		return err
	}
	if err := b.sideBySide(ctx); err != nil {
		return err
	}
	if err := b.continuous(ctx); err != nil {
		return err
	}
	if err := b.latency(ctx, "empty"); err != nil {
		return err
	}
	if b.f.history > 0 {
		if err := b.use(ctx, b.hist); err != nil {
			return err
		}
		if err := b.latency(ctx, "history"); err != nil {
			return err
		}
	}
	if b.f.soak > 0 {
		if err := b.use(ctx, b.main); err != nil {
			return err
		}
		if err := b.soakRound(ctx); err != nil {
			return err
		}
	}
	if b.f.scaleOut {
		b.switchTo(b.main)
		if err := b.scaleOut(ctx); err != nil {
			return err
		}
	}
	// Leave no task behind (a --bench-dsn database must be reusable).
	b.switchTo(b.main)
	if err := b.reset(ctx, false); err != nil {
		return err
	}
	var parts []string
	for _, k := range []string{"throughput_empty", "continuous", "latency_consumed_p50_ms", "latency_consumed_p99_ms",
		"limit_roundtrips", "limit_bookkeeping", "limit_plain_node", "throughput_vs_bookkeeping_limit",
		"throughput_vs_plain_node_limit", "plain_node_vs_bookkeeping_limit", "throughput_history",
		"history_vs_empty", "soak_rss_growth_max", "scale_out_speedup"} {
		if v, ok := b.figure[k]; ok {
			parts = append(parts, fmt.Sprintf("%s=%s", k, num(v)))
		}
	}
	fmt.Fprintf(b.out, "bench summary nodes=%d transport=%s %s\n", b.f.nodes, b.transport, strings.Join(parts, " "))
	ok = true
	return nil
}

func num(v float64) string {
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	// Four significant digits: a ratio of 1.997 must not print as 2.
	return fmt.Sprintf("%.4g", v)
}

func (b *bench) print(name string, v float64, detail string) {
	b.figure[name] = v
	fmt.Fprintf(b.out, "bench figure=%s value=%s %s\n", name, num(v), detail)
}

func (b *bench) startCluster(ctx context.Context, n int, extra ...string) error {
	b.stopCluster()
	dir, err := os.MkdirTemp(b.dir, "cluster-")
	if err != nil {
		return err
	}
	lc, err := startLocalCluster(b.dsn, dir, n, b.f.logLevel, b.nodeArgs(extra...)...)
	if err != nil {
		return err
	}
	b.lc, b.nodes = lc, n
	if err := lc.waitReady(ctx, 60*time.Second); err != nil {
		return err
	}
	// Wait until the leader dispatches: one task through.
	return b.pushAndWait(ctx, 1, "select 0")
}

func (b *bench) stopCluster() {
	if b.lc != nil {
		b.lc.stop()
		b.lc = nil
	}
}

// switchTo makes d the database of the figures that follow, stopping the
// cluster of the other one.
func (b *bench) switchTo(d benchDB) {
	if b.dsn != d.dsn {
		b.stopCluster()
		b.dsn, b.db = d.dsn, d.db
	}
}

// use switches to d and makes sure a cluster of --nodes nodes runs on it,
// started and warmed up if it was not running.
func (b *bench) use(ctx context.Context, d benchDB) error {
	b.switchTo(d)
	if b.lc != nil {
		return nil
	}
	if err := b.startCluster(ctx, b.f.nodes); err != nil {
		return err
	}
	return b.warmUp(ctx, min(b.f.tasks, 2000), "select 0")
}

// poolConfig is the configuration of bench's own pool on a database:
// the pushing clients and a few more.
func (b *bench) poolConfig(dsn string) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = int32(b.f.clients + 4)
	return cfg, nil
}

// configureBench sets generous limits in db: the figures measure the
// machinery, not a pool cap.
func configureBench(ctx context.Context, db *pgxpool.Pool) error {
	_, err := db.Exec(ctx, `select async.configure('{"control":{"workers":1000},"targets":[{"target":"SELF","max_concurrency":1000}]}')`)
	return err
}

// openHistory creates the history database name next to the benchmark
// database (same server), installs the schema, configures it as the main
// one and fills its history (addHistory). throughput_history then runs
// there, round by round beside throughput_empty in the main one. drop
// removes it; call it once no cluster uses it.
func (b *bench) openHistory(ctx context.Context, log hclog.Logger, name string) (drop func(), err error) {
	ident := pgx.Identifier{name}.Sanitize()
	if _, err := b.db.Exec(ctx, "create database "+ident); err != nil {
		return nil, fmt.Errorf("--history: create the history database %s on the benchmark's server (bench creates it and drops it at the end; it must not exist, and the role needs CREATEDB): %w", ident, err)
	}
	drop = func() {
		if b.hist.db != nil {
			b.hist.db.Close()
		}
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if _, err := b.main.db.Exec(dctx, "drop database if exists "+ident+" with (force)"); err != nil {
			fmt.Fprintf(b.out, "bench: drop the history database %s: %v\n", ident, err)
		}
	}
	fail := func(err error) (func(), error) {
		drop()
		return nil, err
	}
	dsn, err := withDatabase(b.dsn, name)
	if err != nil {
		return fail(err)
	}
	cfg, err := b.poolConfig(dsn)
	if err != nil {
		return fail(fmt.Errorf("history database: %s", pgstore.MaskDSN(err.Error())))
	}
	if cfg.ConnConfig.Database != name {
		return fail(fmt.Errorf("history database: the benchmark DSN %s names database %q, not %q, with dbname changed", pgstore.MaskDSN(dsn), cfg.ConnConfig.Database, name))
	}
	db, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return fail(err)
	}
	b.hist = benchDB{dsn: dsn, db: db}
	if _, err := pgstore.Migrate(ctx, dsn, log); err != nil {
		return fail(err)
	}
	if err := configureBench(ctx, db); err != nil {
		return fail(err)
	}
	b.switchTo(b.hist)
	defer b.switchTo(b.main)
	if err := b.addHistory(ctx); err != nil {
		return fail(err)
	}
	return drop, nil
}

// withDatabase returns dsn (a URL or keyword/value connection string)
// naming database name instead of its own.
func withDatabase(dsn, name string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("history database: parse the benchmark DSN: %s", pgstore.MaskDSN(err.Error()))
		}
		u.Path = "/" + name
		u.RawPath = ""
		return u.String(), nil
	}
	// A later keyword overrides an earlier one.
	return dsn + " dbname=" + pglocal.QuoteValue(name), nil
}

// push pushes n tasks of query on SELF in one statement. They carry no
// pool of their own, so push_tasks puts them in SELF's pool.
func (b *bench) push(ctx context.Context, n int, query string) error {
	_, err := b.db.Exec(ctx, `select async.push_tasks(array_agg(async.task($1, 'SELF'))) from generate_series(1, $2)`, query, n)
	return err
}

// pushAndWait pushes n tasks in one statement and waits until none is
// unfinished.
func (b *bench) pushAndWait(ctx context.Context, n int, query string) error {
	if err := b.push(ctx, n, query); err != nil {
		return err
	}
	return b.waitDrained(ctx, 10*time.Minute)
}

// warmUp runs n tasks of query, unmeasured, and removes them, so that the
// figures that follow are those of a running cluster (task and server
// connections open, first-use costs paid), not of its first seconds.
func (b *bench) warmUp(ctx context.Context, n int, query string) error {
	if err := b.reset(ctx, true); err != nil {
		return err
	}
	if err := b.pushAndWait(ctx, n, query); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	return b.reset(ctx, true)
}

func (b *bench) waitDrained(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		// Both halves match a partial index and stop at the first row: the
		// poll must not load the server it measures (a count(*) every 10 ms
		// kept one of two cores busy). The figures come from the tasks'
		// timestamps, so the poll interval does not change them.
		var busy bool
		if err := b.db.QueryRow(ctx, `select exists (select from async.task where consumed is null and processed is null and yielded is null)
			or exists (select from async.task where processed is null and (consumed is not null or yielded is not null))`).Scan(&busy); err != nil {
			return err
		}
		if !busy {
			var failed int64
			if err := b.db.QueryRow(ctx, "select count(*) from async.task where failed").Scan(&failed); err != nil {
				return err
			}
			if failed > 0 {
				return fmt.Errorf("%d tasks failed during the benchmark; see the node logs", failed)
			}
			return nil
		}
		if time.Now().After(deadline) {
			var left int64
			if err := b.db.QueryRow(ctx, "select count(*) from async.task where processed is null").Scan(&left); err != nil {
				return err
			}
			return fmt.Errorf("%d tasks still unfinished after %s", left, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// reset deletes the tasks of the previous figure (only while the cluster is
// idle), so every figure starts from the same state.
func (b *bench) reset(ctx context.Context, keepHistory bool) error {
	q := "delete from async.task"
	if keepHistory {
		q += " where source is distinct from 'bench history'"
	}
	_, err := b.db.Exec(ctx, q)
	return err
}

// round is one round of a figure: of throughput_* or of a limit.
type round struct {
	tasks int
	secs  float64       // throughput: first entered to last processed; limits: wall-clock
	wall  time.Duration // throughput only: push sent to drain seen
	push  time.Duration // throughput only: push sent to its commit acknowledged
	cpu   string        // CPU per task, as cpuMeter.perTask renders it
}

func (r round) perSecond() float64 { return float64(r.tasks) / r.secs }

// rates lists the rate of every round, in order.
func rates(rs []round) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = r.perSecond()
	}
	return out
}

// printThroughput prints throughput_<label> as the median of rounds.
func (b *bench) printThroughput(label string, rounds []round) {
	m := lowerMedian(rounds, round.perSecond)
	b.print("throughput_"+label, m.perSecond(), fmt.Sprintf("unit=tasks/s nodes=%d tasks=%d rounds=%d each=%s seconds=%.3f wall=%s push=%s%s",
		b.nodes, b.f.tasks, len(rounds), each(rates(rounds)), m.secs, m.wall.Round(time.Millisecond), m.push.Round(100*time.Microsecond), m.cpu))
}

// throughputRound pushes --tasks trivial tasks in one statement and waits
// until all are processed: the seconds from the first entered to the last
// processed, the wall time of the round and of its push (which those
// seconds include: no node sees a task before the push commits), and the
// CPU per task from the end of the push to the end of the wait
// (cpuMeter.perTask).
func (b *bench) throughputRound(ctx context.Context, label string, profile bool) (round, error) {
	r := round{tasks: b.f.tasks}
	if err := b.reset(ctx, true); err != nil {
		return r, err
	}
	var prof sync.WaitGroup
	if profile {
		for _, c := range b.lc.children {
			prof.Add(1)
			go func(c *localNode) {
				defer prof.Done()
				b.profile(ctx, c, label)
			}(c)
		}
	}
	defer prof.Wait()
	start := time.Now()
	if err := b.push(ctx, b.f.tasks, "select 0"); err != nil {
		return r, err
	}
	r.push = time.Since(start)
	// From the end of the push, as limit_bookkeeping counts from the end
	// of its own: the work of claiming, running and finishing the tasks.
	before := b.cpu.sample()
	if err := b.waitDrained(ctx, 10*time.Minute); err != nil {
		return r, err
	}
	r.wall = time.Since(start)
	r.cpu = b.cpu.perTask(before, b.cpu.sample(), b.f.tasks)
	err := b.db.QueryRow(ctx, `select extract(epoch from max(processed) - min(entered))::float8 from async.task
		where source is distinct from 'bench history'`).Scan(&r.secs)
	return r, err
}

func (b *bench) profile(ctx context.Context, c *localNode, label string) {
	f, err := os.Create(fmt.Sprintf("%s/%s.%s.cpu.prof", b.f.profileDir, c.id, label))
	if err != nil {
		fmt.Fprintf(b.out, "bench: profile %s: %v\n", c.id, err)
		return
	}
	defer f.Close()
	api := newAPIClient(c.api, "")
	api.http.Timeout = 0
	req := fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", api.base, b.f.profileSeconds)
	hreq, err := newGet(ctx, req)
	if err != nil {
		return
	}
	resp, err := api.http.Do(hreq)
	if err != nil {
		fmt.Fprintf(b.out, "bench: profile %s: %v\n", c.id, err)
		return
	}
	defer resp.Body.Close()
	_, _ = io.Copy(f, resp.Body)
}

// continuous: clients push batches of 100 for a while; tasks finished per
// second over the pushing window.
func (b *bench) continuous(ctx context.Context) error {
	if err := b.reset(ctx, true); err != nil {
		return err
	}
	var pushed atomic.Int64
	var wg sync.WaitGroup
	pctx, cancel := context.WithTimeout(ctx, b.f.push)
	defer cancel()
	errs := make(chan error, b.f.clients)
	start := time.Now()
	for i := 0; i < b.f.clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for pctx.Err() == nil {
				if err := b.push(pctx, 100, "select 0"); err != nil {
					if pctx.Err() == nil {
						errs <- err
					}
					return
				}
				pushed.Add(100)
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	window := time.Since(start)
	if err := b.waitDrained(ctx, 10*time.Minute); err != nil {
		return err
	}
	var n int64
	var secs float64
	if err := b.db.QueryRow(ctx, `select count(*), extract(epoch from max(processed) - min(entered))::float8 from async.task
		where source is distinct from 'bench history'`).Scan(&n, &secs); err != nil {
		return err
	}
	b.print("continuous", float64(n)/secs, fmt.Sprintf("unit=tasks/s nodes=%d clients=%d pushed=%d push_window=%s first_push_to_last_processed=%.3fs",
		b.nodes, b.f.clients, pushed.Load(), window.Round(time.Millisecond), secs))
	return nil
}

// latency: single tasks one at a time on an idle cluster; entered (the
// push) → consumed (dispatched) and → processed, from the server's clock.
func (b *bench) latency(ctx context.Context, label string) error {
	if err := b.reset(ctx, true); err != nil {
		return err
	}
	var consumed, processed []float64
	for i := 0; i < b.f.samples; i++ {
		var id int64
		if err := b.db.QueryRow(ctx, `select async.push_task(async.task('select 0', 'SELF'))`).Scan(&id); err != nil {
			return err
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			var c, p *float64
			err := b.db.QueryRow(ctx, `select extract(epoch from consumed - entered)::float8 * 1000,
				extract(epoch from processed - entered)::float8 * 1000 from async.task where task_id = $1`, id).Scan(&c, &p)
			if err != nil {
				return err
			}
			if p != nil {
				consumed, processed = append(consumed, *c), append(processed, *p)
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("task %d not processed after 30s", id)
			}
			time.Sleep(time.Millisecond)
		}
	}
	for _, s := range []struct {
		name string
		v    []float64
	}{{"consumed", consumed}, {"processed", processed}} {
		slices.Sort(s.v)
		p := func(q float64) float64 { return s.v[min(len(s.v)-1, int(q*float64(len(s.v))))] }
		suffix := ""
		if label != "empty" {
			suffix = "_" + label
		}
		b.figure["latency_"+s.name+"_p50_ms"+suffix] = p(0.50)
		b.figure["latency_"+s.name+"_p99_ms"+suffix] = p(0.99)
		fmt.Fprintf(b.out, "bench figure=latency_push_to_%s%s unit=ms nodes=%d samples=%d p50=%.2f p95=%.2f p99=%.2f max=%.2f\n",
			s.name, suffix, b.nodes, len(s.v), p(0.50), p(0.95), p(0.99), s.v[len(s.v)-1])
	}
	return nil
}

// addHistory inserts finished tasks as history (retention not yet due).
func (b *bench) addHistory(ctx context.Context) error {
	if err := b.reset(ctx, false); err != nil {
		return err
	}
	start := time.Now()
	if _, err := b.db.Exec(ctx, `insert into async.task (target, priority, entered, consumed, processed, finish_status, failed,
		source, query, asynchronous_finish, concurrency_pool)
		select 'SELF', 0, now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour', 'FINISHED', false,
		       'bench history', 'select 0', false, 'SELF'
		  from generate_series(1, $1)`, b.f.history); err != nil {
		return fmt.Errorf("add history: %w", err)
	}
	if _, err := b.db.Exec(ctx, "vacuum analyze async.task"); err != nil {
		return err
	}
	fmt.Fprintf(b.out, "bench history: %d finished tasks added in %s\n", b.f.history, time.Since(start).Round(time.Millisecond))
	return nil
}

// roundTrips measures limit_roundtrips: trivial round trips over the same
// number of connections, on the same PostgreSQL, with no node running.
func (b *bench) roundTrips(ctx context.Context) error {
	var n atomic.Int64
	var wg sync.WaitGroup
	lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	start := time.Now()
	for i := 0; i < b.f.clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := b.db.Acquire(ctx)
			if err != nil {
				return
			}
			defer c.Release()
			for lctx.Err() == nil {
				if _, err := c.Exec(lctx, "select 0", pgx.QueryExecModeSimpleProtocol); err == nil {
					n.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	b.print("limit_roundtrips", float64(n.Load())/time.Since(start).Seconds(),
		fmt.Sprintf("unit=queries/s connections=%d query='select 0'", b.f.clients))
	return nil
}

// sideBySide measures throughput_empty, the two task limits it is
// compared with and, with --history, throughput_history, round by round:
// each round runs the bookkeeping done as plain batched SQL
// (limit_bookkeeping) and the plainest program that keeps a task's
// contract (limitPlainNode) with no node running, one throughput round on
// a cluster started (and warmed up) for it on the main database and, with
// --history, one on a cluster on the history database, within seconds of
// each other. Every figure is the median of its rounds, and each ratio
// the median of the rounds' own ratios, so that the machine's drift
// between figures measured minutes apart (on the development machine the
// same binary drained 11,000 and 18,000 tasks/s within minutes) does not
// enter the ratios. Even rounds run limits, empty, history; odd rounds
// the reverse. A cluster on the main database is left running.
func (b *bench) sideBySide(ctx context.Context) error {
	n := b.f.rounds
	bk, plain := make([]round, 0, n), make([]round, 0, n)
	empty, hist := make([]round, 0, n), make([]round, 0, n)
	limits := func(int) error {
		b.stopCluster()
		r, err := b.bookkeepingRound(ctx)
		if err != nil {
			return err
		}
		bk = append(bk, r)
		if r, err = b.limitPlainNode(ctx); err != nil {
			return err
		}
		plain = append(plain, r)
		return nil
	}
	tp := func(d benchDB, label string, rounds *[]round) func(int) error {
		return func(i int) error {
			if err := b.use(ctx, d); err != nil {
				return err
			}
			r, err := b.throughputRound(ctx, label, i == 0 && b.f.profileSeconds > 0)
			*rounds = append(*rounds, r)
			return err
		}
	}
	steps := []func(int) error{limits, tp(b.main, "empty", &empty)}
	if b.hist.db != nil {
		steps = append(steps, tp(b.hist, "history", &hist))
	}
	for i := range n {
		order := slices.Clone(steps)
		if i%2 == 1 {
			slices.Reverse(order)
		}
		for _, step := range order {
			if err := step(i); err != nil {
				return err
			}
		}
	}
	b.printLimit("limit_bookkeeping", bk, fmt.Sprintf("batch=%d (claim in order + finish, plain SQL, no query run)", plainBatch))
	b.printLimit("limit_plain_node", plain, fmt.Sprintf("task_sessions=%d batch=%d (claim in order + start + 'select 0' with the session reset + finish, plain SQL, no Raft)",
		executor.DefaultShortConns, plainBatch))
	b.printThroughput("empty", empty)
	b.roundRatio("throughput_vs_bookkeeping_limit", "throughput_empty", "limit_bookkeeping", rates(empty), rates(bk))
	b.roundRatio("throughput_vs_plain_node_limit", "throughput_empty", "limit_plain_node", rates(empty), rates(plain))
	// The share of the bookkeeping limit that a program doing only the
	// contract's work reaches in the same rounds: what the contract adds
	// to the bookkeeping, apart from what a node adds to the contract.
	b.roundRatio("plain_node_vs_bookkeeping_limit", "limit_plain_node", "limit_bookkeeping", rates(plain), rates(bk))
	if b.hist.db != nil {
		b.printThroughput("history", hist)
		b.roundRatio("history_vs_empty", "throughput_history", "throughput_empty", rates(hist), rates(empty))
	}
	return b.use(ctx, b.main)
}

// roundRatio prints name as the median over rounds of a's round divided
// by c's round of the same round.
func (b *bench) roundRatio(name, a, c string, as, cs []float64) {
	ratios := make([]float64, len(as))
	for i := range as {
		ratios[i] = as[i] / cs[i]
	}
	ident := func(v float64) float64 { return v }
	b.print(name, lowerMedian(ratios, ident), fmt.Sprintf("rounds=%d each=%s (median over rounds of %s / %s, both measured in the same round)",
		len(ratios), each(ratios), a, c))
}

// printLimit prints the figure name as the median of rounds, with every
// round's rate, then detail and the median round's CPU per task.
func (b *bench) printLimit(name string, rounds []round, detail string) {
	m := lowerMedian(rounds, round.perSecond)
	b.print(name, m.perSecond(), fmt.Sprintf("unit=tasks/s tasks=%d rounds=%d each=%s %s%s",
		b.f.tasks, len(rounds), each(rates(rounds)), detail, m.cpu))
}

// each lists vs, in order, as the figures print them.
func each(vs []float64) string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = num(v)
	}
	return strings.Join(out, ",")
}

// lowerMedian returns the round of rs in the middle by rate (the lower
// middle one for an even count).
func lowerMedian[T any](rs []T, rate func(T) float64) T {
	s := slices.Clone(rs)
	slices.SortStableFunc(s, func(x, y T) int { return cmp.Compare(rate(x), rate(y)) })
	return s[(len(s)-1)/2]
}

// bookkeepingRound pushes --tasks tasks (not timed), then claims and
// finishes them with plain batched SQL on one connection.
func (b *bench) bookkeepingRound(ctx context.Context) (round, error) {
	if err := b.push(ctx, b.f.tasks, "select 0"); err != nil {
		return round{}, err
	}
	before := b.cpu.sample()
	start := time.Now()
	done := 0
	for {
		var ids []int64
		err := b.db.QueryRow(ctx, plainClaim, plainBatch).Scan(&ids)
		if err != nil {
			return round{}, err
		}
		if len(ids) == 0 {
			break
		}
		if _, err := b.db.Exec(ctx, plainFinish, ids); err != nil {
			return round{}, err
		}
		done += len(ids)
	}
	r := round{tasks: done, secs: time.Since(start).Seconds(), cpu: b.cpu.perTask(before, b.cpu.sample(), done)}
	if done != b.f.tasks {
		return r, fmt.Errorf("limit_bookkeeping: claimed %d of the %d tasks pushed", done, b.f.tasks)
	}
	return r, b.reset(ctx, false)
}

// scaleOut: pg_sleep(0.05) tasks, each node capped at --per-node at once;
// 1 node vs 3 nodes.
func (b *bench) scaleOut(ctx context.Context) error {
	rate := map[int]float64{}
	for _, n := range []int{1, 3} {
		if err := b.startCluster(ctx, n, "--max-tasks", fmt.Sprint(b.f.perNode)); err != nil {
			return err
		}
		if err := b.warmUp(ctx, 2*n*b.f.perNode, "select pg_sleep(0.05)"); err != nil {
			return err
		}
		if err := b.pushAndWait(ctx, b.f.sleepTasks, "select pg_sleep(0.05)"); err != nil {
			return err
		}
		var secs float64
		if err := b.db.QueryRow(ctx, `select extract(epoch from max(processed) - min(entered))::float8 from async.task
			where source is distinct from 'bench history'`).Scan(&secs); err != nil {
			return err
		}
		rate[n] = float64(b.f.sleepTasks) / secs
		b.print(fmt.Sprintf("scale_out_%d_nodes", n), rate[n], fmt.Sprintf("unit=tasks/s tasks=%d per_node=%d query='select pg_sleep(0.05)' seconds=%.3f",
			b.f.sleepTasks, b.f.perNode, secs))
	}
	b.print("scale_out_speedup", rate[3]/rate[1], "(3 nodes / 1 node)")
	return nil
}

func newGet(ctx context.Context, url string) (*http.Request, error) {
	return http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
}

// soakRound pushes --soak-rate tasks/s for --soak on the --nodes cluster
// and reports every node's resident memory after the first minute (or half
// the soak, if shorter) and at the end, so a leak shows as growth. The
// figure is the growth of anonymous memory (heap, stacks); file-backed
// resident pages are mostly the memory-mapped Raft log (raft.db), which
// grows with the log up to its compaction and is page cache the kernel can
// reclaim, so they are printed apart.
func (b *bench) soakRound(ctx context.Context) error {
	if err := b.reset(ctx, true); err != nil {
		return err
	}
	first := min(time.Minute, b.f.soak/2)
	perTick := max(b.f.soakRate/10, 1)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	var early []memUse
	pushed := 0
	for time.Since(start) < b.f.soak {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if err := b.push(ctx, perTick, "select 0"); err != nil {
			return fmt.Errorf("soak push: %w", err)
		}
		pushed += perTick
		if early == nil && time.Since(start) >= first {
			m, err := b.clusterMem()
			if err != nil {
				return err
			}
			early = m
		}
	}
	late, err := b.clusterMem()
	if err != nil {
		return err
	}
	window := time.Since(start)
	if err := b.waitDrained(ctx, 10*time.Minute); err != nil {
		return err
	}
	b.print("soak_tasks", float64(pushed)/window.Seconds(), fmt.Sprintf("unit=tasks/s nodes=%d pushed=%d soak=%s (all processed, none failed)",
		b.nodes, pushed, window.Round(time.Second)))
	worst := 0.0
	for i, c := range b.lc.children {
		growth := float64(late[i].anon) / float64(early[i].anon)
		worst = max(worst, growth)
		b.print("soak_rss_"+c.id, growth, fmt.Sprintf("(anonymous RSS at end / after %s) anon_kib=%d,%d file_kib=%d,%d rss_kib=%d,%d (after %s, at end) soak=%s",
			first, early[i].anon, late[i].anon, early[i].file, late[i].file, early[i].rss, late[i].rss, first, window.Round(time.Second)))
	}
	b.print("soak_rss_growth_max", worst, "(largest anonymous-RSS growth of any node)")
	return nil
}

// nodePIDs returns the process ids of the running nodes.
func (b *bench) nodePIDs() []int {
	if b.lc == nil {
		return nil
	}
	var pids []int
	for _, c := range b.lc.children {
		if c.cmd != nil && c.cmd.Process != nil {
			pids = append(pids, c.cmd.Process.Pid)
		}
	}
	return pids
}

// memUse is a process's resident memory in KiB: all of it, anonymous, and
// file-backed.
type memUse struct{ rss, anon, file int64 }

// clusterMem reads every node's resident memory (Linux /proc).
func (b *bench) clusterMem() ([]memUse, error) {
	out := make([]memUse, len(b.lc.children))
	for i, c := range b.lc.children {
		if c.cmd == nil || c.cmd.Process == nil {
			return nil, fmt.Errorf("node %s is not running", c.id)
		}
		m, err := readMem(c.cmd.Process.Pid)
		if err != nil {
			return nil, fmt.Errorf("memory of node %s: %w", c.id, err)
		}
		out[i] = m
	}
	return out, nil
}

// readMem reads VmRSS, RssAnon and RssFile of process pid from
// /proc/<pid>/status.
func readMem(pid int) (memUse, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memUse{}, fmt.Errorf("read /proc (--soak needs Linux): %w", err)
	}
	var m memUse
	fields := map[string]*int64{"VmRSS:": &m.rss, "RssAnon:": &m.anon, "RssFile:": &m.file}
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		for prefix, dst := range fields {
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				if _, err := fmt.Sscanf(strings.TrimSpace(rest), "%d kB", dst); err != nil {
					return memUse{}, fmt.Errorf("parse %s %q: %w", prefix, rest, err)
				}
				found++
			}
		}
	}
	if found != len(fields) || m.anon == 0 {
		return memUse{}, fmt.Errorf("no VmRSS/RssAnon/RssFile in /proc/%d/status", pid)
	}
	return m, nil
}
