package executor

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/asyncnode/asyncnode/pgstore"
)

// Texts written as processing_error.
const (
	// TimeoutError is the processing_error of a TIMED_OUT attempt (D10).
	TimeoutError = "Canceling due to time out"
	// OpenTransactionError is the processing_error of a task whose text left
	// a transaction block open.
	OpenTransactionError = "task left a transaction open; rolled back"
)

// deadlineMargin: a task waiting for an unreachable target gives up this
// long before its deadline, so that it fails with the connection error
// rather than times out.
const deadlineMargin = 500 * time.Millisecond

// maxSafeRetries bounds how often a task is re-sent on a fresh connection
// after a send that failed before reaching the server.
const maxSafeRetries = 3

// closeTimeout bounds closing (or rolling back on) a task connection.
const closeTimeout = time.Second

// resetTimeout bounds the wait for the session reset's answer once the
// task's text has answered (the reset itself takes microseconds).
const resetTimeout = 5 * time.Second

// connFailure is a task's final failure to get a connection to its target.
type connFailure struct{ msg string }

func (f *connFailure) Error() string { return f.msg }

// stopCause tells why ctx ended: errRevoked or errShutdown (no outcome),
// errTimedOut, or nil (not ended).
func stopCause(ctx context.Context) error {
	if ctx.Err() == nil {
		return nil
	}
	cause := context.Cause(ctx)
	for _, c := range []error{errRevoked, errShutdown, errTimedOut} {
		if errors.Is(cause, c) {
			return c
		}
	}
	return cause
}

// run runs one started task. It returns its outcome, or nil and the reason
// (errRevoked, errShutdown, errAbandoned) when the attempt ends without one.
// ctx is cancelled with cause errTimedOut at deadline (zero: none).
func (e *Executor) run(ctx context.Context, st pgstore.StartedTask, deadline time.Time) (*pgstore.Outcome, error) {
	log := newAttemptLog(e.log, &st)
	ref := pgstore.Ref{TaskID: st.TaskID, Attempt: st.Attempt}
	outcome := func(s pgstore.Status, msg string) (*pgstore.Outcome, error) {
		o := &pgstore.Outcome{Ref: ref, Status: s, At: e.cfg.Now()}
		if msg != "" {
			o.Error = &msg
		}
		return o, nil
	}
	ended := func() (*pgstore.Outcome, error) {
		switch c := stopCause(ctx); c {
		case errRevoked, errShutdown, errAbandoned:
			log.Debug("attempt stopped", "reason", c)
			return nil, c
		default:
			log.Info("task timed out")
			return outcome(pgstore.StatusTimedOut, TimeoutError)
		}
	}

	if st.TargetGone {
		msg := fmt.Sprintf("target %q no longer exists in async.target", st.Target)
		log.Warn("task failed", "error", msg)
		return outcome(pgstore.StatusFailed, msg)
	}
	t := e.target(ctx, st.ConnStr)
	if t.cfgErr != nil {
		log.Warn("task failed", "error", t.cfgErr)
		return outcome(pgstore.StatusFailed, t.cfgErr.Error())
	}
	q := prepareQuery(st.TaskID, st.Query)
	log.Debug("running task")
	var gp *pass
	if t.gate != nil {
		var err error
		if gp, err = t.gate.enter(ctx); err != nil {
			return ended()
		}
		defer gp.leave()
	}
	for safeRetries := 0; ; safeRetries++ {
		conn, err := e.acquire(ctx, deadline, t, log)
		if err != nil {
			var cf *connFailure
			if errors.As(err, &cf) {
				log.Warn("task failed: target unreachable", "error", cf.msg)
				return outcome(pgstore.StatusFailed, cf.msg)
			}
			return ended()
		}
		if gp != nil {
			gp.held()
		}
		execErr, resetErr := e.execute(ctx, conn, q, log)
		pc := conn.Conn().PgConn()
		if execErr == nil {
			if pc.TxStatus() != 'I' {
				e.destroy(ctx, conn, true)
				if c := stopCause(ctx); c == errRevoked || c == errShutdown || c == errAbandoned {
					return nil, c
				}
				log.Warn("task failed", "error", OpenTransactionError)
				return outcome(pgstore.StatusFailed, OpenTransactionError)
			}
			switch {
			case resetErr != nil:
				log.Warn("session reset failed; closing the connection", "error", t.maskErr(resetErr))
				e.destroy(ctx, conn, false)
			case ctx.Err() != nil:
				// Stopped as text finished: a cancel request sent for text
				// may still be on its way to this session.
				e.destroy(ctx, conn, false)
			default:
				conn.Release()
			}
			if st.Async {
				log.Debug("task yielded")
				return outcome(pgstore.StatusYielded, "")
			}
			log.Debug("task finished")
			return outcome(pgstore.StatusFinished, "")
		}
		// Never return a connection that saw an error to the pool.
		e.destroy(ctx, conn, false)
		if ctx.Err() != nil {
			return ended()
		}
		if pgconn.SafeToRetry(execErr) && safeRetries < maxSafeRetries {
			// Nothing reached the server (a dead pooled connection): the
			// task did not run; send it again on a fresh connection.
			log.Debug("send failed before reaching the server; retrying", "error", t.maskErr(execErr))
			continue
		}
		if sessionTerminated(execErr) {
			// Ended by pg_terminate_backend or a server shutdown: the
			// other pooled sessions most likely went the same way; do not
			// hand them to the next tasks.
			t.pool.Reset()
		}
		msg := errorText(execErr, t)
		log.Debug("task failed", "error", msg)
		return outcome(pgstore.StatusFailed, msg)
	}
}

