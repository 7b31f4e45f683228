package proccpu

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
	pt, err := parseStat(4242, line)
	require.NoError(t, err)
	require.Equal(t, Times{PPID: 77, Self: 40, Children: 11}, pt)

	_, err = parseStat(4242, "4242 no name")
	require.ErrorContains(t, err, "no command name")
	_, err = parseStat(4242, "4242 (x) S 77 1 2")
	require.ErrorContains(t, err, "fields after the command name")
	_, err = parseStat(4242, "4242 (x) S 77 4242 4242 0 -1 4194560 120 0 0 0 3x 9 5 6 20")
	require.ErrorContains(t, err, "field 14")
}

// The server's CPU is its own, its live children's and its reaped
// children's: here this test process plays the postmaster and a shell
// loop the backend.
func TestTreeTicksCountsChildrenLiveAndReaped(t *testing.T) {
	self, err := ReadTimes(os.Getpid())
	require.NoError(t, err, "the CPU figures need Linux /proc")
	require.Equal(t, os.Getppid(), self.PPID)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	child := exec.CommandContext(ctx, "sh", "-c", "while :; do :; done")
	require.NoError(t, child.Start())
	defer func() { _ = child.Process.Kill() }()
	// Wait until the child has been charged some CPU.
	var burnt int64
	require.Eventually(t, func() bool {
		c, err := ReadTimes(child.Process.Pid)
		if err != nil || c.PPID != os.Getpid() {
			return false
		}
		burnt = c.Self
		return burnt >= 5
	}, 30*time.Second, 20*time.Millisecond, "the child never showed up as ours with CPU time")

	live, err := TreeTicks(os.Getpid())
	require.NoError(t, err)
	ownNow, err := ReadTimes(os.Getpid())
	require.NoError(t, err)
	require.GreaterOrEqual(t, live-ownNow.Self-ownNow.Children, burnt, "a live child's CPU is counted")

	require.NoError(t, child.Process.Kill())
	_ = child.Wait()
	reaped, err := TreeTicks(os.Getpid())
	require.NoError(t, err)
	after, err := ReadTimes(os.Getpid())
	require.NoError(t, err)
	require.GreaterOrEqual(t, after.Children, burnt, "the reaped child's CPU moved to this process's children time")
	require.GreaterOrEqual(t, reaped, live, "reaping a child does not lose its CPU")
}

// A child reaped while /proc is walked is counted once: read live and then
// found in the postmaster's children time, or gone when its turn came and
// not yet in that time when the postmaster was read first. Either way the
// walk is repeated; a sample never misses the child (which made a figure
// negative in a CI run).
func TestTreeTicksCountsAChildReapedDuringTheWalkOnce(t *testing.T) {
	const pm, child = 100, 200
	for _, readLiveFirst := range []bool{true, false} {
		reaped := false
		pmReads := 0
		read := func(pid int) (Times, error) {
			switch pid {
			case pm:
				pmReads++
				if pmReads == 2 {
					reaped = true // between the first walk and the read after it
				}
				if reaped {
					return Times{PPID: 1, Self: 10, Children: 70}, nil
				}
				return Times{PPID: 1, Self: 10}, nil
			case child:
				if reaped || !readLiveFirst {
					reaped = true
					return Times{}, syscall.ENOENT
				}
				return Times{PPID: pm, Self: 70}, nil
			}
			return Times{PPID: 1, Self: 5}, nil
		}
		list := func() ([]int, error) { return []int{1, pm, child}, nil }
		got, err := treeTicksFrom(pm, read, list)
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
	_, err := ReadTimes(math.MaxInt32)
	require.True(t, processGone(err), "a pid that does not exist: %v", err)
}

func TestParseProcIO(t *testing.T) {
	io := "rchar: 2012\nwchar: 880\nsyscr: 155\nsyscw: 98\nread_bytes: 0\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n"
	c, err := parseIO(7, io)
	require.NoError(t, err)
	require.Equal(t, Calls{Reads: 155, Writes: 98}, c)
	_, err = parseIO(7, "rchar: 2012\nwchar: 880\n")
	require.ErrorContains(t, err, "/proc/7/io: no syscr and syscw lines")
	_, err = parseIO(7, "syscr: x\nsyscw: 98\n")
	require.ErrorContains(t, err, "/proc/7/io syscr")

	// This process's own counts: reading a file is at least one read.
	before, err := ReadCalls(os.Getpid())
	require.NoError(t, err)
	_, err = os.ReadFile("/proc/self/stat")
	require.NoError(t, err)
	after, err := ReadCalls(os.Getpid())
	require.NoError(t, err)
	require.Greater(t, after.Reads, before.Reads, "a file read is not counted")
}
