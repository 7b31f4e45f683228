package executor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Backoff of the connection retries to an unreachable target (D12).
const (
	connBackoffMin = 100 * time.Millisecond
	connBackoffMax = 5 * time.Second
)

// idleConnTimeout closes a target session that stayed idle this long.
const idleConnTimeout = time.Minute

// terminateGrace bounds the terminate step: connecting to the target and
// calling pg_terminate_backend. The client-side socket deadline of a
// cancelled query fires TerminateAfter + terminateGrace after the cancel, as
// a last resort when the server does not answer at all.
const terminateGrace = 5 * time.Second

// target is the pool and health of one distinct connection string. The
// connection string itself is only the map key in Executor.targets; it is
// never logged.
type target struct {
	// Fixed at creation.
	pool     *pgxpool.Pool // nil when the connection string is invalid
	connCfg  *pgx.ConnConfig
	password string // for masking
	cfgErr   error  // invalid connection string (masked): tasks fail at once
	gate     *gate  // nil: every task may take a pooled connection at once

	// noCheck is set once the server refused client_connection_check_interval
	// (PostgreSQL 13 and older); later connections go without it.
	noCheck atomic.Bool

	mu        sync.Mutex
	unhealthy bool
	since     time.Time     // first failure of the current unhealthy period
	backoff   time.Duration // current retry interval
	nextTry   time.Time     // no connection attempt before this while unhealthy
	lastErr   error         // last connection error (unmasked; mask with maskErr)
	healthy   chan struct{} // closed when the target becomes healthy again
}

// target returns the pool for connStr (nil means the server database),
// creating it on first use.
func (e *Executor) target(ctx context.Context, connStr *string) *target {
	dsn := e.cfg.ServerDSN
	if connStr != nil {
		dsn = *connStr
	}
	e.tmu.Lock()
	defer e.tmu.Unlock()
	if t, ok := e.targets[dsn]; ok {
		return t
	}
	t := e.newTarget(ctx, dsn)
	e.targets[dsn] = t
	return t
}

func (e *Executor) newTarget(ctx context.Context, dsn string) *target {
	pcfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return &target{cfgErr: fmt.Errorf("invalid connection string: %s", maskDSN(err.Error()))}
	}
	pcfg.MaxConns = int32(e.cfg.MaxConnsPerTarget)
	pcfg.MinConns = 0
	// Idle sessions count against the target's max_connections and role
	// CONNECTION LIMIT: after a burst, close them within a couple of
	// minutes (idle time plus the one-minute health check) instead of
	// pgx's 30, so another node can get a connection. A busy target keeps
	// reusing its sessions.
	pcfg.MaxConnIdleTime = idleConnTimeout
	cc := pcfg.ConnConfig
	cc.RuntimeParams["application_name"] = e.appName
	// A node killed mid-task leaves its query running on the target until
	// the server notices the dead client; ask the server (PostgreSQL 14+)
	// to check while the query runs, so an orphaned task stops within about
	// a second instead of overlapping a re-run. A connection string that
	// sets the parameter itself wins.
	if _, set := cc.RuntimeParams[checkParam]; !set {
		cc.RuntimeParams[checkParam] = checkInterval
	}
	if cc.ConnectTimeout == 0 {
		cc.ConnectTimeout = e.cfg.ConnectTimeout
	}
	// On context cancellation send a cancel request at once, so the query
	// really stops on the target; the socket deadline is only a last resort
	// after the terminate step had its chance.
	deadlineDelay := e.cfg.TerminateAfter + terminateGrace
	t := &target{connCfg: cc, password: cc.Password}
	cc.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		h := &cancelThenTerminate{
			CancelRequestContextWatcherHandler: pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: deadlineDelay},
			e:                                  e,
			t:                                  t,
		}
		pc.CustomData()[watchHandlerKey] = h
		return h
	}
	pcfg.BeforeConnect = func(_ context.Context, c *pgx.ConnConfig) error {
		if t.noCheck.Load() && c.RuntimeParams[checkParam] == checkInterval {
			delete(c.RuntimeParams, checkParam)
		}
		return nil
	}
	// No I/O here (MinConns is 0): connections are opened on first use.
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return &target{cfgErr: fmt.Errorf("invalid connection string: %s", maskSecret(err.Error(), cc.Password))}
	}
	t.pool = pool
	if e.cfg.ShortConnsPerTarget < e.cfg.MaxConnsPerTarget {
		t.gate = newGate(e.cfg.ShortConnsPerTarget, e.cfg.LongTaskAfter, e.cfg.Now)
	}
	return t
}

