package executor

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/asyncnode/asyncnode/pgstore"
)

// Store is the executor's view of the server database (implemented by
// *pgstore.Store).
type Store interface {
	// StartTasks marks the attempts started by node and returns the ones
	// that may run; refs missing from the result were fenced out.
	StartTasks(ctx context.Context, node string, refs []pgstore.Ref) ([]pgstore.StartedTask, error)
	// FinishTasks writes outcomes, fenced by (task, attempt, node).
	FinishTasks(ctx context.Context, node string, outs []pgstore.Outcome) ([]pgstore.Finished, error)
}

// Done tells the leader an attempt no longer needs its worker slot.
type Done struct {
	pgstore.Ref
	Yielded  bool // task is now YIELDED: release the worker slot...
	HoldPool bool // ...but keep the pool slot (track_yielded)
}

// Reporter delivers Done batches to the leader (through Raft); implemented
// elsewhere.
type Reporter interface {
	Report(ctx context.Context, done []Done) error
}

// Work is one assignment for this node (built by the caller from the
// replicated assignment).
type Work struct {
	pgstore.Ref
	// Deadline is when the attempt times out; zero means the deadline of
	// the StartedTask row, and if that is zero too, none.
	Deadline time.Time
}

// Config configures an Executor. Zero fields take the defaults named.
type Config struct {
	Node        string // this node's id
	Incarnation string // unique per process start; goes into application_name
	// ServerDSN is used for targets whose ConnStr is nil (the built-in SELF
	// target). Empty means the libpq defaults (PG* environment variables).
	ServerDSN         string
	MaxConnsPerTarget int // pool size cap per target (default 64)
	// ShortConnsPerTarget bounds the connections to one target used at
	// once by tasks that have held theirs for less than LongTaskAfter
	// (default 16; at or above MaxConnsPerTarget: no such bound).
	ShortConnsPerTarget int
	// LongTaskAfter is how long a task holds its connection before it no
	// longer counts against ShortConnsPerTarget (default 20ms).
	LongTaskAfter time.Duration
	BatchSize     int           // max refs per StartTasks/FinishTasks/Report call (default 500)
	FlushEvery    time.Duration // max wait before flushing a partial outcome batch (default 2ms)
	// ReportsInFlight bounds the Report calls under way at once (default
	// 4). A Report returns once its Raft entry commits, which on a busy
	// leader is the next dispatch pass; with one call at a time, Dones
	// that end meanwhile would wait for that pass and then for the next,
	// holding their workers' slots the whole time.
	ReportsInFlight int
	TerminateAfter  time.Duration // cancel → terminate escalation delay (default 2s)
	// UnreachableWait bounds how long a task waits for an unreachable
	// target, counted from its first failed connection (default 60s).
	UnreachableWait time.Duration
	// ConnectTimeout is the connect timeout for targets whose connection
	// string sets none (default 10s).
	ConnectTimeout time.Duration
	// ShutdownTimeout bounds the final flush of outcomes when Run's
	// context is done (default 5s).
	ShutdownTimeout time.Duration
	Log             hclog.Logger
	Now             func() time.Time // injectable clock, default time.Now
}

// Defaults.
const (
	DefaultMaxConnsPerTarget = 64
	DefaultShortConns        = 16
	DefaultLongTaskAfter     = 20 * time.Millisecond
	DefaultBatchSize         = 500
	DefaultFlushEvery        = 2 * time.Millisecond
	DefaultReportsInFlight   = 4
	DefaultTerminateAfter    = 2 * time.Second
	DefaultUnreachableWait   = 60 * time.Second
	DefaultConnectTimeout    = 10 * time.Second
	DefaultShutdownTimeout   = 5 * time.Second
)

// maxAppNameLen is the longest application_name the server keeps
// (NAMEDATALEN - 1); a longer one is truncated and would no longer match.
const maxAppNameLen = 63

// Backoff of retried Store and Reporter calls.
const (
	retryMin = 50 * time.Millisecond
	retryMax = 5 * time.Second
)

// ErrInvalidConfig is returned by New for a bad Config.
var ErrInvalidConfig = errors.New("executor: invalid config")

// ErrAlreadyRunning is returned by Run when called more than once.
var ErrAlreadyRunning = errors.New("executor: Run called more than once")

