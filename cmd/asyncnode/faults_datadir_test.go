package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// TestFaultCorruptRaftDB corrupts raft.db in the data dir of a stopped
// follower in several ways: starting the node on it must fail at once with
// a clear one-line error and a non-zero exit, never start with an empty
// Raft state (which would bootstrap a new cluster or rejoin as a blank
// node). With the original file back, the node rejoins.
func TestFaultCorruptRaftDB(t *testing.T) {
	dsn := newDB(t)
	initDB(t, dsn)
	nodes := startCluster(t, dsn, 3, faultNodeFlags...)
	victim := nodesExcept(nodes, leaderOf(t, nodes))[0]
	victim.stop()
	path := filepath.Join(victim.dataDir, "raft.db")
	orig, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Greater(t, len(orig), 16<<10, "raft.db is smaller than expected")

	garbage := func(off, n int) []byte {
		b := bytes.Clone(orig)
		_, _ = rand.Read(b[off : off+n])
		return b
	}
	variants := []struct {
		name string
		data []byte // nil: the file is removed
	}{
		{"meta pages overwritten", garbage(0, 8<<10)},
		{"data pages overwritten", corruptPages(t, path, orig)},
		{"last used page cut off", orig[:usedSize(t, path)-4096]},
		{"truncated to zero", []byte{}},
		{"removed", nil},
	}
	for _, v := range variants {
		if v.data == nil {
			require.NoError(t, os.Remove(path))
		} else {
			require.NoError(t, os.WriteFile(path, v.data, 0o600))
		}
		stderr, code, started := runOnce(t, victim, 20*time.Second)
		last := strings.TrimSpace(stderr)
		if i := strings.LastIndexByte(last, '\n'); i >= 0 {
			last = last[i+1:]
		}
		fmt.Printf("scenario=corrupt-raft-db variant=%q exit=%d started=%v error=%q\n", v.name, code, started, last)
		if !check(t, !started, "%s: the node started on a corrupt raft.db", v.name) {
			continue
		}
		check(t, code == 1, "%s: exit code %d, want 1", v.name, code)
		check(t, strings.HasPrefix(last, "asyncnode run: ") && strings.Contains(last, "raft.db"),
			"%s: the last line does not name raft.db: %q", v.name, last)
		check(t, !strings.Contains(stderr, "goroutine ") && !strings.Contains(stderr, "panic"),
			"%s: the node panicked:\n%s", v.name, stderr)
		check(t, !strings.Contains(stderr, "bootstrapping a new cluster"), "%s: the node bootstrapped a new cluster", v.name)
	}
	require.NoError(t, os.WriteFile(path, orig, 0o600))
	victim.start()
	waitMembers(t, nodes, 3)
}

// corruptPages returns raft.db (read from path, content orig) with every
// branch and leaf page filled with random bytes: the metadata stays valid,
// the data it points to does not.
func corruptPages(t *testing.T, path string, orig []byte) []byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true, Timeout: time.Second})
	require.NoError(t, err)
	defer db.Close()
	size := db.Info().PageSize
	out := bytes.Clone(orig)
	n := 0
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		for id := 2; ; id++ {
			pi, err := tx.Page(id)
			if err != nil || pi == nil {
				return err
			}
			if pi.Type == "leaf" || pi.Type == "branch" {
				_, _ = rand.Read(out[id*size : (id+1)*size])
				n++
			}
		}
	}))
	require.Positive(t, n, "no data page found in raft.db")
	return out
}

// usedSize is the size raft.db's metadata says the file needs (bbolt
// allocates ahead, so the file itself is larger).
func usedSize(t *testing.T, path string) int {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true, Timeout: time.Second})
	require.NoError(t, err)
	defer db.Close()
	var n int64
	require.NoError(t, db.View(func(tx *bolt.Tx) error { n = tx.Size(); return nil }))
	require.Equal(t, 4096, db.Info().PageSize)
	return int(n)
}

// check reports a failure without stopping the test.
func check(t *testing.T, ok bool, format string, args ...any) bool {
	t.Helper()
	if !ok {
		t.Errorf(format, args...)
	}
	return ok
}

// runOnce runs the node's `run` command until it exits or timeout passes;
// started reports that it was still running then (it was stopped).
func runOnce(t *testing.T, n *node, timeout time.Duration) (stderr string, code int, started bool) {
	t.Helper()
	args := append([]string{"run", "--dsn", n.dsn, "--node-id", n.id, "--data-dir", n.dataDir,
		"--http-addr", n.api, "--raft-addr", n.raft, "--gossip-addr", n.gossip}, n.extra...)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, testBin, args...)
	cmd.Env = filteredEnv()
	var e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &e, &e
	err := cmd.Run()
	if ctx.Err() != nil {
		return e.String(), -1, true
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return e.String(), ee.ExitCode(), false
	}
	require.NoError(t, err)
	return e.String(), 0, false
}
