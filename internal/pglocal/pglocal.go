// Package pglocal starts throwaway PostgreSQL servers for tests, benchmarks
// and the `asyncnode dev` command: initdb into a temporary directory, a
// postmaster on a free 127.0.0.1 port, trust authentication, and cleanup on
// Stop. When the current process runs as root, the server runs as the
// `postgres` OS user (PostgreSQL refuses to run as root).
package pglocal

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrNoPostgres is returned when no PostgreSQL server binaries can be found.
var ErrNoPostgres = errors.New("pglocal: PostgreSQL server binaries (initdb, postgres) not found: " +
	"install the PostgreSQL server package (Debian: apt-get install postgresql) or set ASYNCNODE_PG_BINDIR")

// Options configures a throwaway server.
type Options struct {
	// BinDir holds initdb and postgres; empty means auto-detect
	// ($ASYNCNODE_PG_BINDIR, pg_config --bindir, /usr/lib/postgresql/*/bin).
	BinDir string
	// Dir is the parent directory for the server's files; empty means os.TempDir().
	Dir string
	// Settings are extra `-c name=value` server settings.
	Settings map[string]string
	// Log receives the server's stderr; nil discards it.
	Log func(line string)
	// ListenAddresses are the IP addresses the server listens on; empty
	// means 127.0.0.1 only. The first one is the host of DSN. Clients on
	// the subnets of the machine's own addresses are trusted (pg_hba
	// "samenet") when an address other than loopback is given.
	ListenAddresses []string
}

// Server is one running throwaway PostgreSQL server.
type Server struct {
	opts    Options
	bin     string
	root    string // everything we own, removed by Stop
	dataDir string
	sockDir string
	port    int
	cred    *syscall.Credential

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// FindBinDir locates the PostgreSQL server binaries.
func FindBinDir() (string, error) {
	has := func(dir string) bool {
		for _, b := range []string{"initdb", "postgres"} {
			if st, err := os.Stat(filepath.Join(dir, b)); err != nil || st.IsDir() {
				return false
			}
		}
		return true
	}
	if d := os.Getenv("ASYNCNODE_PG_BINDIR"); d != "" {
		if has(d) {
			return d, nil
		}
		return "", fmt.Errorf("%w (ASYNCNODE_PG_BINDIR=%s has no initdb/postgres)", ErrNoPostgres, d)
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if d := strings.TrimSpace(string(out)); has(d) {
			return d, nil
		}
	}
	cands, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(cands, func(i, j int) bool { return versionOf(cands[i]) > versionOf(cands[j]) })
	cands = append(cands, "/usr/local/pgsql/bin", "/usr/pgsql/bin")
	for _, d := range cands {
		if has(d) {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if d := filepath.Dir(p); has(d) {
			return d, nil
		}
	}
	return "", ErrNoPostgres
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// Start initialises a new cluster and starts it. The caller must call Stop.
func Start(ctx context.Context, opts Options) (*Server, error) {
	bin := opts.BinDir
	if bin == "" {
		var err error
		if bin, err = FindBinDir(); err != nil {
			return nil, err
		}
	}
	parent := opts.Dir
	if parent == "" {
		parent = os.TempDir()
	}
	root, err := os.MkdirTemp(parent, "asyncnode-pg-")
	if err != nil {
		return nil, fmt.Errorf("pglocal: create temp dir: %w", err)
	}
	s := &Server{opts: opts, bin: bin, root: root,
		dataDir: filepath.Join(root, "data"), sockDir: filepath.Join(root, "sock")}
	if err := s.prepare(); err != nil {
		_ = os.RemoveAll(root)
		return nil, err
	}
	if err := s.initdb(ctx); err != nil {
		_ = os.RemoveAll(root)
		return nil, err
	}
	if err := s.Start(ctx); err != nil {
		_ = os.RemoveAll(root)
		return nil, err
	}
	return s, nil
}

// prepare creates directories and, when running as root, hands them to the
// postgres OS user.
func (s *Server) prepare() error {
	if err := os.MkdirAll(s.sockDir, 0o755); err != nil {
		return fmt.Errorf("pglocal: %w", err)
	}
	if err := os.Chmod(s.root, 0o755); err != nil {
		return fmt.Errorf("pglocal: %w", err)
	}
	if os.Getuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return fmt.Errorf("pglocal: running as root needs the 'postgres' OS user to run the server: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	for _, d := range []string{s.root, s.sockDir} {
		if err := os.Chown(d, uid, gid); err != nil {
			return fmt.Errorf("pglocal: chown %s: %w", d, err)
		}
	}
	return nil
}

func (s *Server) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(s.bin, name), args...)
	cmd.Dir = s.root
	cmd.Env = append(os.Environ(), "LC_ALL=C", "LANG=C")
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	return cmd
}

func (s *Server) initdb(ctx context.Context) error {
	cmd := s.command(ctx, "initdb", "-D", s.dataDir, "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--locale=C", "--no-sync")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("pglocal: initdb failed: %w\n%s", err, out)
	}
	if s.host() == "127.0.0.1" && len(s.opts.ListenAddresses) <= 1 {
		return nil
	}
	// initdb -A trust trusts loopback only; open the other listen
	// addresses' subnets too.
	f, err := os.OpenFile(filepath.Join(s.dataDir, "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pglocal: %w", err)
	}
	_, err = f.WriteString("host all all samenet trust\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pglocal: pg_hba.conf: %w", err)
	}
	return nil
}

// host is the first listen address.
func (s *Server) host() string {
	if len(s.opts.ListenAddresses) > 0 {
		return s.opts.ListenAddresses[0]
	}
	return "127.0.0.1"
}

