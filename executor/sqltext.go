package executor

import (
	"strconv"
	"strings"
)

// taskIDMacro is replaced by the task id in every query text (D16).
const taskIDMacro = "##flow.TASK_ID##"

// SessionReset undoes every piece of session state a task may leave on its
// connection: it is CLOSE ALL, SET SESSION AUTHORIZATION DEFAULT, RESET ALL,
// DEALLOCATE ALL, UNLISTEN *, pg_advisory_unlock_all(), DISCARD PLANS,
// DISCARD TEMP and DISCARD SEQUENCES in one statement. It cannot run inside a
// transaction block, so it fails after a text that left one open (which is
// caught: see RunWithReset's caller).
const SessionReset = "DISCARD ALL"

// prepareQuery substitutes the task id in a task's text (D16).
func prepareQuery(taskID int64, text string) string {
	return strings.ReplaceAll(text, taskIDMacro, strconv.FormatInt(taskID, 10))
}
