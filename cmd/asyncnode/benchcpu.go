package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/asyncnode/asyncnode/internal/proccpu"
)

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
	calls        proccpu.Calls
	callsOK      bool // false: some node's /proc/<pid>/io could not be read
}

func (m cpuMeter) sample() cpuSample {
	var s cpuSample
	s.callsOK = true
	for _, pid := range m.nodes() {
		t, err := proccpu.ReadTimes(pid)
		if err != nil {
			return cpuSample{}
		}
		s.node += t.Self
		c, err := proccpu.ReadCalls(pid)
		if err != nil {
			s.callsOK = false
		}
		s.calls.Reads += c.Reads
		s.calls.Writes += c.Writes
	}
	if m.postmaster != 0 {
		srv, err := proccpu.TreeTicks(m.postmaster)
		if err != nil {
			return cpuSample{}
		}
		s.server = srv
	}
	s.ok = true
	return s
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
	const us = 1e6 / proccpu.UserHZ // ticks to microseconds
	nodes := len(m.nodes()) > 0
	var b strings.Builder
	if nodes {
		b.WriteString(" node_cpu_us_per_task=" + per(after.node-before.node, us))
	}
	if m.postmaster != 0 {
		b.WriteString(" server_cpu_us_per_task=" + per(after.server-before.server, us))
	}
	if nodes && before.callsOK && after.callsOK {
		b.WriteString(" node_reads_per_task=" + per(after.calls.Reads-before.calls.Reads, 1) +
			" node_writes_per_task=" + per(after.calls.Writes-before.calls.Writes, 1))
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
	t, err := proccpu.ReadTimes(pid)
	if err != nil {
		return 0
	}
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", t.PPID))
	if err != nil || !sameDir(cwd, dataDir) {
		return 0
	}
	return t.PPID
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
