package cluster

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	bolt "go.etcd.io/bbolt"
)

// Role is a member's place in Raft.
type Role string

// Roles of a Member.
const (
	RoleLeader   Role = "leader"
	RoleVoter    Role = "voter"
	RoleNonvoter Role = "nonvoter"
	RoleNone     Role = "none" // in gossip, not (yet) in the Raft configuration
)

// Member is one node of the cluster as seen from the local node.
type Member struct {
	ID         string `json:"id"`
	RaftAddr   string `json:"raft_addr"`
	APIAddr    string `json:"api_addr"`
	GossipAddr string `json:"gossip_addr"`
	Role       Role   `json:"role"`
	// Health is the gossip state: alive, suspect, dead, left, or unknown
	// (in Raft but never seen in gossip).
	Health string `json:"health"`
	// LastContact is the last sign of life: on the leader, Raft heartbeats to
	// followers; for the leader on a follower, its last Raft contact; else
	// the last gossip probe answered. Zero when never seen.
	LastContact time.Time `json:"last_contact"`
}

const (
	clusterIDKey    = "asyncnode.cluster_id"
	raftDBFile      = "raft.db"
	snapshotsRetain = 2
	raftMaxPool     = 3
	raftIOTimeout   = 10 * time.Second
	reconcileEvery  = time.Second
	changeTimeout   = 5 * time.Second
	// leaderWatchEvery is how often a forwarded command checks whether the
	// leader it was sent to is still the leader.
	leaderWatchEvery = 50 * time.Millisecond
)

// logStableStore is Raft's log and stable store in one (raft-boltdb).
type logStableStore interface {
	raft.LogStore
	raft.StableStore
	Close() error
}

func openBoltStore(dir string) (logStableStore, error) {
	return raftboltdb.New(raftboltdb.Options{
		Path:        filepath.Join(dir, raftDBFile),
		BoltOptions: &bolt.Options{Timeout: 2 * time.Second},
	})
}

// isNotFound matches a stable store's missing key (raft's own convention).
func isNotFound(err error) bool {
	return errors.Is(err, raftboltdb.ErrKeyNotFound) || err.Error() == "not found"
}

// Node is one asyncnode cluster member: Raft, gossip and the node API.
type Node struct {
	cfg     Config
	fsm     raft.FSM
	log     hclog.Logger
	mux     *http.ServeMux
	members *memberTable

	lifeMu  sync.Mutex
	started bool
	stopped bool

	// Set by Start, read-only afterwards.
	raft          *raft.Raft
	trans         *raft.NetworkTransport
	stream        *streamLayer
	store         logStableStore
	list          *memberlist.Memberlist
	httpSrv       *http.Server
	httpLn        net.Listener
	tls           *tlsConfigs
	client        *Client // forwarding client (token, TLS)
	observer      *raft.Observer
	raftAddr      string // advertised
	apiAddr       string // advertised
	gossipAddr    string // advertised
	resumed       bool   // started from an existing data dir
	probeInterval time.Duration
	clusterID     string // as read at start; later see meta.Cluster

	metaMu    sync.Mutex
	meta      nodeMeta
	refusal   error       // last membership refusal seen by the merge delegate
	metaDirty atomic.Bool // meta changed: re-announce it

	hbMu     sync.Mutex
	failedHB map[raft.ServerID]time.Time // leader view: followers failing heartbeats

	tombMu sync.Mutex
	tombs  map[string]time.Time // ids removed on request: never re-added while alive

	leaderCh    chan bool
	reconcileCh chan struct{}
	stopCh      chan struct{}
	wg          sync.WaitGroup
	left        chan struct{}
	leftOnce    sync.Once
	stopErr     error
}

// New validates cfg and returns a node that is not running yet. fsm is the
// caller's state machine: its Apply must return a []byte, an error or nil.
func New(cfg Config, fsm raft.FSM) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if fsm == nil {
		return nil, errors.New("cluster: fsm is required")
	}
	cfg = cfg.withDefaults()
	n := &Node{
		cfg:         cfg,
		fsm:         fsm,
		log:         cfg.Log.With("node", cfg.NodeID),
		mux:         http.NewServeMux(),
		members:     newMemberTable(),
		failedHB:    map[raft.ServerID]time.Time{},
		tombs:       map[string]time.Time{},
		leaderCh:    make(chan bool, 1),
		reconcileCh: make(chan struct{}, 1),
		stopCh:      make(chan struct{}),
		left:        make(chan struct{}),
	}
	n.routes()
	return n, nil
}

// Handle registers an extra API handler (token auth applies). It must be
// called before Start; it panics afterwards, or on a duplicate pattern.
func (n *Node) Handle(pattern string, h http.Handler) {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	if n.started {
		panic("cluster: Handle called after Start")
	}
	n.mux.Handle(pattern, h)
}

