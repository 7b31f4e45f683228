package main

import (
	"context"
	"io/fs"
	"math"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseProcStat(t *testing.T) {
	// A command name with spaces and parentheses, as a process may set it.
	line := "4242 (a) b) (c) S 77 4242 4242 0 -1 4194560 120 0 0 0 31 9 5 6 20 0 1 0 100 1000 10\n"
	pt, err := parseProcStat(4242, line)
	require.NoError(t, err)
	require.Equal(t, procTimes{ppid: 77, self: 40, children: 11}, pt)

	_, err = parseProcStat(4242, "4242 no name")
	require.ErrorContains(t, err, "no command name")
	_, err = parseProcStat(4242, "4242 (x) S 77 1 2")
	require.ErrorContains(t, err, "fields after the command name")
	_, err = parseProcStat(4242, "4242 (x) S 77 4242 4242 0 -1 4194560 120 0 0 0 3x 9 5 6 20")
	require.ErrorContains(t, err, "field 14")
}

// The server's CPU is its own, its live children's and its reaped
// children's: here this test process plays the postmaster and a shell
// loop the backend.
func TestServerTicksCountsChildrenLiveAndReaped(t *testing.T) {
	self, err := readProcTimes(os.Getpid())
	require.NoError(t, err, "bench's CPU figures need Linux /proc")
	require.Equal(t, os.Getppid(), self.ppid)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	child := exec.CommandContext(ctx, "sh", "-c", "while :; do :; done")
	require.NoError(t, child.Start())
	defer func() { _ = child.Process.Kill() }()
	// Wait until the child has been charged some CPU.
	var burnt int64
	require.Eventually(t, func() bool {
		c, err := readProcTimes(child.Process.Pid)
		if err != nil || c.ppid != os.Getpid() {
			return false
		}
		burnt = c.self
		return burnt >= 5
	}, 30*time.Second, 20*time.Millisecond, "the child never showed up as ours with CPU time")

	live, err := serverTicks(os.Getpid())
	require.NoError(t, err)
	ownNow, err := readProcTimes(os.Getpid())
	require.NoError(t, err)
	require.GreaterOrEqual(t, live-ownNow.self-ownNow.children, burnt, "a live child's CPU is counted")

	require.NoError(t, child.Process.Kill())
	_ = child.Wait()
	reaped, err := serverTicks(os.Getpid())
	require.NoError(t, err)
	after, err := readProcTimes(os.Getpid())
	require.NoError(t, err)
	require.GreaterOrEqual(t, after.children, burnt, "the reaped child's CPU moved to this process's children time")
	require.GreaterOrEqual(t, reaped, live, "reaping a child does not lose its CPU")
}

// A child reaped while /proc is walked is counted once: read live and then
// found in the postmaster's children time, or gone when its turn came and
// not yet in that time when the postmaster was read first. Either way the
// walk is repeated; a sample never misses the child (which made a figure
// negative in a CI run).
func TestServerTicksCountsAChildReapedDuringTheWalkOnce(t *testing.T) {
	const pm, child = 100, 200
	for _, readLiveFirst := range []bool{true, false} {
		reaped := false
		pmReads := 0
		read := func(pid int) (procTimes, error) {
			switch pid {
			case pm:
				pmReads++
				if pmReads == 2 {
					reaped = true // between the first walk and the read after it
				}
				if reaped {
					return procTimes{ppid: 1, self: 10, children: 70}, nil
				}
				return procTimes{ppid: 1, self: 10}, nil
			case child:
				if reaped || !readLiveFirst {
					reaped = true
					return procTimes{}, syscall.ENOENT
				}
				return procTimes{ppid: pm, self: 70}, nil
			}
			return procTimes{ppid: 1, self: 5}, nil
		}
		list := func() ([]int, error) { return []int{1, pm, child}, nil }
		got, err := serverTicksFrom(pm, read, list)
		require.NoError(t, err)
		require.Equal(t, int64(80), got, "read live first: %v", readLiveFirst)
		require.Greater(t, pmReads, 2, "the walk was repeated")
	}
}

// A process that ends between the listing of /proc and the read of its
// stat file is skipped, whichever of the two errors the read gives; any
// other error is not.
func TestProcessGone(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.ENOENT, syscall.ESRCH} {
		err := &fs.PathError{Op: "read", Path: "/proc/1/stat", Err: errno}
		require.True(t, processGone(err), "%v", err)
	}
	require.False(t, processGone(&fs.PathError{Op: "open", Path: "/proc/1/stat", Err: syscall.EACCES}))
	require.False(t, processGone(nil))
	_, err := readProcTimes(math.MaxInt32)
	require.True(t, processGone(err), "a pid that does not exist: %v", err)
}

func TestCPUPerTask(t *testing.T) {
	m := cpuMeter{nodes: func() []int { return []int{1, 2} }, postmaster: 9}
	before := cpuSample{node: 100, server: 1000, ok: true, calls: procCalls{reads: 500, writes: 700}, callsOK: true}
	after := cpuSample{node: 160, server: 1240, ok: true, calls: procCalls{reads: 16000, writes: 10500}, callsOK: true}
	// 60 ticks = 600 ms over 10,000 tasks = 60 µs per task; 240 ticks = 240 µs;
	// 15,500 reads and 9,800 writes over 10,000 tasks.
	require.Equal(t, " node_cpu_us_per_task=60 server_cpu_us_per_task=240 node_reads_per_task=1.55 node_writes_per_task=0.98", m.perTask(before, after, 10000))
	require.Empty(t, m.perTask(cpuSample{}, after, 10000), "no figure without a first sample")
	require.Empty(t, m.perTask(before, after, 0))
	noCalls := after
	noCalls.callsOK = false
	require.Equal(t, " node_cpu_us_per_task=60 server_cpu_us_per_task=240", m.perTask(before, noCalls, 10000), "no system calls when /proc/<pid>/io could not be read")
	m.postmaster = 0
	require.Equal(t, " node_cpu_us_per_task=60 node_reads_per_task=1.55 node_writes_per_task=0.98", m.perTask(before, after, 10000), "no server figure when the server is not measured")
	m.nodes = func() []int { return nil }
	m.postmaster = 9
	require.Equal(t, " server_cpu_us_per_task=240", m.perTask(before, after, 10000), "limit_bookkeeping: no nodes yet")
}

func TestParseProcIO(t *testing.T) {
	io := "rchar: 2012\nwchar: 880\nsyscr: 155\nsyscw: 98\nread_bytes: 0\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n"
	c, err := parseProcIO(7, io)
	require.NoError(t, err)
	require.Equal(t, procCalls{reads: 155, writes: 98}, c)
	_, err = parseProcIO(7, "rchar: 2012\nwchar: 880\n")
	require.ErrorContains(t, err, "/proc/7/io: no syscr and syscw lines")
	_, err = parseProcIO(7, "syscr: x\nsyscw: 98\n")
	require.ErrorContains(t, err, "/proc/7/io syscr")

	// This process's own counts: reading a file is at least one read.
	before, err := readProcCalls(os.Getpid())
	require.NoError(t, err)
	_, err = os.ReadFile("/proc/self/stat")
	require.NoError(t, err)
	after, err := readProcCalls(os.Getpid())
	require.NoError(t, err)
	require.Greater(t, after.reads, before.reads, "a file read is not counted")
}
