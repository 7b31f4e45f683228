// Package agent assembles one asyncnode node: the server-database store,
// the replicated FSM, the cluster layer (Raft, gossip, node API), the
// executor and the leader's scheduler, and the glue between them.
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/asyncnode/asyncnode/cluster"
	"github.com/asyncnode/asyncnode/executor"
	"github.com/asyncnode/asyncnode/fsm"
	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/asyncnode/asyncnode/scheduler"
)

// Config configures one node.
type Config struct {
	NodeID     string
	DSN        string // server database; empty: libpq PG* environment variables
	DataDir    string
	RaftAddr   string
	GossipAddr string
	HTTPAddr   string
	Join       []string
	Voters     int
	Key        []byte
	Token      string
	TLSCert    string
	TLSKey     string
	TLSCA      string
	// MaxTasks caps the tasks this node runs at once (0: no cap beyond
	// control.workers and the pools).
	MaxTasks int
	// TargetConns caps the connections this node opens to one target (per
	// distinct connection string; 0: executor.DefaultMaxConnsPerTarget).
	TargetConns int
	// TargetShortConns bounds the connections to one target used at once
	// by tasks that have held theirs only briefly (0:
	// executor.DefaultShortConns).
	TargetShortConns int
	// TargetLongAfter is how long a task holds its target connection
	// before it stops counting against TargetShortConns (0:
	// executor.DefaultLongTaskAfter).
	TargetLongAfter time.Duration
	Log             hclog.Logger
	// Cluster timing overrides (tests).
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// CommitTimeout is Raft's commit timeout (0: cluster.DefaultCommitTimeout).
	CommitTimeout time.Duration
	// LostAfter is how long a node must be dead before its attempts are resolved.
	LostAfter time.Duration
	// Lease is how long this node keeps running its tasks without contact
	// with a Raft leader (default LostAfter/2, at least 1s): past it, it
	// stops them and records them as lost, so that the leader, which waits
	// LostAfter before resolving a silent node's tasks, never sees one
	// attempt running on two nodes.
	Lease time.Duration
	// Pprof serves Go profiles under /debug/pprof/ on the node API.
	Pprof bool
	// DrainTimeout bounds how long a graceful leave waits for running
	// tasks (default 10s); tasks still running then are stopped and end as
	// a lost node's tasks do.
	DrainTimeout time.Duration
}

// Agent is one running node.
type Agent struct {
	cfg   Config
	log   hclog.Logger
	inc   string
	store *pgstore.Store
	fsm   *fsm.FSM
	node  *cluster.Node
	exec  *executor.Executor
	sched *scheduler.Scheduler

	push     pushState
	pushStop context.CancelFunc

	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
	regMu  sync.Mutex
	drain  bool
}

// observer routes committed FSM changes to this node's executor and the
// scheduler. It runs inside Apply and never blocks.
type observer struct{ a *Agent }

func (o observer) mine(as []fsm.Assignment) []fsm.Assignment {
	ours := func(x fsm.Assignment) bool { return x.Node == o.a.cfg.NodeID && x.Incarnation == o.a.inc }
	n := 0
	for _, x := range as {
		if ours(x) {
			n++
		}
	}
	if n == 0 {
		return nil
	}
	out := make([]fsm.Assignment, 0, n)
	for _, x := range as {
		if ours(x) {
			out = append(out, x)
		}
	}
	return out
}

func (o observer) Assigned(as []fsm.Assignment) {
	o.a.pushAssigned(as)
	mine := o.a.notPushed(o.mine(as))
	if len(mine) == 0 || o.a.exec == nil {
		return
	}
	o.a.exec.Submit(works(mine))
}

func (o observer) Revoked(as []fsm.Assignment) {
	mine := o.mine(as)
	if len(mine) == 0 || o.a.exec == nil {
		return
	}
	refs := make([]pgstore.Ref, len(mine))
	for i, x := range mine {
		refs[i] = pgstore.Ref{TaskID: x.TaskID, Attempt: x.Attempt}
	}
	o.a.exec.Revoke(refs)
}

