// Package pgstore owns every statement asyncnode runs against the server
// database: the embedded, versioned migrations that install the async schema
// and its pgasync-compatible SQL API (migrations/*.sql), and the named
// queries the cluster uses (queries/*.sql) to claim, start, finish, time out,
// reconcile and purge tasks, to read the configuration, to hold the
// leadership advisory lock and to LISTEN for wake-ups.
//
// Fencing: node writes (StartTasks, FinishTasks) are conditional on
// (task_id, attempt, node); leader writes carry the leader's Raft term and
// check it against async.leader in the same transaction, so a paused old
// leader writes nothing once a newer one took over (ErrStaleTerm).
//
// pgstore knows nothing about Raft. Runtime code never concatenates SQL.
package pgstore