// Causes of a task context's end.
var (
	errTimedOut = errors.New("task deadline reached")
	errRevoked  = errors.New("attempt revoked")
	errShutdown = errors.New("executor shutting down")
	// errAbandoned: the node gave the attempt up (see Abandon).
	errAbandoned = errors.New("attempt abandoned")
)

// phase is where an attempt is on this node.
type phase uint8

const (
	phaseQueued    phase = iota // submitted, not yet in a StartTasks call
	phaseStarting               // in a StartTasks call
	phaseRunning                // its query runs
	phaseFinishing              // its outcome waits for FinishTasks
	phaseReporting              // its Done waits for Report
)

type attempt struct {
	work    Work
	phase   phase
	revoked bool
	abandon string                  // non-empty: given up with this reason (Abandon)
	cancel  context.CancelCauseFunc // set while running
}

// Executor runs the attempts assigned to this node. Create it with New,
// start it with Run.
type Executor struct {
	cfg     Config
	store   Store
	rep     Reporter
	log     hclog.Logger
	appName string

	startWake  chan struct{}
	finishWake chan struct{}
	reportWake chan struct{}

	tasks sync.WaitGroup // task goroutines

	mu       sync.Mutex
	attempts map[pgstore.Ref]*attempt // every attempt not yet reported Done
	queue    []pgstore.Ref            // phaseQueued attempts, in submit order (may hold stale refs)
	outcomes []pgstore.Outcome        // waiting for FinishTasks
	outSince time.Time                // when the oldest pending outcome arrived (wall clock)
	dones    []Done                   // waiting for Report
	idle     chan struct{}            // closed when attempts becomes empty (Drain waits on it)
	draining bool
	started  bool
	stopped  bool
	taskBase context.Context // parent of task contexts, cancelled at shutdown
	stopAll  context.CancelCauseFunc

	// tmu guards targets apart from mu: creating a pool may read files
	// (.pgpass, service files) and Submit must never wait for that.
	tmu     sync.Mutex
	targets map[string]*target // by connection string
}

// New validates cfg, applies defaults and returns an Executor.
func New(cfg Config, store Store, rep Reporter) (*Executor, error) {
	if store == nil || rep == nil {
		return nil, fmt.Errorf("%w: store and reporter are required", ErrInvalidConfig)
	}
	if cfg.Node == "" {
		return nil, fmt.Errorf("%w: Node is required", ErrInvalidConfig)
	}
	if cfg.Incarnation == "" {
		return nil, fmt.Errorf("%w: Incarnation is required", ErrInvalidConfig)
	}
	appName := AppName(cfg.Node, cfg.Incarnation)
	if len(appName) > maxAppNameLen {
		return nil, fmt.Errorf("%w: application_name %q is longer than %d bytes (shorten Node or Incarnation)",
			ErrInvalidConfig, appName, maxAppNameLen)
	}
	for _, c := range []byte(appName) {
		if c < 0x20 || c > 0x7e {
			return nil, fmt.Errorf("%w: Node and Incarnation must be printable ASCII", ErrInvalidConfig)
		}
	}
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"MaxConnsPerTarget", int64(cfg.MaxConnsPerTarget)}, {"BatchSize", int64(cfg.BatchSize)},
		{"ShortConnsPerTarget", int64(cfg.ShortConnsPerTarget)}, {"LongTaskAfter", int64(cfg.LongTaskAfter)},
		{"FlushEvery", int64(cfg.FlushEvery)}, {"TerminateAfter", int64(cfg.TerminateAfter)},
		{"UnreachableWait", int64(cfg.UnreachableWait)}, {"ConnectTimeout", int64(cfg.ConnectTimeout)},
		{"ShutdownTimeout", int64(cfg.ShutdownTimeout)}, {"ReportsInFlight", int64(cfg.ReportsInFlight)},
	} {
		if f.v < 0 {
			return nil, fmt.Errorf("%w: %s must be >= 0 (0 means the default)", ErrInvalidConfig, f.name)
		}
	}
	if cfg.MaxConnsPerTarget > 1<<20 {
		return nil, fmt.Errorf("%w: MaxConnsPerTarget must be <= %d", ErrInvalidConfig, 1<<20)
	}
	cfg.MaxConnsPerTarget = cmp.Or(cfg.MaxConnsPerTarget, DefaultMaxConnsPerTarget)
	cfg.ShortConnsPerTarget = cmp.Or(cfg.ShortConnsPerTarget, DefaultShortConns)
	cfg.LongTaskAfter = cmp.Or(cfg.LongTaskAfter, DefaultLongTaskAfter)
	cfg.BatchSize = cmp.Or(cfg.BatchSize, DefaultBatchSize)
	cfg.FlushEvery = cmp.Or(cfg.FlushEvery, DefaultFlushEvery)
	cfg.ReportsInFlight = cmp.Or(cfg.ReportsInFlight, DefaultReportsInFlight)
	cfg.TerminateAfter = cmp.Or(cfg.TerminateAfter, DefaultTerminateAfter)
	cfg.UnreachableWait = cmp.Or(cfg.UnreachableWait, DefaultUnreachableWait)
	cfg.ConnectTimeout = cmp.Or(cfg.ConnectTimeout, DefaultConnectTimeout)
	cfg.ShutdownTimeout = cmp.Or(cfg.ShutdownTimeout, DefaultShutdownTimeout)
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Executor{
		cfg:        cfg,
		store:      store,
		rep:        rep,
		log:        cfg.Log.Named("executor").With("node", cfg.Node),
		appName:    appName,
		startWake:  make(chan struct{}, 1),
		finishWake: make(chan struct{}, 1),
		reportWake: make(chan struct{}, 1),
		attempts:   make(map[pgstore.Ref]*attempt),
		targets:    make(map[string]*target),
	}, nil
}

