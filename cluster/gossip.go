package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// gossipLabel keeps asyncnode gossip apart from other memberlist users.
const gossipLabel = "asyncnode"

// metaVersion is the version of nodeMeta's encoding.
const metaVersion = 1

// nodeMeta is what a member announces in its memberlist metadata (at most
// memberlist.MetaMaxSize bytes of JSON).
type nodeMeta struct {
	V       int    `json:"v"`
	Raft    string `json:"r"`
	API     string `json:"a"`
	Cluster string `json:"c,omitempty"`  // cluster id; empty until a new node joins
	Voter   bool   `json:"vt,omitempty"` // wants to be a voter
	Leaving bool   `json:"l,omitempty"`  // leaving for good: never (re)add
}

func decodeMeta(b []byte) (nodeMeta, error) {
	var m nodeMeta
	if len(b) == 0 {
		return m, errors.New("no metadata (not an asyncnode member)")
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("bad metadata (not an asyncnode member): %v", err)
	}
	if m.V != metaVersion {
		return m, fmt.Errorf("unsupported metadata version %d", m.V)
	}
	if m.Raft == "" || m.API == "" {
		return m, errors.New("metadata lacks raft or api address")
	}
	return m, nil
}

// Gossip health values of a Member.
const (
	HealthAlive   = "alive"
	HealthSuspect = "suspect"
	HealthDead    = "dead"
	HealthLeft    = "left"
	// HealthUnknown: in the Raft configuration, never seen in gossip.
	HealthUnknown = "unknown"
)

// memberInfo is the local view of one gossip member.
type memberInfo struct {
	ID       string
	Gossip   string
	Meta     nodeMeta
	Health   string // alive, dead or left (suspect is derived: see suspects)
	Since    time.Time
	LastPing time.Time
}

// memberTable is fed by memberlist's delegates, which run under
// memberlist's own locks: the table never calls back into memberlist.
type memberTable struct {
	mu sync.Mutex
	m  map[string]*memberInfo
}

func newMemberTable() *memberTable { return &memberTable{m: map[string]*memberInfo{}} }

func (t *memberTable) snapshot() map[string]memberInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]memberInfo, len(t.m))
	for id, mi := range t.m {
		out[id] = *mi
	}
	return out
}

func (t *memberTable) get(id string) (memberInfo, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	mi, ok := t.m[id]
	if !ok {
		return memberInfo{}, false
	}
	return *mi, true
}

// suspects returns the members alive in gossip that this node has not
// probed successfully for three probe rounds (memberlist does not expose
// its own suspect state).
func (n *Node) suspects(table map[string]memberInfo, now time.Time) map[string]bool {
	alive := 0
	for _, mi := range table {
		if mi.Health == HealthAlive {
			alive++
		}
	}
	after := 3 * time.Duration(max(alive, 1)) * n.probeInterval
	out := map[string]bool{}
	for id, mi := range table {
		if id == n.cfg.NodeID || mi.Health != HealthAlive {
			continue
		}
		last := mi.LastPing
		if mi.Since.After(last) {
			last = mi.Since
		}
		if now.Sub(last) > after {
			out[id] = true
		}
	}
	return out
}

// prune forgets members dead or left for longer than after.
func (t *memberTable) prune(after time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id, mi := range t.m {
		if (mi.Health == HealthDead || mi.Health == HealthLeft) && time.Since(mi.Since) > after {
			delete(t.m, id)
		}
	}
}

// raftAddrOwner returns the id of a live member (other than except) that
// announces raftAddr.
func (t *memberTable) raftAddrOwner(raftAddr, except string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id, mi := range t.m {
		if id != except && mi.Health == HealthAlive && mi.Meta.Raft == raftAddr {
			return id
		}
	}
	return ""
}

