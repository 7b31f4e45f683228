package pgstore

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Store is the server database seen from Go: a pgx pool plus the
// configuration for the dedicated connections (leadership, LISTEN).
type Store struct {
	dsn  string // kept only to scrub passwords from driver errors
	pool *pgxpool.Pool
	// claims runs the leader's claim (see ClaimTasks): at most 2
	// connections, opened on first use (only by the leader), whose
	// planner can only read task_ready_idx in order and look ids up
	// (claimSettings).
	claims *pgxpool.Pool
	// lookups runs the statements that look up given task ids (start,
	// finish, task states, unclaim, lost attempts): at most lookupConns
	// connections whose planner can only use index lookups and nested
	// loops (lookupSettings).
	lookups *pgxpool.Pool
	conn    *pgx.ConnConfig // template for dedicated connections
	log     hclog.Logger
}

// claimConns caps the connections of Store.claims: the leader claims from
// one goroutine; the second covers a claim that overlaps a stopping one.
const claimConns = 2

// lookupConns caps the connections of Store.lookups: a node starts and
// finishes attempts from one goroutine each, and its leader reads task
// states from one more.
const lookupConns = 4

// lookupSettings is run on every connection of Store.lookups. The
// statements there take lists of task ids and must look each one up in
// task_pkey, at any size of the task table. As prepared statements they
// end up on a generic plan, and one built while the table was small (the
// queue empty and analysed as such, as when a node idles before a burst)
// hashes a sequential scan of the whole table at every call until the
// table is next analysed: in one 40,000-task burst 178 of 497 finishes
// ran such a plan, at 12.83 ms per call against 1.79 ms for the others
// (docs/performance.md). With these settings no plan the server builds
// for them holds a sequential scan or a hash or merge join on the task
// table, so the generic plan is used from the first call on, without
// planning per call (custom plans cost about a millisecond per finish
// under load). These settings do not rule out one more: on the statistics
// of a table analysed while nearly empty (pages kept, no rows), a join
// with the ids on "t.task_id = n.task_id" reads all of task_pkey and
// compares every row with every id. The statements avoid it themselves:
// they have no join (start_tasks.sql, claim_update.sql), or join on a
// clause that cannot be merged (finish_tasks.sql; docs/performance.md,
// seventeenth and eighteenth sessions;
// TestIDLookupsReadTaskPKeyByIDOnAnEmptiedTable).
const lookupSettings = "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off; " +
	"SET plan_cache_mode = force_generic_plan"

// claimSettings is run on every connection of Store.claims. The claim's two
// statements run prepared, on generic plans cached from the first call:
// planning the single statement the claim was before took 0.74 ms of a
// 250-task claim that ran in 3.34 ms, measured alone (docs/performance.md).
// A plan cached while the table was empty must still fit a queue of any
// size, and these settings leave the planner no other plans: without
// sequential and bitmap scans, the candidates come from ordered scans of
// task_ready_idx (a bitmap scan of it, then a sort, reads every READY task
// of a pool at each claim), and claim_update.sql reads task_pkey with its
// ids as the index condition. Checked on the statistics of a queue
// analysed with a backlog, then emptied, by
// TestClaimUsesIndexPlansWhateverTheStatistics, and on those of a table
// analysed while nearly empty by TestIDLookupsReadTaskPKeyByIDOnAnEmptiedTable.
//
// The claim's transaction spans two round trips (ClaimTasks); the first
// locks the READY tasks it will claim. A leader that stops between the two
// (SIGSTOP, a stall, a network cut) would keep them locked, and so out of
// every other claim, until its session died, which over a cut TCP
// connection takes the keepalive time (two hours by default).
// idle_in_transaction_session_timeout makes the server end such a session
// after claimIdleTimeout; a live leader sends its second round trip as
// soon as it has read the first's rows.
// TestSuccessorClaimsWhatAStoppedClaimLocked.
const claimSettings = lookupSettings + "; SET enable_bitmapscan = off" +
	"; SET idle_in_transaction_session_timeout = '" + claimIdleTimeout + "'"

// claimIdleTimeout is how long the server keeps a claim's transaction open
// while its leader says nothing (see claimSettings): the longest the tasks
// a frozen or cut-off leader was claiming stay out of its successor's
// claims.
const claimIdleTimeout = "1s"

// jitOff runs on every connection of the store's pools unless the DSN sets
// jit itself. The store's statements are short and run thousands of times
// a second; JIT compilation only ever costs them time.
// The server compiles a statement whose estimated cost exceeds
// jit_above_cost (100,000 by default), and the claim's estimate grows with
// the task count the statistics hold, not with the READY tasks it reads:
// once an analyse had seen 150,000 tasks a 1-task claim was estimated at
// 102,848, and compiling it took 26 to 32 ms of its 27 to 36 ms, against
// 0.394 ms with jit off. Until the next analyse every claim paid that
// (docs/performance.md, "JIT compilation of the claim"). It is a SET after
// connecting, not a startup parameter: connection poolers such as
// PgBouncer refuse a connection whose startup packet carries a parameter
// they do not know ("unsupported startup parameter").
const jitOff = "SET jit = off"

// afterConnect returns a pgxpool AfterConnect hook that runs the given
// statements (nil when there are none).
func afterConnect(stmts ...string) func(context.Context, *pgx.Conn) error {
	if len(stmts) == 0 {
		return nil
	}
	sql := strings.Join(stmts, "; ")
	return func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, sql)
		return err
	}
}

