package pgstore_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestConfigureExample(t *testing.T) {
	t.Parallel()
	dsn, s, c := newDB(t)
	ctx := ctxT(t)
	l := listen(t, dsn)
	// §3.5 of the semantics, with D3's alias on one target.
	exec(t, c, `SELECT async.configure('{
	  "control": {"workers": 10, "default_timeout": "5 minutes", "idle_sleep": 0.5, "debug_log": true,
	              "task_keep_duration": "7 days", "advisory_mutex_id": 4242, "busy_sleep": 0.01,
	              "heavy_maintenance_sleep": "12 hours", "light_maintenance_sleep": "2 minutes",
	              "default_concurrency_pool_workers": 3, "self_connection_string": "dbname=app"},
	  "targets": [
	    {"target": "SELF", "connection_string": null, "max_concurrency": 4},
	    {"target": "ext", "connection_string": "host=ext dbname=x", "max_workers": 2, "asynchronous_finish": true,
	     "default_timeout": "30 seconds", "concurrency_track_yielded": true, "max_retries": 3}],
	  "concurrency_pools": [{"concurrency_pool": "reports", "max_workers": 2}]}')`)
	require.Equal(t, "control", l.next(), "control settings changed")
	require.Equal(t, "config", l.next(), "configure always ends with a config wake-up")
	l.none(100 * time.Millisecond)

	require.Equal(t, []string{
		"(SELF,4,,f,,f,0)",
		`(ext,2,"host=ext dbname=x",t,00:00:30,t,3)`,
	}, queryStrings(t, c, `SELECT x::text FROM async.target x ORDER BY target`))
	require.Equal(t, []string{"SELF 4", "ext 2", "reports 2"},
		queryStrings(t, c, `SELECT concurrency_pool || ' ' || max_workers FROM async.concurrency_pool ORDER BY 1`))
	require.Equal(t, []string{"10 0.5 t 7 days 4242 0.01 12:00:00 00:02:00 3 dbname=app 00:05:00"}, queryStrings(t, c,
		`SELECT concat_ws(' ', workers, idle_sleep, debug_log, task_keep_duration, advisory_mutex_id, busy_sleep,
		        heavy_maintenance_sleep, light_maintenance_sleep, default_concurrency_pool_workers, self_connection_string,
		        default_timeout) FROM async.control`))

	cfg, err := s.LoadConfig(ctx)
	require.NoError(t, err)
	require.Equal(t, 10, cfg.Control.Workers)
	require.Equal(t, 5*time.Minute, cfg.Control.DefaultTimeout)
	require.Equal(t, 500*time.Millisecond, cfg.Control.IdleSleep)
	require.Equal(t, 7*24*time.Hour, cfg.Control.TaskKeepDuration)
	require.Equal(t, 12*time.Hour, cfg.Control.HeavyMaintenanceSleep)
	require.EqualValues(t, 4242, cfg.Control.AdvisoryMutexID)
	require.Equal(t, 3, cfg.Control.DefaultPoolWorkers)
	require.True(t, cfg.Control.Enabled)
	require.Nil(t, cfg.Control.LastHeavyMaintenance)
	require.Equal(t, map[string]int{"SELF": 4, "ext": 2, "reports": 2}, cfg.Pools)
	require.Equal(t, 2, cfg.PoolLimit("reports"))
	require.Equal(t, 3, cfg.PoolLimit("unconfigured"))
	require.Len(t, cfg.Targets, 2)
	require.Nil(t, cfg.Targets["SELF"].ConnString, "SELF runs on the server database")
	ext := cfg.Targets["ext"]
	require.Equal(t, "host=ext dbname=x", *ext.ConnString)
	require.Equal(t, 30*time.Second, *ext.DefaultTimeout)
	require.True(t, ext.Async)
	require.Equal(t, 2, ext.MaxConcurrency)
}

