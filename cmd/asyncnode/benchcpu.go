package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgxpool"
)

// userHZ is the unit of the CPU times in /proc/<pid>/stat: Linux reports
// them in USER_HZ, 100 a second on every architecture it runs Go on.
const userHZ = 100

// procTimes is one process's CPU time from /proc/<pid>/stat, in ticks.
type procTimes struct {
	ppid     int
	self     int64 // utime + stime
	children int64 // cutime + cstime: children it has waited for
}

// readProcTimes parses /proc/<pid>/stat. The command name (field 2) may
// hold spaces and parentheses, so the fields are counted from the last ')'.
func readProcTimes(pid int) (procTimes, error) {
	return readProcFile(pid, "stat", parseProcStat)
}

// readProcFile reads /proc/<pid>/<name> and parses it with parse.
func readProcFile[T any](pid int, name string, parse func(pid int, s string) (T, error)) (T, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, name))
	if err != nil {
		var zero T
		return zero, err
	}
	return parse(pid, string(b))
}

func parseProcStat(pid int, s string) (procTimes, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procTimes{}, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	var err error
	// After ") ": state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
	f := strings.Fields(s[i+1:])
	if len(f) < 15 {
		return procTimes{}, fmt.Errorf("/proc/%d/stat: %d fields after the command name", pid, len(f))
	}
	var v [5]int64
	for k, idx := range []int{1, 11, 12, 13, 14} {
		if v[k], err = strconv.ParseInt(f[idx], 10, 64); err != nil {
			return procTimes{}, fmt.Errorf("/proc/%d/stat field %d: %w", pid, idx+3, err)
		}
	}
	return procTimes{ppid: int(v[0]), self: v[1] + v[2], children: v[3] + v[4]}, nil
}

// cpuMeter adds up the CPU time of the bench's nodes and, when bench
// started the server itself or finds it on this machine
// (localPostmaster), of the server: the postmaster, every process it has
// forked (backends, background workers) and those it has reaped.
type cpuMeter struct {
	nodes      func() []int // node process ids
	postmaster int          // 0: the server's CPU is not measured
}

// cpuSample is the CPU time used so far, in ticks, and the nodes' read
// and write system calls so far.
type cpuSample struct {
	node, server int64
	ok           bool // false: /proc is not readable here (not Linux)
	calls        procCalls
	callsOK      bool // false: some node's /proc/<pid>/io could not be read
}

func (m cpuMeter) sample() cpuSample {
	var s cpuSample
	s.callsOK = true
	for _, pid := range m.nodes() {
		t, err := readProcTimes(pid)
		if err != nil {
			return cpuSample{}
		}
		s.node += t.self
		c, err := readProcCalls(pid)
		if err != nil {
			s.callsOK = false
		}
		s.calls.reads += c.reads
		s.calls.writes += c.writes
	}
	if m.postmaster != 0 {
		srv, err := serverTicks(m.postmaster)
		if err != nil {
			return cpuSample{}
		}
		s.server = srv
	}
	s.ok = true
	return s
}

// procCalls is a process's read and write system calls so far, as
// /proc/<pid>/io counts them (syscr, syscw: read(2) and write(2) and
// their vector and positioned forms, a read that finds nothing yet
// included; Go reads and writes its TCP sockets with these, while UDP's
// sendto and recvfrom are not counted). The writes hardly vary with the
// machine's speed, unlike CPU time: a task whose text and session reset go
// out in one write adds one.
type procCalls struct{ reads, writes int64 }

// readProcCalls parses /proc/<pid>/io (readable for one's own processes,
// or as root).
func readProcCalls(pid int) (procCalls, error) {
	return readProcFile(pid, "io", parseProcIO)
}

func parseProcIO(pid int, s string) (procCalls, error) {
	var c procCalls
	var seen int
	for line := range strings.Lines(s) {
		name, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || (name != "syscr" && name != "syscw") {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return procCalls{}, fmt.Errorf("/proc/%d/io %s: %w", pid, name, err)
		}
		if name == "syscr" {
			c.reads = n
		} else {
			c.writes = n
		}
		seen++
	}
	if seen != 2 {
		return procCalls{}, fmt.Errorf("/proc/%d/io: no syscr and syscw lines", pid)
	}
	return c, nil
}

