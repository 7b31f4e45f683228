package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

// Defaults for the zero values of Config.
const (
	DefaultVoters             = 3
	DefaultHeartbeatTimeout   = 500 * time.Millisecond
	DefaultElectionTimeout    = time.Second
	DefaultLeaderLeaseTimeout = 500 * time.Millisecond
	// DefaultCommitTimeout bounds how long a follower may wait to learn
	// that an entry committed when no further entry follows it (Raft
	// tells followers the commit index with the next AppendEntries, and
	// sends an empty one every CommitTimeout to 2×CommitTimeout per
	// follower, reading the previous entry from the log store each time).
	// Followers do not wait for it to start their tasks: the leader pushes
	// committed assignments to them (agent). So it only delays revocations
	// and releases reaching followers, and a short one costs CPU on an
	// idle cluster: an idle 3-node leader used 10.60 % of a core at 5 ms
	// and 26.60 % at 1 ms (docs/performance.md).
	DefaultCommitTimeout = 50 * time.Millisecond
	DefaultReapDeadAfter = 30 * time.Second
	DefaultApplyTimeout  = 10 * time.Second

	// MaxVoters is the largest allowed Config.Voters.
	MaxVoters = 7
)

// Config configures a Node. NodeID, DataDir, RaftAddr, GossipAddr and
// HTTPAddr are required; everything else has a default.
type Config struct {
	// NodeID names the node in Raft and in gossip; it must be unique in the
	// cluster and stable across restarts.
	NodeID string
	// DataDir holds raft.db (log and stable store) and snapshots/.
	DataDir string
	// RaftAddr is the host:port the Raft transport binds (port 0 picks one).
	RaftAddr string
	// RaftAdvertise is the address peers dial; default: the bound address
	// (a private IP of this host when bound to all interfaces).
	RaftAdvertise string
	// GossipAddr is the host:port memberlist binds, TCP and UDP (port 0 picks one).
	GossipAddr string
	// GossipAdvertise is the gossip address peers use; default: the bound one.
	GossipAdvertise string
	// HTTPAddr is the host:port the node API listens on (port 0 picks one).
	HTTPAddr string
	// HTTPAdvertise is the API address peers use to forward; default: the
	// bound address (the Raft advertise host when bound to all interfaces).
	HTTPAdvertise string
	// Join lists gossip addresses of existing members. Empty with an empty
	// data directory bootstraps a new single-voter cluster.
	Join []string
	// Voters is the number of Raft voters, 1..7 (default 3; odd is
	// recommended). Further members join as non-voters.
	Voters int
	// NonVoter keeps this node out of the voters (a worker-only node). Such
	// a node cannot bootstrap a cluster.
	NonVoter bool
	// Key is the gossip encryption key (16, 24 or 32 bytes). Optional, but
	// when set a node without it cannot join.
	Key []byte
	// Token, when set, is required as "Authorization: Bearer <token>" on
	// every API call except GET /v1/health, and sent when forwarding.
	Token string
	// TLSCert, TLSKey and TLSCA are PEM files. When all are set, the Raft
	// transport uses mutual TLS and the API serves HTTPS.
	TLSCert, TLSKey, TLSCA string
	// BeforeLeave, when set, runs when the API is asked to leave (POST
	// /v1/leave), before the node leaves Raft and gossip: the embedding
	// process drains its work there. It bounds its own duration; an error
	// is logged and the node leaves anyway.
	BeforeLeave func(ctx context.Context) error
	// Forwarded, when set, sees every command a follower forwards to this
	// node while it leads (POST /v1/apply), before Raft does. It either
	// handles cmd itself (handled, with the answer Apply gives the
	// follower) or leaves it to Raft (handled false). The agent uses it to
	// put followers' slot releases into the leader's next assignment entry.
	Forwarded func(ctx context.Context, cmd []byte) (res []byte, handled bool, err error)
	// Log receives the node's logs; default: discard.
	Log hclog.Logger

	// Raft timing; zero picks the LAN defaults above. Tests shorten them.
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout, CommitTimeout time.Duration
	// SnapshotInterval and SnapshotThreshold tune Raft snapshots; zero keeps
	// raft's defaults (120s, 8192 entries).
	SnapshotInterval  time.Duration
	SnapshotThreshold uint64
	// ProbeInterval is the gossip failure-detector probe interval; zero keeps
	// memberlist's LAN default (1s). Tests shorten it.
	ProbeInterval time.Duration
	// ReapDeadAfter is how long a member may stay dead in gossip before the
	// leader removes it from Raft (default 30s).
	ReapDeadAfter time.Duration

	// RaftDialer, when set, replaces the TCP dial of Raft peers (TLS, when
	// configured, still wraps the connection). Tests inject faults with it.
	RaftDialer func(address string, timeout time.Duration) (net.Conn, error)
	// GossipWrap, when set, wraps memberlist's network transport (packets
	// and streams). Tests inject faults with it.
	GossipWrap func(memberlist.Transport) memberlist.Transport
}

