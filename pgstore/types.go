package pgstore

import (
	"errors"
	"time"
)

// Sentinel errors returned by Store methods. Callers match them with errors.Is.
var (
	// ErrSchemaMissing means the async schema is not installed (run `asyncnode init`).
	ErrSchemaMissing = errors.New("pgstore: the async schema is not installed in the server database (run `asyncnode init --dsn ...`)")
	// ErrSchemaTooNew means the database was migrated by a newer asyncnode.
	ErrSchemaTooNew = errors.New("pgstore: the async schema is newer than this binary")
	// ErrStaleTerm means a leader write carried a Raft term older than the
	// newest term recorded in the server database: a newer leader took over.
	ErrStaleTerm = errors.New("pgstore: stale leader term (a newer leader has taken over)")
	// ErrLockHeld means another session, not belonging to this cluster,
	// holds the advisory lock control.advisory_mutex_id.
	ErrLockHeld = errors.New("pgstore: the server database's advisory lock is held by another cluster")
)

// Ref names one attempt of a task. Every write that depends on an
// assignment is fenced by (TaskID, Attempt) and, for node writes, the node.
type Ref struct {
	TaskID  int64
	Attempt int32
}

// Control is the subset of async.control the Go side reads.
type Control struct {
	Enabled               bool
	Paused                bool
	Workers               int
	IdleSleep             time.Duration
	DefaultTimeout        time.Duration
	TaskKeepDuration      time.Duration
	HeavyMaintenanceSleep time.Duration
	AdvisoryMutexID       int64
	DefaultPoolWorkers    int
	LastHeavyMaintenance  *time.Time
}

// Target is one row of async.target.
type Target struct {
	Name string
	// ConnString is nil when the target is the server database itself
	// (the built-in SELF target): nodes then use their own server DSN.
	ConnString     *string
	MaxConcurrency int
	DefaultTimeout *time.Duration
	Async          bool
}

// Config is everything the scheduler needs for one pass.
type Config struct {
	Control Control
	// Pools maps pool name to its configured limit (async.concurrency_pool,
	// which mirrors every target's max_concurrency). A pool absent here has
	// limit Control.DefaultPoolWorkers.
	Pools   map[string]int
	Targets map[string]Target
}

// PoolLimit returns the limit of pool name.
func (c Config) PoolLimit(name string) int {
	if l, ok := c.Pools[name]; ok {
		return l
	}
	return c.Control.DefaultPoolWorkers
}

// ClaimRequest asks for READY, eligible tasks in (priority, entered, task_id)
// order under the pool and global limits.
type ClaimRequest struct {
	Term uint64
	// Slots lists, per free global worker slot, the node that would run a
	// task claimed into it; len(Slots) is the global limit of this claim.
	// The i-th claimed query task goes to Slots[i].
	Slots []string
	// PoolRunning is the number of slots each pool holds now (from the FSM);
	// a pool's free room is its limit minus this.
	PoolRunning map[string]int
	Now         time.Time
	// Exclude lists tasks that must not be claimed now: their previous
	// attempt still holds its slot (revoked, its node has not let go yet).
	Exclude []int64
}

// Claimed is one task the leader claimed: in Postgres it is now RUNNING
// (consumed = Now, times_up = Deadline, attempt incremented, node set) but
// it may start only once its assignment is committed in Raft.
type Claimed struct {
	TaskID   int64
	Attempt  int32
	Node     string // empty for External tasks
	Pool     string
	Target   string
	Deadline time.Time
	// External marks a non-query task (NULL query): it is handed out by
	// async.get_tasks, holds a pool slot, no worker slot, no node.
	External bool
}

// StartedTask is what a node needs to run one claimed attempt.
type StartedTask struct {
	TaskID   int64
	Attempt  int32
	Query    string // ##flow.TASK_ID## not yet substituted
	Target   string
	ConnStr  *string // nil: the server database (node's own DSN)
	Async    bool    // asynchronous_finish: success means YIELDED
	Deadline time.Time
	// TargetGone reports that the start found no row of Target in
	// async.target, so ConnStr is unknown and the task cannot run. The
	// target triggers refuse to remove or rename a target that has
	// unfinished tasks, so only a bypass of them leads here.
	TargetGone bool
}

// Status is a terminal or yielded outcome an executor reports.
type Status string

// Outcome statuses written by executors.
const (
	StatusFinished Status = "FINISHED"
	StatusFailed   Status = "FAILED"
	StatusTimedOut Status = "TIMED_OUT"
	StatusCanceled Status = "CANCELED"
	StatusYielded  Status = "YIELDED"
	// StatusLost is never stored: a node gives up an attempt it had to stop
	// (cut off from the leader). The task is re-queued if it allows another
	// retry (max_retries), else it ends FAILED with the outcome's Error (D13).
	StatusLost Status = "LOST"
)

// Outcome is the result of one attempt.
type Outcome struct {
	Ref
	Status Status
	Error  *string // processing_error; nil on success
	At     time.Time
}

// Finished tells what FinishTasks did with one outcome.
type Finished struct {
	Ref
	// Applied is false when the write was fenced out (attempt or node no
	// longer match, or the task was already finished/reset by someone else).
	Applied bool
	// Yielded is true when the task is now YIELDED (asynchronous target or
	// yield_upon_finish), false when it is finished.
	Yielded bool
	// HoldPool is true when a yielded task keeps its pool slot (track_yielded).
	HoldPool bool
}

// State is the derived execution state of a task row (§1.5 of the semantics).
type State string

// Execution states; StateMissing means no such row.
const (
	StateReady    State = "READY"
	StateRunning  State = "RUNNING"
	StateYielded  State = "YIELDED"
	StateFinished State = "FINISHED"
	StateMissing  State = "MISSING"
)

// TaskState is the leader's view of one task row, for sweeps and reconciliation.
type TaskState struct {
	TaskID       int64
	Attempt      int32
	Node         string
	State        State
	Started      bool // a node marked this attempt started
	External     bool
	TrackYielded bool
	Pool         string
	TimesUp      *time.Time
}

// LostResult is what ResolveLost did with one attempt of a lost node.
type LostResult struct {
	Ref
	// Outcome is "requeued" (never started, or started with a retry left),
	// "failed", "timed_out", or "skipped" (already finished or fenced).
	Outcome string
}
