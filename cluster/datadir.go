package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// checkDataDir refuses to start on a damaged Raft state: a raft.db that
// does not open, is shorter than its own metadata says, holds unreadable
// pages or a log with holes, or that is missing or empty while the data
// dir shows an earlier run (remembered peers, the snapshot store). Starting anyway
// would run with a broken log, or with an empty state that bootstraps a
// new cluster or rejoins as a blank member. An absent raft.db in an
// otherwise empty data dir is a new node.
func checkDataDir(dir string) error {
	path := filepath.Join(dir, raftDBFile)
	fix := fmt.Sprintf("restore it, or move data dir %s away and start with --join to rejoin as a new member", dir)
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if prior := priorState(dir); prior != "" {
			return fmt.Errorf("%s is missing but the data dir holds %s of an earlier run: refusing to start with an empty Raft state: %s", raftDBFile, prior, fix)
		}
		return nil
	case err != nil:
		return fmt.Errorf("%s: %w", raftDBFile, err)
	case fi.Size() == 0:
		return fmt.Errorf("%s is empty (0 bytes): refusing to start with an empty Raft state: %s", raftDBFile, fix)
	}
	if err := verifyBolt(path, fi.Size()); err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return fmt.Errorf("open %s (is another node using data dir %s?): %w", raftDBFile, dir, err)
		}
		return fmt.Errorf("%s is corrupt: %s: %s", raftDBFile, oneLine(err.Error()), fix)
	}
	return nil
}

// priorState names what in dir shows that a node ran there before.
func priorState(dir string) string {
	if _, err := os.Stat(filepath.Join(dir, peersFile)); err == nil {
		return peersFile
	}
	// The snapshot store's directory is created right after raft.db at the
	// first start.
	if fi, err := os.Stat(filepath.Join(dir, "snapshots")); err == nil && fi.IsDir() {
		return "snapshots/"
	}
	return ""
}

// verifyBolt opens the bbolt file read-only and reads every page reachable
// from its metadata; raft-boltdb's log must have no holes.
func verifyBolt(path string, size int64) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 2 * time.Second})
	if err != nil {
		return err
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) (err error) {
		if need := tx.Size(); need > size {
			return fmt.Errorf("the file is %d bytes, its metadata needs %d (truncated)", size, need)
		}
		// A damaged page makes bbolt panic or fault: report it instead.
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("unreadable page: %v", r)
			}
		}()
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			return walkBucket(string(name), b)
		})
	})
}

func walkBucket(name string, b *bolt.Bucket) error {
	var prev uint64
	first := true
	return b.ForEach(func(k, v []byte) error {
		if v == nil {
			if nb := b.Bucket(k); nb != nil {
				return walkBucket(name+"/"+string(k), nb)
			}
			return nil
		}
		if name != "logs" {
			return nil
		}
		if len(k) != 8 {
			return fmt.Errorf("log key of %d bytes", len(k))
		}
		idx := binary.BigEndian.Uint64(k)
		if !first && idx != prev+1 {
			return fmt.Errorf("the Raft log jumps from index %d to %d", prev, idx)
		}
		first, prev = false, idx
		return nil
	})
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
