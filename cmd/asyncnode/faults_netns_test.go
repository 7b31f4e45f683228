package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/internal/pglocal"
)

// netLab is the network of a partition scenario: every node runs in a
// network namespace of its own with two veth links, one to a "cluster"
// bridge (its Raft, gossip and API addresses; the test reaches the APIs
// through the bridge's host address) and one to a "db" bridge, through
// which it reaches both PostgreSQL servers, which listen on the host's
// address there. Cutting the host side of a node's cluster link isolates
// it from its peers while it still reaches the databases (cut). Moving the
// host sides of a group's cluster links onto a second cluster bridge
// splits the cluster in two sides that each still talk among themselves
// (split).
//
// Every name starts with prefix (at most 15 characters in all: names are
// prefix plus at most 4), so that leftovers of a crashed run are found and
// deleted before the next one.
type netLab struct {
	t      *testing.T
	prefix string
	cnet   int // third octet of the cluster subnet 10.77.cnet.0/24
	dnet   int // third octet of the db subnet 10.77.dnet.0/24
	nodes  int
}

// newNetLab builds the namespaces, bridges and links for n nodes and
// deletes them at the end of the test. It fails the test, with the
// command's output, when the machine cannot do it (not root, no `ip
// netns`, no bridge support).
func newNetLab(t *testing.T, prefix string, cnet, dnet, n int) *netLab {
	t.Helper()
	require.LessOrEqual(t, len(prefix), 11, "netns prefix %q: names would exceed 15 characters", prefix)
	if os.Geteuid() != 0 {
		t.Fatalf("partition scenarios need root (network namespaces, veth, bridges); running as uid %d", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("partition scenarios need iproute2's `ip` command: %v", err)
	}
	l := &netLab{t: t, prefix: prefix, cnet: cnet, dnet: dnet, nodes: n}
	l.clean()
	t.Cleanup(l.clean)
	for _, br := range []struct {
		name string
		net  int
	}{{l.bridge("c"), cnet}, {l.bridge("d"), dnet}, {l.bridge("c2"), 0}} {
		l.ip("link", "add", br.name, "type", "bridge")
		if br.net != 0 { // the second cluster bridge has no host address: see split
			l.ip("addr", "add", fmt.Sprintf("10.77.%d.1/24", br.net), "dev", br.name)
		}
		l.ip("link", "set", br.name, "up")
	}
	for i := 0; i < n; i++ {
		ns := l.ns(i)
		l.ip("netns", "add", ns)
		l.ip("-n", ns, "link", "set", "lo", "up")
		for _, side := range []struct {
			kind string
			addr string
		}{{"c", l.clusterIP(i)}, {"d", fmt.Sprintf("10.77.%d.%d", dnet, 11+i)}} {
			host := l.veth(i, side.kind)
			peer := host + "p"
			l.ip("link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns)
			l.ip("link", "set", host, "master", l.bridge(side.kind), "up")
			l.ip("-n", ns, "addr", "add", side.addr+"/24", "dev", peer)
			l.ip("-n", ns, "link", "set", peer, "up")
		}
	}
	return l
}

// bridge is the bridge of kind "c" (cluster), "d" (db) or "c2" (the
// second cluster bridge, the other side of a split).
func (l *netLab) bridge(kind string) string { return l.prefix + "br" + kind }
func (l *netLab) ns(i int) string           { return fmt.Sprintf("%sn%d", l.prefix, i+1) }

// veth is the host side of node i's link of kind "c" (cluster) or "d" (db).
func (l *netLab) veth(i int, kind string) string { return fmt.Sprintf("%s%d%s", l.prefix, i+1, kind) }

// clusterIP is node i's address on the cluster bridge.
func (l *netLab) clusterIP(i int) string { return fmt.Sprintf("10.77.%d.%d", l.cnet, 11+i) }

// dbHost is the host's address on the db bridge: the PostgreSQL servers
// listen there.
func (l *netLab) dbHost() string { return fmt.Sprintf("10.77.%d.1", l.dnet) }

// ip runs `ip args...` and fails the test with its output on error.
func (l *netLab) ip(args ...string) {
	l.t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("partition setup: ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
}

// clean deletes every namespace and link whose name starts with the
// prefix, ignoring errors (they may not exist).
func (l *netLab) clean() {
	if out, err := exec.Command("ip", "netns", "list").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], l.prefix) {
				_ = exec.Command("ip", "netns", "del", f[0]).Run()
			}
		}
	}
	if out, err := exec.Command("ip", "-o", "link", "show").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			if strings.HasPrefix(name, l.prefix) {
				_ = exec.Command("ip", "link", "del", name).Run()
			}
		}
	}
}

// cut isolates node i from its peers (and the test's API calls): the host
// side of its cluster link goes down. Its database link stays up.
func (l *netLab) cut(i int) { l.t.Helper(); l.ip("link", "set", l.veth(i, "c"), "down") }

// heal undoes cut.
func (l *netLab) heal(i int) { l.t.Helper(); l.ip("link", "set", l.veth(i, "c"), "up") }

// split splits the cluster network in two sides: the host sides of the
// cluster links of nodes idx move onto the second cluster bridge (the
// kernel takes a port off its bridge when it is enslaved to another; the
// link stays up). Those nodes still reach each other, and the others each
// other, but no node reaches one on the other side: frames are switched
// only within a bridge, and the host forwards nothing between them (the
// second bridge has no address, so no route leads to it). Database links
// are untouched.
//
// The test reaches node APIs through the first bridge's host address
// only, so the moved nodes' APIs do not answer the test until unsplit:
// a scenario moves the side it need not ask (in the partition scenarios,
// the minority, which it observes through the databases instead).
func (l *netLab) split(idx []int) {
	l.t.Helper()
	for _, i := range idx {
		l.ip("link", "set", l.veth(i, "c"), "master", l.bridge("c2"))
	}
}

// unsplit undoes split: the links of nodes idx move back onto the first
// cluster bridge.
func (l *netLab) unsplit(idx []int) {
	l.t.Helper()
	for _, i := range idx {
		l.ip("link", "set", l.veth(i, "c"), "master", l.bridge("c"))
	}
}

// place puts a scenario's servers on the db bridge (and 127.0.0.1) and its
// nodes in the namespaces.
func (l *netLab) place() faultPlace {
	return faultPlace{
		pg:      pglocal.Options{ListenAddresses: []string{l.dbHost(), "127.0.0.1"}},
		cluster: l.startCluster,
	}
}

// startCluster starts n nodes, node i in namespace i with its addresses on
// the cluster bridge: the first bootstraps, the others join it.
func (l *netLab) startCluster(t *testing.T, dsn string, n int, extra ...string) []*node {
	t.Helper()
	require.LessOrEqual(t, n, l.nodes)
	nodes := make([]*node, n)
	for i := range nodes {
		args := extra
		if i > 0 {
			args = append([]string{"--join", nodes[0].gossip}, extra...)
		}
		nd := newNode(t, dsn, fmt.Sprintf("n%d", i+1), args...)
		ip := l.clusterIP(i)
		nd.api, nd.raft, nd.gossip, nd.netns = ip+":7400", ip+":7401", ip+":7402", l.ns(i)
		nd.start()
		if i == 0 {
			nd.waitDispatching()
		}
		nodes[i] = nd
	}
	waitMembers(t, nodes, n)
	return nodes
}
