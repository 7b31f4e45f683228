// Command riverbench measures a well-known Go + PostgreSQL job queue, River,
// on the machine and server where `asyncnode bench` runs, so that asyncnode's
// throughput can be read beside it (docs/performance.md, "A job queue on the
// same machine").
//
// It is a module of its own, so that asyncnode never depends on River;
// `make test` and `make lint` vet and test it too. `make bench-river` runs it.
//
// Each round drains --jobs River jobs inserted before the client starts,
// twice: once with a worker that runs one `select 0` on the client's pool
// (river_select_0) and once with a worker that does nothing (river_noop). A
// figure is jobs/s from the client's start to the last job's completed
// event (the event comes after River's completer has written the job's
// state), the median of the rounds. The client runs with the settings of
// River's own benchmark (2,000 workers, a 2 ms fetch cool-down, a 20 ms
// fetch poll) unless flags say otherwise.
//
// Each line also gives the CPU time per job of this process (River's client
// and its workers) and, on a throwaway server, of the server (every backend
// included), as asyncnode bench gives its nodes' and server's.
//
// Without --dsn it starts a throwaway PostgreSQL with the settings `asyncnode
// bench` gives its own (internal/pglocal). With --dsn it migrates River's
// schema into that database and refuses one whose river_job table holds
// jobs other than its own, since every round empties it.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/asyncnode/asyncnode/internal/pglocal"
	"github.com/asyncnode/asyncnode/internal/proccpu"
	"github.com/asyncnode/asyncnode/pgstore"
)

// options are the command's flags.
type options struct {
	dsn       string
	jobs      int
	processes int
	rounds    int
	workers   int
	conns     int
	cooldown  time.Duration
	poll      time.Duration
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if isChild() {
		if code := runChild(ctx); code != 0 {
			stop()
			os.Exit(code)
		}
		return
	}
	opts, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "riverbench: %v\n", err)
		os.Exit(2)
	}
	if err := run(ctx, opts, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "riverbench: %v\n", err)
		os.Exit(1)
	}
}

// parseFlags reads and checks the flags; a bad one is an error of one line.
func parseFlags(args []string, errOut io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("riverbench", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // a bad flag is one line, not the usage
	fs.StringVar(&o.dsn, "dsn", "", "a database to run in (River's schema is migrated there; its river_job must be empty); default: a throwaway PostgreSQL")
	fs.IntVar(&o.jobs, "jobs", 20000, "jobs drained in each round, per worker kind")
	fs.IntVar(&o.rounds, "rounds", 3, "rounds; each figure is the median round (1-20)")
	fs.IntVar(&o.processes, "processes", 1, "River clients working the queue, each in a process of its own when more than 1 (1-9)")
	fs.IntVar(&o.workers, "workers", 2000, "MaxWorkers of River's default queue (River's own benchmark uses 2000)")
	fs.IntVar(&o.conns, "conns", 0, "max connections of the client's pool (0: pgxpool's default, max(4, CPUs))")
	fs.DurationVar(&o.cooldown, "fetch-cooldown", 2*time.Millisecond, "River's FetchCooldown")
	fs.DurationVar(&o.poll, "fetch-poll", 20*time.Millisecond, "River's FetchPollInterval")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(errOut, "usage: riverbench [flags]")
			fs.SetOutput(errOut)
			fs.PrintDefaults()
		}
		return o, err
	}
	switch {
	case fs.NArg() > 0:
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case o.jobs < 1 || o.jobs > 10_000_000:
		return o, fmt.Errorf("--jobs must be between 1 and 10000000, got %d", o.jobs)
	case o.rounds < 1 || o.rounds > 20:
		return o, fmt.Errorf("--rounds must be between 1 and 20, got %d", o.rounds)
	case o.processes < 1 || o.processes > 9:
		return o, fmt.Errorf("--processes must be between 1 and 9, got %d", o.processes)
	case o.workers < 1 || o.workers > 10_000:
		return o, fmt.Errorf("--workers must be between 1 and 10000, got %d", o.workers)
	case o.conns < 0 || o.conns > 1000:
		return o, fmt.Errorf("--conns must be between 0 and 1000, got %d", o.conns)
	case o.cooldown < time.Millisecond:
		return o, fmt.Errorf("--fetch-cooldown must be at least 1ms, got %s", o.cooldown)
	case o.poll < o.cooldown:
		return o, fmt.Errorf("--fetch-poll (%s) must not be shorter than --fetch-cooldown (%s)", o.poll, o.cooldown)
	}
	if o.dsn != "" {
		if _, err := pgconn.ParseConfig(o.dsn); err != nil {
			return o, fmt.Errorf("--dsn %s: cannot parse it", pgstore.MaskDSN(o.dsn))
		}
	}
	return o, nil
}

