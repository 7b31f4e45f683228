package main

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"
)

// The fault suite's history checker. It judges the task log of the server
// database against the ledger the tasks themselves wrote on the target, and
// does no I/O, so that it can be tested on synthetic histories.

// histTask is one task of the server database's log, read after the run.
type histTask struct {
	ID         int64
	Target     string
	MaxRetries int
	Status     string // finish_status; "" while not terminal
	Error      string // processing_error
	Processed  *time.Time
	// Expect is what the task was built to do: "ok" (runs to the end),
	// "timeout" (sleeps past its timeout), "unreachable" (its target
	// never answers) or "refused" (its target refuses every connection
	// until its deadline: D12 ends it FAILED with the connection error,
	// never TIMED_OUT, and it cannot have run).
	Expect string
}

// histRun is one execution recorded in the ledger on the target: its start
// is committed by the task before it sleeps, its end when it finishes.
type histRun struct {
	TaskID  int64
	Pool    string
	App     string // application_name of the session: asyncnode/<node>/<incarnation>
	Started time.Time
	Ended   *time.Time    // nil: the session was ended (killed, cancelled) before the end
	Planned time.Duration // the task's sleep: a run cannot last longer
}

// faultReport counts what the checker found; every count but FailedLost
// and TimedOut is a violation.
type faultReport struct {
	Tasks           int
	Lost            int
	Dup             int
	Overlap         int
	LimitViolations int
	WrongOutcome    int
	FailedLost      int // FAILED because the node running it was lost (D13): correct
	TimedOut        int
	Finished        int
	Failed          int            // FAILED for any reason allowed by the scenario
	Peak            map[string]int // most runs at once per pool: shows the limits were reached
	Notes           []string
}

func (r *faultReport) note(format string, args ...any) {
	if len(r.Notes) < 40 {
		r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
	}
}

// violations sums the counts that make a scenario fail.
func (r *faultReport) violations() int {
	return r.Lost + r.Dup + r.Overlap + r.LimitViolations + r.WrongOutcome
}

// lostNodeError matches the processing_error of a task whose node was lost
// (D13 in docs/sql-api.md): a correct outcome when retries are exhausted.
var lostNodeError = regexp.MustCompile(`^node \S+ was lost`)

// runEnd is the latest instant a run can have been running: its recorded
// end, else its start plus its sleep (killing or cancelling the session
// only shortens it), and no later than its task's outcome when it is the
// task's last run (a task is settled only after its query stopped: that is
// what cancellation, fencing and the lease guarantee, and what the limit
// check relies on).
func runEnd(r histRun, last bool, t *histTask) time.Time {
	if r.Ended != nil {
		return *r.Ended
	}
	end := r.Started.Add(r.Planned)
	if last && t != nil && t.Processed != nil && t.Processed.Before(end) && t.Processed.After(r.Started) {
		end = *t.Processed
	}
	return end
}

// checkHistory judges a history. limits maps a pool (target) to its
// max_concurrency; allowedFail maps a task's Expect to the processing_error
// of FAILED tasks that the scenario's fault explains (none: only lost
// nodes).
func checkHistory(tasks []histTask, runs []histRun, limits map[string]int, allowedFail map[string]*regexp.Regexp) faultReport {
	rep := faultReport{Tasks: len(tasks), Peak: map[string]int{}}
	byTask := map[int64][]histRun{}
	for _, r := range runs {
		byTask[r.TaskID] = append(byTask[r.TaskID], r)
	}
	known := map[int64]*histTask{}
	for i := range tasks {
		known[tasks[i].ID] = &tasks[i]
	}
	type interval struct {
		pool       string
		start, end time.Time
	}
	var spans []interval
	for id, rs := range byTask {
		sort.Slice(rs, func(i, j int) bool { return rs[i].Started.Before(rs[j].Started) })
		t := known[id]
		if t == nil {
			rep.WrongOutcome++
			rep.note("task %d ran on the target but is not in the task log", id)
		}
		for i, r := range rs {
			end := runEnd(r, i == len(rs)-1, t)
			spans = append(spans, interval{r.Pool, r.Started, end})
			for _, o := range rs[i+1:] {
				if o.Started.Before(end) {
					rep.Overlap++
					rep.note("task %d: run by %s [%s, %s] overlaps run by %s started %s", id, r.App,
						r.Started.Format(time.StampMicro), end.Format(time.StampMicro), o.App, o.Started.Format(time.StampMicro))
				}
			}
		}
	}
	for i := range tasks {
		t := &tasks[i]
		rs := byTask[t.ID]
		completed := 0
		for _, r := range rs {
			if r.Ended != nil {
				completed++
			}
		}
		if len(rs) > 1+t.MaxRetries {
			rep.Dup++
			rep.note("task %d (max_retries %d) ran %d times", t.ID, t.MaxRetries, len(rs))
		}
		if t.Processed == nil || t.Status == "" {
			rep.Lost++
			rep.note("task %d never reached a terminal state", t.ID)
			continue
		}
		wrong := func(format string, args ...any) {
			rep.WrongOutcome++
			rep.note("task %d (%s, expected %s): %s", t.ID, t.Status, t.Expect, fmt.Sprintf(format, args...))
		}
		switch t.Status {
		case "FINISHED":
			rep.Finished++
			switch {
			case t.Expect != "ok":
				wrong("finished although built to %s", t.Expect)
			case completed == 0:
				wrong("FINISHED with no complete run in the ledger")
			case rs[len(rs)-1].Ended == nil:
				wrong("FINISHED but its last run was stopped before the end")
			}
		case "TIMED_OUT":
			rep.TimedOut++
			switch {
			case t.Expect == "ok":
				wrong("timed out although built to %s", t.Expect)
			case t.Expect == "refused":
				wrong("timed out although its target refused the connection: D12 ends it FAILED with the connection error")
			}
		case "FAILED":
			switch {
			case t.Error == "":
				wrong("FAILED without an error")
			case lostNodeError.MatchString(t.Error):
				rep.FailedLost++
			case allowedFail[t.Expect] != nil && allowedFail[t.Expect].MatchString(t.Error):
				rep.Failed++
			default:
				wrong("FAILED for a reason this fault does not explain: %s", firstLine(t.Error))
			}
		default:
			wrong("unexpected status: %s", t.Error)
		}
		if t.Expect == "refused" && len(rs) > 0 {
			wrong("it ran on the target (%d runs) although its target refused every connection", len(rs))
		}
		if t.Expect != "ok" && completed > 0 {
			wrong("its query ran to the end on the target (%d complete runs) although it had to be stopped", completed)
		}
	}
	// Limits: replay starts and ends per pool; ends sort before starts at
	// the same instant.
	perPool := map[string][]runEvent{}
	for _, s := range spans {
		perPool[s.pool] = append(perPool[s.pool], runEvent{s.start, 1}, runEvent{s.end, -1})
	}
	for pool, evs := range perPool {
		limit, ok := limits[pool]
		if !ok {
			continue
		}
		replayRuns(evs, func(e runEvent, cur int) {
			rep.Peak[pool] = max(rep.Peak[pool], cur)
			if e.delta > 0 && cur > limit {
				rep.LimitViolations++
				rep.note("pool %s: %d runs at once at %s (limit %d)", pool, cur, e.at.Format(time.StampMicro), limit)
			}
		})
	}
	return rep
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
