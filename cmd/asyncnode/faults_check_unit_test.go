package main

import (
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestFaultChecker shows that the fault suite's checker detects each kind
// of violation on synthetic histories, and accepts the outcomes D13 allows.
func TestFaultChecker(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	ptr := func(ms int) *time.Time { v := at(ms); return &v }
	planned := 50 * time.Millisecond
	run := func(id int64, start, end int) histRun {
		r := histRun{TaskID: id, Pool: "t0", App: "asyncnode/n1/x", Started: at(start), Planned: planned}
		if end >= 0 {
			r.Ended = ptr(end)
		}
		return r
	}
	ok := func(id int64, processed int) histTask {
		return histTask{ID: id, Target: "t0", Status: "FINISHED", Processed: ptr(processed), Expect: "ok"}
	}
	limits := map[string]int{"t0": 2}

	t.Run("clean", func(t *testing.T) {
		rep := checkHistory(
			[]histTask{ok(1, 60), ok(2, 60),
				// D13: lost with no retry left, ran once (its session was killed).
				{ID: 3, Target: "t0", Status: "FAILED", Error: "node n2 was lost while running the task (the node restarted)", Processed: ptr(5000), Expect: "ok"},
				// Re-run once after a lost node: allowed with max_retries 1.
				{ID: 4, Target: "t0", MaxRetries: 1, Status: "FINISHED", Processed: ptr(6100), Expect: "ok"},
				{ID: 5, Target: "t0", Status: "TIMED_OUT", Error: "Canceling due to time out", Processed: ptr(1100), Expect: "timeout"},
			},
			[]histRun{run(1, 0, 50), run(2, 0, 50), run(3, 60, -1), run(4, 6000, 6050), run(4, 100, -1),
				{TaskID: 5, Pool: "t0", Started: at(200), Planned: time.Minute}},
			limits, nil)
		require.Zero(t, rep.violations(), "%+v", rep)
		require.Equal(t, 1, rep.FailedLost)
		require.Equal(t, 1, rep.TimedOut)
	})
	t.Run("lost", func(t *testing.T) {
		rep := checkHistory([]histTask{{ID: 1, Target: "t0", Expect: "ok"}}, nil, limits, nil)
		require.Equal(t, 1, rep.Lost)
	})
	t.Run("dup", func(t *testing.T) {
		// Two runs of a task without retries, one after the other.
		rep := checkHistory([]histTask{ok(1, 300)}, []histRun{run(1, 0, 50), run(1, 200, 250)}, limits, nil)
		require.Equal(t, 1, rep.Dup, "%+v", rep)
		require.Zero(t, rep.Overlap)
		// A FAILED-as-lost task that ran twice is a duplicate too.
		rep = checkHistory([]histTask{{ID: 1, Target: "t0", Status: "FAILED", Error: "node n1 was lost while running the task", Processed: ptr(9000), Expect: "ok"}},
			[]histRun{run(1, 0, -1), run(1, 4000, -1)}, limits, nil)
		require.Equal(t, 1, rep.Dup, "%+v", rep)
	})
	t.Run("overlap", func(t *testing.T) {
		// Allowed to run twice, but the re-run started while the first run
		// (killed, no recorded end) could still run.
		tk := ok(1, 300)
		tk.MaxRetries = 1
		rep := checkHistory([]histTask{tk}, []histRun{run(1, 0, -1), run(1, 30, 80)}, limits, nil)
		require.Equal(t, 1, rep.Overlap, "%+v", rep)
		require.Zero(t, rep.Dup)
		rep = checkHistory([]histTask{tk}, []histRun{run(1, 0, 70), run(1, 60, 110)}, limits, nil)
		require.Equal(t, 1, rep.Overlap, "%+v", rep)
	})
	t.Run("limit", func(t *testing.T) {
		rep := checkHistory([]histTask{ok(1, 100), ok(2, 100), ok(3, 100), ok(4, 200)},
			[]histRun{run(1, 0, 50), run(2, 10, 60), run(3, 20, 70), run(4, 60, 110)}, limits, nil)
		require.Equal(t, 1, rep.LimitViolations, "%+v", rep)
		// A run that starts exactly when another ends is not over the limit.
		rep = checkHistory([]histTask{ok(1, 100), ok(2, 100), ok(3, 100)},
			[]histRun{run(1, 0, 50), run(2, 10, 60), run(3, 50, 100)}, limits, nil)
		require.Zero(t, rep.LimitViolations, "%+v", rep)
	})
	t.Run("wrong outcome", func(t *testing.T) {
		rep := checkHistory([]histTask{
			ok(1, 100), // FINISHED without a ledger row
			{ID: 2, Target: "t0", Status: "FAILED", Processed: ptr(100), Expect: "ok"},                                        // no error text
			{ID: 3, Target: "t0", Status: "FAILED", Error: "ERROR: boom", Processed: ptr(100), Expect: "ok"},                  // not explained
			{ID: 4, Target: "t0", Status: "FINISHED", Processed: ptr(100), Expect: "timeout"},                                 // should time out
			{ID: 5, Target: "t0", Status: "TIMED_OUT", Error: "Canceling due to time out", Processed: ptr(100), Expect: "ok"}, // should not
			{ID: 6, Target: "t0", Status: "TIMED_OUT", Error: "Canceling due to time out", Processed: ptr(100), Expect: "timeout"},
			{ID: 7, Target: "t0", Status: "CANCELED", Error: "", Processed: ptr(100), Expect: "ok"},
		}, []histRun{run(4, 0, 50), run(5, 0, 50), run(6, 0, 50)}, limits, map[string]*regexp.Regexp{"ok": regexp.MustCompile(`terminating connection`)})
		require.Equal(t, 8, rep.WrongOutcome, "%+v", rep)
		// The scenario's allowed failures are accepted.
		rep = checkHistory([]histTask{{ID: 1, Target: "t0", Status: "FAILED", Error: "FATAL: terminating connection due to administrator command", Processed: ptr(100), Expect: "ok"}},
			[]histRun{run(1, 0, -1)}, limits, map[string]*regexp.Regexp{"ok": regexp.MustCompile(`terminating connection`)})
		require.Zero(t, rep.violations(), "%+v", rep)
		require.Equal(t, 1, rep.Failed)
	})
}