// D7: SELF exists after install with limit control.self_concurrency.
func TestSelfTargetInstalled(t *testing.T) {
	t.Parallel()
	_, s, c := newDB(t)
	require.Equal(t, []string{"SELF 4 null 4"}, queryStrings(t, c,
		`SELECT t.target || ' ' || t.max_concurrency || ' ' || coalesce(t.connection_string, 'null') || ' ' || c.self_concurrency
		   FROM async.target t, async.control c`))
	require.Equal(t, []string{"SELF 4"}, queryStrings(t, c, `SELECT concurrency_pool || ' ' || max_workers FROM async.concurrency_pool`))
	exec(t, c, `SELECT async.configure('{"control": {"self_concurrency": 7}}')`)
	require.Equal(t, []string{"SELF 7 7"}, queryStrings(t, c,
		`SELECT t.target || ' ' || t.max_concurrency || ' ' || c.self_concurrency FROM async.target t, async.control c`))
	cfg, err := s.LoadConfig(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, 7, cfg.PoolLimit("SELF"))
	// A SELF entry with a limit moves self_concurrency too.
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "SELF", "max_concurrency": 9}]}')`)
	require.Equal(t, []string{"SELF 9 9"}, queryStrings(t, c,
		`SELECT t.target || ' ' || t.max_concurrency || ' ' || c.self_concurrency FROM async.target t, async.control c`))
	// SELF always stays, even when not listed.
	exec(t, c, `SELECT async.configure('{"targets": []}')`)
	require.Equal(t, []string{"SELF 9"}, queryStrings(t, c, `SELECT target || ' ' || max_concurrency FROM async.target`))
}

// D3 (alias), D4 (defaults; partial updates keep the rest).
func TestConfigureTargetsDefaultsAndAlias(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a"}, {"target": "b", "max_workers": 3}]}')`)
	require.Equal(t, []string{"(SELF,4,,f,,f,0)", "(a,8,,f,,f,0)", "(b,3,,f,,f,0)"},
		queryStrings(t, c, `SELECT x::text FROM async.target x ORDER BY target`))
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a", "connection_string": "host=a", "asynchronous_finish": true,
	    "default_timeout": "1 minute", "max_retries": 1}, {"target": "b", "max_concurrency": 3, "max_workers": 3}]}')`)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a", "max_concurrency": 5}, {"target": "b"}]}')`)
	require.Equal(t, []string{"(SELF,4,,f,,f,0)", `(a,5,host=a,t,00:01:00,f,1)`, "(b,3,,f,,f,0)"},
		queryStrings(t, c, `SELECT x::text FROM async.target x ORDER BY target`))
	require.Equal(t, []string{"SELF 4", "a 5", "b 3"},
		queryStrings(t, c, `SELECT concurrency_pool || ' ' || max_workers FROM async.concurrency_pool ORDER BY 1`))
	// null resets the nullable settings
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a", "connection_string": null, "default_timeout": null}, {"target": "b"}]}')`)
	require.Equal(t, []string{"(a,5,,t,,f,1)"}, queryStrings(t, c, `SELECT x::text FROM async.target x WHERE target = 'a'`))
	// Missing keys leave the whole sections untouched.
	exec(t, c, `SELECT async.configure('{}')`)
	exec(t, c, `SELECT async.configure('{"control": {}}')`)
	require.EqualValues(t, 3, queryInt(t, c, `SELECT count(*) FROM async.target`))
}

