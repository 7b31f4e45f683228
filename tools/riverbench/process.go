package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
)

// With --processes N above 1, riverbench runs N copies of itself as child
// processes, each with one River client working the same queue, as N
// asyncnode nodes are N processes. The parent inserts the jobs, starts the
// children's clients at once and reads their progress. A child speaks one
// line at a time on its standard output:
//
//	ready                  its client is built and subscribed, not started
//	progress N             N jobs completed on it so far (every 10 ms)
//	done completed=N failed=F last=UNIXNANO cpu_ns=C
//
// and reads "start" on its standard input, then stops once that input ends.
// The connection string and the query reach it in its environment, so that
// no password shows on a command line.
const (
	childEnv = "RIVERBENCH_CHILD" // set: this process is a child
	dsnEnv   = "RIVERBENCH_DSN"
	queryEnv = "RIVERBENCH_QUERY"
)

// isChild reports whether this process is a child of another riverbench.
func isChild() bool { return os.Getenv(childEnv) != "" }

// runChild runs this process as a child (childMain on its arguments and
// standard streams) and returns its exit code; an error goes to standard
// error, where the parent reads it. main and the tests' TestMain both call it.
func runChild(ctx context.Context) int {
	if err := childMain(ctx, os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "riverbench child: %v\n", err)
		return 1
	}
	return 0
}

// childMain runs a child: flags from args, the rest from the environment.
func childMain(ctx context.Context, args []string, in io.Reader, out io.Writer) error {
	o, err := parseFlags(args, io.Discard)
	if err != nil {
		return err
	}
	query, ok := os.LookupEnv(queryEnv)
	if !ok {
		return errors.New(queryEnv + " is not set")
	}
	pool, err := pgxpool.New(ctx, os.Getenv(dsnEnv))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer pool.Close()
	client, err := newClient(pool, o, query)
	if err != nil {
		return err
	}
	events, cancel := subscribe(client, o.jobs)
	defer cancel()
	fmt.Fprintln(out, "ready")
	lines := bufio.NewScanner(in)
	if !lines.Scan() || lines.Text() != "start" {
		return errors.New(`no "start" from the parent`)
	}
	stop := make(chan struct{})
	go func() {
		for lines.Scan() {
		}
		close(stop)
	}()
	c0 := processCPU()
	if err := client.Start(ctx); err != nil {
		return fmt.Errorf("start the client: %w", err)
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var completed, failed, reported int
	var last time.Time
	for running := true; running; {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-stop:
			running = false
		case ev, ok := <-events:
			if !ok {
				return errors.New("the client closed its event channel before its input ended")
			}
			if ev.Kind == river.EventKindJobCompleted {
				completed++
			} else {
				failed++
			}
			last = time.Now()
		case <-tick.C:
			if completed+failed != reported {
				reported = completed + failed
				fmt.Fprintf(out, "progress %d\n", reported)
			}
		}
	}
	cpu := processCPU() - c0
	if err := stopClient(ctx, client); err != nil {
		return err
	}
	var lastNano int64
	if !last.IsZero() {
		lastNano = last.UnixNano()
	}
	fmt.Fprintf(out, "done completed=%d failed=%d last=%d cpu_ns=%d\n", completed, failed, lastNano, cpu.Nanoseconds())
	return nil
}

// child is one started child process.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr bytes.Buffer
}

// childLine is one line a child wrote, or its end (line "").
type childLine struct {
	child int
	line  string
	err   error // why its output ended, with line ""
}

