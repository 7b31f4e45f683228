// Package scheduler holds the leader's loops: claim eligible tasks in
// (priority, entered, task_id) order under pool and worker limits, choose a
// node for each, and commit the assignments through Raft; sweep finished,
// cancelled and deferred tasks; enforce deadlines; resolve attempts of lost
// nodes; reconcile after a failover; run maintenance. It never executes task
// queries.
package scheduler

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/asyncnode/asyncnode/fsm"
	"github.com/asyncnode/asyncnode/pgstore"
)

// Store is the leader's view of the server database (implemented by *pgstore.Store).
type Store interface {
	LoadConfig(ctx context.Context) (pgstore.Config, error)
	TakeLeadership(ctx context.Context, term uint64, node, clusterID string) (*pgstore.Leadership, error)
	ClaimTasks(ctx context.Context, req pgstore.ClaimRequest) ([]pgstore.Claimed, error)
	Unclaim(ctx context.Context, term uint64, refs []pgstore.Ref) error
	TaskStates(ctx context.Context, ids []int64) (map[int64]pgstore.TaskState, error)
	InFlightTasks(ctx context.Context) ([]pgstore.TaskState, error)
	ResolveLost(ctx context.Context, term uint64, reason string, refs []pgstore.Ref, now time.Time) ([]pgstore.LostResult, error)
	TimeOutTasks(ctx context.Context, term uint64, now time.Time) ([]pgstore.Ref, error)
	PurgeHistory(ctx context.Context, term uint64, now time.Time) (int64, error)
	TaskStatistics(ctx context.Context) (pgstore.TaskStatistics, error)
	AnalyzeTasks(ctx context.Context) (bool, error)
}

// Raft is what the scheduler needs from the consensus layer.
type Raft interface {
	Apply(ctx context.Context, cmd []byte) ([]byte, error)
	Term() uint64
	Barrier(ctx context.Context) error
	LeaderCh() <-chan bool
	IsLeader() bool
}

// NodeInfo describes a node that can run tasks.
type NodeInfo struct {
	ID string
	// MaxTasks caps the worker slots this node holds at once (0: no cap).
	MaxTasks int
	// Alive is false once failure detection declared the node dead.
	Alive bool
	// Draining nodes take no new tasks (graceful leave).
	Draining bool
}

// Config wires a Scheduler.
type Config struct {
	NodeID string
	Store  Store
	Raft   Raft
	FSM    *fsm.FSM
	// Nodes lists the cluster's task-running nodes (at least this one).
	Nodes func() []NodeInfo
	Log   hclog.Logger
	Now   func() time.Time
	// MaxBatch caps the tasks claimed per pass (default 1000).
	MaxBatch int
	// ConfigRefresh is how often limits are re-read without a notification (default 1s).
	ConfigRefresh time.Duration
	// SweepEvery is the period of the finished/cancelled task sweep (default 1s).
	SweepEvery time.Duration
	// StatsEvery is how often the leader compares the planner's row
	// estimate of the task table with the rows it holds, and analyses the
	// table when the estimate is stale (default 1s; see keepStatistics).
	StatsEvery time.Duration
	// RevokeGrace is how long past its deadline an attempt may hold its slot
	// before the leader revokes it (its node normally times it out itself).
	RevokeGrace time.Duration
	// StopOrphans, when set, ends on every target the sessions of a node
	// process (node id, incarnation) before its attempts are resolved as
	// lost, so that a query of a lost-but-alive process (frozen,
	// partitioned) does not keep running while its task is re-run. Errors
	// are logged; resolution goes on (an unreachable target cannot run the
	// orphan either).
	StopOrphans func(ctx context.Context, node, incarnation string) error
	// LostAfter is how long a node must be dead before its attempts are
	// resolved as lost (it covers the node's own lease; default 0 for
	// incarnation changes, which are certain).
	LostAfter time.Duration
}

// Status is what the scheduler reports for `asyncnode status`.
type Status struct {
	Leading     bool      `json:"leading"`
	Term        uint64    `json:"term"`
	Dispatching bool      `json:"dispatching"`
	Reason      string    `json:"reason,omitempty"`
	Dispatched  uint64    `json:"dispatched"`
	LastPass    time.Time `json:"last_pass,omitempty"`
}

// Scheduler runs the leader loops while this node leads.
type Scheduler struct {
	cfg  Config
	log  hclog.Logger
	wake chan struct{}
	swp  chan struct{}
	cfgc chan struct{}

	mu     sync.Mutex
	status Status
	dead   map[string]time.Time // node -> first seen dead
	// accepting is true while the dispatch loop runs and takes releases;
	// releases waits for the loop's next entry.
	accepting bool
	releases  []*releaseReq

	// background tracks what runs beside the loop while it leads: release
	// commits the loop does not wait for, and keepStatistics.
	background sync.WaitGroup

	// ended holds the attempts the last periodic sweep found ended in the
	// task log but still assigned and not revoked; only the goroutine that
	// leads touches it (see settle).
	ended map[fsm.Ref]struct{}
}