// Start opens the data directory, starts Raft (bootstrapping a new cluster
// only with an empty data directory and no Join addresses), the API and
// gossip, and joins the Join addresses, retrying until ctx is done. A join
// refused by the cluster (duplicate id or address) fails at once. On error
// everything started is stopped again.
func (n *Node) Start(ctx context.Context) error {
	join, err := n.start()
	if err != nil || !join {
		return err
	}
	if err := n.joinRetry(ctx, n.cfg.Join); err != nil {
		_ = n.Stop(context.Background())
		return err
	}
	return nil
}

func (n *Node) start() (joinNow bool, err error) {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	if n.started {
		return false, errors.New("cluster: node already started")
	}
	n.started = true
	defer func() {
		if err != nil {
			n.stopped = true
			close(n.stopCh)
			n.teardown(context.Background())
		}
	}()

	if err := os.MkdirAll(n.cfg.DataDir, 0o700); err != nil {
		return false, fmt.Errorf("cluster: data dir: %w", err)
	}
	if n.cfg.TLSCert != "" {
		if n.tls, err = loadTLS(n.cfg.TLSCert, n.cfg.TLSKey, n.cfg.TLSCA); err != nil {
			return false, err
		}
	}
	if err := n.startRaft(); err != nil {
		return false, err
	}
	if err := n.listenHTTP(); err != nil {
		return false, err
	}
	var clientTLS *tls.Config
	if n.tls != nil {
		clientTLS = n.tls.client
	}
	n.client = NewClient("", n.cfg.Token, clientTLS)
	n.setMeta(nodeMeta{V: metaVersion, Cluster: n.clusterID, Raft: n.raftAddr, API: n.apiAddr, Voter: !n.cfg.NonVoter})
	if len(n.metaBytes()) > memberlist.MetaMaxSize {
		return false, fmt.Errorf("cluster: node metadata is %d bytes, more than memberlist's %d: shorten the advertised addresses", len(n.metaBytes()), memberlist.MetaMaxSize)
	}
	if err := n.startGossip(); err != nil {
		return false, err
	}
	n.serveHTTP()

	obsCh := make(chan raft.Observation, 64)
	n.observer = raft.NewObserver(obsCh, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation, raft.LeaderObservation:
			return true
		}
		return false
	})
	n.raft.RegisterObserver(n.observer)

	var remembered []string
	if len(n.cfg.Join) == 0 && n.resumed {
		remembered = readPeers(n.cfg.DataDir)
	}
	n.wg.Add(4)
	go n.monitorLeadership()
	go n.observe(obsCh)
	go n.reconcileLoop()
	go n.reconnectLoop(remembered)

	n.log.Info("node started", "raft", n.raftAddr, "gossip", n.gossipAddr, "api", n.apiAddr,
		"resumed", n.resumed, "voters", n.cfg.Voters, "tls", n.tls != nil, "gossip_encrypted", n.cfg.Key != nil)

	if len(n.cfg.Join) == 0 {
		if len(remembered) > 0 {
			n.wg.Add(1)
			go n.rejoinRemembered(remembered)
		}
		return false, nil
	}
	// Join without holding lifeMu, so that Stop can interrupt it.
	return true, nil
}

