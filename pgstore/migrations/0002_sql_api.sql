-- 0002: the public SQL API (pgasync signatures, defaults and return types;
-- docs/pgasync-semantics.md §2 and the decision table D1–D18), plus the
-- internal helpers the cluster calls.
--
-- Every argument is validated; a bad call raises an error whose message
-- names the problem and changes nothing.

-- task_execution_state: the derived state of a row (§1.5) ------------------

CREATE FUNCTION async.task_execution_state(async.task) RETURNS async.task_execution_state_t
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN ($1).processed IS NOT NULL THEN 'FINISHED'
    WHEN ($1).consumed IS NULL AND ($1).yielded IS NULL THEN 'READY'
    WHEN ($1).yielded IS NOT NULL THEN 'YIELDED'
    ELSE 'RUNNING'
  END::async.task_execution_state_t
$$;

-- async.task(): pure constructor ---------------------------------------------

CREATE FUNCTION async.task(
  _query TEXT,
  target TEXT,
  task_data JSONB DEFAULT NULL,
  priority INT DEFAULT 0,
  concurrency_pool TEXT DEFAULT NULL,
  manual_timeout INTERVAL DEFAULT NULL,
  track_yielded BOOL DEFAULT NULL) RETURNS async.task_push_t
LANGUAGE sql IMMUTABLE AS $$
  SELECT ROW($3, $2, $4, $1, $5, $6, $7)::async.task_push_t
$$;

-- async.push_tasks / push_task -----------------------------------------------

CREATE FUNCTION async.push_tasks(
  _tasks async.task_push_t[],
  _run_type async.task_run_type_t DEFAULT 'EXECUTE',
  _source TEXT DEFAULT NULL) RETURNS SETOF BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  _self TEXT;
  _pos INT;
  _bad RECORD;
  _now TIMESTAMPTZ;
BEGIN
  IF _tasks IS NULL THEN
    RAISE EXCEPTION 'async.push_tasks: the task array is NULL; nothing was pushed'
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF _run_type IS NULL THEN
    RAISE EXCEPTION 'async.push_tasks: the run type is NULL (use EXECUTE, EXECUTE_NOASYNC, DOA or EMPTY); nothing was pushed'
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF array_ndims(_tasks) > 1 THEN
    RAISE EXCEPTION 'async.push_tasks: the task array must be one-dimensional, got % dimensions; nothing was pushed', array_ndims(_tasks)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  _pos := array_position(_tasks, NULL);
  IF _pos IS NOT NULL THEN
    RAISE EXCEPTION 'async.push_tasks: task % of the array is NULL; nothing was pushed', _pos - array_lower(_tasks, 1) + 1
      USING ERRCODE = 'null_value_not_allowed';
  END IF;

  SELECT c.self_target INTO _self FROM async.control c;

  -- Keep the named targets from being removed until this transaction ends.
  PERFORM 1 FROM async.target tg
   WHERE tg.target IN (SELECT u.target FROM unnest(_tasks) AS u)
   ORDER BY tg.target
   FOR KEY SHARE;

  SELECT u.ord, u.target, tg.target IS NOT NULL AS known, octet_length(u.query) AS qlen,
         u.manual_timeout, u.concurrency_pool
    INTO _bad
    FROM unnest(_tasks) WITH ORDINALITY
         AS u(task_data, target, priority, query, concurrency_pool, manual_timeout, track_yielded, ord)
    LEFT JOIN async.target tg ON tg.target = u.target
   WHERE u.target IS NULL
      OR u.target = _self
      OR tg.target IS NULL
      OR octet_length(u.query) > 1048576
      OR u.manual_timeout <= interval '0'
      OR u.concurrency_pool = ''
   ORDER BY u.ord
   LIMIT 1;
  IF FOUND THEN
    IF _bad.target IS NULL THEN
      RAISE EXCEPTION 'async.push_tasks: task % has a NULL target; nothing was pushed', _bad.ord
        USING ERRCODE = 'null_value_not_allowed';
    ELSIF _bad.target = _self THEN
      RAISE EXCEPTION 'async.push_tasks: task % targets %, the internal self target, which never runs tasks (use ''SELF'' for the server database); nothing was pushed',
        _bad.ord, quote_literal(_bad.target)
        USING ERRCODE = 'invalid_parameter_value';
    ELSIF NOT _bad.known THEN
      RAISE EXCEPTION 'async.push_tasks: task % has unknown target %; nothing was pushed', _bad.ord, quote_literal(_bad.target)
        USING ERRCODE = 'undefined_object',
              HINT = 'configure the target first with async.configure(''{"targets": [...]}'')';
    ELSIF _bad.qlen > 1048576 THEN
      RAISE EXCEPTION 'async.push_tasks: task % has a query of % bytes, over the 1048576-byte (1 MiB) cap on query text; nothing was pushed',
        _bad.ord, _bad.qlen
        USING ERRCODE = 'program_limit_exceeded';
    ELSIF _bad.manual_timeout <= interval '0' THEN
      RAISE EXCEPTION 'async.push_tasks: task % has manual_timeout %, which must be greater than zero; nothing was pushed',
        _bad.ord, _bad.manual_timeout
        USING ERRCODE = 'invalid_parameter_value';
    ELSE
      RAISE EXCEPTION 'async.push_tasks: task % has an empty concurrency_pool name (use NULL for the target''s pool); nothing was pushed', _bad.ord
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;

  _now := clock_timestamp();
  -- Rows are inserted in array order: task_id (nextval) and entered
  -- (clock_timestamp) are column defaults, evaluated above the sort (D2).
  RETURN QUERY
  WITH ins AS (
    INSERT INTO async.task (target, priority, source, query, task_data, concurrency_pool, manual_timeout,
                            asynchronous_finish, track_yielded, max_retries,
                            consumed, processed, failed, finish_status)
    SELECT u.target, coalesce(u.priority, 0), _source, u.query, u.task_data,
           coalesce(u.concurrency_pool, u.target), u.manual_timeout,
           coalesce(tg.asynchronous_finish, false) AND _run_type NOT IN ('EXECUTE_NOASYNC', 'EMPTY'),
           coalesce(u.track_yielded, tg.concurrency_track_yielded, false),
           tg.max_retries,
           CASE WHEN _run_type IN ('DOA', 'EMPTY') THEN _now END,
           CASE WHEN _run_type IN ('DOA', 'EMPTY') THEN _now END,
           CASE _run_type WHEN 'DOA' THEN true WHEN 'EMPTY' THEN false END,
           CASE _run_type WHEN 'DOA' THEN 'DOA'::async.finish_status_t
                          WHEN 'EMPTY' THEN 'FINISHED'::async.finish_status_t END
      FROM unnest(_tasks) WITH ORDINALITY
           AS u(task_data, target, priority, query, concurrency_pool, manual_timeout, track_yielded, ord)
      JOIN async.target tg ON tg.target = u.target
     ORDER BY u.ord
    RETURNING task_id)
  SELECT ins.task_id FROM ins ORDER BY ins.task_id;

  IF FOUND THEN
    PERFORM pg_notify('async_wakeup', 'push');
  END IF;
  RETURN;
