-- 0001: the async schema: types, tables, indexes, triggers and the rows
-- every install needs. Names and meanings follow pgasync (see
-- docs/pgasync-semantics.md §1); additions are marked.

CREATE SCHEMA IF NOT EXISTS async;

-- Types ---------------------------------------------------------------------

CREATE TYPE async.finish_status_t AS ENUM (
  'FINISHED', 'FAILED', 'CANCELED', 'PAUSED', 'TIMED_OUT', 'YIELDED', 'DOA', 'DEFERRED');

-- Field order matters: row constructors and async.task() depend on it.
CREATE TYPE async.task_push_t AS (
  task_data JSONB,
  target TEXT,
  priority INT,
  query TEXT,
  concurrency_pool TEXT,
  manual_timeout INTERVAL,
  track_yielded BOOL);

CREATE TYPE async.task_run_type_t AS ENUM ('EXECUTE', 'DOA', 'EMPTY', 'EXECUTE_NOASYNC');

CREATE TYPE async.task_execution_state_t AS ENUM ('READY', 'RUNNING', 'YIELDED', 'FINISHED');

-- async.control: the singleton settings row ---------------------------------

CREATE TABLE async.control (
  enabled BOOL NOT NULL DEFAULT true,
  workers INT NOT NULL DEFAULT 100 CHECK (workers > 0),
  idle_sleep FLOAT8 DEFAULT 0.1,
  heavy_maintenance_sleep INTERVAL DEFAULT '24 hours',
  task_keep_duration INTERVAL DEFAULT '30 days',
  default_timeout INTERVAL DEFAULT '1 hour',
  advisory_mutex_id BIGINT DEFAULT 0,
  self_target TEXT DEFAULT 'async.self',
  self_connection_string TEXT,
  self_concurrency INT DEFAULT 4,
  last_heavy_maintenance TIMESTAMPTZ,
  running_since TIMESTAMPTZ,
  paused BOOL NOT NULL DEFAULT false,
  pid INT,
  busy_sleep FLOAT8 DEFAULT 0.0001,
  light_maintenance_sleep INTERVAL DEFAULT '1 minute',
  last_light_maintenance TIMESTAMPTZ,
  default_concurrency_pool_workers INT DEFAULT 4,
  startup_routines TEXT[],
  loop_routines TEXT[],
  version TEXT DEFAULT '1.0',
  debug_log BOOL DEFAULT false,
  -- asyncnode additions (monitoring): the node leading the cluster and its Raft term.
  leader_node TEXT,
  leader_term BIGINT);

CREATE UNIQUE INDEX control_singleton ON async.control ((true));

INSERT INTO async.control DEFAULT VALUES;

-- async.leader: internal fencing record (asyncnode) ---------------------------
-- term is the newest Raft term that took over this server database; every
-- leader write checks it (async.assert_leader_term).

CREATE TABLE async.leader (
  term BIGINT NOT NULL DEFAULT 0,
  node TEXT,
  cluster_id TEXT,
  holder_pid INT,
  since TIMESTAMPTZ);

CREATE UNIQUE INDEX leader_singleton ON async.leader ((true));

INSERT INTO async.leader DEFAULT VALUES;

-- async.target and async.concurrency_pool ------------------------------------

CREATE TABLE async.target (
  target TEXT PRIMARY KEY CHECK (target <> ''),
  -- NOT NULL: every target has a definite limit (pgasync stored NULL when configure omitted it).
  max_concurrency INT NOT NULL DEFAULT 8 CHECK (max_concurrency > 0),
  -- NULL means the server database itself: nodes use their own server DSN.
  connection_string TEXT,
  asynchronous_finish BOOL DEFAULT false,
  default_timeout INTERVAL,
  concurrency_track_yielded BOOL DEFAULT false,
  -- asyncnode: how many times a task may be re-run after its node was lost
  -- while it possibly ran; copied into the task at push.
  max_retries INT NOT NULL DEFAULT 0 CHECK (max_retries >= 0));

CREATE TABLE async.concurrency_pool (
  concurrency_pool TEXT PRIMARY KEY CHECK (concurrency_pool <> ''),
  max_workers INT NOT NULL DEFAULT 8 CHECK (max_workers > 0));

-- async.task: queue, state and history --------------------------------------
-- No foreign key to async.target: removing a target keeps its history (D5).

CREATE TABLE async.task (
  task_id BIGSERIAL PRIMARY KEY,
  target TEXT NOT NULL,
  priority INT NOT NULL DEFAULT 0,
  entered TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
  consumed TIMESTAMPTZ,
  processed TIMESTAMPTZ,
  yielded TIMESTAMPTZ,
  finish_status async.finish_status_t,
  source TEXT,
  query TEXT,
  failed BOOL,
  processing_error TEXT,
  asynchronous_finish BOOL,
  times_up TIMESTAMPTZ,
  task_data JSONB,
  concurrency_pool TEXT NOT NULL,
  manual_timeout INTERVAL,
  tracked BOOL,
  track_yielded BOOL,
  eligible_when TIMESTAMPTZ,
  yield_upon_finish BOOL,
  -- asyncnode additions
  attempt INT NOT NULL DEFAULT 0,   -- incremented at every claim; fences node writes
  node TEXT,                        -- node of the current/last attempt (NULL for non-query tasks)
  started TIMESTAMPTZ,              -- set by the node when the attempt really starts
  retries INT NOT NULL DEFAULT 0,   -- re-runs after a lost node
  max_retries INT NOT NULL DEFAULT 0);