func (n *Node) startRaft() error {
	rlog := n.log.Named("raft")
	if err := checkDataDir(n.cfg.DataDir); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	store, err := openBoltStore(n.cfg.DataDir)
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return fmt.Errorf("cluster: open %s (is another node using data dir %s?): %w", raftDBFile, n.cfg.DataDir, err)
		}
		return fmt.Errorf("cluster: open %s in data dir %s: %w", raftDBFile, n.cfg.DataDir, err)
	}
	n.store = store
	snaps, err := raft.NewFileSnapshotStoreWithLogger(n.cfg.DataDir, snapshotsRetain, rlog)
	if err != nil {
		return fmt.Errorf("cluster: snapshot store: %w", err)
	}

	ln, err := net.Listen("tcp", n.cfg.RaftAddr)
	if err != nil {
		return fmt.Errorf("cluster: raft listen %s: %w", n.cfg.RaftAddr, err)
	}
	adv, err := advertiseFor(ln.Addr(), n.cfg.RaftAdvertise, "")
	if err != nil {
		_ = ln.Close()
		return fmt.Errorf("cluster: raft advertise: %w", err)
	}
	n.raftAddr = adv
	dial := n.cfg.RaftDialer
	if dial == nil {
		dial = tcpDial
	}
	sl := &streamLayer{ln: ln, advertise: advAddr(adv), dial: dial}
	if n.tls != nil {
		sl.ln = tls.NewListener(ln, n.tls.raftServer)
		sl.tls = n.tls.client
	}
	n.stream = sl
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  sl,
		MaxPool: raftMaxPool,
		Timeout: raftIOTimeout,
		Logger:  rlog,
	})

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.NodeID)
	rc.Logger = rlog
	rc.HeartbeatTimeout = n.cfg.HeartbeatTimeout
	rc.ElectionTimeout = n.cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = n.cfg.LeaderLeaseTimeout
	rc.CommitTimeout = n.cfg.CommitTimeout
	// A node removed while cut off keeps running and can be added again.
	rc.ShutdownOnRemove = false
	if n.cfg.SnapshotInterval > 0 {
		rc.SnapshotInterval = n.cfg.SnapshotInterval
	}
	if n.cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = n.cfg.SnapshotThreshold
	}
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("cluster: raft config: %w", err)
	}

	existing, err := raft.HasExistingState(store, store, snaps)
	if err != nil {
		return fmt.Errorf("cluster: read data dir: %w", err)
	}
	n.resumed = existing
	cid, err := store.Get([]byte(clusterIDKey))
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("cluster: read cluster id: %w", err)
	}
	n.clusterID = string(cid)
	if !existing && len(n.cfg.Join) == 0 {
		if n.clusterID == "" {
			var b [12]byte
			if _, err := rand.Read(b[:]); err != nil {
				return fmt.Errorf("cluster: cluster id: %w", err)
			}
			n.clusterID = hex.EncodeToString(b[:])
			if err := store.Set([]byte(clusterIDKey), []byte(n.clusterID)); err != nil {
				return fmt.Errorf("cluster: store cluster id: %w", err)
			}
		}
		n.log.Info("bootstrapping a new cluster", "cluster", n.clusterID, "voter", n.cfg.NodeID, "raft", adv)
		boot := raft.Configuration{Servers: []raft.Server{{
			Suffrage: raft.Voter, ID: rc.LocalID, Address: raft.ServerAddress(adv),
		}}}
		if err := raft.BootstrapCluster(rc, store, store, snaps, n.trans, boot); err != nil {
			return fmt.Errorf("cluster: bootstrap: %w", err)
		}
	} else if existing {
		n.log.Info("resuming from data dir", "dir", n.cfg.DataDir)
	} else {
		n.log.Info("empty data dir: waiting for the leader to add this node", "join", n.cfg.Join)
	}

	r, err := raft.NewRaft(rc, n.fsm, store, store, snaps, n.trans)
	if err != nil {
		return fmt.Errorf("cluster: start raft: %w", err)
	}
	n.raft = r
	return nil
}

func (n *Node) startGossip() error {
	host, port, err := splitPort(n.cfg.GossipAddr)
	if err != nil {
		return fmt.Errorf("cluster: gossip_addr: %w", err)
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = n.cfg.NodeID
	mc.BindAddr = host
	mc.BindPort = port
	if n.cfg.GossipAdvertise != "" {
		ah, ap, err := splitPort(n.cfg.GossipAdvertise)
		if err != nil {
			return fmt.Errorf("cluster: gossip_advertise: %w", err)
		}
		mc.AdvertiseAddr = ah
		mc.AdvertisePort = ap
	}
	mc.Label = gossipLabel
	if n.cfg.Key != nil {
		mc.SecretKey = append([]byte(nil), n.cfg.Key...)
	}
	d := gossipDelegate{n: n}
	mc.Delegate = d
	mc.Events = d
	mc.Conflict = d
	mc.Merge = d
	mc.Alive = d
	mc.Ping = d
	mc.DeadNodeReclaimTime = 10 * time.Second
	mc.LogOutput = nil
	mc.Logger = n.log.Named("memberlist").StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})
	if p := n.cfg.ProbeInterval; p > 0 {
		mc.ProbeInterval = p
		mc.ProbeTimeout = p / 2
		if g := p / 5; g < mc.GossipInterval {
			mc.GossipInterval = g
		}
		if pp := 10 * p; pp < mc.PushPullInterval {
			mc.PushPullInterval = pp
		}
	}
	if n.cfg.GossipWrap != nil {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{host}, BindPort: port, Logger: mc.Logger})
		if err != nil {
			return fmt.Errorf("cluster: gossip: %w", err)
		}
		if port == 0 {
			mc.BindPort = nt.GetAutoBindPort()
			if n.cfg.GossipAdvertise == "" {
				mc.AdvertisePort = mc.BindPort
			}
		}
		mc.Transport = n.cfg.GossipWrap(nt)
	}
	// memberlist publishes its chosen port back into mc; the gossip address
	// is read from the local node below.
	n.probeInterval = mc.ProbeInterval
	list, err := memberlist.Create(mc)
	if err != nil {
		return fmt.Errorf("cluster: gossip: %w", err)
	}
	n.list = list
	n.gossipAddr = gossipAddrOf(list.LocalNode())
	if ip := list.LocalNode().Addr; ip == nil || ip.IsUnspecified() {
		return fmt.Errorf("cluster: gossip advertises %s: set gossip_advertise", n.gossipAddr)
	}
	return nil
}