func (o observer) Released(refs []fsm.Ref) {
	// A slot released while its attempt still runs here means the leader
	// settled the attempt without us (e.g. it resolved this node as lost
	// while the process was frozen): stop it. For attempts this node
	// reported itself, Revoke finds nothing running and does nothing.
	if o.a.exec != nil && len(refs) > 0 {
		stop := make([]pgstore.Ref, len(refs))
		for i, r := range refs {
			stop[i] = pgstore.Ref{TaskID: r.TaskID, Attempt: r.Attempt}
		}
		if o.a.exec.Revoke(stop) > 0 {
			// Settled without us: the leader resolved this process as
			// lost and, before that, ended its sessions on the targets.
			o.a.exec.ResetConnections()
		}
	}
	if o.a.sched != nil {
		o.a.sched.Wake()
	}
}

// reporter sends executor completions to the leader through Raft.
type reporter struct{ a *Agent }

func (r reporter) Report(ctx context.Context, done []executor.Done) error {
	items := make([]fsm.ReleaseItem, len(done))
	for i, d := range done {
		items[i] = fsm.ReleaseItem{Ref: fsm.Ref{TaskID: d.TaskID, Attempt: d.Attempt}, Yielded: d.Yielded, HoldPool: d.HoldPool}
	}
	if r.a.node.IsLeader() {
		if err := r.a.sched.Release(ctx, items); !errors.Is(err, scheduler.ErrNotDispatching) {
			return err
		}
	}
	b, err := fsm.Encode(fsm.MsgRelease, fsm.Release{Items: items})
	if err != nil {
		return err
	}
	_, err = r.a.node.Apply(ctx, b)
	return err
}

// forwarded runs on the leader for each command a follower forwards: a
// Release goes to the scheduler, which commits it with the next
// assignments (see Scheduler.Release); anything else, and a Release while
// the scheduler does not dispatch, goes to Raft as usual.
func (a *Agent) forwarded(ctx context.Context, cmd []byte) ([]byte, bool, error) {
	if len(cmd) == 0 || fsm.MessageType(cmd[0]) != fsm.MsgRelease || a.sched == nil {
		return nil, false, nil
	}
	var rel fsm.Release
	if err := json.Unmarshal(cmd[1:], &rel); err != nil {
		return nil, false, nil // Raft's FSM refuses it with its own error
	}
	if err := a.sched.Release(ctx, rel.Items); err != nil {
		if errors.Is(err, scheduler.ErrNotDispatching) {
			return nil, false, nil
		}
		return nil, true, err
	}
	return nil, true, nil
}

// New validates cfg and builds the node's parts (nothing runs yet).
func New(cfg Config) (*Agent, error) {
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	if cfg.NodeID == "" {
		return nil, errors.New("agent: node id is required")
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("agent: incarnation: %w", err)
	}
	a := &Agent{cfg: cfg, log: cfg.Log.With("node", cfg.NodeID), inc: hex.EncodeToString(b[:])}
	a.fsm = fsm.New(observer{a})
	a.push.ctx, a.pushStop = context.WithCancel(context.Background())
	a.push.senders = map[string]chan assignedBatch{}
	a.push.pushed = map[fsm.Ref]time.Time{}
	return a, nil
}

// Incarnation identifies this process of the node.
func (a *Agent) Incarnation() string { return a.inc }

// FSM exposes the replicated state (read-only use).
func (a *Agent) FSM() *fsm.FSM { return a.fsm }

// Cluster exposes the cluster node.
func (a *Agent) Cluster() *cluster.Node { return a.node }

// Scheduler exposes the leader scheduler.
func (a *Agent) Scheduler() *scheduler.Scheduler { return a.sched }

