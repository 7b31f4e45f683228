package executor

import (
	"context"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// taskIDMacro is replaced by the task id in every query text (D16).
const taskIDMacro = "##flow.TASK_ID##"

// SessionReset undoes every piece of session state a task may leave on its
// connection: it is CLOSE ALL, SET SESSION AUTHORIZATION DEFAULT, RESET ALL,
// DEALLOCATE ALL, UNLISTEN *, pg_advisory_unlock_all(), DISCARD PLANS,
// DISCARD TEMP and DISCARD SEQUENCES in one statement. It cannot run inside a
// transaction block, so it fails after a text that left one open (which is
// caught: see RunWithReset's caller).
const SessionReset = "DISCARD ALL"

// prepareQuery substitutes the task id in a task's text (D16).
func prepareQuery(taskID int64, text string) string {
	return strings.ReplaceAll(text, taskIDMacro, strconv.FormatInt(taskID, 10))
}

// RunWithReset sends text and then SessionReset as two simple-protocol
// queries in one write, and reads both answers. text runs as pgx's Exec runs
// it (several statements form one implicit transaction; a single statement
// runs outside any transaction block, so a procedure may COMMIT and VACUUM
// works); ctx cancels it as Exec does. The reset is a query of its own, so it
// runs whatever text did, and the backend answers both without waiting for
// the client in between: one write and usually one read per task, and a
// cheaper reset than eight statements appended to text.
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
	for {
		msg, err := pc.ReceiveMessage(ctx)
		if err != nil {
			if resetErr == nil {
				resetErr = err
			}
			return nil, resetErr
		}
		switch m := msg.(type) {
		case *pgproto3.ErrorResponse:
			if resetErr == nil {
				resetErr = pgconn.ErrorResponseToPgError(m)
			}
		case *pgproto3.ReadyForQuery:
			return nil, resetErr
		}
	}
}