// joinRetry joins the gossip pool through addrs, retrying with backoff
// until ctx is done. A refusal by the cluster is final.
func (n *Node) joinRetry(ctx context.Context, addrs []string) error {
	wait := 100 * time.Millisecond
	for {
		if n.list.NumMembers() > 1 && n.ClusterID() != "" {
			n.log.Info("already joined through another address")
			return nil
		}
		joined, err := n.joinOnce(addrs)
		if err == nil {
			n.log.Info("joined gossip", "contacted", joined)
			return nil
		}
		if errors.Is(err, ErrRefused) {
			return fmt.Errorf("cluster: join: %w", err)
		}
		n.log.Warn("join failed, retrying", "addrs", addrs, "error", err, "wait", wait)
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: join %v: %w (last error: %v)", addrs, ctx.Err(), err)
		case <-n.stopCh:
			return ErrStopped
		case <-time.After(wait):
		}
		if wait *= 2; wait > 2*time.Second {
			wait = 2 * time.Second
		}
	}
}

func (n *Node) joinOnce(addrs []string) (int, error) {
	n.metaMu.Lock()
	n.refusal = nil
	n.metaMu.Unlock()
	joined, err := n.list.Join(addrs)
	if err == nil {
		return joined, nil
	}
	n.metaMu.Lock()
	ref := n.refusal
	n.metaMu.Unlock()
	if ref != nil {
		return 0, ref
	}
	return 0, err
}

// refuse records a membership refusal for joinRetry and returns it.
func (n *Node) refuse(err error) error {
	n.metaMu.Lock()
	n.refusal = err
	n.metaMu.Unlock()
	n.log.Error("membership refused", "error", err)
	return err
}

// rejoinRemembered tries, in the background, the gossip peers remembered
// in the data directory until another member is seen. Remembered peers
// that are still unknown after that are tried by reconnectLoop.
func (n *Node) rejoinRemembered(peers []string) {
	defer n.wg.Done()
	wait := 200 * time.Millisecond
	for {
		if n.list.NumMembers() > 1 {
			return
		}
		if _, err := n.joinOnce(peers); err == nil {
			n.log.Info("rejoined remembered gossip peers")
			return
		} else if errors.Is(err, ErrRefused) {
			n.log.Error("rejoin refused", "error", err)
			return
		}
		select {
		case <-n.stopCh:
			return
		case <-time.After(wait):
		}
		if wait *= 2; wait > 10*time.Second {
			wait = 10 * time.Second
		}
	}
}

// reconnectEvery is how often a node contacts the members it sees dead.
const reconnectEvery = 2 * time.Second

// rememberedFor is how long after a restart reconnectLoop keeps contacting
// remembered gossip peers that no member has been seen at.
const rememberedFor = 10 * time.Minute

// reconnectLoop contacts, every reconnectEvery, the members this node sees
// dead (not left), as Serf's reconnect does. memberlist alone never
// retries them: after a partition heals, each side keeps the other dead
// (an alive message with the same incarnation is ignored, and the dead
// broadcasts were used up during the partition, so no node refutes) until
// the dead state is reclaimed about 30 s later — while Raft already
// reaches the node again, the leader would remove it as dead and the node,
// seeing no live leader, could not forward to it. A join is a push/pull
// exchange: each side then sees itself reported dead and refutes it.
//
// For rememberedFor after a restart it also contacts the remembered gossip
// peers (remembered, from the data directory) at which no member has been
// seen: when a whole cluster restarts, rejoinRemembered stops at the first
// peer it reaches, and a peer that starts a moment later and remembers
// nobody (killed before it saved its peers) would otherwise never be
// contacted; the leader would remove it from Raft as unknown to gossip.
func (n *Node) reconnectLoop(remembered []string) {
	defer n.wg.Done()
	tick := time.NewTicker(reconnectEvery)
	defer tick.Stop()
	rememberUntil := time.Now().Add(rememberedFor)
	for {
		select {
		case <-n.stopCh:
			return
		case <-n.left:
			return
		case <-tick.C:
		}
		var ids, addrs []string
		seen := map[string]bool{}
		for id, m := range n.members.snapshot() {
			seen[m.Gossip] = true
			if id != n.cfg.NodeID && m.Health == HealthDead && m.Gossip != "" {
				ids, addrs = append(ids, id), append(addrs, m.Gossip)
			}
		}
		if len(remembered) > 0 && time.Now().Before(rememberUntil) {
			for _, a := range remembered {
				if !seen[a] {
					ids, addrs = append(ids, "remembered "+a), append(addrs, a)
				}
			}
		}
		if len(addrs) == 0 {
			continue
		}
		// A dial to an unreachable host can take memberlist's TCPTimeout:
		// Stop does not wait for it (the join fails on a shut-down list).
		done := make(chan struct{})
		go func() {
			defer close(done)
			if k, err := n.list.Join(addrs); err != nil {
				n.log.Debug("members seen dead, or remembered and not seen, still unreachable", "members", ids, "error", err)
			} else {
				n.log.Info("reached members seen dead, or remembered and not seen", "members", ids, "reached", k)
			}
		}()
		select {
		case <-done:
		case <-n.stopCh:
			return
		}
	}
}

