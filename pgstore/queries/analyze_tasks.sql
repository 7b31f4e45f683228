-- Refresh the planner's statistics of the task table (AnalyzeTasks).
-- SKIP_LOCKED: when autovacuum works on the table, it refreshes them itself,
-- and waiting for its lock would cancel it after deadlock_timeout.
ANALYZE (SKIP_LOCKED) async.task