// Start (re)starts the postmaster on the existing data directory. The port is
// chosen on the first start and kept for restarts.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return errors.New("pglocal: server already running")
	}
	if s.port == 0 {
		p, err := FreePort()
		if err != nil {
			return err
		}
		s.port = p
	}
	args := []string{"-D", s.dataDir, "-p", strconv.Itoa(s.port), "-k", s.sockDir,
		"-c", "listen_addresses=" + s.listen(),
		"-c", "fsync=off", "-c", "full_page_writes=off",
		"-c", "max_connections=300", "-c", "shared_buffers=128MB",
		"-c", "log_min_messages=warning", "-c", "logging_collector=off"}
	keys := make([]string, 0, len(s.opts.Settings))
	for k := range s.opts.Settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "-c", k+"="+s.opts.Settings[k])
	}
	// Not CommandContext: the server must outlive the start context.
	cmd := s.command(context.Background(), "postgres", args...)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Own process group, and an immediate shutdown if we die.
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	stderr := &lineWriter{fn: s.opts.Log}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("pglocal: start postgres: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	if err := s.waitReady(ctx, done); err != nil {
		_ = cmd.Process.Signal(syscall.SIGQUIT)
		<-done
		s.cmd, s.done = nil, nil
		return fmt.Errorf("pglocal: postgres did not become ready: %w (last output: %s)", err, stderr.tail())
	}
	return nil
}

func (s *Server) waitReady(ctx context.Context, done chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var last error
	for {
		select {
		case <-done:
			return errors.New("postgres exited")
		default:
		}
		c, err := pgx.Connect(ctx, s.DSN("postgres"))
		if err == nil {
			_ = c.Close(ctx)
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// StopMode is how the postmaster is asked to shut down.
type StopMode int

// Shutdown modes, as in `pg_ctl stop -m`.
const (
	Smart     StopMode = iota // wait for clients
	Fast                      // roll back clients, clean shutdown
	Immediate                 // no clean shutdown: crash recovery at next start
)

// Halt stops the postmaster but keeps the data directory, so Start can
// bring the same cluster back (for restart tests).
func (s *Server) Halt(mode StopMode) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return nil
	}
	sig := map[StopMode]syscall.Signal{Smart: syscall.SIGTERM, Fast: syscall.SIGINT, Immediate: syscall.SIGQUIT}[mode]
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.done:
	case <-time.After(60 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
	s.cmd, s.done = nil, nil
	return nil
}

// Stop shuts the server down immediately and removes all its files.
// It is safe to call more than once.
func (s *Server) Stop() error {
	err := s.Halt(Immediate)
	if rerr := os.RemoveAll(s.root); rerr != nil && err == nil {
		err = fmt.Errorf("pglocal: remove %s: %w", s.root, rerr)
	}
	return err
}

// listen is the listen_addresses setting.
func (s *Server) listen() string {
	if len(s.opts.ListenAddresses) == 0 {
		return "127.0.0.1"
	}
	return strings.Join(s.opts.ListenAddresses, ",")
}

// PID is the postmaster's process id, 0 when the server is not running.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Port is the TCP port of the server.
func (s *Server) Port() int { return s.port }

// DataDir is the cluster's data directory.
func (s *Server) DataDir() string { return s.dataDir }

// DSN returns a connection string for database db as the superuser
// postgres, on the first listen address (127.0.0.1 by default).
func (s *Server) DSN(db string) string { return s.dsn(s.host(), db) }

// SocketDSN is DSN through the server's Unix-domain socket instead of TCP:
// the same server, database and user, without the loopback TCP stack.
func (s *Server) SocketDSN(db string) string { return s.dsn(QuoteValue(s.sockDir), db) }

// dsn is the connection string of DSN and SocketDSN, to host (a value
// ready for a keyword/value string).
func (s *Server) dsn(host, db string) string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", host, s.port, db)
}

// QuoteValue quotes v as a value of a keyword/value connection string, so
// that a name or directory with spaces, quotes or backslashes in it stays
// one value.
func QuoteValue(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// CreateDatabase creates database name, optionally from template.
func (s *Server) CreateDatabase(ctx context.Context, name, template string) error {
	c, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		return fmt.Errorf("pglocal: connect: %w", err)
	}
	defer c.Close(ctx)
	sql := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize()
	if template != "" {
		sql += " TEMPLATE " + pgx.Identifier{template}.Sanitize()
	}
	if _, err := c.Exec(ctx, sql); err != nil {
		return fmt.Errorf("pglocal: %s: %w", sql, err)
	}
	return nil
}

// FreePort asks the kernel for a free TCP port on 127.0.0.1.
func FreePort() (int, error) {
	ps, err := FreePorts(1)
	if err != nil {
		return 0, err
	}
	return ps[0], nil
}

// FreePorts returns n distinct TCP ports on 127.0.0.1 that were free a
// moment ago. The ports are held open together while they are picked, so
// that the kernel cannot hand the same one out twice (ports picked one
// after another, each released before the next, can repeat).
func FreePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pglocal: free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

type lineWriter struct {
	mu   sync.Mutex
	fn   func(string)
	buf  []byte
	last []string
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := strings.IndexByte(string(w.buf), '\n')
		if i < 0 {
			break
		}
		line := string(w.buf[:i])
		w.buf = w.buf[i+1:]
		w.last = append(w.last, line)
		if len(w.last) > 20 {
			w.last = w.last[1:]
		}
		if w.fn != nil {
			w.fn(line)
		}
	}
	return len(p), nil
}

func (w *lineWriter) tail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return strings.Join(w.last, " | ")
}