// Stop shuts the node down: Raft, gossip (without a leave broadcast, so
// the node keeps its Raft seat for a restart) and the API. Idempotent;
// ctx bounds the wait for in-flight API calls.
func (n *Node) Stop(ctx context.Context) error {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	if !n.started || n.stopped {
		return n.stopErr
	}
	n.stopped = true
	close(n.stopCh)
	n.stopErr = n.teardown(ctx)
	n.log.Info("node stopped")
	return n.stopErr
}

// teardown stops whatever Start got running. Called once, with stopCh
// closed.
func (n *Node) teardown(ctx context.Context) error {
	var errs []error
	if n.raft != nil {
		if err := n.raft.Shutdown().Error(); err != nil {
			errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
		}
		if n.observer != nil {
			n.raft.DeregisterObserver(n.observer)
		}
	}
	if n.list != nil {
		if err := n.list.Shutdown(); err != nil {
			errs = append(errs, fmt.Errorf("gossip shutdown: %w", err))
		}
	}
	if n.httpSrv != nil {
		if err := n.httpSrv.Shutdown(ctx); err != nil {
			_ = n.httpSrv.Close()
		}
	} else if n.httpLn != nil {
		_ = n.httpLn.Close()
	}
	n.wg.Wait()
	if n.client != nil {
		n.client.CloseIdleConnections()
	}
	if n.trans != nil {
		if err := n.trans.Close(); err != nil {
			errs = append(errs, fmt.Errorf("raft transport: %w", err))
		}
		n.stream.closeAll()
	}
	if n.store != nil {
		if err := n.store.Close(); err != nil {
			errs = append(errs, fmt.Errorf("raft store: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (n *Node) running() bool {
	select {
	case <-n.stopCh:
		return false
	default:
		return n.raft != nil
	}
}

// Left is closed once the node has left the cluster (Leave or POST
// /v1/leave). The process should then drain its work and Stop.
func (n *Node) Left() <-chan struct{} { return n.left }

// Leave removes the node from the cluster for good: a leader first hands
// leadership to another voter; the leader then removes this node from the
// Raft configuration; finally the node leaves the gossip pool (peers see it
// as left). The node keeps running until Stop.
func (n *Node) Leave(ctx context.Context) error {
	if !n.running() {
		return ErrStopped
	}
	n.log.Info("leaving the cluster")
	// Announce the intent first, so that no leader adds us back meanwhile.
	m := n.getMeta()
	m.Leaving = true
	n.setMeta(m)
	if err := n.list.UpdateNode(changeTimeout); err != nil {
		n.log.Warn("could not announce leaving", "error", err)
	}
	if n.IsLeader() {
		if err := n.handOff(ctx); err != nil {
			return fmt.Errorf("cluster: leave: %w", err)
		}
	}
	if err := n.removeSelf(ctx); err != nil {
		return fmt.Errorf("cluster: leave: %w", err)
	}
	timeout := changeTimeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = max(time.Until(dl), 100*time.Millisecond)
	}
	if err := n.list.Leave(timeout); err != nil {
		return fmt.Errorf("cluster: leave gossip: %w", err)
	}
	n.leftOnce.Do(func() { close(n.left) })
	n.log.Info("left the cluster")
	return nil
}

// handOff transfers leadership to another voter, promoting a healthy
// non-voter first when this node is the only voter.
func (n *Node) handOff(ctx context.Context) error {
	servers, err := n.configuration()
	if err != nil {
		return err
	}
	self := raft.ServerID(n.cfg.NodeID)
	others, nonvoters := 0, []raft.Server{}
	for _, s := range servers {
		if s.ID == self {
			continue
		}
		if s.Suffrage == raft.Voter {
			others++
		} else if n.healthy(string(s.ID)) {
			nonvoters = append(nonvoters, s)
		}
	}
	if others == 0 {
		if len(nonvoters) == 0 {
			return errOnlyServer
		}
		p := nonvoters[0]
		n.log.Info("promoting a non-voter before handing off leadership", "member", p.ID)
		if err := n.raft.AddVoter(p.ID, p.Address, 0, changeTimeout).Error(); err != nil {
			return fmt.Errorf("promote %s: %w", p.ID, err)
		}
	}
	n.log.Info("transferring leadership before leaving")
	if err := n.raft.LeadershipTransfer().Error(); err != nil {
		return fmt.Errorf("leadership transfer: %w", err)
	}
	return n.waitFor(ctx, func() bool {
		_, id := n.raft.LeaderWithID()
		return id != "" && id != self
	})
}

// errOnlyServer refuses to leave a cluster that would be left without servers.
var errOnlyServer = fmt.Errorf("%w: this node is the only server of the cluster: stop it instead", ErrRefused)

// checkCanLeave refuses a leave that cannot succeed: the last server of
// the cluster cannot leave it.
func (n *Node) checkCanLeave() error {
	servers, err := n.configuration()
	if err != nil {
		return err
	}
	for _, s := range servers {
		if string(s.ID) != n.cfg.NodeID {
			return nil
		}
	}
	return errOnlyServer
}

// removeSelf asks the leader to remove this node from Raft and waits until
// it is done.
func (n *Node) removeSelf(ctx context.Context) error {
	self := n.cfg.NodeID
	for {
		servers, err := n.configuration()
		if err == nil && !hasServer(servers, self) {
			return nil
		}
		id, api := n.Leader()
		switch {
		case id == self:
			err = n.removeServer(self)
		case api != "":
			err = n.client.at(api).remove(ctx, self)
		default:
			err = ErrNoLeader
		}
		if err == nil {
			return nil
		}
		n.log.Debug("remove from raft: retrying", "error", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("remove from raft: %w (last error: %v)", ctx.Err(), err)
		case <-n.stopCh:
			return ErrStopped
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// removeServer removes id from Raft (leader only) and keeps it from being
// added back while it is still alive in gossip.
func (n *Node) removeServer(id string) error {
	n.tombMu.Lock()
	n.tombs[id] = time.Now()
	n.tombMu.Unlock()
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, changeTimeout).Error(); err != nil {
		return mapRaftErr(err)
	}
	n.log.Info("removed server on request", "member", id)
	return nil
}

func hasServer(servers []raft.Server, id string) bool {
	for _, s := range servers {
		if string(s.ID) == id {
			return true
		}
	}
	return false
}

// waitFor polls cond until it holds or ctx is done.
func (n *Node) waitFor(ctx context.Context, cond func() bool) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-n.stopCh:
			return ErrStopped
		case <-t.C:
		}
	}
	return nil
}

// forward sends cmd to the API of leader id at api. It gives up as soon as
// this node learns of another leader: a leader that froze (SIGSTOP, a
// stalled VM) accepts the connection but never answers, and waiting for
// ctx would stall every forwarded command (task completions, slot
// releases) for the whole apply timeout after a new leader was elected.
func (n *Node) forward(ctx context.Context, id, api string, cmd []byte) ([]byte, error) {
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan struct{})
	defer close(done)
	go func() {
		tick := time.NewTicker(leaderWatchEvery)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if cur, _ := n.Leader(); cur != id {
					cancel()
					return
				}
			}
		}
	}()
	return n.client.at(api).Apply(fctx, cmd)
}

