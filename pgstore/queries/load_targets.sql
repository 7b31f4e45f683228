SELECT tg.target, tg.connection_string, tg.max_concurrency,
       (extract(epoch FROM tg.default_timeout) * 1000000)::bigint,
       coalesce(tg.asynchronous_finish, false)
  FROM async.target tg
