package pgstore_test

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/pgstore"
)

// The hot-path statements run as prepared statements, and after a few
// executions PostgreSQL may switch to a generic plan built from stale
// statistics (the table was analysed while nothing ran). Those plans must
// still look up the given ids one by one in task_pkey: a plan that walks
// task_running_idx and joins every running task against every given id
// costs O(running × batch) (it took 46 ms instead of 7 ms for 300 of 1000
// running tasks), and one that hashes a sequential scan of the task table
// grows with the history.
func TestHotPathGenericPlans(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	push(t, c, "SELF", 5000, "select 0")
	exec(t, c, `ANALYZE async.task`)
	// Statistics now say nothing runs nor ran; then a history and 1000
	// running tasks appear.
	exec(t, c, `INSERT INTO async.task (target, concurrency_pool, query, consumed, processed, finish_status, failed)
	            SELECT 'SELF', 'SELF', 'select 0', now(), now(), 'FINISHED', false FROM generate_series(1, 20000)`)
	exec(t, c, `UPDATE async.task SET consumed = now(), attempt = 1, node = 'n1', times_up = now() + interval '1 hour'
	            WHERE task_id IN (SELECT task_id FROM async.task WHERE processed IS NULL ORDER BY task_id LIMIT 1000)`)
	exec(t, c, `SET plan_cache_mode = force_generic_plan`)

	for _, q := range idLookups {
		plan := genericPlan(t, c, q.name, q.params, q.args)
		assertLooksUpIDs(t, q.name, plan)
		assert.NotContains(t, plan, "task_running_idx", "%s:\n%s", q.name, plan)
		assert.NotContains(t, plan, "Seq Scan on task", "%s:\n%s", q.name, plan)
	}
	plan := genericPlan(t, c, "claim_tasks", "timestamptz, text[], text[], int[], bigint[]",
		"now(), '{n1,n1,n1}'::text[], '{}'::text[], '{}'::int[], '{}'::bigint[]")
	assert.NotContains(t, plan, "Seq Scan on task", plan)
	assertLooksUpIDs(t, "claim_tasks", plan)
}

// assertLooksUpIDs requires plan to read task_pkey, and only ever by
// task_id: an index scan of it without an index condition on task_id
// reads the whole table (history included) at every call.
func assertLooksUpIDs(t *testing.T, name, plan string) {
	t.Helper()
	scans, unconditioned := taskPKeyScans(plan)
	assert.Zero(t, unconditioned, "task_pkey is read without a task_id condition: %s:\n%s", name, plan)
	assert.NotZero(t, scans, "%s does not read task_pkey:\n%s", name, plan)
}

// taskPKeyScans counts the scans of task_pkey in plan, and those without
// an index condition on task_id.
func taskPKeyScans(plan string) (scans, unconditioned int) {
	scan := regexp.MustCompile(`Index (Only )?Scan (using|on) task_pkey`)
	byID := regexp.MustCompile(`Index Cond: \(+task_id = `)
	lines := strings.Split(plan, "\n")
	for i, l := range lines {
		if !scan.MatchString(l) {
			continue
		}
		scans++
		if i+1 >= len(lines) || !byID.MatchString(lines[i+1]) {
			unconditioned++
		}
	}
	return scans, unconditioned
}

// idLookups are the statements that look up given task ids, with their
// parameter types and sample arguments (ids 1, 2, 3, attempt 1, node n1).
var idLookups = []struct{ name, params, args string }{
	{"start_tasks", "text, bigint[], int[]", "'n1', '{1,2,3}'::bigint[], '{1,1,1}'::int[]"},
	{"finish_tasks", "text, bigint[], int[], text[], text[], timestamptz[]",
		"'n1', '{1,2,3}'::bigint[], '{1,1,1}'::int[], '{FINISHED,FINISHED,FINISHED}'::text[], '{NULL,NULL,NULL}'::text[], array[now(), now(), now()]"},
	{"task_states", "bigint[]", "'{1,2,3}'::bigint[]"},
	{"unclaim_tasks", "bigint[], int[]", "'{1,2,3}'::bigint[], '{1,1,1}'::int[]"},
	{"resolve_lost", "bigint[], int[], timestamptz, text", "'{1,2,3}'::bigint[], '{1,1,1}'::int[], now(), 'lost'"},
}