func gossipAddrOf(n *memberlist.Node) string {
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// gossipDelegate implements memberlist's Delegate, EventDelegate,
// ConflictDelegate, MergeDelegate, AliveDelegate and PingDelegate.
type gossipDelegate struct {
	n *Node
}

var (
	_ memberlist.Delegate         = gossipDelegate{}
	_ memberlist.EventDelegate    = gossipDelegate{}
	_ memberlist.ConflictDelegate = gossipDelegate{}
	_ memberlist.MergeDelegate    = gossipDelegate{}
	_ memberlist.AliveDelegate    = gossipDelegate{}
	_ memberlist.PingDelegate     = gossipDelegate{}
)

func (d gossipDelegate) NodeMeta(limit int) []byte {
	b := d.n.metaBytes()
	if len(b) > limit {
		// Checked at Start; never hand memberlist more than it allows.
		return nil
	}
	return b
}

func (gossipDelegate) NotifyMsg([]byte)                {}
func (gossipDelegate) GetBroadcasts(int, int) [][]byte { return nil }
func (gossipDelegate) LocalState(bool) []byte          { return nil }
func (gossipDelegate) MergeRemoteState([]byte, bool)   {}

func (d gossipDelegate) NotifyJoin(node *memberlist.Node) { d.update(node, HealthAlive) }
func (d gossipDelegate) NotifyUpdate(node *memberlist.Node) {
	d.update(node, HealthAlive)
}

// NotifyLeave reports a member gone: left when it had announced leaving
// (Leave does so before leaving gossip), dead otherwise. memberlist does not
// tell the two apart in the Node it passes.
func (d gossipDelegate) NotifyLeave(node *memberlist.Node) {
	h := HealthDead
	if meta, err := decodeMeta(node.Meta); err == nil && meta.Leaving {
		h = HealthLeft
	} else if mi, ok := d.n.members.get(node.Name); ok && mi.Meta.Leaving {
		h = HealthLeft
	}
	d.update(node, h)
}

func (d gossipDelegate) update(node *memberlist.Node, health string) {
	meta, err := decodeMeta(node.Meta)
	t := d.n.members
	t.mu.Lock()
	mi, ok := t.m[node.Name]
	if !ok {
		mi = &memberInfo{ID: node.Name}
		t.m[node.Name] = mi
	}
	if err == nil {
		mi.Meta = meta
	}
	mi.Gossip = gossipAddrOf(node)
	if mi.Health != health {
		mi.Health = health
		mi.Since = time.Now()
	}
	t.mu.Unlock()
	if node.Name != d.n.cfg.NodeID {
		d.n.log.Debug("member changed", "member", node.Name, "health", health, "gossip", mi.Gossip)
	}
	d.n.triggerReconcile()
}

func (d gossipDelegate) NotifyConflict(existing, other *memberlist.Node) {
	d.n.log.Error("duplicate node id in gossip: refusing the newcomer",
		"member", existing.Name, "existing", gossipAddrOf(existing), "other", gossipAddrOf(other))
}

// NotifyMerge runs on both sides of a join: refuse duplicates before the
// states are merged. A refusal makes the joiner's Join fail.
func (d gossipDelegate) NotifyMerge(peers []*memberlist.Node) error {
	n := d.n
	self := n.cfg.NodeID
	mine := n.getMeta().Cluster
	adopt := ""
	for _, p := range peers {
		if p.State == memberlist.StateDead || p.State == memberlist.StateLeft {
			continue
		}
		meta, err := decodeMeta(p.Meta)
		if err != nil {
			return n.refuse(fmt.Errorf("%w: member %q: %v", ErrRefused, p.Name, err))
		}
		if meta.Cluster != "" && mine != "" && meta.Cluster != mine {
			return n.refuse(fmt.Errorf("%w: member %q belongs to another cluster (%s, this node's is %s): a node that bootstrapped its own cluster cannot join another one; empty its data dir first",
				ErrRefused, p.Name, meta.Cluster, mine))
		}
		if meta.Cluster != "" && adopt == "" {
			adopt = meta.Cluster
		}
		addr := gossipAddrOf(p)
		if p.Name == self {
			if addr != n.gossipAddr {
				return n.refuse(fmt.Errorf("%w: node id %q is already used by a live member at %s", ErrRefused, self, addr))
			}
			continue
		}
		if meta.Raft == n.raftAddr {
			return n.refuse(fmt.Errorf("%w: raft address %s is already used by member %q", ErrRefused, meta.Raft, p.Name))
		}
		if mi, ok := n.members.get(p.Name); ok && mi.Health == HealthAlive && mi.Gossip != addr {
			return n.refuse(fmt.Errorf("%w: node id %q is already used by a live member at %s", ErrRefused, p.Name, mi.Gossip))
		}
		if owner := n.members.raftAddrOwner(meta.Raft, p.Name); owner != "" {
			return n.refuse(fmt.Errorf("%w: raft address %s of %q is already used by member %q", ErrRefused, meta.Raft, p.Name, owner))
		}
	}
	if mine == "" && adopt != "" {
		n.adoptCluster(adopt)
	}
	return nil
}

// NotifyAlive filters every alive message: foreign members and members
// announcing a Raft address another live member owns are ignored.
func (d gossipDelegate) NotifyAlive(p *memberlist.Node) error {
	n := d.n
	if p.Name == n.cfg.NodeID {
		return nil
	}
	meta, err := decodeMeta(p.Meta)
	if err != nil {
		return err
	}
	if mine := n.getMeta().Cluster; meta.Cluster != "" && mine != "" && meta.Cluster != mine {
		return fmt.Errorf("member of another cluster (%s)", meta.Cluster)
	}
	if meta.Raft == n.raftAddr {
		return fmt.Errorf("raft address %s is this node's", meta.Raft)
	}
	if owner := n.members.raftAddrOwner(meta.Raft, p.Name); owner != "" {
		return fmt.Errorf("raft address %s is already used by member %q", meta.Raft, owner)
	}
	return nil
}

func (gossipDelegate) AckPayload() []byte { return nil }

func (d gossipDelegate) NotifyPingComplete(other *memberlist.Node, _ time.Duration, _ []byte) {
	t := d.n.members
	t.mu.Lock()
	if mi, ok := t.m[other.Name]; ok {
		mi.LastPing = time.Now()
	}
	t.mu.Unlock()
}

// peersFile remembers gossip addresses of other members, so that a node
// resuming from its data directory without Join addresses can find them.
const peersFile = "gossip-peers.json"

type peersDoc struct {
	Gossip []string `json:"gossip"`
}

func readPeers(dir string) []string {
	b, err := os.ReadFile(filepath.Join(dir, peersFile))
	if err != nil {
		return nil
	}
	var doc peersDoc
	if json.Unmarshal(b, &doc) != nil {
		return nil
	}
	return doc.Gossip
}

func writePeers(dir string, addrs []string) error {
	sort.Strings(addrs)
	b, err := json.Marshal(peersDoc{Gossip: addrs})
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, peersFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, peersFile))
}