// Apply commits cmd through Raft and returns the FSM's answer. On a
// follower it forwards cmd to the leader's API. The wait is bounded by
// ctx (default 10s). Errors: ErrNoLeader when no leader is known (retry),
// *ApplyError when the FSM rejected cmd. A context error or a lost
// leadership after submission leaves the outcome unknown: commands should
// be idempotent or fenced.
func (n *Node) Apply(ctx context.Context, cmd []byte) ([]byte, error) {
	if !n.running() {
		return nil, ErrStopped
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultApplyTimeout)
		defer cancel()
	}
	var hint string
	for attempt := 0; ; attempt++ {
		if n.IsLeader() {
			res, err := n.applyLocal(ctx, cmd)
			if !errors.Is(err, ErrNotLeader) {
				return res, err
			}
		}
		id, api := n.Leader()
		if hint != "" {
			api, hint = hint, ""
		}
		if id == n.cfg.NodeID && api == n.apiAddr {
			// Raft still names us while we step down: wait for the new leader.
			id, api = "", ""
		}
		var err error
		if api == "" {
			err = ErrNoLeader
		} else {
			var res []byte
			res, err = n.forward(ctx, id, api, cmd)
			if err == nil {
				return res, nil
			}
			var ae *APIError
			if errors.As(err, &ae) {
				switch ae.Code {
				case CodeApplyError:
					return nil, &ApplyError{Err: errors.New(ae.Message)}
				case CodeNotLeader:
					hint = ae.LeaderAPI
				case CodeNoLeader:
				default:
					return nil, err
				}
			} else if ctx.Err() != nil {
				return nil, err
			}
		}
		if attempt >= 2 {
			if errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader) {
				return nil, ErrNoLeader
			}
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ErrNoLeader
		case <-time.After(time.Duration(attempt+1) * 50 * time.Millisecond):
		}
	}
}

