package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// wait is the upper bound for wait-for-condition helpers.
const wait = 10 * time.Second

func ctxT(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func testLogger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "pgstore", Level: hclog.Debug, Output: testWriter{t}})
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func connect(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// newDB returns a fresh migrated database, a store on it and a plain connection.
func newDB(t testing.TB) (string, *pgstore.Store, *pgx.Conn) {
	t.Helper()
	dsn := h.DB(t)
	return dsn, openStore(t, dsn), connect(t, dsn)
}

// openStore opens a store on dsn (another node's, when the test has one
// already), closed at the end of the test.
func openStore(t testing.TB, dsn string) *pgstore.Store {
	t.Helper()
	s, err := pgstore.Open(context.Background(), dsn+" pool_max_conns=4", testLogger(t))
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

func exec(t testing.TB, c *pgx.Conn, sql string, args ...any) {
	t.Helper()
	_, err := c.Exec(context.Background(), sql, args...)
	require.NoError(t, err, sql)
}

// querier is what queryStrings reads from: a connection, a pooled one or a
// transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func queryStrings(t testing.TB, c querier, sql string, args ...any) []string {
	t.Helper()
	rows, err := c.Query(context.Background(), sql, args...)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}

func queryInt(t testing.TB, c *pgx.Conn, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	require.NoError(t, c.QueryRow(context.Background(), sql, args...).Scan(&n), sql)
	return n
}

func queryIDs(t testing.TB, c *pgx.Conn, sql string, args ...any) []int64 {
	t.Helper()
	rows, err := c.Query(context.Background(), sql, args...)
	require.NoError(t, err, sql)
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err, sql)
	return out
}

// snapshot renders every row of the tables a bad call must not change.
func snapshot(t testing.TB, c *pgx.Conn) string {
	t.Helper()
	var b strings.Builder
	for _, q := range []string{
		`SELECT coalesce(string_agg(x::text, E'\n' ORDER BY x.task_id), '') FROM async.task x`,
		`SELECT coalesce(string_agg(x::text, E'\n' ORDER BY x.target), '') FROM async.target x`,
		`SELECT coalesce(string_agg(x::text, E'\n' ORDER BY x.concurrency_pool), '') FROM async.concurrency_pool x`,
		`SELECT coalesce(string_agg(x::text, E'\n'), '') FROM async.control x`,
		`SELECT coalesce(string_agg(x::text, E'\n'), '') FROM async.leader x`,
	} {
		var s string
		require.NoError(t, c.QueryRow(context.Background(), q).Scan(&s))
		b.WriteString(s)
		b.WriteString("\n--\n")
	}
	return b.String()
}

// requireSQLError asserts err is a PostgreSQL error with SQLSTATE code (if
// not empty) whose message contains every fragment.
func requireSQLError(t testing.TB, err error, code string, fragments ...string) {
	t.Helper()
	require.Error(t, err)
	var pgErr *pgconn.PgError
	require.True(t, errors.As(err, &pgErr), "want a PostgreSQL error, got %v", err)
	if code != "" {
		require.Equal(t, code, pgErr.Code, "SQLSTATE of %q", pgErr.Message)
	}
	for _, f := range fragments {
		require.Contains(t, pgErr.Message, f)
	}
}

// notices collects NOTICE/WARNING messages of a connection.
type notices struct{ list []string }

func (n *notices) handler(_ *pgconn.PgConn, no *pgconn.Notice) {
	n.list = append(n.list, no.Severity+": "+no.Message)
}

// connectNotices opens a connection whose notices are recorded.
func connectNotices(t testing.TB, dsn string) (*pgx.Conn, *notices) {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	require.NoError(t, err)
	n := &notices{}
	cfg.OnNotice = n.handler
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(context.Background()) })
	return c, n
}

// listener is a LISTEN async_wakeup connection.
type listener struct {
	t testing.TB
	c *pgx.Conn
}

