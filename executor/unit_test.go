package executor

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/pgstore"
)

func TestPrepareQuery(t *testing.T) {
	require.Equal(t, "insert into t values (42, '42')",
		prepareQuery(42, "insert into t values (##flow.TASK_ID##, '##flow.TASK_ID##')"))
	require.Equal(t, "-- maintenance\nCALL do_it(7)", prepareQuery(7, "-- maintenance\nCALL do_it(##flow.TASK_ID##)"))
}

func TestMaskDSN(t *testing.T) {
	cases := []struct{ in, want string }{
		{"host=h password=secret user=u", "host=h password=xxxxx user=u"},
		{"host=h password = 'sec ret\\'x' user=u", "host=h password = xxxxx user=u"},
		{"host=h PASSWORD=secret", "host=h PASSWORD=xxxxx"},
		{"sslpassword=secret host=h", "sslpassword=xxxxx host=h"},
		{"postgres://bob:secret@db.example:5432/app?sslmode=disable", "postgres://bob:xxxxx@db.example:5432/app?sslmode=disable"},
		{"postgresql://bob:s%40cret@db/app", "postgresql://bob:xxxxx@db/app"},
		{"postgres://db/app?user=bob&password=secret&sslmode=disable", "postgres://db/app?user=bob&password=xxxxx&sslmode=disable"},
		{"cannot parse `postgres://bob:secret@h/db`: bad", "cannot parse `postgres://bob:xxxxx@h/db`: bad"},
		{"postgres://bob@h/db", "postgres://bob@h/db"},
		{"host=h user=u", "host=h user=u"},
	}
	for _, c := range cases {
		got := maskDSN(c.in)
		require.Equal(t, c.want, got, "input %q", c.in)
		require.NotContains(t, got, "secret")
	}
	require.Equal(t, "auth failed for xxxxx", maskSecret("auth failed for hunter2!", "hunter2!"))
	require.Equal(t, "a b", maskSecret("a b", "a")) // too short to replace literally
}

func FuzzMaskDSN(f *testing.F) {
	for _, s := range []string{"host=h password=secret", "postgres://u:p@h/db", "password='a b'", "password=", "://@"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		_ = maskDSN(s) // must not panic or loop
	})
}

func TestErrorText(t *testing.T) {
	tg := &target{password: "topsecret"}
	pe := &pgconn.PgError{Severity: "ERROR", Message: "boom", Detail: "d", Hint: "h", Where: "PL/pgSQL function x line 1 at RAISE"}
	require.Equal(t, "ERROR:  boom\nDETAIL:  d\nHINT:  h\nCONTEXT:  PL/pgSQL function x line 1 at RAISE",
		errorText(pe, tg))
	require.Equal(t, "ERROR:  division by zero", errorText(&pgconn.PgError{Severity: "ERROR", Message: "division by zero"}, tg))
	require.Equal(t, "failed: password=xxxxx xxxxx",
		errorText(errors.New("failed: password=topsecret topsecret"), tg))
}

type nopStore struct{}

func (nopStore) StartTasks(context.Context, string, []pgstore.Ref) ([]pgstore.StartedTask, error) {
	return nil, nil
}
func (nopStore) FinishTasks(context.Context, string, []pgstore.Outcome) ([]pgstore.Finished, error) {
	return nil, nil
}

type nopReporter struct{}

func (nopReporter) Report(context.Context, []Done) error { return nil }

func TestNewValidates(t *testing.T) {
	ok := Config{Node: "n1", Incarnation: "i1"}
	_, err := New(ok, nopStore{}, nopReporter{})
	require.NoError(t, err)

	for name, c := range map[string]Config{
		"Node":              {Incarnation: "i"},
		"Incarnation":       {Node: "n"},
		"longer than":       {Node: "n", Incarnation: strings.Repeat("x", 60)},
		"printable":         {Node: "n\n", Incarnation: "i"},
		"BatchSize":         {Node: "n", Incarnation: "i", BatchSize: -1},
		"MaxConnsPerTarget": {Node: "n", Incarnation: "i", MaxConnsPerTarget: -1},
		"TerminateAfter":    {Node: "n", Incarnation: "i", TerminateAfter: -1},
	} {
		_, err := New(c, nopStore{}, nopReporter{})
		require.ErrorIs(t, err, ErrInvalidConfig, name)
		require.Contains(t, err.Error(), name)
	}
	_, err = New(ok, nil, nopReporter{})
	require.ErrorIs(t, err, ErrInvalidConfig)

	e, err := New(ok, nopStore{}, nopReporter{})
	require.NoError(t, err)
	require.Equal(t, "asyncnode/n1/i1", e.ApplicationName())
	require.Equal(t, DefaultBatchSize, e.cfg.BatchSize)
	require.Equal(t, DefaultMaxConnsPerTarget, e.cfg.MaxConnsPerTarget)
	require.Equal(t, DefaultTerminateAfter, e.cfg.TerminateAfter)
	require.Equal(t, DefaultFlushEvery, e.cfg.FlushEvery)
	require.Equal(t, DefaultReportsInFlight, e.cfg.ReportsInFlight)
	_, err = New(Config{Node: "n", Incarnation: "i", ReportsInFlight: -1}, nopStore{}, nopReporter{})
	require.ErrorContains(t, err, "ReportsInFlight")
}

// heldReporter holds every Report call until release is closed and tells
// calls of each call's batch.
type heldReporter struct {
	release chan struct{}
	calls   chan []Done
}

func (r heldReporter) Report(ctx context.Context, done []Done) error {
	r.calls <- done
	select {
	case <-r.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Dones that end while a Report call waits for its commit go out in calls
// of their own, up to ReportsInFlight at once, and no more. (nopStore
// starts nothing, so every submitted attempt is fenced out at start and
// reported Done at once.)
func TestReportsInFlightAreBounded(t *testing.T) {
	rep := heldReporter{release: make(chan struct{}), calls: make(chan []Done, 10)}
	e, err := New(Config{Node: "n1", Incarnation: "i1", ReportsInFlight: 2}, nopStore{}, rep)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	var run sync.WaitGroup
	run.Go(func() { require.NoError(t, e.Run(ctx)) })
	defer func() { cancel(); run.Wait() }()

	next := func(what string) []Done {
		t.Helper()
		select {
		case b := <-rep.calls:
			return b
		case <-time.After(10 * time.Second):
			t.Fatalf("no Report call for %s", what)
			return nil
		}
	}
	for id := int64(1); id <= 2; id++ {
		e.Submit([]Work{{Ref: pgstore.Ref{TaskID: id, Attempt: 1}}})
		b := next("a Done that ended while earlier calls wait")
		require.Equal(t, []Done{{Ref: pgstore.Ref{TaskID: id, Attempt: 1}}}, b)
	}
	e.Submit([]Work{{Ref: pgstore.Ref{TaskID: 3, Attempt: 1}}})
	select {
	case b := <-rep.calls:
		t.Fatalf("a third Report call while two are under way: %v", b)
	case <-time.After(300 * time.Millisecond):
	}
	close(rep.release)
	require.Equal(t, []Done{{Ref: pgstore.Ref{TaskID: 3, Attempt: 1}}}, next("the Done held back"))
	require.Eventually(t, func() bool { return len(e.Running()) == 0 }, 10*time.Second, 10*time.Millisecond)
}
