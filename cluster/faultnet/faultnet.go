// Package faultnet injects network partitions between in-process cluster
// nodes (tests only). Every node dials its Raft peers through the Network
// (cluster.Config.RaftDialer), and may send its gossip through it too
// (cluster.Config.GossipWrap with Gossip); Isolate then cuts one node off in
// both directions: its open connections are closed, new dials from or to it
// are refused and its gossip packets are dropped until Heal.
package faultnet

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// ErrCut is returned by dials across a cut.
var ErrCut = errors.New("faultnet: connection refused (partitioned)")

// Network tracks the connections dialed through it.
type Network struct {
	mu    sync.Mutex
	names map[string]string // listen address -> node name
	cut   map[string]bool
	conns map[*conn]struct{}
}

// New returns a network with no faults.
func New() *Network {
	return &Network{names: map[string]string{}, cut: map[string]bool{}, conns: map[*conn]struct{}{}}
}

// Register records that node name listens on addr, so dials to addr count
// as traffic to name.
func (n *Network) Register(name, addr string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.names[addr] = name
}

// Dialer returns the dial function of node from.
func (n *Network) Dialer(from string) func(addr string, timeout time.Duration) (net.Conn, error) {
	return func(addr string, timeout time.Duration) (net.Conn, error) {
		if n.blocked(from, addr) {
			return nil, fmt.Errorf("dial %s from %s: %w", addr, from, ErrCut)
		}
		c, err := net.DialTimeout("tcp", addr, timeout)
		if err != nil {
			return nil, err
		}
		fc := &conn{Conn: c, net: n, from: from, to: addr}
		n.mu.Lock()
		if n.cutLocked(from, addr) {
			n.mu.Unlock()
			_ = c.Close()
			return nil, fmt.Errorf("dial %s from %s: %w", addr, from, ErrCut)
		}
		n.conns[fc] = struct{}{}
		n.mu.Unlock()
		return fc, nil
	}
}

func (n *Network) blocked(from, addr string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cutLocked(from, addr)
}

func (n *Network) cutLocked(from, addr string) bool {
	return n.cut[from] || n.cut[n.names[addr]]
}

// Isolate cuts node name off from every other node, both directions.
func (n *Network) Isolate(name string) {
	n.mu.Lock()
	n.cut[name] = true
	var doomed []*conn
	for c := range n.conns {
		if n.cutLocked(c.from, c.to) {
			doomed = append(doomed, c)
		}
	}
	n.mu.Unlock()
	for _, c := range doomed {
		_ = c.Close()
	}
}

// Heal lets node name talk to the others again.
func (n *Network) Heal(name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.cut, name)
}

type conn struct {
	net.Conn
	net      *Network
	from, to string
	once     sync.Once
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.net.mu.Lock()
		delete(c.net.conns, c)
		c.net.mu.Unlock()
	})
	return err
}

// Gossip returns memberlist's transport of node from, wrapped so that
// packets and streams between a cut node and the others are dropped and
// refused (UDP probes and gossip are lost, TCP push/pull and joins fail).
// Register the node's gossip address as well, so that traffic to it counts
// as traffic to the node.
func (n *Network) Gossip(from string) func(memberlist.Transport) memberlist.Transport {
	return func(t memberlist.Transport) memberlist.Transport {
		return &gossipTransport{Transport: t, net: n, from: from}
	}
}

// gossipTransport filters on the sending side: a cut node sends nothing,
// and nothing is sent to it, which cuts both directions.
type gossipTransport struct {
	memberlist.Transport
	net  *Network
	from string
}

func (g *gossipTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if g.net.blocked(g.from, addr) {
		return time.Now(), nil // lost on the way, as UDP goes
	}
	return g.Transport.WriteTo(b, addr)
}

func (g *gossipTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if g.net.blocked(g.from, addr) {
		return nil, fmt.Errorf("dial %s from %s: %w", addr, g.from, ErrCut)
	}
	return g.Transport.DialTimeout(addr, timeout)
}