func listen(t testing.TB, dsn string) *listener {
	t.Helper()
	c := connect(t, dsn)
	exec(t, c, "LISTEN async_wakeup")
	return &listener{t: t, c: c}
}

// next waits for the next notification and returns its payload.
func (l *listener) next() string {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	n, err := l.c.WaitForNotification(ctx)
	require.NoError(l.t, err, "no notification within %s", wait)
	return n.Payload
}

// none asserts no notification is pending within d (a negative check).
func (l *listener) none(d time.Duration) {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	n, err := l.c.WaitForNotification(ctx)
	if err == nil {
		l.t.Fatalf("unexpected notification %q", n.Payload)
	}
}

// push pushes n tasks with query q (NULL when q is "") to target and
// returns their ids.
func push(t testing.TB, c *pgx.Conn, target string, n int, q string) []int64 {
	t.Helper()
	var query any = q
	if q == "" {
		query = nil
	}
	return queryIDs(t, c, `SELECT async.push_tasks(array_agg(async.task($1::text, $2)))
	                         FROM generate_series(1, $3::int)`, query, target, n)
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// takeLead takes the leadership for term, released at the end of the test.
func takeLead(t testing.TB, s *pgstore.Store, term uint64) *pgstore.Leadership {
	t.Helper()
	l, err := s.TakeLeadership(context.Background(), term, fmt.Sprintf("leader-%d", term), "test-cluster")
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Release(context.Background()) })
	return l
}

// slots returns n slot nodes n0, n1, ...
func slots(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("n%d", i)
	}
	return out
}

// claim claims with n slots (nodes n0..), now.
func claim(t testing.TB, s *pgstore.Store, term uint64, n int, running map[string]int) []pgstore.Claimed {
	t.Helper()
	cl, err := s.ClaimTasks(context.Background(), pgstore.ClaimRequest{Term: term, Slots: slots(n), PoolRunning: running, Now: time.Now()})
	require.NoError(t, err)
	return cl
}

func ref(c pgstore.Claimed) pgstore.Ref { return pgstore.Ref{TaskID: c.TaskID, Attempt: c.Attempt} }

func refs(r ...pgstore.Ref) []pgstore.Ref { return r }

// explainClaim returns EXPLAIN of the claim's first statement
// (claim_select.sql, which finds and locks the tasks) with n free slots and
// no pool running, as q plans it; options, if any, go in parentheses
// ("ANALYZE, FORMAT JSON"). With ANALYZE it runs: give a transaction and
// roll it back.
func explainClaim(t *testing.T, q querier, options string, n int) string {
	t.Helper()
	explain := "EXPLAIN "
	if options != "" {
		explain += "(" + options + ") "
	}
	return strings.Join(queryStrings(t, q, explain+querySQL(t, "claim_select"), time.Now(), int32(n), []string{}, []int32{}, []int64{}), "\n")
}

// refsByNode groups claimed attempts by the node they were given to, as the
// nodes would start them.
func refsByNode(cl []pgstore.Claimed) map[string][]pgstore.Ref {
	by := map[string][]pgstore.Ref{}
	for _, c := range cl {
		by[c.Node] = append(by[c.Node], ref(c))
	}
	return by
}

// finished returns a FINISHED outcome, now, for each ref.
func finished(rs []pgstore.Ref) []pgstore.Outcome {
	outs := make([]pgstore.Outcome, len(rs))
	for i, r := range rs {
		outs[i] = pgstore.Outcome{Ref: r, Status: pgstore.StatusFinished, At: time.Now()}
	}
	return outs
}

func finish(t testing.TB, s *pgstore.Store, node string, r pgstore.Ref, status pgstore.Status) pgstore.Finished {
	t.Helper()
	f, err := s.FinishTasks(context.Background(), node, []pgstore.Outcome{{Ref: r, Status: status, At: time.Now()}})
	require.NoError(t, err)
	require.Len(t, f, 1)
	return f[0]
}

// querySQL is the statement queries/<name>.sql as the store runs it (the
// embedded file).
func querySQL(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile("queries/" + name + ".sql")
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}