// genericPlan prepares queries/<name>.sql and explains its generic plan.
func genericPlan(t *testing.T, c *pgx.Conn, name, params, args string) string {
	t.Helper()
	exec(t, c, fmt.Sprintf("PREPARE %s (%s) AS %s", name, params, querySQL(t, name)))
	return strings.Join(queryStrings(t, c, fmt.Sprintf("EXPLAIN EXECUTE %s(%s)", name, args)), "\n")
}

// The claim must be planned for the queue as it is at every call. A node
// that idled with an empty queue would otherwise run, after a burst, a plan
// the server cached for the prepared statement while the table was empty:
// sequential scans and sorts of the whole task table at every claim, until
// the table is next analysed (seen: 40 to 150 ms per claim instead of about
// 5). So the claim runs on the store's claim pool as unnamed statements: no
// session of that pool may hold it as a prepared statement, however often
// it ran on an empty queue first.
func TestClaimIsPlannedAtEveryCall(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	takeLead(t, s, 1)
	for range 10 {
		cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(4), Now: time.Now()})
		require.NoError(t, err)
		require.Empty(t, cl)
	}
	push(t, c, "SELF", 2000, "select 0")
	cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(4), Now: time.Now()})
	require.NoError(t, err)
	require.Len(t, cl, 4)

	claims := s.ClaimsPool()
	require.GreaterOrEqual(t, claims.Stat().TotalConns(), int32(1), "the claims did not run on the claim pool")
	conns := claims.AcquireAllIdle(ctx)
	require.NotEmpty(t, conns)
	for _, pc := range conns {
		var prepared int
		err := pc.QueryRow(ctx, `select count(*) from pg_prepared_statements where statement like '%Claim READY%'`).Scan(&prepared)
		pc.Release()
		require.NoError(t, err)
		require.Zero(t, prepared, "the claim is a prepared statement: the server may reuse a plan cached on an empty queue")
	}
}

// The statements that look up given task ids (start, finish, task states,
// unclaim, lost attempts) run on the store's lookup pool, whose sessions
// plan them with index lookups and nested loops only, once per session. A
// plain session builds, for a table analysed while empty and still small,
// a generic plan that hashes a sequential scan of the whole task table, and
// keeps it while the table grows until the next analyse: 178 of 497
// finishes of one 40,000-task burst ran such a plan (docs/performance.md).
func TestLookupsUseIndexPlansWhateverTheStatistics(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `ANALYZE async.task`) // empty
	ids := push(t, c, "SELF", 300, "select 0")
	exec(t, c, `UPDATE async.task SET consumed = now(), attempt = 1, node = 'n1', times_up = now() + interval '1 hour'`)

	// The trap, in a plain session.
	exec(t, c, `SET plan_cache_mode = force_generic_plan`)
	plan := genericPlan(t, c, "finish_tasks", idLookups[1].params, idLookups[1].args)
	require.Contains(t, plan, "Seq Scan on task", "the plain session no longer shows the trap this test guards against:\n%s", plan)

	// The lookup pool's sessions, as they are: generic plans from the first
	// call, each id looked up in task_pkey.
	// Taken out of the pool at once: its prepared statements are the test's,
	// and the store's Close must not wait for it if an assertion fails.
	pc, err := s.LookupsPool().Acquire(ctx)
	require.NoError(t, err)
	lc := pc.Hijack()
	defer func() { _ = lc.Close(context.WithoutCancel(ctx)) }()
	for _, q := range idLookups {
		plan := genericPlan(t, lc, q.name, q.params, q.args)
		assertLooksUpIDs(t, q.name, plan)
		assert.NotContains(t, plan, "Seq Scan on task", "%s:\n%s", q.name, plan)
		assert.NotContains(t, plan, "Hash Join", "%s:\n%s", q.name, plan)
	}

	// The store runs them there.
	refs := make([]pgstore.Ref, 100)
	for i := range refs {
		refs[i] = pgstore.Ref{TaskID: ids[i], Attempt: 1}
	}
	started, err := s.StartTasks(ctx, "n1", refs)
	require.NoError(t, err)
	require.Len(t, started, 100)
	fin, err := s.FinishTasks(ctx, "n1", finished(refs))
	require.NoError(t, err)
	require.True(t, fin[99].Applied)
	_, err = s.TaskStates(ctx, ids)
	require.NoError(t, err)
	var custom, generic int
	for _, pc := range s.LookupsPool().AcquireAllIdle(ctx) {
		var cu, ge int
		err := pc.QueryRow(ctx, `select coalesce(sum(custom_plans), 0), coalesce(sum(generic_plans), 0)
		                           from pg_prepared_statements where statement like '-- %'`,
			pgx.QueryExecModeSimpleProtocol).Scan(&cu, &ge)
		pc.Release()
		require.NoError(t, err)
		custom, generic = custom+cu, generic+ge
	}
	assert.Zero(t, custom, "a lookup was planned for its parameters")
	assert.Equal(t, 3, generic, "start, finish and task states did not all run on the lookup pool")
}