// Start connects to the server database, checks its schema, starts the
// cluster layer and the loops.
func (a *Agent) Start(ctx context.Context) error {
	store, err := pgstore.Open(ctx, a.cfg.DSN, a.log)
	if err != nil {
		return err
	}
	if err := store.CheckSchema(ctx); err != nil {
		store.Close()
		return err
	}
	a.store = store
	node, err := cluster.New(cluster.Config{
		NodeID: a.cfg.NodeID, DataDir: a.cfg.DataDir, RaftAddr: a.cfg.RaftAddr, GossipAddr: a.cfg.GossipAddr,
		HTTPAddr: a.cfg.HTTPAddr, Join: a.cfg.Join, Voters: a.cfg.Voters, Key: a.cfg.Key, Token: a.cfg.Token,
		TLSCert: a.cfg.TLSCert, TLSKey: a.cfg.TLSKey, TLSCA: a.cfg.TLSCA, Log: a.log, BeforeLeave: a.beforeLeave,
		HeartbeatTimeout: a.cfg.HeartbeatTimeout, ElectionTimeout: a.cfg.ElectionTimeout, LeaderLeaseTimeout: a.cfg.LeaderLeaseTimeout,
		CommitTimeout: a.cfg.CommitTimeout, Forwarded: a.forwarded,
	}, a.fsm)
	if err != nil {
		store.Close()
		return err
	}
	a.node = node
	exec, err := executor.New(executor.Config{Node: a.cfg.NodeID, Incarnation: a.inc, ServerDSN: a.cfg.DSN, Log: a.log,
		MaxConnsPerTarget: a.cfg.TargetConns, ShortConnsPerTarget: a.cfg.TargetShortConns,
		LongTaskAfter: a.cfg.TargetLongAfter}, store, reporter{a})
	if err != nil {
		store.Close()
		return err
	}
	a.exec = exec
	sched, err := scheduler.New(scheduler.Config{NodeID: a.cfg.NodeID, Store: store, Raft: node, FSM: a.fsm,
		Nodes: a.nodes, Log: a.log, LostAfter: a.cfg.LostAfter, StopOrphans: a.stopOrphans})
	if err != nil {
		store.Close()
		return err
	}
	a.sched = sched
	a.registerAPI()
	if err := node.Start(ctx); err != nil {
		store.Close()
		return err
	}
	rctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	a.goRun(func() { _ = exec.Run(rctx) })
	a.goRun(func() { _ = sched.Run(rctx) })
	a.goRun(func() { _ = store.Listen(rctx, sched.Notify) })
	a.goRun(func() { a.register(rctx) })
	a.goRun(func() { a.watchLease(rctx) })
	a.log.Info("node started", "incarnation", a.inc, "api", node.APIAddr(), "raft", node.RaftAddr(), "gossip", node.GossipAddr())
	return nil
}

func (a *Agent) goRun(fn func()) {
	a.wg.Add(1)
	go func() { defer a.wg.Done(); fn() }()
}