// ErrNotDispatching is Release's answer while the dispatch loop does not
// run (not leading, establishing leadership, stopping): the caller applies
// a Release entry through Raft itself.
var ErrNotDispatching = errors.New("scheduler: not dispatching")

// releaseReq is a batch of finished attempts waiting for the dispatch
// loop's next entry.
type releaseReq struct {
	items []fsm.ReleaseItem
	done  chan error // buffered; answered once
}

// Release frees the slots of finished attempts in the next entry the
// dispatch loop commits, the same entry as the assignments that reuse
// those slots: on the way from one task to the next, one Raft commit
// instead of two. It returns once that entry is committed, with its error
// if it was not (the outcome is then unknown, as for any Apply; releasing
// again is harmless). While the loop does not run it returns
// ErrNotDispatching at once.
func (s *Scheduler) Release(ctx context.Context, items []fsm.ReleaseItem) error {
	r := &releaseReq{items: items, done: make(chan error, 1)}
	s.mu.Lock()
	if !s.accepting {
		s.mu.Unlock()
		return ErrNotDispatching
	}
	s.releases = append(s.releases, r)
	s.mu.Unlock()
	s.Wake()
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// accept starts or stops taking releases; when it stops, releases still
// waiting are answered ErrNotDispatching, so their callers apply them
// themselves.
func (s *Scheduler) accept(on bool) {
	s.mu.Lock()
	s.accepting = on
	var left []*releaseReq
	if !on {
		left, s.releases = s.releases, nil
	}
	s.mu.Unlock()
	answer(left, ErrNotDispatching)
}

// takeReleases returns the waiting releases and their items.
func (s *Scheduler) takeReleases() ([]*releaseReq, []fsm.ReleaseItem) {
	s.mu.Lock()
	reqs := s.releases
	s.releases = nil
	s.mu.Unlock()
	var items []fsm.ReleaseItem
	for _, r := range reqs {
		items = append(items, r.items...)
	}
	return reqs, items
}

func answer(reqs []*releaseReq, err error) {
	for _, r := range reqs {
		r.done <- err
	}
}

// New validates cfg and returns a Scheduler.
func New(cfg Config) (*Scheduler, error) {
	if cfg.Store == nil || cfg.Raft == nil || cfg.FSM == nil || cfg.Nodes == nil || cfg.NodeID == "" {
		return nil, errors.New("scheduler: Store, Raft, FSM, Nodes and NodeID are required")
	}
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 1000
	}
	if cfg.ConfigRefresh <= 0 {
		cfg.ConfigRefresh = time.Second
	}
	if cfg.SweepEvery <= 0 {
		cfg.SweepEvery = time.Second
	}
	if cfg.StatsEvery <= 0 {
		cfg.StatsEvery = time.Second
	}
	if cfg.RevokeGrace <= 0 {
		cfg.RevokeGrace = 5 * time.Second
	}
	return &Scheduler{cfg: cfg, log: cfg.Log.Named("scheduler"),
		wake: make(chan struct{}, 1), swp: make(chan struct{}, 1), cfgc: make(chan struct{}, 1),
		dead: map[string]time.Time{}}, nil
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Wake asks for a dispatch pass soon (new tasks, freed slots). Never blocks.
func (s *Scheduler) Wake() { poke(s.wake) }

// Notify routes a server-database notification payload ("push", "finish",
// "config", "control", "reconnect").
func (s *Scheduler) Notify(payload string) {
	switch payload {
	case "finish":
		poke(s.swp)
	case "config", "control":
		poke(s.cfgc)
	case "reconnect":
		poke(s.cfgc)
		poke(s.swp)
	}
	poke(s.wake)
}

// Status returns a copy of the current status.
func (s *Scheduler) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

func (s *Scheduler) setStatus(fn func(*Status)) {
	s.mu.Lock()
	fn(&s.status)
	s.mu.Unlock()
}

// Run follows leadership changes until ctx is done: while this node leads,
// it runs the leader loop with a context cancelled on loss of leadership.
func (s *Scheduler) Run(ctx context.Context) error {
	var (
		cancel context.CancelFunc
		done   chan struct{}
	)
	stop := func() {
		if cancel != nil {
			cancel()
			<-done
			cancel, done = nil, nil
		}
		s.setStatus(func(st *Status) { *st = Status{} })
	}
	defer stop()
	var startTerm uint64 // Raft term when the running loop started
	start := func() {
		if cancel != nil {
			return
		}
		startTerm = s.cfg.Raft.Term()
		var lctx context.Context
		lctx, cancel = context.WithCancel(ctx)
		done = make(chan struct{})
		go func() {
			defer close(done)
			s.lead(lctx)
		}()
	}
	if s.cfg.Raft.IsLeader() {
		start()
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case leader := <-s.cfg.Raft.LeaderCh():
			if leader {
				// "Leader" in a newer term while a loop runs means leadership
				// was lost and regained without this loop seeing the loss
				// (the channel keeps only the latest change): establish
				// again (barrier, lock, reconcile) for the new term.
				if cancel == nil || s.cfg.Raft.Term() != startTerm {
					stop()
					start()
				}
			} else {
				stop()
			}
		}
	}
}

// retryEvery is how long lead waits before establishing leadership again
// after a failure.
const retryEvery = 2 * time.Second