// watchHandlerKey holds a task connection's *cancelThenTerminate in its
// PgConn.CustomData, for execute to arm.
const watchHandlerKey = "asyncnode.watch"

// cancelThenTerminate is a task connection's context-watcher handler (pgx
// calls it when the context of an operation in progress ends). It sends a
// cancel request at once, as pgx's CancelRequestContextWatcherHandler does,
// with the socket deadline as the last resort; and while a task's text runs
// (armed by execute), it terminates the backend if the text is still
// running TerminateAfter after the cancel, as a query that ignores cancel
// requests would be. It lives with the connection: arming it costs a task
// nothing that a watch of its own would allocate.
type cancelThenTerminate struct {
	pgconn.CancelRequestContextWatcherHandler
	e *Executor
	t *target // the connection's target, for terminateStuck

	// log is set by execute (arm) before the text is sent and cleared once
	// its answer came; HandleCancel runs in between or not at all (pgx's
	// context watcher orders it after Watch and before Unwatch returns), so
	// the fields need no lock. Nil: no task text is running.
	log   *attemptLog
	timer *time.Timer   // the terminate step, armed by HandleCancel
	done  chan struct{} // closed once the terminate step, if it fired, returned
}

// handlerOf returns pc's cancelThenTerminate, or nil when pc was not
// opened by a target's pool.
func handlerOf(pc *pgconn.PgConn) *cancelThenTerminate {
	h, _ := pc.CustomData()[watchHandlerKey].(*cancelThenTerminate)
	return h
}

// arm makes a cancel while log's task text runs lead to the terminate step;
// disarm after the text answered.
func (h *cancelThenTerminate) arm(log *attemptLog) { h.log = log }

func (h *cancelThenTerminate) disarm() { h.log = nil }

// HandleCancel implements ctxwatch.Handler.
func (h *cancelThenTerminate) HandleCancel(ctx context.Context) {
	h.CancelRequestContextWatcherHandler.HandleCancel(ctx)
	if h.log == nil {
		return
	}
	log, pid, done := h.log, h.Conn.PID(), make(chan struct{})
	h.done = done
	h.timer = time.AfterFunc(h.e.cfg.TerminateAfter, func() {
		defer close(done)
		h.e.terminateStuck(context.WithoutCancel(ctx), h.t, pid, log)
	})
}

// HandleUnwatchAfterCancel implements ctxwatch.Handler: the operation
// ended (the text answered, or the connection failed). A terminate step
// that has not fired never will; one that fired is waited for.
func (h *cancelThenTerminate) HandleUnwatchAfterCancel() {
	if h.timer != nil {
		if !h.timer.Stop() {
			<-h.done
		}
		h.timer, h.done = nil, nil
	}
	h.CancelRequestContextWatcherHandler.HandleUnwatchAfterCancel()
}

const (
	checkParam    = "client_connection_check_interval"
	checkInterval = "1000" // milliseconds
)

// noteConnectError remembers a server that does not know checkParam, so
// the next attempt connects without it.
func (t *target) noteConnectError(err error) {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42704" && strings.Contains(pgErr.Message, checkParam) {
		t.noCheck.Store(true)
	}
}

