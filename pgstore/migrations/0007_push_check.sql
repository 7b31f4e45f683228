-- async.push_tasks checks the targets of a push against async.target read
-- once (NOT EXISTS, which the server runs as a hashed subplan) instead of
-- looking each task's target up in its index (a join). For one push of
-- 20,000 tasks, eight pushes in one session, the check took 27.049 to
-- 47.738 ms before and 5.384 to 9.164 ms after; with the tasks spread over
-- 500 targets, 32.917 to 44.489 ms before and 4.363 to 8.464 ms after
-- (docs/performance.md, nineteenth session). What is accepted, what is
-- refused and with which message is unchanged.

CREATE OR REPLACE FUNCTION async.push_tasks(
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

  -- NOT EXISTS, not a join: the server reads async.target once into a
  -- hash table and probes it for each task ("hashed SubPlan"); joined,
  -- it looked each task's target up in the table's index.
  SELECT u.ord, u.target, EXISTS (SELECT FROM async.target tg WHERE tg.target = u.target) AS known,
         octet_length(u.query) AS qlen, u.manual_timeout, u.concurrency_pool
    INTO _bad
    FROM unnest(_tasks) WITH ORDINALITY
         AS u(task_data, target, priority, query, concurrency_pool, manual_timeout, track_yielded, ord)
   WHERE u.target IS NULL
      OR u.target = _self
      OR NOT EXISTS (SELECT FROM async.target tg WHERE tg.target = u.target)
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