// lead establishes leadership and runs the loops until ctx is cancelled.
// If establishing fails it retries; it never dispatches without the
// advisory lock and the term recorded in the server database.
func (s *Scheduler) lead(ctx context.Context) {
	// A new leadership cannot know how long a node has been dead: the node
	// may have been alive while this node was not leading. LostAfter counts
	// from this leadership's first sighting (an older one would resolve, and
	// re-run or fail, a task its node may still be running).
	s.mu.Lock()
	s.dead = map[string]time.Time{}
	s.mu.Unlock()
	s.setStatus(func(st *Status) {
		*st = Status{Leading: true, Term: s.cfg.Raft.Term(), Reason: "establishing leadership"}
	})
	// The loop stops when the lock session dies (Postgres restart, session
	// killed) or the term is found stale. While this node still leads (ctx
	// alive), establish again rather than wedge without dispatching.
	for {
		term, lease := s.establishRetry(ctx)
		if lease == nil {
			return
		}
		log := s.log.With("term", term)
		log.Info("leadership established; dispatching")
		s.setStatus(func(st *Status) { st.Term, st.Dispatching, st.Reason = term, true, "" })
		err := s.loop(ctx, term, lease)
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		lease.Release(rctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		log.Error("leader loop stopped; establishing leadership again", "error", err, "retry_in", retryEvery)
		s.setStatus(func(st *Status) { st.Dispatching, st.Reason = false, err.Error() })
		select {
		case <-ctx.Done():
			return
		case <-time.After(retryEvery):
		}
	}
}

// establishRetry establishes leadership, retrying until it succeeds (it
// returns the term and the lease) or ctx is done (nil lease). The term is
// read at every attempt: a term found stale is never retried as is.
func (s *Scheduler) establishRetry(ctx context.Context) (uint64, *pgstore.Leadership) {
	for {
		term := s.cfg.Raft.Term()
		lease, err := s.establish(ctx, term)
		if err == nil {
			return term, lease
		}
		if ctx.Err() != nil {
			return 0, nil
		}
		reason := err.Error()
		if errors.Is(err, pgstore.ErrLockHeld) {
			reason = "another cluster leads this server database: " + err.Error()
		}
		s.log.Warn("cannot establish leadership; retrying", "term", term, "error", err)
		s.setStatus(func(st *Status) { st.Term, st.Dispatching, st.Reason = term, false, reason })
		select {
		case <-ctx.Done():
			return 0, nil
		case <-time.After(retryEvery):
		}
	}
}

func (s *Scheduler) establish(ctx context.Context, term uint64) (*pgstore.Leadership, error) {
	bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := s.cfg.Raft.Barrier(bctx)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("raft barrier: %w", err)
	}
	clusterID, err := s.clusterID(ctx)
	if err != nil {
		return nil, err
	}
	lease, err := s.cfg.Store.TakeLeadership(ctx, term, s.cfg.NodeID, clusterID)
	if err != nil {
		return nil, fmt.Errorf("take leadership in the server database: %w", err)
	}
	// Server-database writes carry the lease's fencing token, which is
	// larger than the Raft term if another cluster led the database before.
	if err := s.reconcile(ctx, lease.Term()); err != nil {
		rctx, c := context.WithTimeout(context.Background(), 5*time.Second)
		lease.Release(rctx)
		c()
		return nil, fmt.Errorf("reconcile: %w", err)
	}
	return lease, nil
}

// clusterID returns the cluster's identity, creating it on first use. It
// tells this cluster's stale leaders apart from another cluster that points
// at the same server database.
func (s *Scheduler) clusterID(ctx context.Context) (string, error) {
	if id := s.cfg.FSM.ClusterID(); id != "" {
		return id, nil
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate cluster id: %w", err)
	}
	if _, err := s.apply(ctx, fsm.MsgSetID, fsm.SetID{ClusterID: hex.EncodeToString(b[:])}); err != nil {
		return "", fmt.Errorf("record cluster id: %w", err)
	}
	return s.cfg.FSM.ClusterID(), nil
}

