package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/agent"
	"github.com/asyncnode/asyncnode/internal/pglocal"
)

// Shared by the package's tests: one PostgreSQL server and one build of the
// binary.
var (
	testPG  *pglocal.Server
	testBin string
	dbSeq   int
	dbMu    sync.Mutex
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	ctx := context.Background()
	var err error
	testPG, err = pglocal.Start(ctx, pglocal.Options{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: cannot start a throwaway PostgreSQL for the tests: %v\n", err)
		return 1
	}
	defer testPG.Stop()
	dir, err := os.MkdirTemp("", "asyncnode-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	testBin = filepath.Join(dir, "asyncnode")
	args := append(append([]string{"build"}, buildFlags...), "-o", testBin, ".")
	out, err := exec.Command("go", args...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: go build: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// newDB creates an empty database and returns its DSN.
func newDB(t *testing.T) string {
	t.Helper()
	dbMu.Lock()
	dbSeq++
	name := fmt.Sprintf("e2e_%d", dbSeq)
	dbMu.Unlock()
	require.NoError(t, testPG.CreateDatabase(context.Background(), name, ""))
	return testPG.DSN(name)
}

// runCLI runs the binary to completion.
func runCLI(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, testBin, args...)
	cmd.Env = append(filteredEnv(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "run %v: %v", args, err)
		code = ee.ExitCode()
	}
	return o.String(), e.String(), code
}

// node is one asyncnode process under test.
type node struct {
	t       *testing.T
	id      string
	dsn     string
	dataDir string
	api     string
	raft    string
	gossip  string
	extra   []string
	logPath string
	netns   string // network namespace the process runs in; "" = the test's own
	cmd     *exec.Cmd
	done    chan struct{}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	p, err := pglocal.FreePort()
	require.NoError(t, err)
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
}

func newNode(t *testing.T, dsn, id string, extra ...string) *node {
	// Picked together: three ports picked one by one can repeat (a node
	// once got the same port for Raft and gossip).
	ports, err := pglocal.FreePorts(3)
	require.NoError(t, err)
	return newNodeOn(t, dsn, id, ports, extra...)
}

// newNodes makes nodes ids[0], ids[1], … with ports picked in one call;
// extra gives node i's flags, knowing the nodes made before it. Nodes made
// one by one can get the same port when the earlier one has not bound it
// yet (seen: a node's Raft port was the API port of the node started just
// before it).
func newNodes(t *testing.T, dsn string, ids []string, extra func(i int, before []*node) []string) []*node {
	ports, err := pglocal.FreePorts(3 * len(ids))
	require.NoError(t, err)
	nodes := make([]*node, len(ids))
	for i, id := range ids {
		nodes[i] = newNodeOn(t, dsn, id, ports[3*i:3*i+3], extra(i, nodes[:i])...)
	}
	return nodes
}

// newNodeOn makes a node on ports (API, Raft, gossip).
func newNodeOn(t *testing.T, dsn, id string, ports []int, extra ...string) *node {
	dir := t.TempDir()
	addr := func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) }
	n := &node{t: t, id: id, dsn: dsn, dataDir: filepath.Join(dir, "data"), api: addr(ports[0]),
		raft: addr(ports[1]), gossip: addr(ports[2]), extra: extra, logPath: filepath.Join(dir, id+".log")}
	t.Cleanup(func() {
		n.kill()
		if t.Failed() {
			b, _ := os.ReadFile(n.logPath)
			t.Logf("---- log of %s ----\n%s", n.id, b)
		}
	})
	return n
}

func (n *node) start() {
	n.t.Helper()
	args := append([]string{"run", "--dsn", n.dsn, "--node-id", n.id, "--data-dir", n.dataDir,
		"--http-addr", n.api, "--raft-addr", n.raft, "--gossip-addr", n.gossip, "--log-level", "debug"}, n.extra...)
	f, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	require.NoError(n.t, err)
	if n.netns != "" {
		args = append([]string{"netns", "exec", n.netns, testBin}, args...)
		n.cmd = exec.Command("ip", args...) // ip execs the binary: same process
	} else {
		n.cmd = exec.Command(testBin, args...)
	}
	n.cmd.Env = filteredEnv()
	n.cmd.Stdout, n.cmd.Stderr = f, f
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(n.t, n.cmd.Start())
	n.done = make(chan struct{})
	done, cmd := n.done, n.cmd
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
}

func (n *node) kill() {
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Kill()
	<-n.done
	n.cmd = nil
}

func (n *node) stop() {
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(30 * time.Second):
		n.t.Errorf("%s did not stop on SIGTERM within 30s", n.id)
		n.kill()
	}
	n.cmd = nil
}

func (n *node) status() (agent.StatusReport, error) {
	var rep agent.StatusReport
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := newAPIClient(n.api, "").do(ctx, http.MethodGet, "/v1/status", nil, &rep)
	return rep, err
}

// waitDispatching waits until this node leads and dispatches.
func (n *node) waitDispatching() {
	n.t.Helper()
	require.Eventually(n.t, func() bool {
		rep, err := n.status()
		return err == nil && rep.Scheduler.Dispatching
	}, 60*time.Second, 50*time.Millisecond, "%s never started dispatching", n.id)
}

func pool(t *testing.T, dsn string) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), dsn)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return p
}

func initDB(t *testing.T, dsn string) {
	t.Helper()
	out, errOut, code := runCLI(t, nil, "init", "--dsn", dsn)
	require.Equal(t, 0, code, "init failed: %s %s", out, errOut)
}

// waitAllDone waits until no task is unfinished.
func waitAllDone(t *testing.T, db *pgxpool.Pool, timeout time.Duration) {
	t.Helper()
	var left int
	require.Eventually(t, func() bool {
		err := db.QueryRow(context.Background(), "select count(*) from async.task where processed is null").Scan(&left)
		return err == nil && left == 0
	}, timeout, 50*time.Millisecond, "tasks still unfinished")
}
