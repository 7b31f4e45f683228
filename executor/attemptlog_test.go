package executor

import (
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/pgstore"
)

func TestAttemptLogAddsTheAttemptToEmittedLinesOnly(t *testing.T) {
	var out syncBuffer
	base := hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: &out})
	st := pgstore.StartedTask{TaskID: 42, Attempt: 3, Target: "SELF"}
	log := newAttemptLog(base, &st)

	log.Debug("not shown", "k", 1)
	require.Empty(t, out.String())

	var wg sync.WaitGroup
	for i := range 8 { // the terminate step logs from another goroutine
		wg.Go(func() {
			if i%2 == 0 {
				log.Info("info line", "i", i)
			} else {
				log.Warn("warn line", "i", i)
			}
		})
	}
	wg.Wait()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 8)
	for _, l := range lines {
		for _, f := range []string{"task_id=42", "attempt=3", "target=SELF"} {
			require.Contains(t, l, f)
		}
	}
	require.NotContains(t, out.String(), "not shown")

	base.SetLevel(hclog.Debug)
	log.Debug("now shown")
	require.Contains(t, out.String(), "[DEBUG] now shown: attempt=3 target=SELF task_id=42")
}

// BenchmarkAttemptLog compares what an attempt that logs nothing at the
// default level pays for its logger: hclog's With against attemptLog.
//
//	go test ./executor/ -run XXX -bench AttemptLog
func BenchmarkAttemptLog(b *testing.B) {
	base := hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: io.Discard})
	st := pgstore.StartedTask{TaskID: 42, Attempt: 3, Target: "SELF", Query: "select 0"}
	b.Run("with", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			s := st
			l := base.With("task_id", s.TaskID, "attempt", s.Attempt, "target", s.Target)
			l.Debug("running task")
			l.Debug("task finished")
		}
	})
	b.Run("attemptLog", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			s := st
			l := newAttemptLog(base, &s)
			l.Debug("running task")
			l.Debug("task finished")
		}
	})
}