// loop is the leader's event loop. term is the Raft term (it stamps FSM
// assignments); every server-database write carries the fencing token
// fence = lease.Term() instead (equal to term unless another cluster led
// the database before; pgstore rejects anything else as stale).
func (s *Scheduler) loop(ctx context.Context, term uint64, lease *pgstore.Leadership) error {
	fence := lease.Term()
	cfg, err := s.cfg.Store.LoadConfig(ctx)
	if err != nil {
		return fmt.Errorf("load config: %w", err)
	}
	s.accept(true)
	defer s.accept(false)
	defer s.background.Wait()
	statsCtx, stopStats := context.WithCancel(ctx)
	defer stopStats() // before the Wait above
	s.background.Go(func() { s.keepStatistics(statsCtx) })
	cfgAt := s.cfg.Now()
	sweepT := time.NewTicker(s.cfg.SweepEvery)
	defer sweepT.Stop()
	checkT := time.NewTicker(250 * time.Millisecond)
	defer checkT.Stop()
	idle := time.NewTimer(0)
	defer idle.Stop()
	for {
		if s.cfg.Now().Sub(cfgAt) >= s.cfg.ConfigRefresh {
			if c, err := s.cfg.Store.LoadConfig(ctx); err != nil {
				s.log.Warn("reload config", "error", err)
			} else {
				cfg, cfgAt = c, s.cfg.Now()
			}
		}
		more, err := s.dispatch(ctx, term, fence, cfg)
		if err != nil {
			if errors.Is(err, pgstore.ErrStaleTerm) || ctx.Err() != nil {
				return err
			}
			s.log.Warn("dispatch pass failed", "error", err)
		}
		if more {
			// A full batch: there may be more work. The periodic duties
			// still run when due, so a busy queue cannot starve them.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-lease.Lost():
				return errors.New("lost the server-database leadership session")
			case <-s.cfgc:
				cfgAt = time.Time{}
			case <-s.swp:
				s.sweep(ctx, fence, true)
			case <-sweepT.C:
				s.periodic(ctx, fence, &cfg)
			case <-checkT.C:
				s.checkDeadlines(ctx, fence)
				s.checkLost(ctx, fence)
			default:
			}
			continue
		}
		if !idle.Stop() {
			select {
			case <-idle.C:
			default:
			}
		}
		idle.Reset(pollInterval(cfg))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-lease.Lost():
			return errors.New("lost the server-database leadership session")
		case <-s.wake:
		case <-idle.C:
		case <-s.cfgc:
			cfgAt = time.Time{}
		case <-s.swp:
			s.sweep(ctx, fence, true)
		case <-sweepT.C:
			s.periodic(ctx, fence, &cfg)
		case <-checkT.C:
			s.checkDeadlines(ctx, fence)
			s.checkLost(ctx, fence)
		}
	}
}

// periodic runs the sweep, the task-log time-outs and maintenance.
func (s *Scheduler) periodic(ctx context.Context, fence uint64, cfg *pgstore.Config) {
	s.sweep(ctx, fence, false)
	// A yielded task that keeps no pool slot has no assignment, so
	// checkDeadlines cannot see it: look in the task log (D10).
	s.timeOut(ctx, fence, s.cfg.Now())
	if at, ok := s.maintain(ctx, fence, *cfg); ok {
		cfg.Control.LastHeavyMaintenance = &at
	}
}

func pollInterval(cfg pgstore.Config) time.Duration {
	d := cfg.Control.IdleSleep
	if d <= 0 {
		d = 100 * time.Millisecond
	}
	if d > 5*time.Second {
		d = 5 * time.Second
	}
	return d
}

// dispatch claims and assigns one batch, in one entry with the releases
// waiting (Release). It reports whether the batch was full (more work is
// likely waiting).
func (s *Scheduler) dispatch(ctx context.Context, term, fence uint64, cfg pgstore.Config) (bool, error) {
	reqs, released := s.takeReleases()
	// The claim counts the slots of these releases as free: they commit in
	// the same entry as the assignments, before them.
	claimed, slots, claimErr := s.claim(ctx, fence, cfg, released)
	if len(claimed) == 0 {
		// Nothing to assign: the releases go on their own, without holding
		// up the next pass (a task pushed meanwhile). Until they apply, the
		// next pass counts their slots as held, never the other way round.
		s.releaseAlone(ctx, reqs, released)
		return false, claimErr
	}
	items := make([]fsm.Assignment, len(claimed))
	incs := s.cfg.FSM.Nodes()
	for i, c := range claimed {
		items[i] = fsm.Assignment{TaskID: c.TaskID, Attempt: c.Attempt, Node: c.Node, Incarnation: incs[c.Node].Incarnation,
			Pool: c.Pool, Deadline: c.Deadline.UnixMilli(), External: c.External}
	}
	// One packed entry, with or without releases: every replica decodes
	// it, at every replay too, so it is the compact form, not JSON.
	res, err := s.apply(ctx, fsm.MsgReleaseAssignPacked,
		fsm.ReleaseAssign{Releases: released, Assign: fsm.Assign{Term: term, Items: items}})
	answerCommit(ctx, reqs, err)
	if err != nil {
		// The claimed rows are RUNNING, not started, in Postgres. Sweeps and
		// deadline checks only see assignments, so while this node leads
		// nothing else would put them back: requeue those the FSM does not
		// hold. Safe if the entry commits late after all: Unclaim skips
		// started attempts, and a late assignment of a requeued attempt is
		// fenced out at start, then swept. (If leadership was lost, the next
		// leader's reconciliation requeues them.)
		s.unclaimUncommitted(ctx, fence, claimed)
		return false, fmt.Errorf("commit assignments: %w", err)
	}
	if len(res.Rejected) > 0 {
		refs := make([]pgstore.Ref, len(res.Rejected))
		for i, r := range res.Rejected {
			refs[i] = pgstore.Ref{TaskID: r.TaskID, Attempt: r.Attempt}
		}
		if err := s.cfg.Store.Unclaim(ctx, fence, refs); err != nil {
			return false, fmt.Errorf("unclaim rejected: %w", err)
		}
	}
	n := uint64(len(claimed) - len(res.Rejected))
	s.setStatus(func(st *Status) { st.Dispatched += n })
	return len(claimed) == slots, nil
}