END $$;

CREATE FUNCTION async.push_task(
  _task async.task_push_t,
  _run_type async.task_run_type_t DEFAULT 'EXECUTE',
  _source TEXT DEFAULT 'manual push') RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
  _id BIGINT;
BEGIN
  SELECT p INTO _id FROM async.push_tasks(ARRAY[_task], _run_type, _source) AS p;
  RETURN _id;
END $$;

-- async.finish and its wrappers (D8, D9, D11) --------------------------------

CREATE FUNCTION async.finish(
  _task_ids BIGINT[],
  _status async.finish_status_t,
  _error_message TEXT,
  _duration INTERVAL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  _pos INT;
  _missing BIGINT[];
  _done RECORD;
  _now TIMESTAMPTZ := clock_timestamp();
BEGIN
  IF _task_ids IS NULL THEN
    RAISE EXCEPTION 'async.finish: the task id array is NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF _status IS NULL THEN
    RAISE EXCEPTION 'async.finish: the status is NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  _pos := array_position(_task_ids, NULL);
  IF _pos IS NOT NULL THEN
    RAISE EXCEPTION 'async.finish: task id % of the array is NULL', _pos - array_lower(_task_ids, 1) + 1
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF _duration < interval '0' THEN
    RAISE EXCEPTION 'async.finish: the duration % is negative', _duration USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- Lock the rows in id order: concurrent finishers cannot deadlock.
  PERFORM 1 FROM async.task t WHERE t.task_id = ANY(_task_ids) ORDER BY t.task_id FOR UPDATE;

  SELECT array_agg(DISTINCT x ORDER BY x) INTO _missing
    FROM unnest(_task_ids) AS x
   WHERE NOT EXISTS (SELECT 1 FROM async.task t WHERE t.task_id = x);
  IF _missing IS NOT NULL THEN
    RAISE WARNING 'async.finish: no task with id %; ignored', array_to_string(_missing, ', ');
  END IF;
  FOR _done IN
    SELECT t.task_id, t.finish_status FROM async.task t
     WHERE t.task_id = ANY(_task_ids) AND t.processed IS NOT NULL ORDER BY t.task_id
  LOOP
    RAISE WARNING 'async.finish: task % is already finished (%); terminal states are final, % not applied',
      _done.task_id, coalesce(_done.finish_status::text, 'no status'), _status;
  END LOOP;

  IF _status IN ('FINISHED', 'FAILED', 'CANCELED', 'TIMED_OUT', 'DOA') THEN
    -- FINISHED on a task flagged yield_upon_finish yields instead (one shot).
    UPDATE async.task t SET
      processed = CASE WHEN _status = 'FINISHED' AND t.yield_upon_finish THEN NULL ELSE _now END,
      yielded = CASE WHEN _status = 'FINISHED' AND t.yield_upon_finish THEN _now ELSE t.yielded END,
      finish_status = CASE WHEN _status = 'FINISHED' AND t.yield_upon_finish THEN NULL ELSE _status END,
      failed = _status IN ('FAILED', 'CANCELED', 'TIMED_OUT'),
      processing_error = _error_message,
      eligible_when = NULL,
      tracked = CASE WHEN _status = 'FINISHED' AND t.yield_upon_finish THEN coalesce(t.track_yielded, false) ELSE false END,
      yield_upon_finish = NULL
    WHERE t.task_id = ANY(_task_ids) AND t.processed IS NULL;
  ELSIF _status = 'YIELDED' THEN
    UPDATE async.task t SET
      yielded = _now,
      finish_status = 'YIELDED',
      failed = false,
      processing_error = _error_message,
      eligible_when = NULL,
      tracked = coalesce(t.track_yielded, false),
      yield_upon_finish = NULL
    WHERE t.task_id = ANY(_task_ids) AND t.processed IS NULL;
  ELSE
    -- DEFERRED and PAUSED put the task back in the queue (READY); a running
    -- attempt is fenced out (consumed is cleared, the next claim bumps attempt).
    UPDATE async.task t SET
      consumed = NULL,
      yielded = NULL,
      started = NULL,
      node = NULL,
      times_up = NULL,
      finish_status = CASE WHEN _status = 'DEFERRED' THEN 'DEFERRED'::async.finish_status_t END,
      eligible_when = CASE WHEN _status = 'DEFERRED' THEN now() + _duration END,
      failed = false,
      processing_error = _error_message,
      tracked = false,
      yield_upon_finish = NULL
    WHERE t.task_id = ANY(_task_ids) AND t.processed IS NULL;
  END IF;

  PERFORM pg_notify('async_wakeup', 'finish');
END $$;

CREATE FUNCTION async.finish(
  _task_ids BIGINT[],
  _status async.finish_status_t,
  _error_message TEXT) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM async.finish(_task_ids, _status, _error_message, NULL::INTERVAL);
END $$;

CREATE FUNCTION async.cancel(
  _task_ids BIGINT[],
  _error_message TEXT DEFAULT 'manual cancel') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM async.finish(_task_ids, 'CANCELED', _error_message, NULL::INTERVAL);
END $$;

-- Returns at once: the change is applied in the caller's transaction.
CREATE FUNCTION async.defer(
  _task_ids BIGINT[],
  _duration INTERVAL) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM async.finish(_task_ids, 'DEFERRED', NULL, _duration);
END $$;

-- Compatibility: there is no latch to wait for; finishes apply at commit.
CREATE FUNCTION async.wait_for_latch() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  RETURN;
END $$;

-- async.get_tasks: hand out non-query tasks the cluster dispatched -----------

CREATE FUNCTION async.get_tasks(
  _target TEXT,
  _limit INT DEFAULT 1,
  _timeout INTERVAL DEFAULT '30 seconds',
  OUT task_id BIGINT,
  OUT priority INT,
  OUT times_up TIMESTAMPTZ,
  OUT task_data JSONB) RETURNS SETOF RECORD
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  _deadline TIMESTAMPTZ;
  _left FLOAT8;
BEGIN
  IF _target IS NULL THEN
    RAISE EXCEPTION 'async.get_tasks: the target (concurrency pool) is NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF _limit IS NULL OR _limit < 1 THEN
    RAISE EXCEPTION 'async.get_tasks: the limit must be at least 1, got %', coalesce(_limit::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF _timeout IS NULL OR _timeout < interval '0' THEN
    RAISE EXCEPTION 'async.get_tasks: the timeout must be zero or positive, got %', coalesce(_timeout::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  _deadline := clock_timestamp() + _timeout;
  LOOP
    RETURN QUERY
    WITH c AS (
      SELECT t.task_id FROM async.task t
       WHERE t.concurrency_pool = _target
         AND t.query IS NULL AND t.consumed IS NOT NULL AND t.processed IS NULL AND t.yielded IS NULL
       ORDER BY t.priority, t.entered, t.task_id
       LIMIT _limit
       FOR UPDATE SKIP LOCKED),
    u AS (
      UPDATE async.task t SET
        processed = CASE WHEN t.asynchronous_finish THEN NULL ELSE clock_timestamp() END,
        yielded = CASE WHEN t.asynchronous_finish THEN clock_timestamp() END,
        finish_status = CASE WHEN t.asynchronous_finish THEN 'YIELDED'::async.finish_status_t
                             ELSE 'FINISHED'::async.finish_status_t END,
        failed = false,
        started = coalesce(t.started, clock_timestamp()),
        tracked = t.asynchronous_finish IS TRUE
        FROM c WHERE t.task_id = c.task_id
      RETURNING t.task_id, t.priority, t.times_up, t.task_data, t.entered)
    SELECT u.task_id, u.priority, u.times_up, u.task_data FROM u ORDER BY u.priority, u.entered, u.task_id;
    IF FOUND THEN
      PERFORM pg_notify('async_wakeup', 'finish');
      RETURN;
    END IF;
    _left := extract(epoch FROM _deadline - clock_timestamp());
    EXIT WHEN _left <= 0;
    PERFORM pg_sleep(least(0.05, _left));
  END LOOP;
  RETURN;
END $$;

-- async.restart_task (D14) ----------------------------------------------------

CREATE FUNCTION async.restart_task(_task_id BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  _t RECORD;
BEGIN
  IF _task_id IS NULL THEN
    RAISE EXCEPTION 'async.restart_task: the task id is NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  SELECT t.task_id, t.target, t.processed, async.task_execution_state(t) AS state INTO _t
    FROM async.task t WHERE t.task_id = _task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE WARNING 'async.restart_task: no task with id %; nothing restarted', _task_id;
    RETURN;
  END IF;
  IF _t.processed IS NULL THEN
    RAISE WARNING 'async.restart_task: task % is not finished (it is %); only finished tasks can be restarted', _task_id, _t.state;
    RETURN;
  END IF;
  PERFORM 1 FROM async.target tg WHERE tg.target = _t.target FOR KEY SHARE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'async.restart_task: task % belongs to target %, which no longer exists', _task_id, quote_literal(_t.target)
      USING ERRCODE = 'undefined_object';
  END IF;
  UPDATE async.task t SET
    processed = NULL, yielded = NULL, consumed = NULL, eligible_when = NULL, finish_status = NULL,
    processing_error = NULL, times_up = NULL, started = NULL, node = NULL, failed = NULL,
    tracked = false, retries = 0, source = 'async.restart_task'
  WHERE t.task_id = _task_id;
  PERFORM pg_notify('async_wakeup', 'push');
END $$;

-- async.main: the cluster is the orchestrator --------------------------------

CREATE PROCEDURE async.main(_force BOOL DEFAULT false, _manual_mode BOOL DEFAULT false)
LANGUAGE plpgsql AS $$
DECLARE
  _l RECORD;
BEGIN
  SELECT l.node, l.term INTO _l FROM async.leader l;
  RAISE NOTICE 'async.main: the asyncnode cluster is the orchestrator of this database (leader %, term %); nothing to do here',
    coalesce(_l.node, 'none yet'), coalesce(_l.term, 0);
END $$;

-- async.pause / async.resume (D15) -------------------------------------------

CREATE FUNCTION async.pause() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE async.control SET paused = true;
  PERFORM pg_notify('async_wakeup', 'control');
END $$;

CREATE FUNCTION async.resume() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE async.control SET paused = false;
  PERFORM pg_notify('async_wakeup', 'control');
END $$;

-- Leader fencing (internal) ---------------------------------------------------
-- Every leader write runs this first in the same transaction: it share-locks
-- the leader row (a takeover waits for in-flight writes of the old term) and
-- fails with SQLSTATE AS001 when a newer term has taken over.

CREATE FUNCTION async.assert_leader_term(_term BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  _cur BIGINT;
BEGIN
  SELECT l.term INTO _cur FROM async.leader l FOR SHARE;
  IF _cur IS DISTINCT FROM _term THEN
    RAISE EXCEPTION 'stale leader term %: the server database records term %', _term, _cur
      USING ERRCODE = 'AS001';
  END IF;
END $$;
