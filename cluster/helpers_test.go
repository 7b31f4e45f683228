package cluster_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/asyncnode/asyncnode/cluster"
)

func TestMain(m *testing.M) {
	// memberlist's Shutdown does not wait for a probe in flight: probeNode
	// returns when its ack handler times out (the probe interval), which
	// under -race on a loaded machine can outlast goleak's retries. It
	// ends on its own and touches nothing of ours.
	//
	// Node.await waits for a Raft future on a goroutine of its own and
	// returns when the node stops. Raft does not answer every future at
	// shutdown (its FSM goroutine returns without answering the committed
	// entries still queued for it, in fsmMutateCh), so that goroutine can
	// stay blocked in the future's Error until the process ends; seen once,
	// in a fresh-clone CI run (2026-12-06). It holds nothing but the future.
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/hashicorp/memberlist.(*Memberlist).probeNode"),
		goleak.IgnoreAnyFunction("github.com/asyncnode/asyncnode/cluster.(*Node).await.func1"))
}

// listFSM is an append-only list of applied commands. A command starting
// with "fail:" is rejected with the rest as the error.
type listFSM struct {
	mu      sync.Mutex
	entries []string
}

func (f *listFSM) Apply(l *raft.Log) any {
	if msg, ok := bytes.CutPrefix(l.Data, []byte("fail:")); ok {
		return errors.New(string(msg))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = append(f.entries, string(l.Data))
	return []byte(strconv.Itoa(len(f.entries)))
}

func (f *listFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return listSnapshot(append([]string(nil), f.entries...)), nil
}

func (f *listFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var entries []string
	if err := json.NewDecoder(rc).Decode(&entries); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = entries
	return nil
}

func (f *listFSM) list() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.entries...)
}

type listSnapshot []string

func (s listSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode([]string(s)); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (listSnapshot) Release() {}

// logWriter sends logs to t until the test ends.
type logWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func testLogger(t testing.TB) hclog.Logger {
	w := &logWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	level := hclog.Info
	if l := os.Getenv("CLUSTER_TEST_LOG"); l != "" {
		level = hclog.LevelFromString(l)
	}
	return hclog.New(&hclog.LoggerOptions{Name: "asyncnode", Level: level, Output: w})
}

type tnode struct {
	*cluster.Node
	fsm *listFSM
	cfg cluster.Config
}

// baseConfig is a node on 127.0.0.1 with dynamic ports and short timings.
func baseConfig(t testing.TB, id string) cluster.Config {
	return cluster.Config{
		NodeID:             id,
		DataDir:            filepath.Join(t.TempDir(), id),
		RaftAddr:           "127.0.0.1:0",
		GossipAddr:         "127.0.0.1:0",
		HTTPAddr:           "127.0.0.1:0",
		Log:                testLogger(t),
		HeartbeatTimeout:   200 * time.Millisecond,
		ElectionTimeout:    400 * time.Millisecond,
		LeaderLeaseTimeout: 200 * time.Millisecond,
		CommitTimeout:      5 * time.Millisecond,
		ProbeInterval:      200 * time.Millisecond,
		ReapDeadAfter:      2 * time.Second,
	}
}

// startNode starts a node with a fresh listFSM; it is stopped at cleanup.
func startNode(t testing.TB, cfg cluster.Config) *tnode {
	t.Helper()
	n, fsm, err := tryStart(t, cfg)
	require.NoError(t, err)
	return &tnode{Node: n, fsm: fsm, cfg: cfg}
}

func tryStart(t testing.TB, cfg cluster.Config) (*cluster.Node, *listFSM, error) {
	t.Helper()
	fsm := &listFSM{}
	n, err := cluster.New(cfg, fsm)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { _ = n.Stop(context.Background()) })
	return n, fsm, nil
}

func joinConfig(t testing.TB, id string, seeds ...*tnode) cluster.Config {
	cfg := baseConfig(t, id)
	for _, s := range seeds {
		cfg.Join = append(cfg.Join, s.GossipAddr())
	}
	return cfg
}

// waitLeader waits until exactly one of nodes leads and the others know it.
func waitLeader(t testing.TB, nodes ...*tnode) *tnode {
	t.Helper()
	var leader *tnode
	require.Eventually(t, func() bool {
		leader = nil
		for _, n := range nodes {
			if n.IsLeader() {
				if leader != nil {
					return false
				}
				leader = n
			}
		}
		if leader == nil {
			return false
		}
		for _, n := range nodes {
			if id, api := n.Leader(); id != leader.ID() || api == "" {
				return false
			}
		}
		return true
	}, 15*time.Second, 20*time.Millisecond, "no single leader known by all")
	return leader
}

// servers returns the Raft configuration as id -> suffrage.
func servers(t testing.TB, n *tnode) map[string]raft.ServerSuffrage {
	t.Helper()
	f := n.Raft().GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	out := map[string]raft.ServerSuffrage{}
	for _, s := range f.Configuration().Servers {
		out[string(s.ID)] = s.Suffrage
	}
	return out
}

func waitServers(t testing.TB, n *tnode, want map[string]raft.ServerSuffrage) {
	t.Helper()
	require.Eventually(t, func() bool {
		got := servers(t, n)
		if len(got) != len(want) {
			return false
		}
		for id, s := range want {
			if g, ok := got[id]; !ok || g != s {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "raft configuration never became %v (last: %v)", want, servers(t, n))
}

func waitEntries(t testing.TB, want []string, nodes ...*tnode) {
	t.Helper()
	for _, n := range nodes {
		require.Eventually(t, func() bool {
			got := n.fsm.list()
			if len(got) != len(want) {
				return false
			}
			for i := range got {
				if got[i] != want[i] {
					return false
				}
			}
			return true
		}, 15*time.Second, 20*time.Millisecond, "node %s never applied %v (has %v)", n.ID(), want, n.fsm.list())
	}
}

func membersByID(ms []cluster.Member) map[string]cluster.Member {
	out := map[string]cluster.Member{}
	for _, m := range ms {
		out[m.ID] = m
	}
	return out
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// writeTLS writes a CA and a certificate for 127.0.0.1 signed by it (usable
// as server and client) and returns the file names.
func writeTLS(t testing.TB, dir string) (certFile, keyFile, caFile string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o700))
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "asyncnode test ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "asyncnode node"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)

	certFile = filepath.Join(dir, "node.pem")
	keyFile = filepath.Join(dir, "node-key.pem")
	caFile = filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600))
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600))
	return certFile, keyFile, caFile
}
