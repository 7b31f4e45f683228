package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/asyncnode/asyncnode/internal/pglocal"
)

// localCluster is a set of child `asyncnode run` processes on 127.0.0.1,
// used by `dev` and `bench`.
type localCluster struct {
	dir      string
	children []*localNode
}

// localNode is one child node process.
type localNode struct {
	id, api, gossip string
	cmd             *exec.Cmd
	done            chan struct{}
	logPath         string
}

// startLocalCluster starts n nodes against dsn, the first bootstrapping and
// the others joining it, with their data dirs and logs under dir. extra
// flags are passed to every node. Stop it with stop.
func startLocalCluster(dsn, dir string, n int, logLevel string, extra ...string) (*localCluster, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	lc := &localCluster{dir: dir}
	voters := min(n, 3)
	addr := func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) }
	// Every node's three ports are picked in one call, before any node
	// starts: a port picked for a node whose process has not bound it yet
	// is free again for the next pick (two nodes got the same port).
	all, err := pglocal.FreePorts(3 * n)
	if err != nil {
		return nil, err
	}
	for i := 1; i <= n; i++ {
		ports := all[3*(i-1) : 3*i]
		id := "node" + strconv.Itoa(i)
		join := ""
		if len(lc.children) > 0 {
			join = lc.children[0].gossip
		}
		args := append(localNodeArgs(dsn, dir, id, [3]string{addr(ports[0]), addr(ports[1]), addr(ports[2])}, voters, logLevel, join), extra...)
		c := &localNode{id: id, api: addr(ports[0]), gossip: addr(ports[2]), done: make(chan struct{}),
			logPath: filepath.Join(dir, id+".log")}
		logf, err := os.Create(c.logPath)
		if err != nil {
			lc.stop()
			return nil, err
		}
		c.cmd = exec.Command(self, args...)
		c.cmd.Stdout, c.cmd.Stderr = logf, logf
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
		// The children must not inherit ASYNCNODE_* settings meant for the parent.
		c.cmd.Env = filteredEnv()
		if err := c.cmd.Start(); err != nil {
			logf.Close()
			lc.stop()
			return nil, fmt.Errorf("start %s: %w", id, err)
		}
		go func() { _ = c.cmd.Wait(); logf.Close(); close(c.done) }()
		lc.children = append(lc.children, c)
	}
	return lc, nil
}

// localNodeArgs is the command line of node id of a local cluster: its
// data directory under dir, its API, Raft and gossip addresses, and join,
// the first node's gossip address, for every node but the first ("").
// Flags given to every node come after it.
func localNodeArgs(dsn, dir, id string, addrs [3]string, voters int, logLevel, join string) []string {
	args := []string{"run", "--dsn", dsn, "--node-id", id, "--data-dir", filepath.Join(dir, id),
		"--http-addr", addrs[0], "--raft-addr", addrs[1], "--gossip-addr", addrs[2],
		"--voters", strconv.Itoa(voters), "--log-level", logLevel, "--shutdown-timeout", "3s"}
	if join != "" {
		args = append(args, "--join", join)
	}
	return args
}

// waitReady waits until a leader dispatches and every node is a live member.
func (lc *localCluster) waitReady(ctx context.Context, timeout time.Duration) error {
	api := newAPIClient(lc.children[0].api, "")
	deadline := time.Now().Add(timeout)
	for {
		var rep struct {
			Scheduler struct {
				Dispatching bool `json:"dispatching"`
			} `json:"scheduler"`
			Leader  string `json:"leader"`
			Members []struct {
				Health string `json:"health"`
			} `json:"members"`
		}
		if err := api.do(ctx, "GET", "/v1/status", nil, &rep); err == nil && rep.Leader != "" {
			alive := 0
			for _, m := range rep.Members {
				if m.Health == "alive" {
					alive++
				}
			}
			if alive == len(lc.children) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-lc.children[0].done:
			return fmt.Errorf("%s exited during startup; see %s", lc.children[0].id, lc.children[0].logPath)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the cluster was not ready after %s; see the logs in %s", timeout, lc.dir)
		}
	}
}

// stop stops every node (SIGTERM, then SIGKILL after 10s).
func (lc *localCluster) stop() {
	var wg sync.WaitGroup
	for _, c := range lc.children {
		wg.Add(1)
		go func(c *localNode) {
			defer wg.Done()
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-c.done:
			case <-time.After(10 * time.Second):
				_ = c.cmd.Process.Kill()
				<-c.done
			}
		}(c)
	}
	wg.Wait()
}

func filteredEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if len(kv) >= 10 && kv[:10] == "ASYNCNODE_" {
			continue
		}
		out = append(out, kv)
	}
	return out
}
