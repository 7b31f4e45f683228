package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/asyncnode/asyncnode/agent"
	"github.com/asyncnode/asyncnode/cluster"
	"github.com/asyncnode/asyncnode/executor"
	"github.com/asyncnode/asyncnode/internal/gctune"
	"github.com/asyncnode/asyncnode/pgstore"
)

func newFlagSet(name string, stdout io.Writer, summary string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(stdout, "%s\n\nFlags:\n", summary)
		printDefaults(stdout, fs)
	}
	return fs
}

// parse parses args (and ASYNCNODE_* variables) into fs.
func parse(fs *flag.FlagSet, args []string, env func(string) string) error {
	return parseFlags(fs, args, env) // flag prints the help itself on --help
}

type logFlags struct {
	level string
	json  bool
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&l.level, "log-level", "info", "log level: trace, debug, info, warn, error")
	fs.BoolVar(&l.json, "log-json", false, "log in JSON")
}

func (l *logFlags) logger(w io.Writer) (hclog.Logger, error) {
	lvl := hclog.LevelFromString(l.level)
	if lvl == hclog.NoLevel {
		return nil, usagef("--log-level must be one of trace, debug, info, warn, error; got %q", l.level)
	}
	return hclog.New(&hclog.LoggerOptions{Name: "asyncnode", Level: lvl, JSONFormat: l.json, Output: w}), nil
}

func cmdInit(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("init", stdout, "asyncnode init --dsn DSN: install or upgrade the async schema (idempotent)")
	dsn := fs.String("dsn", "", "server database connection string (libpq key=value or URL; PG* variables apply)")
	var lf logFlags
	lf.register(fs)
	if err := parse(fs, args, env); err != nil {
		return err
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	applied, err := pgstore.Migrate(ctx, *dsn, log)
	if err != nil {
		return err
	}
	if len(applied) == 0 {
		fmt.Fprintf(stdout, "async schema is up to date (version %d)\n", pgstore.CurrentVersion())
	} else {
		fmt.Fprintf(stdout, "applied migrations %v; async schema is at version %d\n", applied, pgstore.CurrentVersion())
	}
	return nil
}

var nodeIDRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func checkAddr(name, v string, allowEmpty bool) error {
	if v == "" && allowEmpty {
		return nil
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return usagef("--%s must be host:port, got %q", name, v)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return usagef("--%s has an invalid port in %q", name, v)
	}
	if host == "" {
		return usagef("--%s needs a host (e.g. 127.0.0.1:%s), got %q", name, port, v)
	}
	return nil
}

// maxGCHeadroomMiB bounds --gc-headroom-mib: 64 GiB.
const maxGCHeadroomMiB = 65536

// maxTargetConns bounds --target-conns: far above what one PostgreSQL
// server accepts by default, low enough to catch a typo.
const maxTargetConns = 10000

type runFlags struct {
	dsn, nodeID, dataDir, httpAddr, raftAddr, gossipAddr string
	join                                                 listFlag
	voters, maxTasks, targetConns, targetShortConns      int
	gcHeadroomMiB                                        int
	gossipKey, token, tlsCert, tlsKey, tlsCA             string
	lostAfter, lease, shutdown, commitTimeout            time.Duration
	targetLongAfter                                      time.Duration
	pprof                                                bool
	log                                                  logFlags
}

func (r *runFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&r.dsn, "dsn", "", "server database connection string (libpq key=value or URL; PG* variables apply)")
	fs.StringVar(&r.nodeID, "node-id", "", "this node's unique id (letters, digits, _ . -)")
	fs.StringVar(&r.dataDir, "data-dir", "", "directory for Raft state (created if missing)")
	fs.StringVar(&r.httpAddr, "http-addr", "127.0.0.1:7700", "node API address host:port")
	fs.StringVar(&r.raftAddr, "raft-addr", "127.0.0.1:7701", "Raft address host:port")
	fs.StringVar(&r.gossipAddr, "gossip-addr", "127.0.0.1:7702", "gossip (memberlist) address host:port")
	fs.Var(&r.join, "join", "gossip address(es) of existing members, comma-separated")
	fs.IntVar(&r.voters, "voters", 3, "number of Raft voters (3 or 5; further nodes are non-voters)")
	fs.IntVar(&r.maxTasks, "max-tasks", 0, "cap on tasks this node runs at once (0: only control.workers and pools)")
	fs.IntVar(&r.targetConns, "target-conns", executor.DefaultMaxConnsPerTarget, "most connections this node opens to one target (1-10000); its tasks beyond that wait for a connection, within their timeout")
	fs.IntVar(&r.targetShortConns, "target-short-conns", executor.DefaultShortConns, "most connections to one target used at once by this node's short tasks (1-10000); a task that has held its connection for --target-long-after stops counting, so long tasks each get one, up to --target-conns")
	fs.DurationVar(&r.targetLongAfter, "target-long-after", executor.DefaultLongTaskAfter, "how long a task holds its target connection before it stops counting against --target-short-conns (1ms-1h; raise it above the round trip to a distant target)")
	fs.StringVar(&r.gossipKey, "gossip-key", "", "base64 cluster key (16, 24 or 32 bytes) encrypting gossip")
	fs.StringVar(&r.token, "token", "", "token required by the node API")
	fs.StringVar(&r.tlsCert, "tls-cert", "", "TLS certificate for Raft and the API")
	fs.StringVar(&r.tlsKey, "tls-key", "", "TLS key")
	fs.StringVar(&r.tlsCA, "tls-ca", "", "TLS CA bundle that peers' certificates must chain to")
	fs.DurationVar(&r.lostAfter, "lost-after", 10*time.Second, "how long a node must be unreachable before its tasks are resolved as lost")
	fs.DurationVar(&r.lease, "lease", 0, "how long this node keeps running tasks without contact with the leader (0: half of --lost-after, at least 1s)")
	fs.DurationVar(&r.commitTimeout, "raft-commit-timeout", cluster.DefaultCommitTimeout, "longest wait for Raft to tell followers that entries committed when none follow (1ms-10s; shorter: sooner revocations on followers, more CPU when idle)")
	fs.IntVar(&r.gcHeadroomMiB, "gc-headroom-mib", gctune.DefaultHeadroom>>20, "MiB the Go heap may grow above its live size before the garbage collector runs (0-65536; 0: Go's default, GOGC=100); not applied when GOGC is set")
	fs.BoolVar(&r.pprof, "pprof", false, "serve Go profiles under /debug/pprof/ on the node API")
	fs.DurationVar(&r.shutdown, "shutdown-timeout", 10*time.Second, "on SIGTERM, how long running tasks may finish before they are stopped")
	r.log.register(fs)
}