// AppName is the application_name the executor of node process
// (node, incarnation) gives its target connections.
func AppName(node, incarnation string) string { return "asyncnode/" + node + "/" + incarnation }

// ApplicationName is the application_name of every connection this
// executor opens to a target: "asyncnode/<node>/<incarnation>".
func (e *Executor) ApplicationName() string { return e.appName }

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Submit queues work for this node. It never blocks (the queue is
// unbounded), so it may be called from the Raft FSM apply path. An attempt
// already held here is ignored. After Drain (or once Run has returned) work
// is refused: it is dropped without being started or reported, and stays
// assigned in the FSM for the leader to resolve (a never-started attempt of
// a node that leaves is simply re-dispatched).
func (e *Executor) Submit(work []Work) {
	e.mu.Lock()
	if e.draining || e.stopped {
		e.mu.Unlock()
		if len(work) > 0 {
			e.log.Debug("refusing work while draining", "count", len(work))
		}
		return
	}
	added := 0
	for _, w := range work {
		if _, dup := e.attempts[w.Ref]; dup {
			continue
		}
		e.attempts[w.Ref] = &attempt{work: w}
		e.queue = append(e.queue, w.Ref)
		added++
	}
	e.mu.Unlock()
	if added > 0 {
		signal(e.startWake)
	}
}

// Revoke stops the given attempts if they are queued or running here: a
// queued one is dropped, a running one has its query cancelled (escalating to
// termination like a timeout). A revoked attempt writes no outcome of its
// own (someone else decided) unless it already had a result or ran past its
// deadline (then TIMED_OUT); such writes are fenced. Each is reported Done
// once its query has stopped.
// An attempt whose outcome is already known here is not affected (its write
// is fenced in the server database). It never blocks. It returns the number
// of attempts it stopped.
func (e *Executor) Revoke(refs []pgstore.Ref) int {
	e.mu.Lock()
	report := false
	stopped := 0
	for _, ref := range refs {
		a := e.attempts[ref]
		if a == nil || a.revoked {
			continue
		}
		switch a.phase {
		case phaseQueued:
			a.revoked = true
			a.phase = phaseReporting
			e.dones = append(e.dones, Done{Ref: ref})
			report = true
		case phaseStarting:
			a.revoked = true // handled when StartTasks returns
		case phaseRunning:
			a.revoked = true
			a.cancel(errRevoked)
		default:
			continue
		}
		stopped++
	}
	e.mu.Unlock()
	if report {
		signal(e.reportWake)
	}
	if stopped > 0 {
		e.log.Debug("revoked attempts", "count", stopped)
	}
	return stopped
}

// Abandon gives up every attempt held here whose outcome is not known yet:
// queued ones are not started, running ones have their query cancelled
// (escalating like a timeout). Each then gets a LOST outcome carrying
// reason, written fenced like any outcome: the task is re-queued if it
// allows a retry and fails with reason otherwise (D13), and its slot is
// reported Done. A node cut off from the leader calls it when its lease
// runs out, so that an attempt the leader may hand to another node stops
// here first. It returns the number of attempts given up and never blocks.
func (e *Executor) Abandon(reason string) int {
	e.mu.Lock()
	n := 0
	for ref, a := range e.attempts {
		if a.revoked || a.abandon != "" {
			continue
		}
		switch a.phase {
		case phaseQueued:
			a.abandon = reason
			e.addOutcomeLocked(a, lostOutcome(ref, reason, e.cfg.Now()))
		case phaseStarting:
			a.abandon = reason // handled when StartTasks returns
		case phaseRunning:
			a.abandon = reason
			a.cancel(errAbandoned)
		default:
			continue
		}
		n++
	}
	e.mu.Unlock()
	// The leader may have ended this process's target sessions (fencing
	// it as lost); a pooled connection it ended would fail the next task
	// without running it.
	e.ResetConnections()
	if n > 0 {
		signal(e.finishWake)
		e.log.Warn("gave up the attempts held here", "count", n, "reason", reason)
	}
	return n
}

// ResetConnections drops every pooled target connection: idle ones now,
// busy ones when their task releases them; later tasks open new sessions.
// Call it when this process's sessions may have been terminated on the
// targets (the leader fences a node process it declared lost by ending
// every session with its application_name, idle ones included).
func (e *Executor) ResetConnections() {
	e.tmu.Lock()
	defer e.tmu.Unlock()
	for _, t := range e.targets {
		if t.pool != nil {
			t.pool.Reset()
		}
	}
}

func lostOutcome(ref pgstore.Ref, reason string, at time.Time) pgstore.Outcome {
	return pgstore.Outcome{Ref: ref, Status: pgstore.StatusLost, Error: &reason, At: at}
}

// addOutcomeLocked queues an outcome for FinishTasks; e.mu is held. It
// reports whether the finish loop should be woken now.
func (e *Executor) addOutcomeLocked(a *attempt, o pgstore.Outcome) bool {
	a.phase = phaseFinishing
	if len(e.outcomes) == 0 {
		e.outSince = time.Now()
	}
	e.outcomes = append(e.outcomes, o)
	return len(e.outcomes) == 1 || len(e.outcomes) >= e.cfg.BatchSize
}

// Running returns the attempts held here: queued, running, or whose outcome
// or Done is still being delivered (they still hold their slots).
func (e *Executor) Running() []pgstore.Ref {
	e.mu.Lock()
	refs := make([]pgstore.Ref, 0, len(e.attempts))
	for ref := range e.attempts {
		refs = append(refs, ref)
	}
	e.mu.Unlock()
	slices.SortFunc(refs, func(a, b pgstore.Ref) int {
		return cmp.Or(cmp.Compare(a.TaskID, b.TaskID), cmp.Compare(a.Attempt, b.Attempt))
	})
	return refs
}

// Drain stops accepting new work (see Submit) and waits until every attempt
// held here has run and been reported Done, or ctx is done. Run must be
// running for the held work to progress.
func (e *Executor) Drain(ctx context.Context) error {
	e.mu.Lock()
	if !e.draining {
		e.draining = true
		e.log.Info("draining", "held", len(e.attempts))
	}
	if len(e.attempts) == 0 {
		e.mu.Unlock()
		return nil
	}
	if e.idle == nil {
		e.idle = make(chan struct{})
	}
	ch := e.idle
	e.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run runs the executor until ctx is done. It then cancels the running
// queries (they end without an outcome), writes and reports the outcomes it
// already has within Config.ShutdownTimeout, closes the pools and returns
// nil.
func (e *Executor) Run(ctx context.Context) error {
	e.mu.Lock()
	if e.started {
		e.mu.Unlock()
		return ErrAlreadyRunning
	}
	e.started = true
	e.taskBase, e.stopAll = context.WithCancelCause(context.WithoutCancel(ctx))
	e.mu.Unlock()
	e.log.Info("executor started", "application_name", e.appName)

	var loops sync.WaitGroup
	loops.Go(func() { e.startLoop(ctx) })
	loops.Go(func() { e.finishLoop(ctx) })
	loops.Go(func() { e.reportLoop(ctx) })
	<-ctx.Done()
	loops.Wait()

	e.mu.Lock()
	e.stopped = true
	running := 0
	for _, a := range e.attempts {
		if a.phase == phaseRunning {
			running++
		}
	}
	e.mu.Unlock()
	e.log.Info("executor stopping", "running", running)
	e.stopAll(errShutdown)
	e.tasks.Wait()

	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), e.cfg.ShutdownTimeout)
	defer cancel()
	e.flushAll(fctx)

	e.tmu.Lock()
	targets := e.targets
	e.targets = make(map[string]*target)
	e.tmu.Unlock()
	for _, t := range targets {
		if t.pool != nil {
			t.pool.Close()
		}
	}
	e.log.Info("executor stopped")
	return nil
}