// releaseAlone commits releases without assignments, in the background;
// the loop waits for it before it ends.
func (s *Scheduler) releaseAlone(ctx context.Context, reqs []*releaseReq, items []fsm.ReleaseItem) {
	if len(reqs) == 0 {
		return
	}
	s.background.Add(1)
	go func() {
		defer s.background.Done()
		_, err := s.apply(ctx, fsm.MsgRelease, fsm.Release{Items: items})
		answerCommit(ctx, reqs, err)
	}()
}

// answerCommit answers releases with the outcome of their entry; when the
// loop is ending (ctx done), with ErrNotDispatching, so that the callers
// apply their releases themselves (again, if the entry commits after all:
// harmless).
func answerCommit(ctx context.Context, reqs []*releaseReq, err error) {
	if err != nil && ctx.Err() != nil {
		err = ErrNotDispatching
	}
	answer(reqs, err)
}

// claim claims the tasks that fit the free slots, counting those of
// released as free, and returns them with the number of slots offered.
func (s *Scheduler) claim(ctx context.Context, fence uint64, cfg pgstore.Config, released []fsm.ReleaseItem) ([]pgstore.Claimed, int, error) {
	if !cfg.Control.Enabled || cfg.Control.Paused {
		reason := "paused (async.control.paused)"
		if !cfg.Control.Enabled {
			reason = "disabled (async.control.enabled = false)"
		}
		s.setStatus(func(st *Status) { st.Dispatching, st.Reason = false, reason })
		return nil, 0, nil
	}
	s.setStatus(func(st *Status) { st.Dispatching, st.Reason, st.LastPass = true, "", s.cfg.Now() })
	counts := s.cfg.FSM.CountsAfter(released)
	free := cfg.Control.Workers - counts.Workers
	if free <= 0 {
		return nil, 0, nil
	}
	if free > s.cfg.MaxBatch {
		free = s.cfg.MaxBatch
	}
	slots := buildSlots(free, s.cfg.Nodes(), counts.PerNode)
	if len(slots) == 0 {
		return nil, 0, nil
	}
	now := s.cfg.Now()
	// A task whose revoked attempt still holds its slot (cancelled, paused
	// or deferred while running) is not claimed again until its node lets
	// go: the FSM would refuse the new assignment anyway.
	exclude := s.cfg.FSM.RevokedTaskIDs()
	claimed, err := s.cfg.Store.ClaimTasks(ctx, pgstore.ClaimRequest{Term: fence, Slots: slots, PoolRunning: counts.Pools, Now: now, Exclude: exclude})
	if err != nil {
		return nil, 0, fmt.Errorf("claim: %w", err)
	}
	return claimed, len(slots), nil
}

// unclaimUncommitted requeues the claims whose assignment is not in the FSM.
func (s *Scheduler) unclaimUncommitted(ctx context.Context, term uint64, claimed []pgstore.Claimed) {
	if ctx.Err() != nil {
		return
	}
	var refs []pgstore.Ref
	for _, c := range claimed {
		if a, ok := s.cfg.FSM.Get(c.TaskID); ok && a.Attempt == c.Attempt {
			continue
		}
		refs = append(refs, pgstore.Ref{TaskID: c.TaskID, Attempt: c.Attempt})
	}
	if err := s.cfg.Store.Unclaim(ctx, term, refs); err != nil {
		s.log.Warn("requeue claims whose assignment was not committed", "error", err, "count", len(refs))
	}
}

// buildSlots lists, for up to free slots, the node that takes each one:
// least-loaded alive, non-draining nodes first, within their MaxTasks.
func buildSlots(free int, nodes []NodeInfo, held map[string]int) []string {
	type cand struct {
		id   string
		load int
		room int // -1: unlimited
	}
	var cs []*cand
	for _, n := range nodes {
		if !n.Alive || n.Draining {
			continue
		}
		room := -1
		if n.MaxTasks > 0 {
			room = n.MaxTasks - held[n.ID]
			if room <= 0 {
				continue
			}
		}
		cs = append(cs, &cand{id: n.ID, load: held[n.ID], room: room})
	}
	if len(cs) == 0 {
		return nil
	}
	slots := make([]string, 0, free)
	for len(slots) < free {
		// The least loaded node with room, the smallest id among equals: a
		// scan per slot (a claim offers up to hundreds of slots to a few
		// nodes; sorting for each slot allocated every time).
		var pick *cand
		for _, c := range cs {
			if c.room != 0 && (pick == nil || c.load < pick.load || (c.load == pick.load && c.id < pick.id)) {
				pick = c
			}
		}
		if pick == nil {
			break
		}
		slots = append(slots, pick.id)
		pick.load++
		if pick.room > 0 {
			pick.room--
		}
	}
	return slots
}

func (s *Scheduler) apply(ctx context.Context, t fsm.MessageType, v any) (fsm.Result, error) {
	b, err := fsm.Encode(t, v)
	if err != nil {
		return fsm.Result{}, err
	}
	out, err := s.cfg.Raft.Apply(ctx, b)
	if err != nil {
		return fsm.Result{}, err
	}
	return fsm.DecodeResult(out)
}