// applyLocal applies cmd on this node, which must be the leader.
func (n *Node) applyLocal(ctx context.Context, cmd []byte) ([]byte, error) {
	timeout := DefaultApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, context.DeadlineExceeded
		}
	}
	f := n.raft.Apply(cmd, timeout)
	if err := waitFuture(ctx, f); err != nil {
		return nil, mapRaftErr(err)
	}
	switch r := f.Response().(type) {
	case nil:
		return nil, nil
	case []byte:
		return r, nil
	case error:
		return nil, &ApplyError{Err: r}
	default:
		return nil, fmt.Errorf("cluster: the fsm returned %T, want []byte, error or nil", r)
	}
}

func waitFuture(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func mapRaftErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return fmt.Errorf("%w: %v", ErrNotLeader, err)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%w: %v", ErrStopped, err)
	}
	return fmt.Errorf("cluster: raft: %w", err)
}

// Barrier waits until every entry committed before it is applied to the
// local FSM. Leader only (ErrNotLeader otherwise).
func (n *Node) Barrier(ctx context.Context) error {
	if !n.running() {
		return ErrStopped
	}
	timeout := DefaultApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	return mapRaftErr(waitFuture(ctx, n.raft.Barrier(timeout)))
}

// IsLeader reports whether this node is the Raft leader now.
func (n *Node) IsLeader() bool {
	return n.raft != nil && n.raft.State() == raft.Leader
}

// LeaderCh delivers true when this node becomes leader and false when it
// stops being leader. It is buffered and never blocks Raft: when the
// consumer lags, older values are replaced by the latest. Single consumer.
func (n *Node) LeaderCh() <-chan bool { return n.leaderCh }

// Term returns the current Raft term (0 before Start).
func (n *Node) Term() uint64 {
	if n.raft == nil {
		return 0
	}
	return n.raft.CurrentTerm()
}

// Leader returns the leader's id and API address as known locally, or
// empty strings when no leader is known. The API address is empty while
// gossip has not told us the leader's metadata.
func (n *Node) Leader() (id, apiAddr string) {
	if n.raft == nil {
		return "", ""
	}
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", ""
	}
	id = string(lid)
	if id == n.cfg.NodeID {
		return id, n.apiAddr
	}
	if mi, ok := n.members.get(id); ok && mi.Health == HealthAlive {
		return id, mi.Meta.API
	}
	return id, ""
}

// APIAddr returns the advertised address of the node API.
func (n *Node) APIAddr() string { return n.apiAddr }

// RaftAddr returns the advertised Raft address.
func (n *Node) RaftAddr() string { return n.raftAddr }

// GossipAddr returns the advertised gossip address.
func (n *Node) GossipAddr() string { return n.gossipAddr }

// ID returns the node id.
func (n *Node) ID() string { return n.cfg.NodeID }

// Raft exposes the underlying Raft instance (nil before Start).
func (n *Node) Raft() *raft.Raft { return n.raft }

// JoinGossip asks the local memberlist to join addrs (one attempt each).
// It returns how many were contacted.
func (n *Node) JoinGossip(addrs []string) (int, error) {
	if !n.running() {
		return 0, ErrStopped
	}
	joined, err := n.joinOnce(addrs)
	if err != nil {
		return joined, fmt.Errorf("cluster: join: %w", err)
	}
	return joined, nil
}

func (n *Node) configuration() ([]raft.Server, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, mapRaftErr(err)
	}
	return f.Configuration().Servers, nil
}