// D5: removing a target with unfinished tasks is refused with the count;
// a removed target's history is kept.
func TestConfigureRemoveTarget(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a"}, {"target": "b"}]}')`)
	ids := push(t, c, "a", 3, "select 1")
	done := push(t, c, "b", 2, "select 1")
	exec(t, c, `SELECT async.finish($1::bigint[], 'FINISHED', NULL)`, done)

	before := snapshot(t, c)
	_, err := c.Exec(ctx, `SELECT async.configure('{"targets": [{"target": "b"}]}')`)
	requireSQLError(t, err, "55006", "cannot remove target 'a'", "3 unfinished task(s)")
	require.Equal(t, before, snapshot(t, c))
	// A direct DELETE is refused the same way.
	_, err = c.Exec(ctx, `DELETE FROM async.target WHERE target = 'a'`)
	requireSQLError(t, err, "55006", "cannot remove target 'a'", "3 unfinished")

	exec(t, c, `SELECT async.finish($1::bigint[], 'CANCELED', NULL)`, ids[:2])
	_, err = c.Exec(ctx, `SELECT async.configure('{"targets": [{"target": "b"}]}')`)
	requireSQLError(t, err, "55006", "cannot remove target 'a'", "1 unfinished task(s)")
	exec(t, c, `SELECT async.finish($1::bigint[], 'CANCELED', NULL)`, ids[2:])

	// Now b goes (no unfinished tasks), a stays.
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a"}]}')`)
	require.Equal(t, []string{"SELF", "a"}, queryStrings(t, c, `SELECT target FROM async.target ORDER BY 1`))
	require.Equal(t, []string{"SELF", "a"}, queryStrings(t, c, `SELECT concurrency_pool FROM async.concurrency_pool ORDER BY 1`))
	require.EqualValues(t, 2, queryInt(t, c, `SELECT count(*) FROM async.task WHERE target = 'b'`), "history kept")
	// Pushing to the removed target is refused; restarting its task too.
	_, err = c.Exec(ctx, `SELECT async.push_tasks(array[async.task('x', 'b')])`)
	requireSQLError(t, err, "42704", "unknown target 'b'")
	_, err = c.Exec(ctx, `SELECT async.restart_task($1)`, done[0])
	requireSQLError(t, err, "42704", "target 'b'", "no longer exists")
	// Renaming a target with unfinished tasks is refused.
	push(t, c, "a", 1, "x")
	_, err = c.Exec(ctx, `UPDATE async.target SET target = 'z' WHERE target = 'a'`)
	requireSQLError(t, err, "55006", "cannot rename target 'a'")
}

func TestConfigurePools(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a", "max_concurrency": 2}],
	    "concurrency_pools": [{"concurrency_pool": "p", "max_workers": 5}, {"concurrency_pool": "q", "max_workers": 1}]}')`)
	require.Equal(t, []string{"SELF 4", "a 2", "p 5", "q 1"},
		queryStrings(t, c, `SELECT concurrency_pool || ' ' || max_workers FROM async.concurrency_pool ORDER BY 1`))
	// Declarative for non-target pools: q goes, p changes, target pools stay.
	exec(t, c, `SELECT async.configure('{"concurrency_pools": [{"concurrency_pool": "p", "max_workers": 6}]}')`)
	require.Equal(t, []string{"SELF 4", "a 2", "p 6"},
		queryStrings(t, c, `SELECT concurrency_pool || ' ' || max_workers FROM async.concurrency_pool ORDER BY 1`))
	// Target limit changes reach the pool row at commit (D6).
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a", "max_concurrency": 7}]}')`)
	exec(t, c, `UPDATE async.target SET max_concurrency = 3 WHERE target = 'SELF'`)
	require.Equal(t, []string{"SELF 3", "a 7", "p 6"},
		queryStrings(t, c, `SELECT concurrency_pool || ' ' || max_workers FROM async.concurrency_pool ORDER BY 1`))
}