// run measures both figures, o.rounds times in turn, and prints them to out.
func run(ctx context.Context, o options, out io.Writer) error {
	dsn, where, postmaster := o.dsn, "", 0
	if dsn == "" {
		pg, err := pglocal.Start(ctx, pglocal.Options{})
		if err != nil {
			return fmt.Errorf("start a throwaway PostgreSQL: %w", err)
		}
		defer func() { _ = pg.Stop() }()
		dsn, where = pg.DSN("postgres"), "a throwaway PostgreSQL (the settings asyncnode bench gives its own)"
		postmaster = pg.PID()
	} else {
		where = pgstore.MaskDSN(dsn)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return fmt.Errorf("parse the connection string %s: %w", pgstore.MaskDSN(dsn), err)
	}
	if o.conns > 0 {
		cfg.MaxConns = int32(o.conns)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", pgstore.MaskDSN(dsn), err)
	}
	defer pool.Close()
	if o.dsn != "" {
		if err := checkEmpty(ctx, pool); err != nil {
			return err
		}
	}
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		return fmt.Errorf("river migrations: %w", err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("install River's schema: %w", err)
	}
	fmt.Fprintf(out, "riverbench: River %s on %s; %d jobs a round, %d rounds, processes=%d, MaxWorkers=%d a process, pool max_conns=%d a process, FetchCooldown=%s, FetchPollInterval=%s\n",
		riverVersion(), where, o.jobs, o.rounds, o.processes, o.workers, pool.Config().MaxConns, o.cooldown, o.poll)

	kinds := []struct{ name, query string }{{"river_select_0", "select 0"}, {"river_noop", ""}}
	rounds := make([][]result, len(kinds))
	for r := range o.rounds {
		for k, kind := range kinds {
			res, err := drain(ctx, dsn, pool, o, kind.query, postmaster)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, kind.name, err)
			}
			fmt.Fprintf(out, "riverbench round=%d figure=%s value=%.0f unit=jobs/s%s\n", r+1, kind.name, res.rate, res.cpu(o.jobs))
			rounds[k] = append(rounds[k], res)
		}
	}
	summary := "riverbench summary"
	for k, kind := range kinds {
		rates := make([]float64, len(rounds[k]))
		for i, res := range rounds[k] {
			rates[i] = res.rate
		}
		med := medianRound(rounds[k])
		fmt.Fprintf(out, "riverbench figure=%s value=%.0f unit=jobs/s rounds=%d each=%s jobs=%d processes=%d%s (median round, with its CPU; %s)\n",
			kind.name, med.rate, o.rounds, join(rates, 0), o.jobs, o.processes, med.cpu(o.jobs), describe(kind.query))
		summary += fmt.Sprintf(" %s=%.0f", kind.name, med.rate)
	}
	fmt.Fprintln(out, summary)
	return nil
}

// checkEmpty refuses a database whose river_job table holds jobs other
// than riverbench's own: every round empties the table.
func checkEmpty(ctx context.Context, pool *pgxpool.Pool) error {
	var n int64
	err := pool.QueryRow(ctx, "select count(*) from river_job where kind <> $1", benchArgs{}.Kind()).Scan(&n)
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &pe) && pe.Code == "42P01": // no river_job yet
		return nil
	case err != nil:
		return fmt.Errorf("read river_job: %w", err)
	case n > 0:
		return fmt.Errorf("river_job already holds %d jobs that are not riverbench's; riverbench empties that table, so give it a database of its own", n)
	}
	return nil
}

// benchArgs are the jobs' arguments.
type benchArgs struct {
	N int `json:"n"`
}

// Kind is River's job kind.
func (benchArgs) Kind() string { return "riverbench" }

// worker runs query on the pool, or nothing when it is empty.
type worker struct {
	river.WorkerDefaults[benchArgs]
	pool  *pgxpool.Pool
	query string
}

// Work runs one job.
func (w *worker) Work(ctx context.Context, _ *river.Job[benchArgs]) error {
	if w.query == "" {
		return nil
	}
	// The simple protocol, as asyncnode sends a task's text: for River it
	// was the faster of the two (docs/performance.md, twenty-eighth session).
	_, err := w.pool.Exec(ctx, w.query, pgx.QueryExecModeSimpleProtocol)
	return err
}

// result is one round of one figure.
type result struct {
	rate    float64       // jobs/s
	process time.Duration // this process's CPU time over the round
	server  time.Duration // the server's, when measured
	onSrv   bool          // the server's CPU was measured
}

// cpu renders the round's CPU per job: this process's, and the server's
// when it was measured.
func (r result) cpu(jobs int) string {
	per := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(jobs) }
	s := fmt.Sprintf(" process_cpu_us_per_job=%.2f", per(r.process))
	if r.onSrv {
		s += fmt.Sprintf(" server_cpu_us_per_job=%.2f", per(r.server))
	}
	return s
}