func (r *runFlags) validate() (*agent.Config, error) {
	if r.nodeID == "" {
		return nil, usagef("--node-id is required")
	}
	if !nodeIDRe.MatchString(r.nodeID) {
		return nil, usagef("--node-id %q is invalid: use 1-64 letters, digits, '_', '.', '-'", r.nodeID)
	}
	if r.dataDir == "" {
		return nil, usagef("--data-dir is required")
	}
	for _, a := range []struct{ n, v string }{{"http-addr", r.httpAddr}, {"raft-addr", r.raftAddr}, {"gossip-addr", r.gossipAddr}} {
		if err := checkAddr(a.n, a.v, false); err != nil {
			return nil, err
		}
	}
	for _, j := range r.join {
		if err := checkAddr("join", j, false); err != nil {
			return nil, err
		}
	}
	if r.voters < 1 || r.voters > 7 {
		return nil, usagef("--voters must be between 1 and 7 (3 or 5 recommended), got %d", r.voters)
	}
	if r.maxTasks < 0 {
		return nil, usagef("--max-tasks must not be negative, got %d", r.maxTasks)
	}
	if r.targetConns < 1 || r.targetConns > maxTargetConns {
		return nil, usagef("--target-conns must be between 1 and %d, got %d", maxTargetConns, r.targetConns)
	}
	if r.targetShortConns < 1 || r.targetShortConns > maxTargetConns {
		return nil, usagef("--target-short-conns must be between 1 and %d, got %d", maxTargetConns, r.targetShortConns)
	}
	if r.gcHeadroomMiB < 0 || r.gcHeadroomMiB > maxGCHeadroomMiB {
		return nil, usagef("--gc-headroom-mib must be between 0 and %d, got %d", maxGCHeadroomMiB, r.gcHeadroomMiB)
	}
	if r.targetLongAfter < time.Millisecond || r.targetLongAfter > time.Hour {
		return nil, usagef("--target-long-after must be between 1ms and 1h, got %s", r.targetLongAfter)
	}
	if err := positive("lost-after", r.lostAfter); err != nil {
		return nil, err
	}
	if r.lease < 0 {
		return nil, usagef("--lease must not be negative, got %s", r.lease)
	}
	lease := r.lease
	if lease == 0 {
		lease = agent.DefaultLease(r.lostAfter)
	}
	if lease >= r.lostAfter {
		return nil, usagef("--lease (%s) must be shorter than --lost-after (%s), or tasks could run on two nodes at once", lease, r.lostAfter)
	}
	if err := positive("shutdown-timeout", r.shutdown); err != nil {
		return nil, err
	}
	if r.commitTimeout < time.Millisecond || r.commitTimeout > 10*time.Second {
		return nil, usagef("--raft-commit-timeout must be between 1ms and 10s, got %s", r.commitTimeout)
	}
	var key []byte
	if r.gossipKey != "" {
		k, err := base64.StdEncoding.DecodeString(r.gossipKey)
		if err != nil {
			return nil, usagef("--gossip-key must be base64: %v", err)
		}
		if n := len(k); n != 16 && n != 24 && n != 32 {
			return nil, usagef("--gossip-key must decode to 16, 24 or 32 bytes, got %d", n)
		}
		key = k
	}
	tls := 0
	for _, v := range []string{r.tlsCert, r.tlsKey, r.tlsCA} {
		if v != "" {
			tls++
		}
	}
	if tls != 0 && tls != 3 {
		return nil, usagef("--tls-cert, --tls-key and --tls-ca must be given together")
	}
	if _, err := pgx.ParseConfig(r.dsn); err != nil {
		return nil, usagef("--dsn is invalid: %s", pgstore.MaskDSN(err.Error()))
	}
	return &agent.Config{NodeID: r.nodeID, DSN: r.dsn, DataDir: r.dataDir, RaftAddr: r.raftAddr,
		GossipAddr: r.gossipAddr, HTTPAddr: r.httpAddr, Join: r.join, Voters: r.voters, Key: key,
		Token: r.token, TLSCert: r.tlsCert, TLSKey: r.tlsKey, TLSCA: r.tlsCA, MaxTasks: r.maxTasks, TargetConns: r.targetConns,
		TargetShortConns: r.targetShortConns, TargetLongAfter: r.targetLongAfter,
		LostAfter: r.lostAfter, Lease: r.lease, DrainTimeout: r.shutdown, Pprof: r.pprof, CommitTimeout: r.commitTimeout}, nil
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("run", stdout, "asyncnode run: start a node (bootstraps a new cluster with an empty --data-dir and no --join)")
	var rf runFlags
	rf.register(fs)
	if err := parse(fs, args, env); err != nil {
		return err
	}
	cfg, err := rf.validate()
	if err != nil {
		return err
	}
	log, err := rf.log.logger(stderr)
	if err != nil {
		return err
	}
	cfg.Log = log
	a, err := agent.New(*cfg)
	if err != nil {
		return err
	}
	stopTuner, _ := startGCTuner(ctx, rf.gcHeadroomMiB, env, log)
	defer stopTuner()
	if err := a.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-a.Left():
		log.Info("left the cluster; stopping")
	}
	log.Info("shutting down: no new tasks; waiting for running ones", "timeout", rf.shutdown)
	dctx, cancel := context.WithTimeout(context.Background(), rf.shutdown)
	if err := a.Drain(dctx); err != nil {
		log.Warn("drain incomplete", "error", err)
	}
	cancel()
	sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return a.Stop(sctx)
}

