package executor

import (
	"strconv"
	"strings"
)

// taskIDMacro is replaced by the task id in every query text (D16).
const taskIDMacro = "##flow.TASK_ID##"

// SessionReset undoes every piece of session state a task may leave on its
// connection. Every statement here may run inside a transaction block, so
// it can follow the task text in the same simple-protocol message (one
// round trip). RESET SESSION AUTHORIZATION comes first: it also resets the
// role (RESET ALL does not), and the rest then runs as the connecting
// user. Exported for `asyncnode bench`, which sends the same text.
const SessionReset = "RESET SESSION AUTHORIZATION;RESET ALL;DISCARD TEMP;DISCARD SEQUENCES;" +
	"CLOSE ALL;UNLISTEN *;DEALLOCATE ALL;SELECT pg_advisory_unlock_all()"

// prepared is a task text ready to send.
type prepared struct {
	// sql is the text to send with the simple query protocol.
	sql string
	// separateReset is true for a lone CALL or VACUUM: sql is the task text
	// alone (a procedure may COMMIT, VACUUM cannot run in a transaction
	// block) and SessionReset must be sent after it on its own.
	separateReset bool
}

// prepareQuery substitutes the task id and decides how the text is sent (D17).
func prepareQuery(taskID int64, text string) prepared {
	text = strings.ReplaceAll(text, taskIDMacro, strconv.FormatInt(taskID, 10))
	kw, single := leadingKeyword(text)
	if single && (kw == "CALL" || kw == "VACUUM") {
		return prepared{sql: text, separateReset: true}
	}
	// The newline ends a trailing -- comment; the semicolon ends the last
	// statement if the text did not.
	return prepared{sql: text + "\n;" + SessionReset}
}

// leadingKeyword returns the first word of text (upper-cased), after white
// space and comments, and whether text holds a single statement: no
// semicolon outside quotes, identifiers and comments is followed by anything
// but white space, comments and more semicolons.
func leadingKeyword(text string) (keyword string, single bool) {
	i := skipSpaceAndComments(text, 0)
	j := i
	for j < len(text) && isIdentChar(text[j]) {
		j++
	}
	keyword = strings.ToUpper(text[i:j])
	single = true
	for k := i; k < len(text); {
		switch c := text[k]; {
		case c == ';':
			if rest := skipSpaceAndComments(text, k+1); rest < len(text) && text[rest] != ';' {
				return keyword, false
			}
			k++
		case c == '\'':
			escapes := k > 0 && (text[k-1] == 'e' || text[k-1] == 'E') && (k < 2 || !isIdentChar(text[k-2]))
			k = skipQuoted(text, k, '\'', escapes)
		case c == '"':
			k = skipQuoted(text, k, '"', false)
		case c == '$':
			if tag, ok := dollarTag(text, k); ok {
				end := strings.Index(text[k+len(tag):], tag)
				if end < 0 {
					return keyword, single
				}
				k += len(tag) + end + len(tag)
			} else {
				k++
			}
		case c == '-' && k+1 < len(text) && text[k+1] == '-', c == '/' && k+1 < len(text) && text[k+1] == '*':
			k = skipSpaceAndComments(text, k)
		default:
			k++
		}
	}
	return keyword, single
}

// skipSpaceAndComments returns the index of the first byte at or after i
// that is neither white space nor inside a -- or (nested) /* */ comment.
func skipSpaceAndComments(s string, i int) int {
	for i < len(s) {
		switch {
		case s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v':
			i++
		case strings.HasPrefix(s[i:], "--"):
			nl := strings.IndexByte(s[i:], '\n')
			if nl < 0 {
				return len(s)
			}
			i += nl + 1
		case strings.HasPrefix(s[i:], "/*"):
			depth := 0
			for i < len(s) {
				if strings.HasPrefix(s[i:], "/*") {
					depth++
					i += 2
				} else if strings.HasPrefix(s[i:], "*/") {
					depth--
					i += 2
					if depth == 0 {
						break
					}
				} else {
					i++
				}
			}
		default:
			return i
		}
	}
	return i
}

// skipQuoted returns the index just after the quoted text starting at i
// (s[i] == q); a doubled quote is an escaped quote, and so is a
// backslash-escaped one when backslash is true (E'...').
func skipQuoted(s string, i int, q byte, backslash bool) int {
	for i++; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if backslash {
				i++
			}
		case q:
			if i+1 < len(s) && s[i+1] == q {
				i++
				continue
			}
			return i + 1
		}
	}
	return len(s)
}

// dollarTag returns the dollar-quote opening tag ($$ or $name$) at s[i].
func dollarTag(s string, i int) (string, bool) {
	if i > 0 && isIdentChar(s[i-1]) {
		return "", false // part of an identifier, or a parameter like $1
	}
	for j := i + 1; j < len(s); j++ {
		c := s[j]
		switch {
		case c == '$':
			return s[i : j+1], true
		case c == '_' || c >= 0x80 || (c|0x20 >= 'a' && c|0x20 <= 'z') || (j > i+1 && c >= '0' && c <= '9'):
		default:
			return "", false
		}
	}
	return "", false
}

func isIdentChar(c byte) bool {
	return c == '_' || c == '$' || c >= 0x80 || (c >= '0' && c <= '9') || (c|0x20 >= 'a' && c|0x20 <= 'z')
}