// drain empties river_job, inserts o.jobs jobs and works them with one
// River client in this process, or with o.processes clients each in a
// process of its own (drainProcesses), and waits for every job's completed
// event. It returns jobs/s from the start to the last event, and the CPU
// time the clients and, when postmaster is not 0, the server used over the
// same span.
func drain(ctx context.Context, dsn string, pool *pgxpool.Pool, o options, query string, postmaster int) (res result, err error) {
	if _, err := pool.Exec(ctx, "truncate river_job"); err != nil {
		return res, fmt.Errorf("empty river_job: %w", err)
	}
	if _, err := pool.Exec(ctx, "vacuum analyze river_job"); err != nil {
		return res, fmt.Errorf("vacuum river_job: %w", err)
	}
	client, err := newClient(pool, o, query)
	if err != nil {
		return res, err
	}
	batch := make([]river.InsertManyParams, 0, 5000)
	for i := 0; i < o.jobs; i += cap(batch) {
		batch = batch[:0]
		for n := i; n < min(i+cap(batch), o.jobs); n++ {
			batch = append(batch, river.InsertManyParams{Args: benchArgs{N: n}})
		}
		if _, err := client.InsertManyFast(ctx, batch); err != nil {
			return res, fmt.Errorf("insert jobs: %w", err)
		}
	}
	if o.processes > 1 {
		return drainProcesses(ctx, dsn, o, query, postmaster)
	}
	events, cancel := subscribe(client, o.jobs)
	defer cancel()
	s0, err := serverCPU(postmaster)
	if err != nil {
		return res, err
	}
	c0, t0 := processCPU(), time.Now()
	if err := client.Start(ctx); err != nil {
		return res, fmt.Errorf("start the client: %w", err)
	}
	defer func() {
		if serr := stopClient(ctx, client); serr != nil && err == nil {
			err = serr
		}
	}()
	var last time.Time
	for range o.jobs {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case ev, ok := <-events:
			if !ok {
				return res, errors.New("the client closed its event channel before every job completed")
			}
			if ev.Kind != river.EventKindJobCompleted {
				return res, fmt.Errorf("job %d ended %s, not completed: %v", ev.Job.ID, ev.Kind, ev.Job.Errors)
			}
			last = time.Now()
		}
	}
	c1 := processCPU()
	s1, err := serverCPU(postmaster)
	if err != nil {
		return res, err
	}
	return result{rate: float64(o.jobs) / last.Sub(t0).Seconds(), process: c1 - c0, server: s1 - s0, onSrv: postmaster != 0}, nil
}

// newClient is a River client on pool whose worker runs query.
func newClient(pool *pgxpool.Pool, o options, query string) (*river.Client[pgx.Tx], error) {
	workers := river.NewWorkers()
	river.AddWorker(workers, &worker{pool: pool, query: query})
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
		FetchCooldown:     o.cooldown,
		FetchPollInterval: o.poll,
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: o.workers}},
		Workers:           workers,
	})
	if err != nil {
		return nil, fmt.Errorf("river client: %w", err)
	}
	return client, nil
}

// subscribe is the client's channel of the events that end a job.
func subscribe(client *river.Client[pgx.Tx], jobs int) (<-chan *river.Event, func()) {
	return client.SubscribeConfig(&river.SubscribeConfig{
		ChanSize: jobs + 1,
		Kinds:    []river.EventKind{river.EventKindJobCompleted, river.EventKindJobFailed, river.EventKindJobCancelled},
	})
}

// stopClient stops a started client, waiting up to 30 s for its jobs.
func stopClient(ctx context.Context, client *river.Client[pgx.Tx]) error {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := client.Stop(sctx); err != nil {
		return fmt.Errorf("stop the client: %w", err)
	}
	return nil
}

// serverCPU is the CPU time the server whose postmaster this is has used so
// far (its backends included); 0 when postmaster is 0.
func serverCPU(postmaster int) (time.Duration, error) {
	if postmaster == 0 {
		return 0, nil
	}
	ticks, err := proccpu.TreeTicks(postmaster)
	if err != nil {
		return 0, fmt.Errorf("read the server's CPU time from /proc: %w", err)
	}
	return time.Duration(ticks) * time.Second / proccpu.UserHZ, nil
}

// processCPU is this process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// riverVersion is the River module version this binary was built with.
func riverVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, m := range bi.Deps {
			if m.Path == "github.com/riverqueue/river" {
				return m.Version
			}
		}
	}
	return "(unknown version)"
}

// describe says what a round's worker does.
func describe(query string) string {
	if query == "" {
		return "each job does nothing"
	}
	return fmt.Sprintf("each job runs %q on the client's pool", query)
}

// medianRound is the round of the median rate, the lower middle one for
// an even count (as asyncnode bench takes it).
func medianRound(rounds []result) result {
	s := slices.Clone(rounds)
	slices.SortFunc(s, func(a, b result) int { return cmp.Compare(a.rate, b.rate) })
	return s[(len(s)-1)/2]
}

// join renders values comma-separated with prec decimals.
func join(v []float64, prec int) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = strconv.FormatFloat(x, 'f', prec, 64)
	}
	return strings.Join(parts, ",")
}
