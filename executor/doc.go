// Package executor runs, on every node, the task queries the leader assigned
// to that node, against their target databases.
//
// The life of one attempt on a node:
//
//  1. The Raft FSM apply path calls Submit with the attempts assigned to this
//     node (never blocking: the queue is unbounded).
//  2. A starter loop takes up to Config.BatchSize queued attempts and marks
//     them started in the server database with one Store.StartTasks call.
//     That call is the fence: only the tasks it returns may run; the others
//     (reassigned, finished or reset meanwhile) are reported Done at once so
//     the leader frees their slots.
//  3. Each started task runs in its own goroutine on a connection of the warm
//     pgxpool of its target (one pool per distinct connection string), with a
//     context cancelled at the attempt's deadline. The leader enforces
//     the limits, so there is no worker count here.
//  4. Outcomes are written in batches with Store.FinishTasks (flushed when a
//     batch is full or Config.FlushEvery after the first pending outcome),
//     then every outcome is reported Done to the leader through the Reporter
//     (in batches too, up to Config.ReportsInFlight calls at once: a call
//     returns once the leader has committed the release, and Dones that end
//     meanwhile should not wait for it). Failing Store or Reporter calls are
//     retried with backoff while the executor runs: an outcome is never
//     dropped.
//
// Query text (decisions D16 and D17 of docs/pgasync-semantics.md): every
// `##flow.TASK_ID##` is replaced by the task id, and the text is sent with the
// simple query protocol, followed in the same write by the session reset
// (DISCARD ALL) as a second query (RunWithReset). Several statements run as
// one implicit transaction, so results are discarded and a failing statement
// rolls back the whole text; a text of one statement runs outside any
// transaction block, so a procedure may COMMIT and VACUUM or CREATE INDEX
// CONCURRENTLY work. The reset (role, settings, search_path, temporary
// tables, cursors, listens, prepared statements, advisory locks, sequences'
// session state) runs whatever the text did, so nothing reaches the next task
// on that connection. A connection that saw an error, or that a task left
// inside a transaction block (where the reset cannot run), is never returned
// to the pool: it is closed (a task leaving a transaction open is FAILED
// "task left a transaction open; rolled back").
//
// Timeouts (D10): at the deadline the query is cancelled with a cancel
// request; if the backend is still busy Config.TerminateAfter later it is
// terminated with pg_terminate_backend from a separate connection. The
// outcome is TIMED_OUT with processing_error 'Canceling due to time out'.
// Revoke stops an attempt the same way but writes no outcome (someone else
// already decided); it is still reported Done, once the query has stopped.
//
// Unreachable targets (D12): when connecting to a target fails, the target is
// marked unhealthy and the waiting tasks retry the connection with backoff
// (100 ms doubling to 5 s, one attempt at a time per target) until the task's
// deadline is near or Config.UnreachableWait (60 s) has passed since the
// task's first failure; the task then ends FAILED with the connection error
// text. Other targets are unaffected. Connection strings and passwords never
// appear in logs or errors.
//
// Shutdown: when the context given to Run is done, running queries are
// cancelled (with the same escalation) and end without an outcome — the node
// is going away and the leader resolves its attempts as it resolves a lost
// node's. Outcomes already known are flushed and reported within a bounded
// time, then the pools are closed. Use Drain first for a graceful stop.
package executor