func (s *Scheduler) nodeState() (alive map[string]bool, incs map[string]fsm.NodeReg) {
	alive = map[string]bool{}
	for _, n := range s.cfg.Nodes() {
		if n.Alive {
			alive[n.ID] = true
		}
	}
	return alive, s.cfg.FSM.Nodes()
}

// owned reports whether an assignment's owner is the live process it was
// given to.
func owned(a fsm.Assignment, alive map[string]bool, incs map[string]fsm.NodeReg) bool {
	return alive[a.Node] && incs[a.Node].Incarnation == a.Incarnation
}

// sweep compares assignments with the task log: a task finished, cancelled,
// deferred or paused by SQL has its attempt revoked (its node stops the
// query and releases the slot); slots of yielded and external tasks that
// ended are released. A periodic sweep (prompt false) leaves a node one
// sweep period to release an attempt it ended itself (see settle); a sweep
// prompted by async.finish or async.cancel, or run when leadership starts,
// revokes at once.
func (s *Scheduler) sweep(ctx context.Context, term uint64, prompt bool) {
	as := s.cfg.FSM.Assignments()
	if len(as) == 0 {
		return
	}
	ids := make([]int64, len(as))
	for i, a := range as {
		ids[i] = a.TaskID
	}
	states, err := s.cfg.Store.TaskStates(ctx, ids)
	if err != nil {
		s.log.Warn("sweep: read task states", "error", err)
		return
	}
	incs := s.cfg.FSM.Nodes()
	var revoke []fsm.Ref
	var release []fsm.ReleaseItem
	for _, a := range as {
		st, ok := states[a.TaskID]
		if !ok {
			continue
		}
		current := st.Attempt == a.Attempt && (st.State == pgstore.StateRunning || st.State == pgstore.StateYielded)
		if current {
			if st.State == pgstore.StateYielded && !a.Yielded && a.External {
				// get_tasks handed out an asynchronous external task.
				release = append(release, fsm.ReleaseItem{Ref: a.Ref(), Yielded: true, HoldPool: true})
			}
			continue
		}
		switch {
		case a.External || a.Yielded || incs[a.Node].Incarnation != a.Incarnation:
			// Nothing runs it: no node, or the node's process is gone.
			release = append(release, fsm.ReleaseItem{Ref: a.Ref()})
		case !a.Revoked:
			// Its node stops it and releases the slot. A node that is only
			// unreachable (not alive) may still be running the query: its
			// slot stays held until checkLost declares it lost (LostAfter),
			// else the limits could be exceeded (invariant 5).
			revoke = append(revoke, a.Ref())
		}
	}
	revoke = s.settle(revoke, prompt)
	s.commitRevokeRelease(ctx, revoke, release)
}

// settle returns the attempts of ended that are to be revoked now. A
// node writes its own outcome to the task log first and releases the slot
// through Raft a moment later, so a sweep in between finds many attempts
// that ended with their node's own outcome (hundreds per sweep while a
// node drains trivial tasks); revoking them costs a Raft entry and work on
// the node for nothing. So, unless prompt, an attempt is revoked only if
// the previous periodic sweep found it ended too; an attempt that
// async.finish or async.cancel ended (they notify, which prompts a sweep)
// is revoked at once.
func (s *Scheduler) settle(ended []fsm.Ref, prompt bool) []fsm.Ref {
	if prompt {
		return ended
	}
	prev := s.ended
	s.ended = make(map[fsm.Ref]struct{}, len(ended))
	var now []fsm.Ref
	for _, r := range ended {
		if _, seen := prev[r]; seen {
			now = append(now, r)
		} else {
			s.ended[r] = struct{}{}
		}
	}
	return now
}

func (s *Scheduler) commitRevokeRelease(ctx context.Context, revoke []fsm.Ref, release []fsm.ReleaseItem) {
	if len(revoke) > 0 {
		if _, err := s.apply(ctx, fsm.MsgRevoke, fsm.Revoke{Items: revoke}); err != nil {
			s.log.Warn("revoke", "error", err)
		}
	}
	if len(release) > 0 {
		if _, err := s.apply(ctx, fsm.MsgRelease, fsm.Release{Items: release}); err != nil {
			s.log.Warn("release", "error", err)
		} else {
			s.Wake()
		}
	}
}

// checkDeadlines revokes attempts well past their deadline whose node has
// not timed them out itself, and times out yielded and external tasks.
func (s *Scheduler) checkDeadlines(ctx context.Context, term uint64) {
	now := s.cfg.Now()
	as := s.cfg.FSM.Assignments()
	alive, incs := s.nodeState()
	var revoke []fsm.Ref
	due := false
	for _, a := range as {
		if a.Deadline == 0 || now.UnixMilli() < a.Deadline {
			continue
		}
		if a.External || a.Yielded {
			due = true
			continue
		}
		if !a.Revoked && owned(a, alive, incs) && now.Sub(time.UnixMilli(a.Deadline)) > s.cfg.RevokeGrace {
			revoke = append(revoke, a.Ref())
		}
	}
	if due {
		s.timeOut(ctx, term, now)
	}
	s.commitRevokeRelease(ctx, revoke, nil)
}

