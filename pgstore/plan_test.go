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
	{"claim_update", "timestamptz, bigint[], text, interval", "now(), '{1,2,3}'::bigint[], 'n1', '1h'"},
}

// claimSelectArgs are claim_select's parameter types and sample arguments:
// 200 free slots, no pool running, nothing excluded.
const claimSelectParams, claimSelectArgs = "timestamptz, int, text[], int[], bigint[]",
	"now(), 200, '{}'::text[], '{}'::int[], '{}'::bigint[]"

// lookup returns the idLookups entry of the statement name.
func lookup(t *testing.T, name string) struct{ name, params, args string } {
	t.Helper()
	for _, q := range idLookups {
		if q.name == name {
			return q
		}
	}
	t.Fatalf("no id lookup %s", name)
	return idLookups[0]
}

// preparedPlans sums, over the idle sessions of pool, the custom and
// generic plans of the prepared statements whose text starts with prefix,
// and counts those that ran on a generic plan.
func preparedPlans(t *testing.T, pool *pgxpool.Pool, prefix string) (custom, generic, genericStatements int) {
	t.Helper()
	ctx := ctxT(t)
	for _, pc := range pool.AcquireAllIdle(ctx) {
		var cu, ge, gs int
		err := pc.QueryRow(ctx, `select coalesce(sum(custom_plans), 0), coalesce(sum(generic_plans), 0),
		                                count(*) filter (where generic_plans > 0)
		                           from pg_prepared_statements where starts_with(statement, $1)`,
			pgx.QueryExecModeSimpleProtocol, prefix).Scan(&cu, &ge, &gs)
		pc.Release()
		require.NoError(t, err)
		custom, generic, genericStatements = custom+cu, generic+ge, genericStatements+gs
	}
	return custom, generic, genericStatements
}

// taskRowsSorted matches a plan's sort of task rows themselves (as opposed
// to a sort of the claim's candidates, which the plan calls cand): a pool's
// READY rows read out of index order, then sorted.
var taskRowsSorted = regexp.MustCompile(`Sort Key: t(_\d+)?\.`)

// genericPlan prepares queries/<name>.sql and explains its generic plan.
func genericPlan(t *testing.T, c *pgx.Conn, name, params, args string) string {
	t.Helper()
	exec(t, c, fmt.Sprintf("PREPARE %s (%s) AS %s", name, params, querySQL(t, name)))
	return strings.Join(queryStrings(t, c, fmt.Sprintf("EXPLAIN EXECUTE %s(%s)", name, args)), "\n")
}

// backlogThenEmptied leaves the task table with the statistics of a queue
// analysed while it held a backlog of READY tasks (every row READY), then
// emptied, vacuumed, reindexed and analysed while empty (pages and rows
// near zero, the column statistics kept), and pushes n tasks onto that.
func backlogThenEmptied(t *testing.T, c *pgx.Conn, n int) {
	t.Helper()
	exec(t, c, `ALTER TABLE async.task SET (autovacuum_enabled = off)`)
	push(t, c, "SELF", n, "select 1")
	exec(t, c, `ANALYZE async.task`)
	exec(t, c, `DELETE FROM async.task`)
	exec(t, c, `VACUUM async.task`)
	exec(t, c, `REINDEX TABLE async.task`)
	push(t, c, "SELF", 100, "select 1")
	exec(t, c, `DELETE FROM async.task`)
	exec(t, c, `ANALYZE async.task`)
	push(t, c, "SELF", n, "select 1")
}

