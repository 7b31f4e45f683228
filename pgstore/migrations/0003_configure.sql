-- 0003: async.configure(jsonb) — the declarative configuration document
-- (docs/pgasync-semantics.md §3, decisions D3–D7).
--
-- Shape: {"control": {...}, "targets": [{...}, ...], "concurrency_pools": [{...}, ...]}.
-- Any unknown key anywhere is an error naming the key and where it is; every
-- value is type-checked; the whole call is one transaction (any error: no change).

-- Validation helpers (internal). _where names the setting in messages, e.g.
-- control.workers or targets[1] ('ext').max_concurrency.

CREATE FUNCTION async.cfg_describe(_v JSONB) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN _v IS NULL THEN 'nothing'
              WHEN jsonb_typeof(_v) IN ('object', 'array') THEN 'a JSON ' || jsonb_typeof(_v)
              ELSE 'a JSON ' || jsonb_typeof(_v) || ' (' || left(_v::text, 60) || ')' END
$$;

CREATE FUNCTION async.cfg_int(_v JSONB, _where TEXT, _min BIGINT, _max BIGINT DEFAULT 2147483647) RETURNS BIGINT
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  _n NUMERIC;
BEGIN
  IF jsonb_typeof(_v) IS DISTINCT FROM 'number' THEN
    RAISE EXCEPTION 'async.configure: % must be an integer (a JSON number), got %', _where, async.cfg_describe(_v)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  _n := _v::NUMERIC;
  IF _n <> trunc(_n) THEN
    RAISE EXCEPTION 'async.configure: % must be an integer, got %', _where, _n USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF _n < _min THEN
    IF _min = 1 THEN
      RAISE EXCEPTION 'async.configure: % must be greater than 0, got %', _where, _n USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RAISE EXCEPTION 'async.configure: % must be at least %, got %', _where, _min, _n USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF _n > _max THEN
    RAISE EXCEPTION 'async.configure: % must be at most %, got %', _where, _max, _n USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN _n::BIGINT;
END $$;

CREATE FUNCTION async.cfg_float(_v JSONB, _where TEXT) RETURNS FLOAT8
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  _n FLOAT8;
BEGIN
  IF jsonb_typeof(_v) IS DISTINCT FROM 'number' THEN
    RAISE EXCEPTION 'async.configure: % must be a number of seconds (a JSON number), got %', _where, async.cfg_describe(_v)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  _n := _v::FLOAT8;
  IF _n <= 0 THEN
    RAISE EXCEPTION 'async.configure: % must be greater than 0, got %', _where, _n USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN _n;
END $$;

-- An interval given as a JSON string ("5 minutes"), greater than zero. JSON
-- null is accepted only when _nullable (it sets NULL).
CREATE FUNCTION async.cfg_interval(_v JSONB, _where TEXT, _nullable BOOL DEFAULT false) RETURNS INTERVAL
LANGUAGE plpgsql STABLE AS $$
DECLARE
  _i INTERVAL;
