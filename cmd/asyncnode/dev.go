package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/asyncnode/asyncnode/internal/pglocal"
	"github.com/asyncnode/asyncnode/pgstore"
)

// cmdDev starts a throwaway PostgreSQL and a local cluster of child node
// processes, prints how to use them, and cleans everything up on Ctrl-C.
func cmdDev(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("dev", stdout, "asyncnode dev: a throwaway PostgreSQL and a local cluster, for trying asyncnode out")
	nodes := fs.Int("nodes", 1, "number of nodes")
	var lf logFlags
	lf.register(fs)
	if err := parse(fs, args, env); err != nil {
		return err
	}
	if *nodes < 1 || *nodes > 9 {
		return usagef("--nodes must be between 1 and 9, got %d", *nodes)
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	fmt.Fprintln(stdout, "starting a throwaway PostgreSQL ...")
	pg, err := pglocal.Start(ctx, pglocal.Options{})
	if err != nil {
		return err
	}
	defer pg.Stop()
	if err := pg.CreateDatabase(ctx, "asyncnode", ""); err != nil {
		return err
	}
	dsn := pg.DSN("asyncnode")
	if _, err := pgstore.Migrate(ctx, dsn, log); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "asyncnode-dev-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	type child struct {
		id, api string
		cmd     *exec.Cmd
		done    chan struct{}
	}
	var children []*child
	var firstGossip string
	voters := 3
	if *nodes < 3 {
		voters = *nodes
	}
	for i := 1; i <= *nodes; i++ {
		ports := make([]int, 3)
		for j := range ports {
			if ports[j], err = pglocal.FreePort(); err != nil {
				return err
			}
		}
		id := "node" + strconv.Itoa(i)
		addr := func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) }
		cargs := []string{"run", "--dsn", dsn, "--node-id", id, "--data-dir", filepath.Join(dir, id),
			"--http-addr", addr(ports[0]), "--raft-addr", addr(ports[1]), "--gossip-addr", addr(ports[2]),
			"--voters", strconv.Itoa(voters), "--log-level", lf.level, "--shutdown-timeout", "3s"}
		if firstGossip != "" {
			cargs = append(cargs, "--join", firstGossip)
		} else {
			firstGossip = addr(ports[2])
		}
		cmd := exec.Command(self, cargs...)
		logf, err := os.Create(filepath.Join(dir, id+".log"))
		if err != nil {
			return err
		}
		defer logf.Close()
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
		// The children must not inherit ASYNCNODE_* settings meant for dev.
		cmd.Env = filteredEnv()
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start %s: %w", id, err)
		}
		c := &child{id: id, api: addr(ports[0]), cmd: cmd, done: make(chan struct{})}
		go func() { _ = cmd.Wait(); close(c.done) }()
		children = append(children, c)
	}
	stopAll := func() {
		var wg sync.WaitGroup
		for _, c := range children {
			wg.Add(1)
			go func(c *child) {
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
	defer stopAll()

	// Wait until a leader dispatches.
	api := newAPIClient(children[0].api, "")
	deadline := time.Now().Add(60 * time.Second)
	for {
		var rep struct {
			Leader string `json:"leader"`
		}
		err := api.do(ctx, "GET", "/v1/status", nil, &rep)
		if err == nil && rep.Leader != "" {
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-children[0].done:
			return fmt.Errorf("node1 exited during startup; see %s", filepath.Join(dir, "node1.log"))
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no leader after 60s; see the logs in %s", dir)
		}
	}
	fmt.Fprintf(stdout, "\nasyncnode is running: PostgreSQL on 127.0.0.1:%d, %d node(s).\n\n", pg.Port(), *nodes)
	fmt.Fprintf(stdout, "Connect with:\n  psql \"%s\"\n\nThen try:\n", dsn)
	fmt.Fprintln(stdout, "  SELECT async.push_tasks(array[async.task('select 0', 'SELF')]);")
	fmt.Fprintln(stdout, "  SELECT task_id, consumed, processed, finish_status FROM async.task ORDER BY task_id DESC LIMIT 5;")
	fmt.Fprintln(stdout, "\nNodes:")
	for _, c := range children {
		fmt.Fprintf(stdout, "  %s  pid %d  api %s  log %s\n", c.id, c.cmd.Process.Pid, c.api, filepath.Join(dir, c.id+".log"))
	}
	fmt.Fprintf(stdout, "\nStatus:  %s status --http-addr %s\n", self, children[0].api)
	if *nodes > 1 {
		fmt.Fprintf(stdout, "Failover: kill -9 <pid of the leader>, then run status against another node.\n")
	}
	fmt.Fprintln(stdout, "\nPress Ctrl-C to stop everything and remove all files.")
	<-ctx.Done()
	fmt.Fprintln(stdout, "\nstopping ...")
	return nil
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
