// Package pgtest gives tests a real, migrated server database: one
// throwaway PostgreSQL server per test binary (internal/pglocal), one
// template database migrated once, and a fresh clone of it per test.
//
//	var h *pgtest.Harness
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m, &h)) }
//
//	func TestX(t *testing.T) { dsn := h.DB(t); ... }
//
// If PostgreSQL cannot start, Main fails the run with the error: tests are
// never skipped for want of a database.
package pgtest

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asyncnode/asyncnode/internal/pglocal"
	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/hashicorp/go-hclog"
)

const templateName = "asyncnode_template"

// Harness is one throwaway server with a migrated template database.
type Harness struct {
	srv *pglocal.Server
	seq atomic.Int64
	mu  sync.Mutex // one CREATE DATABASE ... TEMPLATE at a time
}

// Start starts a server and migrates the template database.
func Start(ctx context.Context) (*Harness, error) {
	srv, err := pglocal.Start(ctx, pglocal.Options{})
	if err != nil {
		return nil, err
	}
	h := &Harness{srv: srv}
	if err := srv.CreateDatabase(ctx, templateName, ""); err != nil {
		_ = srv.Stop()
		return nil, err
	}
	if _, err := pgstore.Migrate(ctx, srv.DSN(templateName), hclog.NewNullLogger()); err != nil {
		_ = srv.Stop()
		return nil, fmt.Errorf("pgtest: migrate the template database: %w", err)
	}
	return h, nil
}

// Main is a TestMain body: it starts the harness into *h, runs the tests and
// stops the server. It returns the exit code.
func Main(m *testing.M, h **Harness) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	hh, err := Start(ctx)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: cannot start a throwaway PostgreSQL: %v\n", err)
		return 1
	}
	*h = hh
	code := m.Run()
	if err := hh.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: stop: %v\n", err)
	}
	return code
}

// Stop stops the server and removes its files.
func (h *Harness) Stop() error { return h.srv.Stop() }

// Server is the underlying throwaway server.
func (h *Harness) Server() *pglocal.Server { return h.srv }

// Template is the name of the migrated template database.
func (h *Harness) Template() string { return templateName }

var unsafeChars = regexp.MustCompile(`[^a-z0-9_]+`)

// DB creates a fresh database cloned from the migrated template and returns
// its DSN. The database is named after the test.
func (h *Harness) DB(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("t%d_%s", h.seq.Add(1), unsafeChars.ReplaceAllString(strings.ToLower(t.Name()), "_"))
	if len(name) > 63 {
		name = name[:63]
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.srv.CreateDatabase(ctx, name, templateName); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return h.srv.DSN(name)
}

// EmptyDB creates a fresh empty database (no async schema) and returns its DSN.
func (h *Harness) EmptyDB(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("e%d_%s", h.seq.Add(1), unsafeChars.ReplaceAllString(strings.ToLower(t.Name()), "_"))
	if len(name) > 63 {
		name = name[:63]
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := h.srv.CreateDatabase(ctx, name, ""); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return h.srv.DSN(name)
}