// timeOut ends yielded and non-query tasks past their deadline as TIMED_OUT
// (no node runs them) and releases the slots they held.
func (s *Scheduler) timeOut(ctx context.Context, term uint64, now time.Time) {
	refs, err := s.cfg.Store.TimeOutTasks(ctx, term, now)
	if err != nil {
		s.log.Warn("time out yielded/external tasks", "error", err)
		return
	}
	var items []fsm.ReleaseItem
	for _, r := range refs {
		if a, ok := s.cfg.FSM.Get(r.TaskID); ok && a.Attempt == r.Attempt {
			items = append(items, fsm.ReleaseItem{Ref: fsm.Ref{TaskID: r.TaskID, Attempt: r.Attempt}})
		}
	}
	s.commitRevokeRelease(ctx, nil, items)
}

// checkLost resolves the attempts held by node processes that are gone:
// a restarted node (new incarnation) or a node dead for LostAfter.
func (s *Scheduler) checkLost(ctx context.Context, term uint64) {
	now := s.cfg.Now()
	alive, incs := s.nodeState()
	s.mu.Lock()
	for _, n := range s.cfg.Nodes() {
		if n.Alive {
			delete(s.dead, n.ID)
		} else if _, ok := s.dead[n.ID]; !ok {
			s.dead[n.ID] = now
		}
	}
	as := s.cfg.FSM.Assignments()
	// A node holding slots but no longer listed at all is dead too: sweep
	// leaves the slots of dead nodes to this check.
	for _, a := range as {
		if _, ok := s.dead[a.Node]; a.Node != "" && !alive[a.Node] && !ok {
			s.dead[a.Node] = now
		}
	}
	deadSince := make(map[string]time.Time, len(s.dead))
	for k, v := range s.dead {
		deadSince[k] = v
	}
	s.mu.Unlock()
	byReason := map[string][]fsm.Assignment{}
	for _, a := range as {
		// A yielded task runs on no node (it waits for async.finish): the
		// loss of the node that yielded it must not free the pool slot it
		// keeps (track_yielded). It ends by sweep or timeOut.
		if a.External || a.Yielded || a.Node == "" {
			continue
		}
		var reason string
		switch {
		case incs[a.Node].Incarnation != a.Incarnation:
			reason = fmt.Sprintf("node %s was lost while running the task (the node restarted)", a.Node)
		case !alive[a.Node]:
			since, ok := deadSince[a.Node]
			if !ok || now.Sub(since) < s.cfg.LostAfter {
				continue
			}
			reason = fmt.Sprintf("node %s was lost while running the task (declared dead at %s)", a.Node, since.UTC().Format(time.RFC3339))
		default:
			continue
		}
		byReason[reason] = append(byReason[reason], a)
	}
	for reason, list := range byReason {
		s.stopOrphans(ctx, list)
		s.resolveLost(ctx, term, reason, list, now)
	}
}

// stopOrphans ends the target sessions of the node processes behind list.
func (s *Scheduler) stopOrphans(ctx context.Context, list []fsm.Assignment) {
	if s.cfg.StopOrphans == nil {
		return
	}
	type proc struct{ node, inc string }
	seen := map[proc]bool{}
	for _, a := range list {
		p := proc{a.Node, a.Incarnation}
		if seen[p] || p.inc == "" {
			continue
		}
		seen[p] = true
		octx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := s.cfg.StopOrphans(octx, p.node, p.inc); err != nil {
			s.log.Warn("could not end the target sessions of a lost node process", "node", p.node, "incarnation", p.inc, "error", err)
		}
		cancel()
	}
}

func (s *Scheduler) resolveLost(ctx context.Context, term uint64, reason string, list []fsm.Assignment, now time.Time) {
	refs := make([]pgstore.Ref, len(list))
	for i, a := range list {
		refs[i] = pgstore.Ref{TaskID: a.TaskID, Attempt: a.Attempt}
	}
	res, err := s.cfg.Store.ResolveLost(ctx, term, reason, refs, now)
	if err != nil {
		s.log.Warn("resolve lost attempts", "error", err, "count", len(refs))
		return
	}
	counts := map[string]int{}
	items := make([]fsm.ReleaseItem, 0, len(res))
	for _, r := range res {
		counts[r.Outcome]++
		items = append(items, fsm.ReleaseItem{Ref: fsm.Ref{TaskID: r.TaskID, Attempt: r.Attempt}})
	}
	s.log.Warn("resolved attempts of a lost node", "reason", reason, "requeued", counts["requeued"],
		"failed", counts["failed"], "timed_out", counts["timed_out"], "skipped", counts["skipped"])
	s.commitRevokeRelease(ctx, nil, items)
}