// Open connects to the server database (a pgxpool; pool_max_conns and the
// other pgxpool settings may be given in the DSN) and checks that it
// answers. Its pooled sessions run with jit = off unless the DSN sets jit
// (see jitOff). Errors and logs show the DSN masked (MaskDSN). log may be nil.
func Open(ctx context.Context, dsn string, log hclog.Logger) (*Store, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("pgstore: parse server DSN %s: %w", MaskDSN(dsn), redact(err, dsn))
	}
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		cfg.ConnConfig.RuntimeParams["application_name"] = "asyncnode"
	}
	var onConnect []string // run on every pooled connection
	if _, ok := cfg.ConnConfig.RuntimeParams["jit"]; !ok {
		onConnect = append(onConnect, jitOff) // else the DSN's choice
	}
	cfg.AfterConnect = afterConnect(onConnect...)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: open server database %s: %w", MaskDSN(dsn), redact(err, dsn))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("pgstore: connect to server database %s: %w", MaskDSN(dsn), redact(err, dsn))
	}
	ccfg := cfg.Copy()
	ccfg.MaxConns, ccfg.MinConns = claimConns, 0
	ccfg.AfterConnect = afterConnect(append(onConnect, claimSettings)...)
	claims, err := pgxpool.NewWithConfig(ctx, ccfg)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("pgstore: open server database %s: %w", MaskDSN(dsn), redact(err, dsn))
	}
	lcfg := cfg.Copy()
	lcfg.MaxConns, lcfg.MinConns = lookupConns, 0
	lcfg.AfterConnect = afterConnect(append(onConnect, lookupSettings)...)
	lookups, err := pgxpool.NewWithConfig(ctx, lcfg)
	if err != nil {
		claims.Close()
		pool.Close()
		return nil, fmt.Errorf("pgstore: open server database %s: %w", MaskDSN(dsn), redact(err, dsn))
	}
	log.Debug("connected to server database", "dsn", MaskDSN(dsn))
	return &Store{dsn: dsn, pool: pool, claims: claims, lookups: lookups, conn: cfg.ConnConfig.Copy(), log: log}, nil
}

// Close closes the pools. Leaderships and listeners have their own
// connections and are ended by Release / their context.
func (s *Store) Close() {
	s.lookups.Close()
	s.claims.Close()
	s.pool.Close()
}

// Pool is the underlying pgx pool, for callers that need plain SQL (tests,
// the CLI's status output).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// wrap translates a driver error for operation op.
func (s *Store) wrap(op string, err error) error { return translate(op, s.dsn, err) }

// dedicated opens a connection outside the pool, named appName in
// pg_stat_activity.
func (s *Store) dedicated(ctx context.Context, appName string) (*pgx.Conn, error) {
	cfg := s.conn.Copy()
	cfg.RuntimeParams["application_name"] = appName
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: connect to server database %s: %w", MaskDSN(s.dsn), redact(err, s.dsn))
	}
	return conn, nil
}

func termArg(term uint64) (int64, error) {
	if term > math.MaxInt64 {
		return 0, fmt.Errorf("pgstore: term %d does not fit in a bigint", term)
	}
	return int64(term), nil
}

// fenced runs the statements queued by queue after the leader-term fence,
// all in one batch: one round trip and one implicit transaction, so the
// fence's share lock on async.leader covers the writes, and a stale term
// (ErrStaleTerm) rolls everything back.
func (s *Store) fenced(ctx context.Context, op string, term uint64, queue func(b *pgx.Batch)) error {
	return s.fencedOn(ctx, s.pool, op, term, queue)
}

// fencedOn is fenced on the given pool.
func (s *Store) fencedOn(ctx context.Context, pool *pgxpool.Pool, op string, term uint64, queue func(b *pgx.Batch)) error {
	t, err := termArg(term)
	if err != nil {
		return err
	}
	b := &pgx.Batch{}
	b.Queue(qAssertLeaderTerm, t)
	queue(b)
	if err := pool.SendBatch(ctx, b).Close(); err != nil {
		return s.wrap(op, err)
	}
	return nil
}

func micros(us int64) time.Duration { return time.Duration(us) * time.Microsecond }

// LoadConfig reads async.control, async.concurrency_pool and async.target.
// The scheduler calls it every pass, so limit changes apply at once (D6).
func (s *Store) LoadConfig(ctx context.Context) (Config, error) {
	cfg := Config{Pools: map[string]int{}, Targets: map[string]Target{}}
	b := &pgx.Batch{}
	b.Queue(qLoadControl).QueryRow(func(row pgx.Row) error {
		c := &cfg.Control
		var idle, dt, keep, heavy int64
		var workers, poolDefault int32
		if err := row.Scan(&c.Enabled, &c.Paused, &workers, &idle, &dt, &keep, &heavy,
			&c.AdvisoryMutexID, &poolDefault, &c.LastHeavyMaintenance); err != nil {
			return err
		}
		c.Workers, c.DefaultPoolWorkers = int(workers), int(poolDefault)
		c.IdleSleep, c.DefaultTimeout, c.TaskKeepDuration, c.HeavyMaintenanceSleep = micros(idle), micros(dt), micros(keep), micros(heavy)
		return nil
	})
	b.Queue(qLoadPools).Query(func(rows pgx.Rows) error {
		var name string
		var limit int32
		_, err := pgx.ForEachRow(rows, []any{&name, &limit}, func() error {
			cfg.Pools[name] = int(limit)
			return nil
		})
		return err
	})
	b.Queue(qLoadTargets).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var t Target
			var limit int32
			var dt *int64
			if err := rows.Scan(&t.Name, &t.ConnString, &limit, &dt, &t.Async); err != nil {
				return err
			}
			t.MaxConcurrency = int(limit)
			if dt != nil {
				d := micros(*dt)
				t.DefaultTimeout = &d
			}
			cfg.Targets[t.Name] = t
		}
		return rows.Err()
	})
	if err := s.pool.SendBatch(ctx, b).Close(); err != nil {
		return Config{}, s.wrap("load config", err)
	}
	return cfg, nil
}