// maskErr renders err for a task's processing_error or a log line.
func (t *target) maskErr(err error) string {
	return maskSecret(err.Error(), t.password)
}

// mayTry reports whether a connection attempt may be made now; while the
// target is unhealthy only one attempt per backoff interval is allowed, and
// a true result reserves it.
func (t *target) mayTry(now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.unhealthy {
		return true
	}
	if now.Before(t.nextTry) {
		return false
	}
	t.nextTry = now.Add(t.backoff)
	return true
}

// markFailed records a failed connection attempt; it reports whether the
// target just became unhealthy.
func (t *target) markFailed(now time.Time, err error) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lastErr = err
	became := !t.unhealthy
	if became {
		t.unhealthy = true
		t.since = now
		t.backoff = connBackoffMin
		t.healthy = make(chan struct{})
	} else {
		t.backoff = min(2*t.backoff, connBackoffMax)
	}
	t.nextTry = now.Add(t.backoff)
	return became
}

// markHealthy records a successful connection; it reports whether the
// target was unhealthy, and since when.
func (t *target) markHealthy() (was bool, since time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.unhealthy {
		return false, time.Time{}
	}
	t.unhealthy = false
	close(t.healthy)
	t.healthy = nil
	return true, t.since
}

// waitState returns what a task waiting for the target needs: when the next
// attempt is allowed, a channel closed when the target becomes healthy, and
// the last connection error.
func (t *target) waitState() (nextTry time.Time, healthy <-chan struct{}, lastErr error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.unhealthy {
		return time.Time{}, nil, t.lastErr
	}
	return t.nextTry, t.healthy, t.lastErr
}

// TerminateSessions ends every backend on the target (nil connStr: the
// server database) whose application_name is appName: the sessions of
// another node process, typically one the leader declared lost, so that
// none of its queries keeps running while its tasks are re-run elsewhere.
// It uses a separate connection and returns how many it ended.
func (e *Executor) TerminateSessions(ctx context.Context, connStr *string, appName string) (int, error) {
	t := e.target(ctx, connStr)
	if t.cfgErr != nil {
		return 0, t.cfgErr
	}
	ctx, cancel := context.WithTimeout(ctx, terminateGrace)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, t.connCfg.Copy())
	if err != nil {
		return 0, errors.New(t.maskErr(err))
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer ccancel()
		_ = conn.Close(cctx)
	}()
	var n int
	err = conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name = $1 AND pid <> pg_backend_pid()`, appName).Scan(&n)
	if err != nil {
		return 0, errors.New(t.maskErr(err))
	}
	return n, nil
}

// terminateStuck is the terminate step of a task whose text did not stop
// TerminateAfter after its cancel request: it terminates the backend and
// logs what happened.
func (e *Executor) terminateStuck(ctx context.Context, t *target, pid uint32, log *attemptLog) {
	log.Info("query still running after cancel; terminating its backend", "pid", pid)
	ok, err := e.terminate(ctx, t, pid)
	switch {
	case err != nil:
		log.Warn("terminating the backend failed", "pid", pid, "error", err)
	case ok:
		log.Info("backend terminated", "pid", pid)
	default:
		log.Debug("backend already gone or idle", "pid", pid)
	}
}

// terminate ends backend pid on the target if it is still busy, from a
// separate connection (the pool may be full). It reports whether a backend
// was terminated.
func (e *Executor) terminate(ctx context.Context, t *target, pid uint32) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, terminateGrace)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, t.connCfg.Copy())
	if err != nil {
		return false, errors.New(t.maskErr(err))
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer ccancel()
		_ = conn.Close(cctx)
	}()
	var done bool
	err = conn.QueryRow(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE pid = $1 AND application_name = $2 AND state IS DISTINCT FROM 'idle'`,
		int64(pid), e.appName).Scan(&done)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, errors.New(t.maskErr(err))
	}
	return done, nil
}