// The server JIT-compiles a statement whose estimated cost exceeds
// jit_above_cost, and the claim's estimate follows the task count the last
// analyse saw, not the READY tasks it reads: once an analyse had seen
// 150,000 tasks, a 1-task claim took 27 to 36 ms, nearly all of it
// compiling, instead of 0.4 ms. The store's sessions set jit off. Here
// the database compiles every statement (jit_above_cost = 0): a session of
// a store whose DSN asks for jit compiles the claim, no session of a plain
// store does, and the claims still work.
func TestStoreSessionsDoNotCompileStatements(t *testing.T) {
	t.Parallel()
	dsn, _, c := newDB(t)
	ctx := ctxT(t)
	var available bool
	require.NoError(t, c.QueryRow(ctx, `SELECT pg_jit_available()`).Scan(&available))
	require.True(t, available, "this PostgreSQL cannot JIT-compile (is its llvmjit module installed?), "+
		"so the test cannot show that the store's sessions do not")
	exec(t, c, `DO $$BEGIN EXECUTE format('ALTER DATABASE %I SET jit_above_cost = 0', current_database()); END$$`)
	push(t, c, "SELF", 10, "select 0")

	// compiled explains the claim (rolled back) on a session of p and says
	// whether the server JIT-compiled it.
	compiled := func(p *pgxpool.Pool) bool {
		t.Helper()
		tx, err := p.Begin(ctx)
		require.NoError(t, err)
		defer func() { require.NoError(t, tx.Rollback(ctx)) }()
		return strings.Contains(explainClaim(t, tx, "ANALYZE", 2), "JIT:")
	}

	asked, err := pgstore.Open(ctx, dsn+" jit=on", testLogger(t))
	require.NoError(t, err)
	t.Cleanup(asked.Close)
	require.True(t, compiled(asked.Pool()), "a session whose DSN sets jit=on did not compile the claim: "+
		"the database setting jit_above_cost = 0 did not take, so the test shows nothing")

	s, err := pgstore.Open(ctx, dsn, testLogger(t))
	require.NoError(t, err)
	t.Cleanup(s.Close)
	for name, p := range map[string]*pgxpool.Pool{"main": s.Pool(), "claims": s.ClaimsPool(), "lookups": s.LookupsPool()} {
		assert.False(t, compiled(p), "a session of the store's %s pool JIT-compiled the claim", name)
		// Set by a SET after connecting, not in the startup packet, which
		// poolers such as PgBouncer refuse for parameters they do not know.
		var source string
		require.NoError(t, p.QueryRow(ctx, `SELECT source FROM pg_settings WHERE name = 'jit'`).Scan(&source))
		assert.Equal(t, "session", source, "jit of the store's %s pool", name)
	}
	takeLead(t, s, 1)
	require.Len(t, claim(t, s, 1, 3, nil), 3)
}