// startGCTuner runs the garbage collector's tuner (internal/gctune) with
// headroomMiB, unless that is 0 or GOGC is set in env (the operator's
// choice stands). It returns the function that stops it and waits for it,
// which puts back the GOGC it found, and whether it runs.
func startGCTuner(ctx context.Context, headroomMiB int, env func(string) string, log hclog.Logger) (stop func(), tuning bool) {
	if headroomMiB == 0 {
		return func() {}, false
	}
	if v := env("GOGC"); v != "" {
		log.Info("GOGC is set; not tuning the garbage collector", "GOGC", v)
		return func() {}, false
	}
	tctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	t := &gctune.Tuner{Headroom: uint64(headroomMiB) << 20, OnChange: func(live uint64, p int) {
		log.Debug("garbage collector target set", "live_heap_bytes", live, "gogc", p)
	}}
	go func() {
		defer close(done)
		t.Run(tctx)
	}()
	return func() {
		cancel()
		<-done
	}, true
}

// apiClient talks to a node's HTTP API.
type apiClient struct {
	base  string
	token string
	http  *http.Client
}

func newAPIClient(addr, token string) *apiClient {
	base := addr
	if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
		base = "http://" + base
	}
	return &apiClient{base: base, token: token, http: &http.Client{Timeout: 15 * time.Second}}
}