// Every bad document: an error naming the key and the problem, no change.
func TestConfigureValidation(t *testing.T) {
	t.Parallel()
	_, _, c := newDB(t)
	ctx := ctxT(t)
	exec(t, c, `SELECT async.configure('{"targets": [{"target": "a"}], "concurrency_pools": [{"concurrency_pool": "p", "max_workers": 2}]}')`)
	for _, tc := range []struct {
		name, doc string
		want      []string
	}{
		{"not an object", `[]`, []string{"must be a JSON object", "a JSON array"}},
		{"scalar", `3`, []string{"must be a JSON object"}},
		{"unknown top-level key", `{"control": {}, "target": []}`, []string{"unknown key 'target'", "top level"}},
		{"control not object", `{"control": []}`, []string{"control must be a JSON object"}},
		{"unknown control key", `{"control": {"workers": 2, "enabled": true}}`, []string{"unknown key 'enabled' in control"}},
		{"workers string", `{"control": {"workers": "10"}}`, []string{"control.workers must be an integer", `a JSON string ("10")`}},
		{"workers fraction", `{"control": {"workers": 1.5}}`, []string{"control.workers must be an integer, got 1.5"}},
		{"workers zero", `{"control": {"workers": 0}}`, []string{"control.workers must be greater than 0, got 0"}},
		{"workers null", `{"control": {"workers": null}}`, []string{"control.workers must be an integer", "a JSON null"}},
		{"workers huge", `{"control": {"workers": 1e12}}`, []string{"control.workers must be at most"}},
		{"self_concurrency negative", `{"control": {"self_concurrency": -1}}`, []string{"control.self_concurrency must be greater than 0"}},
		{"pool default zero", `{"control": {"default_concurrency_pool_workers": 0}}`, []string{"control.default_concurrency_pool_workers must be greater than 0"}},
		{"timeout number", `{"control": {"default_timeout": 60}}`, []string{"control.default_timeout must be an interval as a JSON string"}},
		{"timeout garbage", `{"control": {"default_timeout": "banana"}}`, []string{"control.default_timeout is not a valid interval", "banana"}},
		{"timeout negative", `{"control": {"default_timeout": "-5 minutes"}}`, []string{"control.default_timeout must be greater than zero"}},
		{"keep zero", `{"control": {"task_keep_duration": "0"}}`, []string{"control.task_keep_duration must be greater than zero"}},
		{"heavy bad", `{"control": {"heavy_maintenance_sleep": true}}`, []string{"control.heavy_maintenance_sleep must be an interval"}},
		{"light bad", `{"control": {"light_maintenance_sleep": "x"}}`, []string{"control.light_maintenance_sleep is not a valid interval"}},
		{"idle negative", `{"control": {"idle_sleep": -0.1}}`, []string{"control.idle_sleep must be greater than 0"}},
		{"busy string", `{"control": {"busy_sleep": "fast"}}`, []string{"control.busy_sleep must be a number of seconds"}},
		{"debug_log number", `{"control": {"debug_log": 1}}`, []string{"control.debug_log must be true or false"}},
		{"mutex fraction", `{"control": {"advisory_mutex_id": 0.5}}`, []string{"control.advisory_mutex_id must be an integer"}},
		{"self_target empty", `{"control": {"self_target": ""}}`, []string{"control.self_target must not be empty"}},
		{"self_target is a target", `{"control": {"self_target": "a"}}`, []string{"control.self_target 'a' is the name of an existing target"}},
		{"self_connection_string number", `{"control": {"self_connection_string": 5}}`, []string{"control.self_connection_string must be a JSON string or null"}},
		{"targets not array", `{"targets": {"target": "a"}}`, []string{"targets must be a JSON array"}},
		{"target not object", `{"targets": ["a"]}`, []string{"targets[0] must be a JSON object"}},
		{"target without name", `{"targets": [{"max_concurrency": 2}]}`, []string{`targets[0] has no "target" key`}},
		{"target empty name", `{"targets": [{"target": ""}]}`, []string{"targets[0].target must not be empty"}},
		{"target name number", `{"targets": [{"target": 5}]}`, []string{"targets[0].target must be a JSON string"}},
		{"unknown target key", `{"targets": [{"target": "a"}, {"target": "b", "max_conc": 2}]}`, []string{"unknown key 'max_conc' in targets[1] ('b')"}},
		{"alias disagrees", `{"targets": [{"target": "a", "max_concurrency": 2, "max_workers": 3}]}`,
			[]string{"targets[0] ('a')", "max_concurrency (2) and its alias max_workers (3) disagree"}},
		{"limit zero", `{"targets": [{"target": "a", "max_concurrency": 0}]}`, []string{"targets[0] ('a').max_concurrency must be greater than 0"}},
		{"alias zero", `{"targets": [{"target": "a", "max_workers": 0}]}`, []string{"targets[0] ('a').max_workers must be greater than 0"}},
		{"retries negative", `{"targets": [{"target": "a", "max_retries": -1}]}`, []string{"targets[0] ('a').max_retries must be at least 0"}},
		{"async string", `{"targets": [{"target": "a", "asynchronous_finish": "yes"}]}`, []string{"targets[0] ('a').asynchronous_finish must be true or false"}},
		{"track number", `{"targets": [{"target": "a", "concurrency_track_yielded": 0}]}`, []string{"targets[0] ('a').concurrency_track_yielded must be true or false"}},
		{"target timeout", `{"targets": [{"target": "a", "default_timeout": "soon"}]}`, []string{"targets[0] ('a').default_timeout is not a valid interval"}},
		{"conn number", `{"targets": [{"target": "a", "connection_string": 1}]}`, []string{"targets[0] ('a').connection_string must be a JSON string or null"}},
		{"duplicate target", `{"targets": [{"target": "a"}, {"target": "a"}]}`, []string{"targets[1] ('a')", "listed more than once"}},
		{"internal self target", `{"targets": [{"target": "async.self"}]}`, []string{"'async.self' is reserved for the internal self target"}},
		{"SELF vs self_concurrency", `{"control": {"self_concurrency": 3}, "targets": [{"target": "SELF", "max_concurrency": 5}]}`,
			[]string{"max_concurrency 5 disagrees with control.self_concurrency 3"}},
		{"pools not array", `{"concurrency_pools": {}}`, []string{"concurrency_pools must be a JSON array"}},
		{"pool not object", `{"concurrency_pools": [1]}`, []string{"concurrency_pools[0] must be a JSON object"}},
		{"pool without name", `{"concurrency_pools": [{"max_workers": 1}]}`, []string{`concurrency_pools[0] has no "concurrency_pool" key`}},
		{"pool without limit", `{"concurrency_pools": [{"concurrency_pool": "p"}]}`, []string{`concurrency_pools[0] ('p') has no "max_workers" key`}},
		{"pool limit zero", `{"concurrency_pools": [{"concurrency_pool": "p", "max_workers": 0}]}`, []string{"concurrency_pools[0] ('p').max_workers must be greater than 0"}},
		{"unknown pool key", `{"concurrency_pools": [{"concurrency_pool": "p", "max_workers": 1, "limit": 2}]}`, []string{"unknown key 'limit' in concurrency_pools[0] ('p')"}},
		{"pool named like a target", `{"concurrency_pools": [{"concurrency_pool": "a", "max_workers": 1}]}`, []string{"concurrency_pools[0] ('a')", "'a' is the name of a target"}},
		{"pool named like a new target", `{"targets": [{"target": "n"}], "concurrency_pools": [{"concurrency_pool": "n", "max_workers": 1}]}`, []string{"'n' is the name of a target"}},
		{"duplicate pool", `{"concurrency_pools": [{"concurrency_pool": "p", "max_workers": 1}, {"concurrency_pool": "p", "max_workers": 1}]}`, []string{"pool 'p' is listed more than once"}},
		// A valid part before the error is rolled back with it.
		{"late error rolls back", `{"control": {"workers": 55}, "targets": [{"target": "a"}, {"target": "new"}], "concurrency_pools": [{"concurrency_pool": "p", "max_workers": -1}]}`,
			[]string{"max_workers must be greater than 0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, c)
			_, err := c.Exec(ctx, `SELECT async.configure($1::jsonb)`, tc.doc)
			requireSQLError(t, err, "22023", tc.want...)
			require.Equal(t, before, snapshot(t, c), "a refused configuration must change nothing")
		})
	}
	_, err := c.Exec(ctx, `SELECT async.configure(NULL)`)
	requireSQLError(t, err, "22004", "configuration is NULL")
	_, err = c.Exec(ctx, `SELECT async.configure('{not json')`)
	requireSQLError(t, err, "22P02", "invalid input syntax for type json")
}