// drainProcesses works the inserted jobs with o.processes child processes
// (see above) and returns the round's figures: jobs/s from the moment the
// children were told to start to the last completion any of them saw, their
// CPU time, and the server's when postmaster is not 0.
func drainProcesses(ctx context.Context, dsn string, o options, query string, postmaster int) (res result, err error) {
	exe, err := os.Executable()
	if err != nil {
		return res, fmt.Errorf("find riverbench's own binary to start children: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // kills children still running on an early return
	lines := make(chan childLine, 64)
	children := make([]*child, o.processes)
	var readers sync.WaitGroup
	defer func() {
		// Children whose input ends stop their clients and exit; those
		// that do not within 30 s (or at once, after an error) are killed
		// by the context.
		for _, c := range children {
			if c != nil {
				_ = c.stdin.Close()
			}
		}
		exited := make(chan struct{})
		go func() {
			defer close(exited)
			for _, c := range children {
				if c != nil {
					_ = c.cmd.Wait()
				}
			}
		}()
		if err != nil {
			cancel()
		}
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
		}
		cancel()
		<-exited
		readers.Wait()
	}()
	for i := range children {
		c := &child{cmd: exec.CommandContext(ctx, exe,
			"--jobs", strconv.Itoa(o.jobs), "--workers", strconv.Itoa(o.workers), "--conns", strconv.Itoa(o.conns),
			"--fetch-cooldown", o.cooldown.String(), "--fetch-poll", o.poll.String())}
		c.cmd.Env = append(os.Environ(), childEnv+"=1", dsnEnv+"="+dsn, queryEnv+"="+query)
		c.cmd.Stderr = &c.stderr
		if c.stdin, err = c.cmd.StdinPipe(); err != nil {
			return res, fmt.Errorf("child %d: %w", i+1, err)
		}
		stdout, err := c.cmd.StdoutPipe()
		if err != nil {
			return res, fmt.Errorf("child %d: %w", i+1, err)
		}
		if err := c.cmd.Start(); err != nil {
			return res, fmt.Errorf("start child %d: %w", i+1, err)
		}
		children[i] = c
		readers.Go(func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				select {
				case lines <- childLine{child: i, line: sc.Text()}:
				case <-ctx.Done():
					return
				}
			}
			select {
			case lines <- childLine{child: i, err: cmp.Or(sc.Err(), io.EOF)}:
			case <-ctx.Done():
			}
		})
	}
	// next is the next line of any child, or the end of a child's output
	// (its err set).
	next := func(what string) (childLine, error) {
		select {
		case <-ctx.Done():
			return childLine{}, ctx.Err()
		case <-time.After(2 * time.Minute):
			return childLine{}, fmt.Errorf("no word from the children for 2 minutes, waiting for %s", what)
		case l := <-lines:
			return l, nil
		}
	}
	// ended is the error of a child whose output ended too early, with
	// what it wrote on its standard error.
	ended := func(l childLine, what string) error {
		_ = children[l.child].cmd.Wait()
		return fmt.Errorf("child %d ended while riverbench waited for %s: %s", l.child+1, what,
			cmp.Or(strings.TrimSpace(children[l.child].stderr.String()), l.err.Error()))
	}
	for ready := 0; ready < len(children); {
		l, err := next(`"ready"`)
		if err != nil {
			return res, err
		}
		if l.err != nil {
			return res, ended(l, `"ready"`)
		}
		if l.line != "ready" {
			return res, fmt.Errorf("child %d said %q before it was ready", l.child+1, l.line)
		}
		ready++
	}
	s0, err := serverCPU(postmaster)
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	for i, c := range children {
		if _, err := io.WriteString(c.stdin, "start\n"); err != nil {
			return res, fmt.Errorf("start child %d: %w", i+1, err)
		}
	}
	progress := make([]int, len(children))
	for sum := 0; sum < o.jobs; {
		l, err := next("the jobs to complete")
		if err != nil {
			return res, err
		}
		if l.err != nil {
			return res, ended(l, "the jobs to complete")
		}
		n, ok := strings.CutPrefix(l.line, "progress ")
		if !ok {
			return res, fmt.Errorf("child %d said %q while working", l.child+1, l.line)
		}
		p, err := strconv.Atoi(n)
		if err != nil {
			return res, fmt.Errorf("child %d said %q while working", l.child+1, l.line)
		}
		sum += p - progress[l.child]
		progress[l.child] = p
	}
	s1, err := serverCPU(postmaster)
	if err != nil {
		return res, err
	}
	for _, c := range children {
		_ = c.stdin.Close()
	}
	var completed, failed int
	var last int64
	var cpu time.Duration
	said := make([]bool, len(children))
	for done := 0; done < len(children); {
		l, err := next(`"done"`)
		if err != nil {
			return res, err
		}
		if l.err != nil {
			if said[l.child] {
				continue
			}
			return res, ended(l, `"done"`)
		}
		if strings.HasPrefix(l.line, "progress ") {
			continue
		}
		var c, f int
		var at, ns int64
		if _, err := fmt.Sscanf(l.line, "done completed=%d failed=%d last=%d cpu_ns=%d", &c, &f, &at, &ns); err != nil {
			return res, fmt.Errorf("child %d said %q at its end", l.child+1, l.line)
		}
		completed, failed, last, cpu = completed+c, failed+f, max(last, at), cpu+time.Duration(ns)
		said[l.child] = true
		done++
	}
	if failed > 0 || completed != o.jobs {
		return res, fmt.Errorf("the children completed %d jobs and saw %d fail or be cancelled, of %d", completed, failed, o.jobs)
	}
	return result{rate: float64(o.jobs) / time.Unix(0, last).Sub(t0).Seconds(), process: cpu, server: s1 - s0, onSrv: postmaster != 0}, nil
}