// retry calls f until it succeeds or ctx is done, with backoff.
func (e *Executor) retry(ctx context.Context, what string, n int, f func(context.Context) error) error {
	backoff := retryMin
	for try := 1; ; try++ {
		err := f(ctx)
		if err == nil {
			if try > 1 {
				e.log.Info("call succeeded after retries", "call", what, "refs", n, "attempts", try)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		e.log.Warn("call failed, retrying", "call", what, "refs", n, "attempt", try,
			"backoff", backoff, "error", maskDSN(err.Error()))
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, retryMax)
	}
}

// takeQueued moves up to BatchSize queued attempts to phaseStarting.
func (e *Executor) takeQueued() []Work {
	e.mu.Lock()
	defer e.mu.Unlock()
	var batch []Work
	i := 0
	for ; i < len(e.queue) && len(batch) < e.cfg.BatchSize; i++ {
		a := e.attempts[e.queue[i]]
		if a == nil || a.phase != phaseQueued {
			continue // revoked while queued
		}
		a.phase = phaseStarting
		batch = append(batch, a.work)
	}
	e.queue = e.queue[i:]
	if len(e.queue) == 0 {
		e.queue = nil
	}
	return batch
}

// startLoop marks queued attempts started, in batches, and launches them.
func (e *Executor) startLoop(ctx context.Context) {
	for {
		batch := e.takeQueued()
		if len(batch) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-e.startWake:
				continue
			}
		}
		refs := make([]pgstore.Ref, len(batch))
		for i, w := range batch {
			refs[i] = w.Ref
		}
		var started []pgstore.StartedTask
		err := e.retry(ctx, "start tasks", len(refs), func(ctx context.Context) error {
			var err error
			started, err = e.store.StartTasks(ctx, e.cfg.Node, refs)
			return err
		})
		if err != nil {
			return // shutting down; the batch is abandoned like running work
		}
		e.launch(batch, started)
	}
}