// register announces this process's incarnation (and caps) through Raft,
// retrying until it is committed.
func (a *Agent) register(ctx context.Context) {
	for {
		err := a.applyRegistration(ctx)
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (a *Agent) applyRegistration(ctx context.Context) error {
	a.regMu.Lock()
	reg := fsm.Register{Node: a.cfg.NodeID, Incarnation: a.inc, MaxTasks: a.cfg.MaxTasks, Draining: a.drain}
	a.regMu.Unlock()
	b, err := fsm.Encode(fsm.MsgRegister, reg)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = a.node.Apply(actx, b)
	return err
}

// nodes lists the task-running nodes for the scheduler: cluster members
// that registered their current incarnation.
func (a *Agent) nodes() []scheduler.NodeInfo {
	regs := a.fsm.Nodes()
	alive := map[string]bool{a.cfg.NodeID: true}
	for _, m := range a.node.Members() {
		alive[m.ID] = m.Health == "alive" || m.Health == "suspect"
	}
	out := make([]scheduler.NodeInfo, 0, len(regs))
	for id, r := range regs {
		out = append(out, scheduler.NodeInfo{ID: id, MaxTasks: r.MaxTasks, Alive: alive[id], Draining: r.Draining})
	}
	return out
}

func (a *Agent) lease() time.Duration {
	if a.cfg.Lease > 0 {
		return a.cfg.Lease
	}
	return DefaultLease(a.cfg.LostAfter)
}

// DefaultLease is the lease a node uses when none is configured: half of
// lostAfter, at least one second.
func DefaultLease(lostAfter time.Duration) time.Duration {
	return max(lostAfter/2, time.Second)
}

// watchLease gives up this node's attempts once it has been out of contact
// with any Raft leader for longer than its lease (a partition, or a cluster
// without quorum): their queries are stopped and their tasks re-queued or
// failed as D13 says, before the leader may hand them to another node.
func (a *Agent) watchLease(ctx context.Context) {
	lease := a.lease()
	tick := time.NewTicker(min(lease/4, 250*time.Millisecond))
	defer tick.Stop()
	var leaderAt time.Time // last time this node itself led
	expired := false
	lastTick := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		gap := now.Sub(lastTick)
		lastTick = now
		if gap > lease {
			// This process did not run for longer than its lease (SIGSTOP,
			// a VM pause, starvation): whatever Raft still believes, the
			// cluster may have resolved its tasks meanwhile.
			reason := fmt.Sprintf("node %s was lost: the process was frozen for %s, so it stopped the task",
				a.cfg.NodeID, gap.Round(time.Millisecond))
			n := a.exec.Abandon(reason)
			a.log.Warn("lease expired: this process was frozen", "for", gap.Round(time.Millisecond), "lease", lease, "stopped", n)
			leaderAt = time.Time{}
			continue
		}
		if a.node.IsLeader() {
			leaderAt, expired = now, false
			continue
		}
		contact := a.node.Raft().LastContact()
		if leaderAt.After(contact) {
			contact = leaderAt
		}
		if contact.IsZero() || now.Sub(contact) <= lease {
			expired = false
			continue
		}
		reason := fmt.Sprintf("node %s was lost: no contact with the cluster leader for %s, so it stopped the task",
			a.cfg.NodeID, now.Sub(contact).Round(time.Millisecond))
		if n := a.exec.Abandon(reason); n > 0 || !expired {
			a.log.Warn("lease expired: no contact with the leader", "since", contact.Format(time.RFC3339Nano), "lease", lease, "stopped", n)
		}
		expired = true
	}
}

// stopOrphans ends, on the server database and every configured target,
// the sessions of a lost node process, so its queries stop before its
// tasks are re-run elsewhere.
func (a *Agent) stopOrphans(ctx context.Context, node, incarnation string) error {
	cfg, err := a.store.LoadConfig(ctx)
	if err != nil {
		return err
	}
	app := executor.AppName(node, incarnation)
	seen := map[string]bool{}
	var errs []error
	total := 0
	conns := []*string{nil} // the server database (SELF)
	for _, t := range cfg.Targets {
		conns = append(conns, t.ConnString)
	}
	for _, c := range conns {
		key := "\x00self"
		if c != nil {
			key = *c
		}
		if seen[key] {
			continue
		}
		seen[key] = true
		n, err := a.exec.TerminateSessions(ctx, c, app)
		if err != nil {
			errs = append(errs, err)
		}
		total += n
	}
	if total > 0 {
		a.log.Warn("ended the target sessions of a lost node process", "node", node, "incarnation", incarnation, "sessions", total)
	}
	return errors.Join(errs...)
}

// beforeLeave drains the node when it is asked to leave the cluster.
func (a *Agent) beforeLeave(ctx context.Context) error {
	d := a.cfg.DrainTimeout
	if d <= 0 {
		d = 10 * time.Second
	}
	dctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	a.log.Info("leaving: no new tasks; waiting for running ones", "timeout", d)
	return a.Drain(dctx)
}

// Left is closed once the node has left the cluster (asyncnode leave);
// the process should then stop.
func (a *Agent) Left() <-chan struct{} { return a.node.Left() }

// Drain stops this node from taking new tasks and waits (bounded by ctx)
// for its running tasks to finish.
func (a *Agent) Drain(ctx context.Context) error {
	a.regMu.Lock()
	a.drain = true
	a.regMu.Unlock()
	if err := a.applyRegistration(ctx); err != nil {
		a.log.Warn("drain: could not announce draining", "error", err)
	}
	return a.exec.Drain(ctx)
}

// Stop stops the node: loops, cluster layer, connections. Idempotent.
func (a *Agent) Stop(ctx context.Context) error {
	var err error
	a.once.Do(func() {
		a.push.mu.Lock()
		a.pushStop() // under the lock: no sender starts after this
		a.push.mu.Unlock()
		if a.cancel != nil {
			a.cancel()
		}
		a.wg.Wait()
		if a.node != nil {
			err = a.node.Stop(ctx)
		}
		if a.store != nil {
			a.store.Close()
		}
	})
	return err
}
