// Package proccpu reads processes' CPU time and system calls from Linux's
// /proc, for the figures of `asyncnode bench` and tools/riverbench: a
// process's own time, and a PostgreSQL server's (its postmaster, the
// backends it has forked and those it has reaped).
package proccpu

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// UserHZ is the unit of the CPU times in /proc/<pid>/stat: Linux reports
// them in USER_HZ, 100 a second on every architecture it runs Go on.
const UserHZ = 100

// Times is one process's CPU time from /proc/<pid>/stat, in ticks.
type Times struct {
	PPID     int   // parent process id
	Self     int64 // utime + stime
	Children int64 // cutime + cstime: children it has waited for
}

// ReadTimes parses /proc/<pid>/stat. The command name (field 2) may
// hold spaces and parentheses, so the fields are counted from the last ')'.
func ReadTimes(pid int) (Times, error) {
	return readFile(pid, "stat", parseStat)
}

// readFile reads /proc/<pid>/<name> and parses it with parse.
func readFile[T any](pid int, name string, parse func(pid int, s string) (T, error)) (T, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, name))
	if err != nil {
		var zero T
		return zero, err
	}
	return parse(pid, string(b))
}

func parseStat(pid int, s string) (Times, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return Times{}, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	var err error
	// After ") ": state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
	f := strings.Fields(s[i+1:])
	if len(f) < 15 {
		return Times{}, fmt.Errorf("/proc/%d/stat: %d fields after the command name", pid, len(f))
	}
	var v [5]int64
	for k, idx := range []int{1, 11, 12, 13, 14} {
		if v[k], err = strconv.ParseInt(f[idx], 10, 64); err != nil {
			return Times{}, fmt.Errorf("/proc/%d/stat field %d: %w", pid, idx+3, err)
		}
	}
	return Times{PPID: int(v[0]), Self: v[1] + v[2], Children: v[3] + v[4]}, nil
}

// Calls is a process's read and write system calls so far, as
// /proc/<pid>/io counts them (syscr, syscw: read(2) and write(2) and
// their vector and positioned forms, a read that finds nothing yet
// included; Go reads and writes its TCP sockets with these, while UDP's
// sendto and recvfrom are not counted). The writes hardly vary with the
// machine's speed, unlike CPU time: a task whose text and session reset go
// out in one write adds one.
type Calls struct{ Reads, Writes int64 }

// ReadCalls parses /proc/<pid>/io (readable for one's own processes,
// or as root).
func ReadCalls(pid int) (Calls, error) {
	return readFile(pid, "io", parseIO)
}

func parseIO(pid int, s string) (Calls, error) {
	var c Calls
	var seen int
	for line := range strings.Lines(s) {
		name, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || (name != "syscr" && name != "syscw") {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return Calls{}, fmt.Errorf("/proc/%d/io %s: %w", pid, name, err)
		}
		if name == "syscr" {
			c.Reads = n
		} else {
			c.Writes = n
		}
		seen++
	}
	if seen != 2 {
		return Calls{}, fmt.Errorf("/proc/%d/io: no syscr and syscw lines", pid)
	}
	return c, nil
}

// TreeTicks is the CPU time of the process postmaster (a PostgreSQL
// server's) and of all its children, live or reaped, in ticks (UserHZ).
func TreeTicks(postmaster int) (int64, error) {
	return treeTicksFrom(postmaster, ReadTimes, listPIDs)
}

// treeTicksFrom is TreeTicks reading processes with read and listing
// them with list. A child the postmaster reaps while the list is walked is
// either counted twice (live, then in the postmaster's children time) or,
// read after it was reaped, once; so the postmaster is read before and after
// the walk and the walk repeated until no child was reaped during it. Under
// constant churn the last walk counts, with the postmaster read after it:
// that can count a child twice, never miss one (a sample that missed one
// could make the CPU used between two samples negative).
func treeTicksFrom(postmaster int, read func(int) (Times, error), list func() ([]int, error)) (int64, error) {
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
			if t.PPID == postmaster {
				live += t.Self
			}
		}
		after, err := read(postmaster)
		if err != nil {
			return 0, err
		}
		total = after.Self + after.Children + live
		if after.Children == before.Children {
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
