package executor

import (
	"sync"

	"github.com/hashicorp/go-hclog"

	"github.com/asyncnode/asyncnode/pgstore"
)

// attemptLog logs the lines of one attempt with its task_id, attempt and
// target. The sub-logger carrying those fields is built on the first line
// that is emitted: hclog's With allocates a logger, and at the default
// level most attempts log nothing (it showed at 4 % of a node's CPU
// profile under load). Safe for concurrent use (the terminate step logs
// from its own goroutine).
type attemptLog struct {
	base hclog.Logger
	st   *pgstore.StartedTask
	once sync.Once
	sub  hclog.Logger
}

func newAttemptLog(base hclog.Logger, st *pgstore.StartedTask) *attemptLog {
	return &attemptLog{base: base, st: st}
}

func (a *attemptLog) logger() hclog.Logger {
	a.once.Do(func() {
		a.sub = a.base.With("task_id", a.st.TaskID, "attempt", a.st.Attempt, "target", a.st.Target)
	})
	return a.sub
}

// Debug logs at debug level.
func (a *attemptLog) Debug(msg string, args ...any) {
	if a.base.IsDebug() {
		a.logger().Debug(msg, args...)
	}
}

// Info logs at info level.
func (a *attemptLog) Info(msg string, args ...any) {
	if a.base.IsInfo() {
		a.logger().Info(msg, args...)
	}
}

// Warn logs at warn level.
func (a *attemptLog) Warn(msg string, args ...any) {
	if a.base.IsWarn() {
		a.logger().Warn(msg, args...)
	}
}
