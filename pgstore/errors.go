package pgstore

import (
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrSchemaOutdated means the server database holds an older async schema
// than this binary needs; `asyncnode init` migrates it.
var ErrSchemaOutdated = errors.New("pgstore: the async schema is older than this binary (run `asyncnode init --dsn ...` to upgrade it)")

// SQLSTATE codes raised by the async schema.
const (
	// codeStaleTerm is raised by async.assert_leader_term.
	codeStaleTerm       = "AS001"
	codeUndefinedTable  = "42P01"
	codeUndefinedSchema = "3F000"
	codeUndefinedFunc   = "42883"
)

// translate maps a driver error to the package's typed errors, once, at the
// edge. op names the operation for the message; dsn, when not empty, is
// scrubbed from the text.
func translate(op, dsn string, err error) error {
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case codeStaleTerm:
			return fmt.Errorf("pgstore: %s: %w (%s)", op, ErrStaleTerm, pgErr.Message)
		case codeUndefinedTable, codeUndefinedSchema, codeUndefinedFunc:
			if strings.Contains(pgErr.Message, "async") {
				return fmt.Errorf("pgstore: %s: %w: %w", op, ErrSchemaMissing, err)
			}
		}
	}
	return fmt.Errorf("pgstore: %s: %w", op, redact(err, dsn))
}

// redactedError hides passwords in an error's text; Unwrap still gives the
// original error to errors.Is / errors.As.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// redact returns err with every password found in dsn replaced in its text.
// A DSN parse error is reduced to its reason: pgx quotes the connection
// string in it with a best-effort redaction that misses some passwords.
func redact(err error, dsn string) error {
	if err == nil || dsn == "" {
		return err
	}
	msg := err.Error()
	out := msg
	var pce *pgconn.ParseConfigError
	if errors.As(err, &pce) {
		const prefix = "cannot parse `"
		if i := strings.Index(out, prefix); i >= 0 {
			if j := strings.LastIndex(out, "`: "); j > i {
				out = out[:i] + "cannot parse the connection string: " + out[j+3:]
			}
		}
	}
	for _, pw := range dsnPasswords(dsn) {
		if pw != "" {
			out = strings.ReplaceAll(out, pw, passwordMask)
		}
	}
	if out == msg {
		return err
	}
	return &redactedError{msg: out, err: err}
}