// Members lists the cluster as seen from this node: the union of the Raft
// configuration and the gossip members, sorted by id.
func (n *Node) Members() []Member {
	if n.raft == nil {
		return nil
	}
	servers, _ := n.configuration()
	table := n.members.snapshot()
	suspect := n.suspects(table, time.Now())
	leaderID, _ := n.Leader()
	isLeader := n.IsLeader()
	n.hbMu.Lock()
	failed := make(map[raft.ServerID]time.Time, len(n.failedHB))
	for k, v := range n.failedHB {
		failed[k] = v
	}
	n.hbMu.Unlock()
	now := time.Now()

	byID := map[string]*Member{}
	for id, mi := range table {
		m := &Member{ID: id, RaftAddr: mi.Meta.Raft, APIAddr: mi.Meta.API, GossipAddr: mi.Gossip,
			Role: RoleNone, Health: mi.Health, LastContact: mi.LastPing}
		if suspect[id] && mi.Health == HealthAlive {
			m.Health = HealthSuspect
		}
		byID[id] = m
	}
	for _, s := range servers {
		id := string(s.ID)
		m, ok := byID[id]
		if !ok {
			m = &Member{ID: id, Health: HealthUnknown}
			byID[id] = m
		}
		m.RaftAddr = string(s.Address)
		m.Role = RoleNonvoter
		if s.Suffrage == raft.Voter {
			m.Role = RoleVoter
		}
		if isLeader {
			if t, bad := failed[s.ID]; bad {
				m.LastContact = t
			} else {
				m.LastContact = now
			}
		}
	}
	if m, ok := byID[leaderID]; ok {
		m.Role = RoleLeader
		if !isLeader {
			if lc := n.raft.LastContact(); lc.After(m.LastContact) {
				m.LastContact = lc
			}
		}
	}
	if m, ok := byID[n.cfg.NodeID]; ok {
		m.LastContact = now
		if m.Health == HealthUnknown {
			m.Health = HealthAlive
		}
		m.APIAddr = n.apiAddr
		m.GossipAddr = n.gossipAddr
	}
	out := make([]Member, 0, len(byID))
	for _, m := range byID {
		out = append(out, *m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// ClusterID returns the id of the cluster this node belongs to: made at
// bootstrap, adopted from the members when joining (empty until then).
// Gossip refuses members of another cluster, so two clusters never merge.
func (n *Node) ClusterID() string { return n.getMeta().Cluster }

// adoptCluster records the cluster id learnt when joining. Called from a
// memberlist delegate: the new metadata is announced by the reconciler.
func (n *Node) adoptCluster(id string) {
	n.metaMu.Lock()
	if n.meta.Cluster != "" {
		n.metaMu.Unlock()
		return
	}
	n.meta.Cluster = id
	n.metaMu.Unlock()
	if err := n.store.Set([]byte(clusterIDKey), []byte(id)); err != nil {
		n.log.Error("could not store the cluster id", "error", err)
	}
	n.log.Info("joined cluster", "cluster", id)
	n.metaDirty.Store(true)
	n.triggerReconcile()
}

func (n *Node) setMeta(m nodeMeta) {
	n.metaMu.Lock()
	n.meta = m
	n.metaMu.Unlock()
}

func (n *Node) getMeta() nodeMeta {
	n.metaMu.Lock()
	defer n.metaMu.Unlock()
	return n.meta
}

func (n *Node) metaBytes() []byte {
	b, _ := json.Marshal(n.getMeta())
	return b
}

// monitorLeadership forwards Raft's leadership changes to LeaderCh and
// wakes the reconciler.
func (n *Node) monitorLeadership() {
	defer n.wg.Done()
	ch := n.raft.LeaderCh()
	for {
		select {
		case <-n.stopCh:
			return
		case v := <-ch:
			n.log.Info("leadership changed", "leader", v, "term", n.raft.CurrentTerm())
			if !v {
				n.hbMu.Lock()
				clear(n.failedHB)
				n.hbMu.Unlock()
			}
			select {
			case n.leaderCh <- v:
			default:
				select {
				case <-n.leaderCh:
				default:
				}
				select {
				case n.leaderCh <- v:
				default:
				}
			}
			n.triggerReconcile()
		}
	}
}

// observe tracks followers failing heartbeats (leader view of last contact).
func (n *Node) observe(ch <-chan raft.Observation) {
	defer n.wg.Done()
	for {
		select {
		case <-n.stopCh:
			return
		case o := <-ch:
			switch d := o.Data.(type) {
			case raft.FailedHeartbeatObservation:
				n.hbMu.Lock()
				if _, ok := n.failedHB[d.PeerID]; !ok {
					n.failedHB[d.PeerID] = d.LastContact
				}
				n.hbMu.Unlock()
			case raft.ResumedHeartbeatObservation:
				n.hbMu.Lock()
				delete(n.failedHB, d.PeerID)
				n.hbMu.Unlock()
			case raft.LeaderObservation:
				n.triggerReconcile()
			}
		}
	}
}

func (n *Node) triggerReconcile() {
	select {
	case n.reconcileCh <- struct{}{}:
	default:
	}
}