// launch starts a goroutine per started task and reports the fenced-out
// (or revoked) rest Done.
func (e *Executor) launch(batch []Work, started []pgstore.StartedTask) {
	byRef := make(map[pgstore.Ref]pgstore.StartedTask, len(started))
	for _, st := range started {
		byRef[pgstore.Ref{TaskID: st.TaskID, Attempt: st.Attempt}] = st
	}
	fenced := 0
	wakeFinish := false
	e.mu.Lock()
	for _, w := range batch {
		a := e.attempts[w.Ref]
		st, ok := byRef[w.Ref]
		if !ok || a.revoked {
			if !ok {
				fenced++
			}
			a.phase = phaseReporting
			e.dones = append(e.dones, Done{Ref: w.Ref})
			continue
		}
		if a.abandon != "" {
			if e.addOutcomeLocked(a, lostOutcome(w.Ref, a.abandon, e.cfg.Now())) {
				wakeFinish = true
			}
			continue
		}
		deadline := w.Deadline
		if deadline.IsZero() {
			deadline = st.Deadline
			a.work.Deadline = deadline
		}
		tctx, cancel := context.WithCancelCause(e.taskBase)
		a.phase = phaseRunning
		a.cancel = cancel
		e.tasks.Add(1)
		go e.runAttempt(tctx, cancel, st, deadline)
	}
	report := len(e.dones) > 0
	e.mu.Unlock()
	if fenced > 0 {
		e.log.Debug("attempts fenced out at start", "count", fenced)
	}
	if report {
		signal(e.reportWake)
	}
	if wakeFinish {
		signal(e.finishWake)
	}
}