-- The hot path only touches these partial indexes, which hold unfinished rows
-- only: a large history does not slow dispatch (D18).
CREATE INDEX task_ready_idx ON async.task (concurrency_pool, priority, entered, task_id)
  WHERE consumed IS NULL AND processed IS NULL AND yielded IS NULL;
CREATE INDEX task_get_tasks_idx ON async.task (concurrency_pool, priority, entered, task_id)
  WHERE query IS NULL AND consumed IS NOT NULL AND processed IS NULL AND yielded IS NULL;
CREATE INDEX task_running_idx ON async.task (times_up)
  WHERE processed IS NULL AND (consumed IS NOT NULL OR yielded IS NOT NULL);
CREATE INDEX task_history_idx ON async.task (processed)
  WHERE processed IS NOT NULL;

-- Target triggers: refuse the internal self target name, keep the pool row
-- of the same name in sync, refuse to remove or rename a target that still
-- has unfinished tasks (D5).

CREATE FUNCTION async.target_before_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  _n BIGINT;
BEGIN
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    IF NEW.target = (SELECT c.self_target FROM async.control c) THEN
      RAISE EXCEPTION 'target name % is reserved for the internal self target (control.self_target)', quote_literal(NEW.target)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.target IS DISTINCT FROM OLD.target) THEN
    SELECT count(*) INTO _n FROM async.task t WHERE t.target = OLD.target AND t.processed IS NULL;
    IF _n > 0 THEN
      RAISE EXCEPTION 'cannot % target %: it has % unfinished task(s) (queued, running or yielded); finish or cancel them first',
        CASE TG_OP WHEN 'DELETE' THEN 'remove' ELSE 'rename' END, quote_literal(OLD.target), _n
        USING ERRCODE = 'object_in_use';
    END IF;
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER target_before_change BEFORE INSERT OR UPDATE OR DELETE ON async.target
  FOR EACH ROW EXECUTE FUNCTION async.target_before_change();

CREATE FUNCTION async.target_after_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND (TG_OP = 'DELETE' OR NEW.target IS DISTINCT FROM OLD.target) THEN
    DELETE FROM async.concurrency_pool p WHERE p.concurrency_pool = OLD.target;
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO async.concurrency_pool AS p (concurrency_pool, max_workers)
    VALUES (NEW.target, NEW.max_concurrency)
    ON CONFLICT (concurrency_pool) DO UPDATE SET max_workers = EXCLUDED.max_workers
      WHERE p.max_workers IS DISTINCT FROM EXCLUDED.max_workers;
  END IF;
  RETURN NULL;
END $$;

CREATE TRIGGER target_after_change AFTER INSERT OR UPDATE OR DELETE ON async.target
  FOR EACH ROW EXECUTE FUNCTION async.target_after_change();

-- Wake the cluster when limits or switches change, whoever changes them
-- (configure, pause/resume, or a plain UPDATE).

CREATE FUNCTION async.notify_config() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('async_wakeup', TG_ARGV[0]);
  RETURN NULL;
END $$;

CREATE TRIGGER target_notify AFTER INSERT OR UPDATE OR DELETE ON async.target
  FOR EACH STATEMENT EXECUTE FUNCTION async.notify_config('config');
CREATE TRIGGER concurrency_pool_notify AFTER INSERT OR UPDATE OR DELETE ON async.concurrency_pool
  FOR EACH STATEMENT EXECUTE FUNCTION async.notify_config('config');
CREATE TRIGGER control_notify AFTER UPDATE ON async.control
  FOR EACH ROW WHEN (
       OLD.enabled IS DISTINCT FROM NEW.enabled
    OR OLD.paused IS DISTINCT FROM NEW.paused
    OR OLD.workers IS DISTINCT FROM NEW.workers
    OR OLD.idle_sleep IS DISTINCT FROM NEW.idle_sleep
    OR OLD.default_timeout IS DISTINCT FROM NEW.default_timeout
    OR OLD.default_concurrency_pool_workers IS DISTINCT FROM NEW.default_concurrency_pool_workers
    OR OLD.task_keep_duration IS DISTINCT FROM NEW.task_keep_duration
    OR OLD.heavy_maintenance_sleep IS DISTINCT FROM NEW.heavy_maintenance_sleep
    OR OLD.advisory_mutex_id IS DISTINCT FROM NEW.advisory_mutex_id)
  EXECUTE FUNCTION async.notify_config('control');

-- The user-facing self target (D7): the server database itself, limit
-- control.self_concurrency.
INSERT INTO async.target (target, max_concurrency, connection_string)
SELECT 'SELF', c.self_concurrency, NULL FROM async.control c;