// reconcile runs once per term before the first dispatch: it aligns the
// FSM's assignments with the task log.
func (s *Scheduler) reconcile(ctx context.Context, term uint64) error {
	inflight, err := s.cfg.Store.InFlightTasks(ctx)
	if err != nil {
		return err
	}
	as := s.cfg.FSM.Assignments()
	held := make(map[int64]fsm.Assignment, len(as))
	for _, a := range as {
		held[a.TaskID] = a
	}
	var unclaim []pgstore.Ref
	lost := map[string][]pgstore.Ref{} // by node
	for _, t := range inflight {
		if a, ok := held[t.TaskID]; ok && a.Attempt == t.Attempt {
			continue
		}
		if t.State != pgstore.StateRunning {
			// A yielded task needs no worker slot; one that keeps its pool
			// slot (track_yielded) has it recorded in the FSM.
			continue
		}
		ref := pgstore.Ref{TaskID: t.TaskID, Attempt: t.Attempt}
		// Claimed in Postgres but never committed in Raft: it cannot have
		// started unless something is badly wrong.
		if !t.Started {
			unclaim = append(unclaim, ref)
		} else {
			lost[t.Node] = append(lost[t.Node], ref)
		}
	}
	if len(unclaim) > 0 {
		if err := s.cfg.Store.Unclaim(ctx, term, unclaim); err != nil {
			return fmt.Errorf("requeue never-started tasks: %w", err)
		}
		s.log.Info("reconcile: requeued tasks claimed but never assigned", "count", len(unclaim))
	}
	// The reason names the node (D13): processing_error must say which
	// node possibly ran the task.
	for node, refs := range lost {
		reason := fmt.Sprintf("node %s was lost while running the task (it was started without an assignment recorded by this cluster: leader failover)", node)
		if _, err := s.cfg.Store.ResolveLost(ctx, term, reason, refs, s.cfg.Now()); err != nil {
			return fmt.Errorf("resolve unassigned started tasks: %w", err)
		}
	}
	// Assignments whose task ended or moved on are swept like any other,
	// at once: a new leader has no earlier sweep to go by.
	s.ended = nil
	s.sweep(ctx, term, true)
	return nil
}

// analyzeShare bounds keepStatistics' ANALYZEs to about a tenth of one
// server session's time: after an ANALYZE that took d, the next waits 9d.
// An ANALYZE that failed is not tried again for errorPause.
const (
	analyzeShare = 10
	errorPause   = 10 * time.Second
)

// keepStatistics analyses the task table, while this node leads, when the
// planner expects far fewer rows than the table holds
// (pgstore.TaskStatistics.Stale). Such an estimate, left by an ANALYZE or
// VACUUM of the emptied table, lasts until autovacuum next analyses it, a
// minute or more after a burst of pushes; the plans made meanwhile read
// every READY task at each claim, or all of task_pkey for every task id a
// statement looks up. It runs beside the dispatch loop: an ANALYZE samples
// up to 30,000 rows and must not hold up claims. An ANALYZE the server
// skipped (autovacuum holds the table) is tried again on the next tick.
func (s *Scheduler) keepStatistics(ctx context.Context) {
	tick := time.NewTicker(s.cfg.StatsEvery)
	defer tick.Stop()
	var next time.Time // no ANALYZE before
	warned := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st, err := s.cfg.Store.TaskStatistics(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Debug("read task table statistics", "error", err)
			}
			continue
		}
		if !st.Stale() || time.Now().Before(next) {
			continue
		}
		if !st.MayAnalyze {
			if !warned {
				s.log.Warn("the planner expects far fewer tasks than async.task holds, and this role may not ANALYZE it "+
					"(it must own the table or the database); plans stay poor until autovacuum analyses it",
					"planner_rows", int64(st.PlannerRows), "live_rows", st.LiveRows, "changed_rows", st.ChangedRows)
				warned = true
			}
			continue
		}
		began := time.Now()
		done, err := s.cfg.Store.AnalyzeTasks(ctx)
		switch {
		case err != nil:
			next = time.Now().Add(errorPause)
			if ctx.Err() == nil {
				s.log.Warn("analyze the task table", "error", err)
			}
		case !done:
			s.log.Debug("ANALYZE skipped async.task (another ANALYZE or a VACUUM holds it); trying again")
		default:
			took := time.Since(began)
			next = began.Add(analyzeShare * took)
			s.log.Info("analysed async.task: the planner expected far fewer tasks than it holds",
				"planner_rows", int64(st.PlannerRows), "live_rows", st.LiveRows, "changed_rows", st.ChangedRows,
				"took", took.Round(time.Millisecond))
		}
	}
}

// maintain runs heavy maintenance (history purge) when due. It reports the
// time of a run that completed, which the caller records in its config: a
// run must not repeat because the config was not reloaded yet.
func (s *Scheduler) maintain(ctx context.Context, term uint64, cfg pgstore.Config) (time.Time, bool) {
	now := s.cfg.Now()
	last := cfg.Control.LastHeavyMaintenance
	if last != nil && now.Sub(*last) < cfg.Control.HeavyMaintenanceSleep {
		return time.Time{}, false
	}
	n, err := s.cfg.Store.PurgeHistory(ctx, term, now)
	if err != nil {
		s.log.Warn("heavy maintenance", "error", err)
		return time.Time{}, false
	}
	s.log.Info("heavy maintenance: purged finished tasks", "deleted", n)
	return now, true
}