// The claim runs on generic plans cached from its first call (planning it
// at every call took 0.74 ms of a 250-task claim), so a plan cached while
// the queue was empty, or built on misleading statistics, must still fit a
// queue of any size. With only sequential scans and hash and merge joins
// ruled out (the lookups' settings), the generic plan on the statistics of
// backlogThenEmptied reads the claim's candidates with a bitmap scan of
// every READY task of the pool, sorted, at each claim: a drain then costs
// the square of its length. The claim pool's sessions (claimSettings) can
// only read task_ready_idx in order and look the claimed ids up, and the
// store's claims run there on generic plans.
func TestClaimUsesIndexPlansWhateverTheStatistics(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	ctx := ctxT(t)
	backlogThenEmptied(t, c, 40000)

	// The trap, in a session of the lookups' settings, where bitmap scans
	// are allowed.
	exec(t, c, pgstore.LookupSettings)
	plan := genericPlan(t, c, "claim_select", claimSelectParams, claimSelectArgs)
	require.Regexp(t, taskRowsSorted, plan, "a session with bitmap scans no longer shows the trap this test guards against:\n%s", plan)

	// The claim pool's sessions, as they are. Taken out of the pool: its
	// prepared statements are the test's.
	pc, err := s.ClaimsPool().Acquire(ctx)
	require.NoError(t, err)
	cc := pc.Hijack()
	defer func() { _ = cc.Close(context.WithoutCancel(ctx)) }()
	plan = genericPlan(t, cc, "claim_select", claimSelectParams, claimSelectArgs)
	assert.NotRegexp(t, taskRowsSorted, plan)
	assert.NotContains(t, plan, "Bitmap", plan)
	assert.NotContains(t, plan, "Seq Scan on task", plan)
	assert.Contains(t, plan, "Index Scan using task_ready_idx on task", plan)
	q := lookup(t, "claim_update")
	plan = genericPlan(t, cc, q.name, q.params, q.args)
	assertLooksUpIDs(t, "claim_update", plan)
	assert.NotContains(t, plan, "Seq Scan on task", plan)
	assert.NotContains(t, plan, "Hash Join", plan)

	// The store claims there, on generic plans from the first call.
	exec(t, c, `UPDATE async.target SET max_concurrency = 1000 WHERE target = 'SELF'`)
	takeLead(t, s, 1)
	for range 3 {
		cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slots(100), Now: time.Now()})
		require.NoError(t, err)
		require.Len(t, cl, 100)
	}
	custom, _, generic := preparedPlans(t, s.ClaimsPool(), "-- The claim's")
	assert.Zero(t, custom, "a claim statement was planned for its parameters")
	assert.Equal(t, 2, generic, "the claim's two statements did not both run on generic plans on the claim pool")
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
	custom, generic, _ := preparedPlans(t, s.LookupsPool(), "-- ")
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

// On the statistics of a table analysed while nearly empty (pages kept, no
// rows), a generic plan of an UPDATE joined with unnest() of the ids on
// "t.task_id = n.task_id" reads all of task_pkey and compares every row
// with every id, however many rows the table holds by then: the claim's
// update in that shape took 6.6 s on a bench database, a finish of 250 ids
// among 40,000 rows 2848.7 ms. claim_update.sql has no join, and the
// lookups join with a clause that cannot be merged: in the sessions that
// run them, every one reads task_pkey by id on those statistics.
func TestIDLookupsReadTaskPKeyByIDOnAnEmptiedTable(t *testing.T) {
	t.Parallel()
	dsn, s, _ := newDB(t)
	ctx := ctxT(t)
	emptiedTaskTable(t, dsn, s, 3000)
	for _, p := range []struct {
		name  string
		pool  *pgxpool.Pool
		claim bool // the claim pool runs claim_update; the lookup pool every other id lookup
	}{
		{"claims", s.ClaimsPool(), true},
		{"lookups", s.LookupsPool(), false},
	} {
		pc, err := p.pool.Acquire(ctx)
		require.NoError(t, err)
		c := pc.Hijack()
		defer func() { _ = c.Close(context.WithoutCancel(ctx)) }()

		exec(t, c, `PREPARE joined (bigint[], text[]) AS
		    UPDATE async.task t SET node = n.node FROM unnest($1::bigint[], $2::text[]) AS n(task_id, node)
		     WHERE t.task_id = n.task_id`)
		joined := strings.Join(queryStrings(t, c, `EXPLAIN EXECUTE joined('{1,2,3}', '{n1,n1,n1}')`), "\n")
		_, unconditioned := taskPKeyScans(joined)
		require.NotZero(t, unconditioned, "%s: the joined update no longer shows the trap this test guards against:\n%s", p.name, joined)

		for _, q := range idLookups {
			if (q.name == "claim_update") == p.claim {
				assertLooksUpIDs(t, p.name+": "+q.name, genericPlan(t, c, q.name, q.params, q.args))
			}
		}
	}
}