// serverTicks is the CPU time of postmaster and of all its children, live
// or reaped.
func serverTicks(postmaster int) (int64, error) {
	return serverTicksFrom(postmaster, readProcTimes, listPIDs)
}

// serverTicksFrom is serverTicks reading processes with read and listing
// them with list. A child the postmaster reaps while the list is walked is
// either counted twice (live, then in the postmaster's children time) or,
// read after it was reaped, once; so the postmaster is read before and after
// the walk and the walk repeated until no child was reaped during it. Under
// constant churn the last walk counts, with the postmaster read after it:
// that can count a child twice, never miss one (a sample that missed one
// could make the CPU used between two samples negative).
func serverTicksFrom(postmaster int, read func(int) (procTimes, error), list func() ([]int, error)) (int64, error) {
	var total int64
	for range 5 {
		before, err := read(postmaster)
		if err != nil {
			return 0, err
		}
		pids, err := list()
		if err != nil {
			return 0, err
		}
		var live int64
		for _, pid := range pids {
			if pid == postmaster {
				continue
			}
			t, err := read(pid)
			if processGone(err) {
				continue // ended meanwhile: the postmaster's children time has it, or will
			}
			if err != nil {
				return 0, err
			}
			if t.ppid == postmaster {
				live += t.self
			}
		}
		after, err := read(postmaster)
		if err != nil {
			return 0, err
		}
		total = after.self + after.children + live
		if after.children == before.children {
			break
		}
	}
	return total, nil
}

// listPIDs lists the process ids in /proc.
func listPIDs() ([]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	pids := make([]int, 0, len(entries))
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// processGone reports whether err, from reading /proc/<pid>/stat, says
// the process ended while /proc was being read: its directory is gone
// (ENOENT), or it is still listed but reading it fails with ESRCH.
func processGone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

// perTask renders the CPU used between two samples as microseconds per
// task, and the nodes' read and write system calls per task:
// " node_cpu_us_per_task=.. server_cpu_us_per_task=.. node_reads_per_task=..
// node_writes_per_task=.." (each part only when measured), or "" when
// /proc could not be read.
func (m cpuMeter) perTask(before, after cpuSample, tasks int) string {
	if !before.ok || !after.ok || tasks <= 0 {
		return ""
	}
	per := func(n int64, scale float64) string { return num(float64(n) * scale / float64(tasks)) }
	const us = 1e6 / userHZ // ticks to microseconds
	nodes := len(m.nodes()) > 0
	var b strings.Builder
	if nodes {
		b.WriteString(" node_cpu_us_per_task=" + per(after.node-before.node, us))
	}
	if m.postmaster != 0 {
		b.WriteString(" server_cpu_us_per_task=" + per(after.server-before.server, us))
	}
	if nodes && before.callsOK && after.callsOK {
		b.WriteString(" node_reads_per_task=" + per(after.calls.reads-before.calls.reads, 1) +
			" node_writes_per_task=" + per(after.calls.writes-before.calls.writes, 1))
	}
	return b.String()
}

// localPostmaster finds the postmaster of the server db is connected to,
// when that server runs on this machine and bench may read its processes:
// the parent of the session's backend, if its working directory is the
// server's data directory (a postmaster runs in it). 0 when it is not
// found that way (another machine, no /proc, no right to read the data
// directory setting): then the server's CPU is not measured.
func localPostmaster(ctx context.Context, db *pgxpool.Pool) int {
	var pid int
	var dataDir string
	if err := db.QueryRow(ctx, `select pg_backend_pid(), coalesce(current_setting('data_directory', true), '')`).Scan(&pid, &dataDir); err != nil || dataDir == "" {
		return 0
	}
	t, err := readProcTimes(pid)
	if err != nil {
		return 0
	}
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", t.ppid))
	if err != nil || !sameDir(cwd, dataDir) {
		return 0
	}
	return t.ppid
}

// sameDir reports whether two paths name the same directory.
func sameDir(a, b string) bool {
	ea, err1 := filepath.EvalSymlinks(a)
	eb, err2 := filepath.EvalSymlinks(b)
	if err1 != nil || err2 != nil {
		return filepath.Clean(a) == filepath.Clean(b)
	}
	return ea == eb
}