// runAttempt runs one started task and hands its result on.
func (e *Executor) runAttempt(ctx context.Context, cancel context.CancelCauseFunc, st pgstore.StartedTask, deadline time.Time) {
	defer e.tasks.Done()
	defer cancel(nil)
	// The deadline cancels ctx itself (cause errTimedOut) rather than a
	// child context: one context fewer per attempt, and everything that
	// watches the attempt registers on one parent.
	if !deadline.IsZero() {
		if d := time.Until(deadline); d > 0 {
			t := time.AfterFunc(d, func() { cancel(errTimedOut) })
			defer t.Stop()
		} else {
			cancel(errTimedOut)
		}
	}
	out, stop := e.run(ctx, st, deadline)
	e.complete(pgstore.Ref{TaskID: st.TaskID, Attempt: st.Attempt}, out, stop)
}

// complete records the end of a running attempt: an outcome to write, or
// (revoked) a Done to report, or (shutdown) nothing.
func (e *Executor) complete(ref pgstore.Ref, out *pgstore.Outcome, stop error) {
	e.mu.Lock()
	a := e.attempts[ref]
	a.cancel = nil
	var wake chan struct{}
	revoked := a.revoked || (out == nil && errors.Is(stop, errRevoked))
	if revoked && out == nil && !a.work.Deadline.IsZero() && !e.cfg.Now().Before(a.work.Deadline) {
		// The leader revokes an attempt that ran well past its deadline
		// (its node could not stop it in time, or the clocks disagree):
		// it timed out, and nobody else writes that (D10).
		msg := TimeoutError
		out = &pgstore.Outcome{Ref: ref, Status: pgstore.StatusTimedOut, Error: &msg, At: e.cfg.Now()}
	}
	switch {
	case revoked && out != nil:
		// A revoked attempt that has a result still writes it: the write is
		// fenced, so it only lands when nobody ended the task meanwhile
		// (a deadline revoke), never over a cancel, finish or re-run.
		if e.addOutcomeLocked(a, *out) {
			wake = e.finishWake
		}
	case revoked:
		a.phase = phaseReporting
		e.dones = append(e.dones, Done{Ref: ref})
		wake = e.reportWake
	case out == nil && a.abandon != "" && errors.Is(stop, errAbandoned):
		if e.addOutcomeLocked(a, lostOutcome(ref, a.abandon, e.cfg.Now())) {
			wake = e.finishWake
		}
	case out == nil:
		// Shutdown: no outcome; the leader resolves the attempt.
	default:
		// An outcome that arrived while abandoning is the truth: keep it.
		if e.addOutcomeLocked(a, *out) {
			wake = e.finishWake
		}
	}
	e.mu.Unlock()
	if wake != nil {
		signal(wake)
	}
}

// finishLoop writes outcomes in batches.
func (e *Executor) finishLoop(ctx context.Context) {
	for {
		e.mu.Lock()
		n := len(e.outcomes)
		wait := e.cfg.FlushEvery - time.Since(e.outSince)
		e.mu.Unlock()
		switch {
		case n == 0:
			select {
			case <-ctx.Done():
				return
			case <-e.finishWake:
			}
			continue
		case n < e.cfg.BatchSize && wait > 0:
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-e.finishWake:
				t.Stop()
				continue
			case <-t.C:
			}
		}
		batch := e.takeOutcomes()
		if err := e.finishBatch(ctx, batch); err != nil {
			e.requeueOutcomes(batch)
			return
		}
	}
}

func (e *Executor) takeOutcomes() []pgstore.Outcome {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := min(len(e.outcomes), e.cfg.BatchSize)
	batch := slices.Clone(e.outcomes[:n])
	e.outcomes = slices.Delete(e.outcomes, 0, n)
	return batch
}

