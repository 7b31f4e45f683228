SELECT p.concurrency_pool, p.max_workers FROM async.concurrency_pool p