BEGIN
  IF _nullable AND jsonb_typeof(_v) = 'null' THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(_v) IS DISTINCT FROM 'string' THEN
    RAISE EXCEPTION 'async.configure: % must be an interval as a JSON string (e.g. "5 minutes"), got %', _where, async.cfg_describe(_v)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    _i := (_v #>> '{}')::INTERVAL;
  EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow
                 OR invalid_parameter_value OR syntax_error THEN
    RAISE EXCEPTION 'async.configure: % is not a valid interval: %', _where, _v::text USING ERRCODE = 'invalid_parameter_value';
  END;
  IF _i <= interval '0' THEN
    RAISE EXCEPTION 'async.configure: % must be greater than zero, got %', _where, _v::text USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN _i;
END $$;

CREATE FUNCTION async.cfg_bool(_v JSONB, _where TEXT) RETURNS BOOL
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF jsonb_typeof(_v) IS DISTINCT FROM 'boolean' THEN
    RAISE EXCEPTION 'async.configure: % must be true or false (a JSON boolean), got %', _where, async.cfg_describe(_v)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN _v::BOOL;
END $$;

-- A JSON string; JSON null only when _nullable; empty only when _allow_empty.
CREATE FUNCTION async.cfg_text(_v JSONB, _where TEXT, _nullable BOOL, _allow_empty BOOL) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF _nullable AND jsonb_typeof(_v) = 'null' THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(_v) IS DISTINCT FROM 'string' THEN
    RAISE EXCEPTION 'async.configure: % must be a JSON string%, got %', _where,
      CASE WHEN _nullable THEN ' or null' ELSE '' END, async.cfg_describe(_v)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT _allow_empty AND _v #>> '{}' = '' THEN
    RAISE EXCEPTION 'async.configure: % must not be empty', _where USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN _v #>> '{}';
END $$;

-- Raises when _obj has a key outside _allowed.
CREATE FUNCTION async.cfg_check_keys(_obj JSONB, _where TEXT, _allowed TEXT[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  _k TEXT;
BEGIN
  SELECT k INTO _k FROM jsonb_object_keys(_obj) AS k WHERE k <> ALL(_allowed) ORDER BY k LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'async.configure: unknown key % in % (allowed: %)', quote_literal(_k), _where, array_to_string(_allowed, ', ')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END $$;

CREATE FUNCTION async.configure(_configuration JSONB) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  _c async.control%ROWTYPE;
  _ctl JSONB;
  _list JSONB;
  _e JSONB;
  _i INT;
  _w TEXT;
  _name TEXT;
  _names TEXT[] := '{}';
  _pools TEXT[] := '{}';
  _self_conc_given BOOL := false;
  _has_limit BOOL;
  _limit BIGINT;
  _alias BIGINT;
  _conn TEXT;
  _async BOOL;
  _track BOOL;
  _dt INTERVAL;
  _retries BIGINT;
  _n BIGINT;
  _r RECORD;
BEGIN
  IF _configuration IS NULL THEN
    RAISE EXCEPTION 'async.configure: the configuration is NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF jsonb_typeof(_configuration) <> 'object' THEN
    RAISE EXCEPTION 'async.configure: the configuration must be a JSON object with keys control, targets, concurrency_pools; got %',
      async.cfg_describe(_configuration) USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM async.cfg_check_keys(_configuration, 'the configuration (top level)',
    ARRAY['control', 'targets', 'concurrency_pools']);

  -- Serializes concurrent configure calls.
  SELECT * INTO STRICT _c FROM async.control FOR UPDATE;

  -- control ------------------------------------------------------------------
  IF _configuration ? 'control' THEN
    _ctl := _configuration -> 'control';
    IF jsonb_typeof(_ctl) <> 'object' THEN
      RAISE EXCEPTION 'async.configure: control must be a JSON object, got %', async.cfg_describe(_ctl)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF _ctl ? 'paused' OR _ctl ? 'enabled' THEN
      RAISE EXCEPTION 'async.configure: unknown key % in control: it is not a configuration setting',
        quote_literal(CASE WHEN _ctl ? 'paused' THEN 'paused' ELSE 'enabled' END)
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'use async.pause() / async.resume(), or UPDATE async.control';
    END IF;
    PERFORM async.cfg_check_keys(_ctl, 'control', ARRAY['workers', 'idle_sleep', 'heavy_maintenance_sleep',
      'task_keep_duration', 'default_timeout', 'self_target', 'self_connection_string', 'self_concurrency',
      'light_maintenance_sleep', 'default_concurrency_pool_workers', 'advisory_mutex_id', 'busy_sleep', 'debug_log']);
    IF _ctl ? 'workers' THEN
      _c.workers := async.cfg_int(_ctl -> 'workers', 'control.workers', 1);
    END IF;
    IF _ctl ? 'idle_sleep' THEN
      _c.idle_sleep := async.cfg_float(_ctl -> 'idle_sleep', 'control.idle_sleep');
    END IF;
    IF _ctl ? 'busy_sleep' THEN
      _c.busy_sleep := async.cfg_float(_ctl -> 'busy_sleep', 'control.busy_sleep');
    END IF;
    IF _ctl ? 'heavy_maintenance_sleep' THEN
      _c.heavy_maintenance_sleep := async.cfg_interval(_ctl -> 'heavy_maintenance_sleep', 'control.heavy_maintenance_sleep');
    END IF;
    IF _ctl ? 'light_maintenance_sleep' THEN
      _c.light_maintenance_sleep := async.cfg_interval(_ctl -> 'light_maintenance_sleep', 'control.light_maintenance_sleep');
    END IF;
    IF _ctl ? 'task_keep_duration' THEN
      _c.task_keep_duration := async.cfg_interval(_ctl -> 'task_keep_duration', 'control.task_keep_duration');
    END IF;
    IF _ctl ? 'default_timeout' THEN
      _c.default_timeout := async.cfg_interval(_ctl -> 'default_timeout', 'control.default_timeout');
    END IF;
    IF _ctl ? 'self_connection_string' THEN
      _c.self_connection_string := async.cfg_text(_ctl -> 'self_connection_string', 'control.self_connection_string', true, true);
    END IF;
    IF _ctl ? 'self_concurrency' THEN
      _c.self_concurrency := async.cfg_int(_ctl -> 'self_concurrency', 'control.self_concurrency', 1);
      _self_conc_given := true;
    END IF;
    IF _ctl ? 'default_concurrency_pool_workers' THEN
      _c.default_concurrency_pool_workers := async.cfg_int(_ctl -> 'default_concurrency_pool_workers',
        'control.default_concurrency_pool_workers', 1);
    END IF;
    IF _ctl ? 'advisory_mutex_id' THEN
      _c.advisory_mutex_id := async.cfg_int(_ctl -> 'advisory_mutex_id', 'control.advisory_mutex_id',
        -9223372036854775808, 9223372036854775807);
    END IF;
    IF _ctl ? 'debug_log' THEN
      _c.debug_log := async.cfg_bool(_ctl -> 'debug_log', 'control.debug_log');
    END IF;
    IF _ctl ? 'self_target' THEN
      _c.self_target := async.cfg_text(_ctl -> 'self_target', 'control.self_target', false, false);
      IF EXISTS (SELECT 1 FROM async.target tg WHERE tg.target = _c.self_target) THEN
        RAISE EXCEPTION 'async.configure: control.self_target % is the name of an existing target; pick another name',
          quote_literal(_c.self_target) USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;
  END IF;

  -- The new control row first: the target trigger checks the self target name.
  UPDATE async.control SET
    workers = _c.workers,
    idle_sleep = _c.idle_sleep,
    busy_sleep = _c.busy_sleep,
    heavy_maintenance_sleep = _c.heavy_maintenance_sleep,
    light_maintenance_sleep = _c.light_maintenance_sleep,
    task_keep_duration = _c.task_keep_duration,
    default_timeout = _c.default_timeout,
    self_target = _c.self_target,
    self_connection_string = _c.self_connection_string,
    self_concurrency = _c.self_concurrency,
    default_concurrency_pool_workers = _c.default_concurrency_pool_workers,
    advisory_mutex_id = _c.advisory_mutex_id,
    debug_log = _c.debug_log;

  -- targets (declarative when present; SELF always stays) --------------------
  IF _configuration ? 'targets' THEN
    _list := _configuration -> 'targets';
    IF jsonb_typeof(_list) <> 'array' THEN
      RAISE EXCEPTION 'async.configure: targets must be a JSON array of objects, got %', async.cfg_describe(_list)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR _i IN 0 .. jsonb_array_length(_list) - 1 LOOP
      _e := _list -> _i;
      _w := format('targets[%s]', _i);
      IF jsonb_typeof(_e) <> 'object' THEN
        RAISE EXCEPTION 'async.configure: % must be a JSON object, got %', _w, async.cfg_describe(_e)
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF NOT _e ? 'target' THEN
        RAISE EXCEPTION 'async.configure: % has no "target" key (the target name is required)', _w
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      _name := async.cfg_text(_e -> 'target', _w || '.target', false, false);
      _w := format('targets[%s] (%s)', _i, quote_literal(_name));
      PERFORM async.cfg_check_keys(_e, _w, ARRAY['target', 'connection_string', 'max_concurrency', 'max_workers',
        'asynchronous_finish', 'default_timeout', 'concurrency_track_yielded', 'max_retries']);
      IF _name = _c.self_target THEN
        RAISE EXCEPTION 'async.configure: %: the name % is reserved for the internal self target (control.self_target)',
          _w, quote_literal(_name) USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF _name = ANY(_names) THEN
        RAISE EXCEPTION 'async.configure: %: target % is listed more than once', _w, quote_literal(_name)
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      _names := _names || _name;

      _limit := NULL; _alias := NULL; _conn := NULL; _async := NULL; _track := NULL; _dt := NULL; _retries := NULL;
      IF _e ? 'max_concurrency' THEN
        _limit := async.cfg_int(_e -> 'max_concurrency', _w || '.max_concurrency', 1);
      END IF;
      IF _e ? 'max_workers' THEN  -- D3: alias of max_concurrency
        _alias := async.cfg_int(_e -> 'max_workers', _w || '.max_workers', 1);
        IF _limit IS NOT NULL AND _limit <> _alias THEN
          RAISE EXCEPTION 'async.configure: %: max_concurrency (%) and its alias max_workers (%) disagree; give one of them',
            _w, _limit, _alias USING ERRCODE = 'invalid_parameter_value';
        END IF;
        _limit := _alias;
      END IF;
      _has_limit := _limit IS NOT NULL;
      IF _e ? 'connection_string' THEN
        _conn := async.cfg_text(_e -> 'connection_string', _w || '.connection_string', true, true);
      END IF;
      IF _e ? 'asynchronous_finish' THEN
        _async := async.cfg_bool(_e -> 'asynchronous_finish', _w || '.asynchronous_finish');
      END IF;
      IF _e ? 'concurrency_track_yielded' THEN
        _track := async.cfg_bool(_e -> 'concurrency_track_yielded', _w || '.concurrency_track_yielded');
      END IF;
      IF _e ? 'default_timeout' THEN
        _dt := async.cfg_interval(_e -> 'default_timeout', _w || '.default_timeout', true);
      END IF;
      IF _e ? 'max_retries' THEN
        _retries := async.cfg_int(_e -> 'max_retries', _w || '.max_retries', 0);
      END IF;

      IF _name = 'SELF' THEN  -- D7: SELF's limit is control.self_concurrency
        IF _has_limit THEN
          IF _self_conc_given AND _limit <> _c.self_concurrency THEN
            RAISE EXCEPTION 'async.configure: %: max_concurrency % disagrees with control.self_concurrency %',
              _w, _limit, _c.self_concurrency USING ERRCODE = 'invalid_parameter_value';
          END IF;
          _c.self_concurrency := _limit;
          _self_conc_given := true;
          UPDATE async.control SET self_concurrency = _c.self_concurrency;
        ELSE
          _limit := _c.self_concurrency;
          _has_limit := _self_conc_given;
        END IF;
      END IF;

      -- D4: a new target gets the documented defaults; an existing one
      -- changes only the keys given.
      INSERT INTO async.target AS t (target, max_concurrency, connection_string, asynchronous_finish,
                                     default_timeout, concurrency_track_yielded, max_retries)
      VALUES (_name, coalesce(_limit, 8), _conn, coalesce(_async, false), _dt, coalesce(_track, false),
              coalesce(_retries, 0))
      ON CONFLICT (target) DO UPDATE SET
        max_concurrency = CASE WHEN _has_limit THEN EXCLUDED.max_concurrency ELSE t.max_concurrency END,
        connection_string = CASE WHEN _e ? 'connection_string' THEN EXCLUDED.connection_string ELSE t.connection_string END,
        asynchronous_finish = CASE WHEN _e ? 'asynchronous_finish' THEN EXCLUDED.asynchronous_finish ELSE t.asynchronous_finish END,
        default_timeout = CASE WHEN _e ? 'default_timeout' THEN EXCLUDED.default_timeout ELSE t.default_timeout END,
        concurrency_track_yielded = CASE WHEN _e ? 'concurrency_track_yielded' THEN EXCLUDED.concurrency_track_yielded
                                         ELSE t.concurrency_track_yielded END,
        max_retries = CASE WHEN _e ? 'max_retries' THEN EXCLUDED.max_retries ELSE t.max_retries END;
    END LOOP;

    -- D5: targets not listed are removed, only when they have no unfinished
    -- tasks; their history stays in async.task.
    FOR _r IN
      SELECT tg.target FROM async.target tg
       WHERE tg.target <> 'SELF' AND tg.target <> ALL(_names)
       ORDER BY tg.target FOR UPDATE
    LOOP
      SELECT count(*) INTO _n FROM async.task t WHERE t.target = _r.target AND t.processed IS NULL;
      IF _n > 0 THEN
        RAISE EXCEPTION 'async.configure: cannot remove target % (not listed in targets): it has % unfinished task(s) (queued, running or yielded)',
          quote_literal(_r.target), _n
          USING ERRCODE = 'object_in_use',
                HINT = 'keep the target listed until its tasks are finished, or cancel them with async.cancel()';
      END IF;
      DELETE FROM async.target tg WHERE tg.target = _r.target;
    END LOOP;
  END IF;

  -- SELF always exists and follows control.self_concurrency (D7).
  INSERT INTO async.target AS t (target, max_concurrency, connection_string)
  VALUES ('SELF', _c.self_concurrency, NULL)
  ON CONFLICT (target) DO UPDATE SET max_concurrency = EXCLUDED.max_concurrency
    WHERE _self_conc_given AND t.max_concurrency <> EXCLUDED.max_concurrency;

  -- concurrency_pools (declarative for pools that are not target pools) ------
  IF _configuration ? 'concurrency_pools' THEN
    _list := _configuration -> 'concurrency_pools';
    IF jsonb_typeof(_list) <> 'array' THEN
      RAISE EXCEPTION 'async.configure: concurrency_pools must be a JSON array of objects, got %', async.cfg_describe(_list)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR _i IN 0 .. jsonb_array_length(_list) - 1 LOOP
      _e := _list -> _i;
      _w := format('concurrency_pools[%s]', _i);
      IF jsonb_typeof(_e) <> 'object' THEN
        RAISE EXCEPTION 'async.configure: % must be a JSON object, got %', _w, async.cfg_describe(_e)
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF NOT _e ? 'concurrency_pool' THEN
        RAISE EXCEPTION 'async.configure: % has no "concurrency_pool" key (the pool name is required)', _w
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      _name := async.cfg_text(_e -> 'concurrency_pool', _w || '.concurrency_pool', false, false);
      _w := format('concurrency_pools[%s] (%s)', _i, quote_literal(_name));
      PERFORM async.cfg_check_keys(_e, _w, ARRAY['concurrency_pool', 'max_workers']);
      IF NOT _e ? 'max_workers' THEN
        RAISE EXCEPTION 'async.configure: % has no "max_workers" key (the pool limit is required)', _w
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      _limit := async.cfg_int(_e -> 'max_workers', _w || '.max_workers', 1);
      IF EXISTS (SELECT 1 FROM async.target tg WHERE tg.target = _name) THEN
        RAISE EXCEPTION 'async.configure: %: % is the name of a target; a target''s pool limit is its max_concurrency',
          _w, quote_literal(_name) USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF _name = ANY(_pools) THEN
        RAISE EXCEPTION 'async.configure: %: pool % is listed more than once', _w, quote_literal(_name)
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      _pools := _pools || _name;
      INSERT INTO async.concurrency_pool AS p (concurrency_pool, max_workers) VALUES (_name, _limit)
      ON CONFLICT (concurrency_pool) DO UPDATE SET max_workers = EXCLUDED.max_workers
        WHERE p.max_workers <> EXCLUDED.max_workers;
    END LOOP;
    DELETE FROM async.concurrency_pool p
     WHERE p.concurrency_pool <> ALL(_pools)
       AND NOT EXISTS (SELECT 1 FROM async.target tg WHERE tg.target = p.concurrency_pool);
  END IF;

  PERFORM pg_notify('async_wakeup', 'config');
END $$;