func (e *Executor) requeueOutcomes(batch []pgstore.Outcome) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.outcomes = append(batch, e.outcomes...)
}

// finishBatch writes batch with FinishTasks (retried while ctx lives) and
// queues a Done for every outcome.
func (e *Executor) finishBatch(ctx context.Context, batch []pgstore.Outcome) error {
	var fin []pgstore.Finished
	err := e.retry(ctx, "finish tasks", len(batch), func(ctx context.Context) error {
		var err error
		fin, err = e.store.FinishTasks(ctx, e.cfg.Node, batch)
		return err
	})
	if err != nil {
		return err
	}
	byRef := make(map[pgstore.Ref]pgstore.Finished, len(fin))
	for _, f := range fin {
		byRef[f.Ref] = f
	}
	notApplied := 0
	e.mu.Lock()
	for _, o := range batch {
		d := Done{Ref: o.Ref}
		if f, ok := byRef[o.Ref]; ok && f.Applied {
			d.Yielded, d.HoldPool = f.Yielded, f.Yielded && f.HoldPool
		} else {
			notApplied++
		}
		if a := e.attempts[o.Ref]; a != nil {
			a.phase = phaseReporting
		}
		e.dones = append(e.dones, d)
	}
	e.mu.Unlock()
	signal(e.reportWake)
	if notApplied > 0 {
		e.log.Debug("outcomes fenced out", "count", notApplied)
	}
	return nil
}

// reportLoop delivers Done batches to the leader, up to ReportsInFlight
// at once; it returns once ctx is done and its calls have returned (a
// batch whose call failed is queued again for flushAll).
func (e *Executor) reportLoop(ctx context.Context) {
	var calls sync.WaitGroup
	defer calls.Wait()
	free := make(chan struct{}, e.cfg.ReportsInFlight)
	for ctx.Err() == nil {
		// A place first, then the batch: Dones that end while every place
		// is taken go out together in the next call.
		select {
		case <-ctx.Done():
			return
		case free <- struct{}{}:
		}
		batch := e.takeDones()
		for len(batch) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-e.reportWake:
			}
			batch = e.takeDones()
		}
		calls.Go(func() {
			defer func() { <-free }()
			if err := e.reportBatch(ctx, batch); err != nil {
				e.requeueDones(batch)
			}
		})
	}
}

func (e *Executor) takeDones() []Done {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := min(len(e.dones), e.cfg.BatchSize)
	batch := slices.Clone(e.dones[:n])
	e.dones = slices.Delete(e.dones, 0, n)
	return batch
}

func (e *Executor) requeueDones(batch []Done) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dones = append(batch, e.dones...)
}

// reportBatch reports batch (retried while ctx lives) and forgets its
// attempts.
func (e *Executor) reportBatch(ctx context.Context, batch []Done) error {
	err := e.retry(ctx, "report done", len(batch), func(ctx context.Context) error {
		return e.rep.Report(ctx, batch)
	})
	if err != nil {
		return err
	}
	e.mu.Lock()
	for _, d := range batch {
		delete(e.attempts, d.Ref)
	}
	if len(e.attempts) == 0 && e.idle != nil {
		close(e.idle)
		e.idle = nil
	}
	e.mu.Unlock()
	return nil
}

// flushAll writes and reports what is pending, at shutdown.
func (e *Executor) flushAll(ctx context.Context) {
	for {
		batch := e.takeOutcomes()
		if len(batch) == 0 {
			break
		}
		if err := e.finishBatch(ctx, batch); err != nil {
			e.requeueOutcomes(batch)
			e.mu.Lock()
			n := len(e.outcomes)
			e.mu.Unlock()
			e.log.Error("outcomes not written at shutdown; the leader will resolve these attempts",
				"count", n, "error", err)
			break
		}
	}
	for {
		batch := e.takeDones()
		if len(batch) == 0 {
			return
		}
		if err := e.reportBatch(ctx, batch); err != nil {
			e.requeueDones(batch)
			e.mu.Lock()
			n := len(e.dones)
			e.mu.Unlock()
			e.log.Error("done not reported at shutdown; the leader will reconcile these attempts",
				"count", n, "error", err)
			return
		}
	}
}