// acquire gets a connection to t. While the target is unreachable it waits
// with backoff (D12); it returns a *connFailure once the task has waited
// long enough (never later than deadline less deadlineMargin, unless
// deadline is zero), or ctx's error when ctx ends first (unless a
// connection error is known and the deadline was reached: then a
// *connFailure too).
func (e *Executor) acquire(ctx context.Context, deadline time.Time, t *target, log *attemptLog) (*pgxpool.Conn, error) {
	hasDeadline := !deadline.IsZero()
	var firstFail time.Time
	var lastErr error
	for {
		if ctx.Err() != nil {
			if lastErr != nil && stopCause(ctx) == errTimedOut {
				return nil, &connFailure{t.maskErr(lastErr)}
			}
			return nil, ctx.Err()
		}
		now := e.cfg.Now()
		if t.mayTry(now) {
			c, err := t.pool.Acquire(ctx)
			if err == nil {
				if was, since := t.markHealthy(); was {
					log.Info("target reachable again", "unreachable_for", e.cfg.Now().Sub(since).Round(time.Millisecond))
				}
				return c, nil
			}
			if ctx.Err() != nil {
				continue
			}
			lastErr = err
			t.noteConnectError(err)
			if t.markFailed(e.cfg.Now(), err) {
				log.Warn("target unreachable; its tasks wait and retry", "error", t.maskErr(err))
			} else {
				log.Debug("connection attempt failed", "error", t.maskErr(err))
			}
		}
		nextTry, healthy, tErr := t.waitState()
		if healthy == nil {
			continue // healthy again meanwhile
		}
		if lastErr == nil {
			lastErr = tErr
		}
		if firstFail.IsZero() {
			firstFail = now
		}
		giveUp := firstFail.Add(e.cfg.UnreachableWait)
		if hasDeadline {
			if d := deadline.Add(-deadlineMargin); d.Before(giveUp) {
				giveUp = d
			}
		}
		if !now.Before(giveUp) {
			if lastErr == nil {
				lastErr = errors.New("target unreachable")
			}
			return nil, &connFailure{t.maskErr(lastErr)}
		}
		wait := min(giveUp.Sub(now), max(nextTry.Sub(now), 0))
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
		case <-healthy:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// execute sends the task text and the session reset after it
// (RunWithReset). When ctx ends meanwhile, pgx sends a cancel request; if
// the backend is still busy TerminateAfter later, it is terminated (the
// connection's cancelThenTerminate, armed for the text).
func (e *Executor) execute(ctx context.Context, conn *pgxpool.Conn, q string, log *attemptLog) (execErr, resetErr error) {
	pc := conn.Conn().PgConn()
	if h := handlerOf(pc); h != nil {
		h.arm(log)
		defer h.disarm()
	}
	return RunWithReset(ctx, pc, q)
}

// RunWithReset sends text and then SessionReset as two simple-protocol
// queries in one write, and reads both answers. text runs as pgx's Exec runs
// it (several statements form one implicit transaction; a single statement
// runs outside any transaction block, so a procedure may COMMIT and VACUUM
// works); ctx cancels it as Exec does. The reset is a query of its own, so
// it runs whatever text did, and the backend answers both without waiting
// for the client in between: one write and usually one read per task, and a
// cheaper reset than eight statements appended to text. The reset's answer
// is read without ctx, within resetTimeout (readResetAnswer).
//
// execErr is text's error. When it is not nil the reset's answer is left
// unread and the connection must not be used again: its socket is closed
// here already (Exec may have returned before writing text). resetErr is the
// reset's error (or the error reading its answer); the connection is then not
// fit for reuse either. PgConn.TxStatus afterwards is the reset's: not 'I'
// when text left a transaction block open.
//
// Exported for `asyncnode bench`, whose plain program sends tasks the same way.
func RunWithReset(ctx context.Context, pc *pgconn.PgConn, text string) (execErr, resetErr error) {
	// Exec appends its own query to the write buffer and writes both; its
	// reader stops at the first ReadyForQuery, which is text's.
	pc.Frontend().Send(&pgproto3.Query{String: text})
	if execErr = pc.Exec(ctx, SessionReset).Close(); execErr != nil {
		// Exec may have returned before writing anything (a context already
		// done, a closed connection): close the socket so that the buffered
		// text can never be written by a later call (Close's Terminate).
		_ = pc.Conn().Close()
		return execErr, nil
	}
	return nil, readResetAnswer(pc, resetTimeout)
}

// readResetAnswer reads the answer to the session reset that RunWithReset
// sent after the text. Not on the attempt's context: text has answered, so
// there is nothing left for a time-out, revoke or shutdown to stop, and
// registering on the context for each message cost as much as the read.
// A connection read deadline (timeout from now) bounds it instead; past it
// the error is returned and the caller closes the connection.
func readResetAnswer(pc *pgconn.PgConn, timeout time.Duration) error {
	nc := pc.Conn()
	if err := nc.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set the session reset's read deadline: %w", err)
	}
	var resetErr error
	for {
		msg, err := pc.ReceiveMessage(context.Background())
		if err != nil {
			// The connection is not fit for reuse: the caller closes it,
			// so the deadline needs no clearing.
			return cmp.Or(resetErr, err)
		}
		switch m := msg.(type) {
		case *pgproto3.ErrorResponse:
			if resetErr == nil {
				resetErr = pgconn.ErrorResponseToPgError(m)
			}
		case *pgproto3.ReadyForQuery:
			if err := nc.SetReadDeadline(time.Time{}); err != nil {
				return cmp.Or(resetErr, fmt.Errorf("clear the session reset's read deadline: %w", err))
			}
			return resetErr
		}
	}
}

// destroy closes a task connection instead of returning it to the pool,
// rolling back first if asked.
func (e *Executor) destroy(ctx context.Context, conn *pgxpool.Conn, rollback bool) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), closeTimeout)
	defer cancel()
	c := conn.Hijack()
	if rollback && !c.IsClosed() {
		_ = c.PgConn().Exec(ctx, "ROLLBACK").Close()
	}
	_ = c.Close(ctx)
}

// errorText renders a task error as libpq does ("ERROR:  message" and the
// DETAIL, HINT, QUERY and CONTEXT lines), masked.
func errorText(err error, t *target) string {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return t.maskErr(err)
	}
	var b strings.Builder
	sev := pe.Severity
	if sev == "" {
		sev = "ERROR"
	}
	b.WriteString(sev + ":  " + pe.Message)
	for _, l := range []struct{ label, text string }{
		{"DETAIL", pe.Detail}, {"HINT", pe.Hint}, {"QUERY", pe.InternalQuery}, {"CONTEXT", pe.Where},
	} {
		if l.text != "" {
			b.WriteString("\n" + l.label + ":  " + l.text)
		}
	}
	return maskSecret(b.String(), t.password)
}

// sessionTerminated reports whether err says the server ended the session
// (admin_shutdown: pg_terminate_backend or a fast shutdown; crash_shutdown).
func sessionTerminated(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "57P01" || pe.Code == "57P02")
}