func (c *apiClient) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("node API %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error string `json:"error"`
			Code  string `json:"code"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("node API %s %s: %s (%s)", method, path, e.Error, e.Code)
		}
		return fmt.Errorf("node API %s %s: HTTP %d: %s", method, path, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("node API %s %s: bad response: %w", method, path, err)
		}
	}
	return nil
}

// apiOpts are the flags of the commands that call a node's API.
type apiOpts struct{ addr, token, tlsCA string }

func apiFlags(fs *flag.FlagSet) *apiOpts {
	o := &apiOpts{}
	fs.StringVar(&o.addr, "http-addr", "127.0.0.1:7700", "node API address host:port")
	fs.StringVar(&o.token, "token", "", "node API token")
	fs.StringVar(&o.tlsCA, "tls-ca", "", "CA bundle (PEM) that a node API served over TLS must chain to; implies https")
	return o
}

// client validates the flags and returns a client for the node API.
func (o *apiOpts) client() (*apiClient, error) {
	if err := checkAddr("http-addr", o.addr, false); err != nil {
		return nil, err
	}
	c := newAPIClient(o.addr, o.token)
	if o.tlsCA == "" {
		return c, nil
	}
	pem, err := os.ReadFile(o.tlsCA)
	if err != nil {
		return nil, usagef("--tls-ca: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, usagef("--tls-ca %s holds no PEM certificate", o.tlsCA)
	}
	c.base = "https://" + o.addr
	c.http.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}
	return c, nil
}

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("status", stdout, "asyncnode status: leader, members, pools, queue depth and recent failures")
	api := apiFlags(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args, env); err != nil {
		return err
	}
	c, err := api.client()
	if err != nil {
		return err
	}
	var rep agent.StatusReport
	if err := c.do(ctx, http.MethodGet, "/v1/status", nil, &rep); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printStatus(stdout, rep)
	}
	if len(rep.Errors) > 0 {
		return fmt.Errorf("the node reported %d error(s) (shown above)", len(rep.Errors))
	}
	return nil
}

func printStatus(w io.Writer, rep agent.StatusReport) {
	leader := rep.Leader
	if leader == "" {
		leader = "(none)"
	}
	fmt.Fprintf(w, "node %s  leader %s  term %d\n", rep.Node, leader, rep.Term)
	if rep.Scheduler.Leading {
		state := "dispatching"
		if !rep.Scheduler.Dispatching {
			state = "NOT dispatching: " + rep.Scheduler.Reason
		}
		fmt.Fprintf(w, "this node leads: %s (%d tasks dispatched this term)\n", state, rep.Scheduler.Dispatched)
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nMEMBER\tROLE\tHEALTH\tRUNNING\tLAST CONTACT\tAPI")
	for _, m := range rep.Members {
		lc := "-"
		if !m.LastContact.IsZero() {
			lc = time.Since(m.LastContact).Round(time.Millisecond).String() + " ago"
		}
		role := string(m.Role)
		if m.Draining {
			role += " (draining)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", m.ID, role, m.Health, m.Running, lc, m.APIAddr)
	}
	fmt.Fprintf(tw, "\nWORKERS\t%d/%d running\n", rep.Workers.Running, rep.Workers.Limit)
	fmt.Fprintf(tw, "QUEUE\t%d queued, %d running, %d yielded\n", rep.Queue.Queued, rep.Queue.Running, rep.Queue.Yielded)
	fmt.Fprintln(tw, "\nPOOL\tRUNNING/LIMIT")
	for _, p := range rep.Pools {
		fmt.Fprintf(tw, "%s\t%d/%d\n", p.Name, p.Running, p.Limit)
	}
	tw.Flush()
	if len(rep.Failures) > 0 {
		fmt.Fprintln(w, "\nRECENT FAILURES")
		for _, f := range rep.Failures {
			msg := strings.ReplaceAll(f.Error, "\n", " ")
			if len(msg) > 120 {
				msg = msg[:117] + "..."
			}
			fmt.Fprintf(w, "  task %d %s at %s: %s\n", f.TaskID, f.FinishStatus, f.Processed.Format(time.RFC3339), msg)
		}
	}
	for _, e := range rep.Errors {
		fmt.Fprintln(w, "error:", e)
	}
}

func cmdJoin(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("join", stdout, "asyncnode join --http-addr LOCAL ADDR...: ask the running node at LOCAL to join the members at gossip ADDR")
	api := apiFlags(fs)
	if err := parse(fs, args, env); err != nil {
		return err
	}
	c, err := api.client()
	if err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usagef("give at least one gossip address to join (host:port)")
	}
	for _, a := range fs.Args() {
		if err := checkAddr("join address", a, false); err != nil {
			return err
		}
	}
	if err := c.do(ctx, http.MethodPost, "/v1/join", map[string]any{"addrs": fs.Args()}, nil); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "joined")
	return nil
}

func cmdLeave(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("leave", stdout, "asyncnode leave --http-addr LOCAL: leave the cluster gracefully (running tasks finish first, bounded by the node's --shutdown-timeout)")
	api := apiFlags(fs)
	timeout := fs.Duration("timeout", 15*time.Minute, "how long to wait for the node to drain and leave")
	if err := parse(fs, args, env); err != nil {
		return err
	}
	if *timeout <= 0 {
		return usagef("--timeout must be positive, got %s", *timeout)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c, err := api.client()
	if err != nil {
		return err
	}
	c.http.Timeout = 0 // bounded by ctx: draining may take a while
	if err := c.do(ctx, http.MethodPost, "/v1/leave", nil, nil); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "left the cluster")
	return nil
}