// withDefaults returns a copy of c with zero values replaced by defaults.
func (c Config) withDefaults() Config {
	if c.Voters == 0 {
		c.Voters = DefaultVoters
	}
	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = DefaultHeartbeatTimeout
	}
	if c.ElectionTimeout == 0 {
		c.ElectionTimeout = DefaultElectionTimeout
	}
	if c.LeaderLeaseTimeout == 0 {
		c.LeaderLeaseTimeout = DefaultLeaderLeaseTimeout
		if c.LeaderLeaseTimeout > c.HeartbeatTimeout {
			c.LeaderLeaseTimeout = c.HeartbeatTimeout
		}
	}
	if c.CommitTimeout == 0 {
		c.CommitTimeout = DefaultCommitTimeout
	}
	if c.ReapDeadAfter == 0 {
		c.ReapDeadAfter = DefaultReapDeadAfter
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	c.Join = append([]string(nil), c.Join...)
	c.Key = append([]byte(nil), c.Key...)
	if len(c.Key) == 0 {
		c.Key = nil
	}
	return c
}

// Validate reports the first invalid field of c (after defaults), naming
// the field and what it allows.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.NodeID == "":
		return errors.New("cluster: config: node_id is required")
	case len(c.NodeID) > 128:
		return errors.New("cluster: config: node_id must be at most 128 bytes")
	case c.DataDir == "":
		return errors.New("cluster: config: data_dir is required")
	case c.Voters < 1 || c.Voters > MaxVoters:
		return fmt.Errorf("cluster: config: voters must be between 1 and %d, got %d", MaxVoters, c.Voters)
	case c.HeartbeatTimeout < 5*time.Millisecond:
		return fmt.Errorf("cluster: config: heartbeat_timeout must be at least 5ms, got %s", c.HeartbeatTimeout)
	case c.ElectionTimeout < c.HeartbeatTimeout:
		return fmt.Errorf("cluster: config: election_timeout (%s) must be at least heartbeat_timeout (%s)", c.ElectionTimeout, c.HeartbeatTimeout)
	case c.LeaderLeaseTimeout < 5*time.Millisecond || c.LeaderLeaseTimeout > c.HeartbeatTimeout:
		return fmt.Errorf("cluster: config: leader_lease_timeout must be between 5ms and heartbeat_timeout (%s), got %s", c.HeartbeatTimeout, c.LeaderLeaseTimeout)
	case c.CommitTimeout < time.Millisecond:
		return fmt.Errorf("cluster: config: commit_timeout must be at least 1ms, got %s", c.CommitTimeout)
	case c.ReapDeadAfter < 0:
		return fmt.Errorf("cluster: config: reap_dead_after must not be negative, got %s", c.ReapDeadAfter)
	case c.ProbeInterval < 0:
		return fmt.Errorf("cluster: config: probe_interval must not be negative, got %s", c.ProbeInterval)
	case c.SnapshotInterval < 0:
		return fmt.Errorf("cluster: config: snapshot_interval must not be negative, got %s", c.SnapshotInterval)
	case c.Key != nil && len(c.Key) != 16 && len(c.Key) != 24 && len(c.Key) != 32:
		return fmt.Errorf("cluster: config: key must be 16, 24 or 32 bytes, got %d", len(c.Key))
	case c.NonVoter && len(c.Join) == 0:
		return errors.New("cluster: config: non_voter needs join addresses (a non-voter cannot bootstrap a cluster)")
	}
	tlsSet := 0
	for _, f := range []string{c.TLSCert, c.TLSKey, c.TLSCA} {
		if f != "" {
			tlsSet++
		}
	}
	if tlsSet != 0 && tlsSet != 3 {
		return errors.New("cluster: config: tls_cert, tls_key and tls_ca must be set together")
	}
	for _, a := range []struct{ name, v string }{
		{"raft_addr", c.RaftAddr}, {"gossip_addr", c.GossipAddr}, {"http_addr", c.HTTPAddr},
	} {
		if a.v == "" {
			return fmt.Errorf("cluster: config: %s is required", a.name)
		}
		if err := checkHostPort(a.v); err != nil {
			return fmt.Errorf("cluster: config: %s %q: %v", a.name, a.v, err)
		}
	}
	for _, a := range []struct{ name, v string }{
		{"raft_advertise", c.RaftAdvertise}, {"gossip_advertise", c.GossipAdvertise}, {"http_advertise", c.HTTPAdvertise},
	} {
		if a.v == "" {
			continue
		}
		if err := checkHostPort(a.v); err != nil {
			return fmt.Errorf("cluster: config: %s %q: %v", a.name, a.v, err)
		}
		host, _, _ := net.SplitHostPort(a.v)
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			return fmt.Errorf("cluster: config: %s %q: needs a concrete host, not a wildcard", a.name, a.v)
		}
	}
	for _, j := range c.Join {
		if j == "" {
			return errors.New("cluster: config: join has an empty address")
		}
	}
	return nil
}

func checkHostPort(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("want host:port")
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return errors.New("port must be a number between 0 and 65535")
	}
	return nil
}
