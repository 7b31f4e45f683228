-- When async.task was last analysed by an ANALYZE command (not autovacuum):
-- AnalyzeTasks reads it before and after its ANALYZE, which skips the table
-- without an error when it cannot have it at once or may not analyse it.
SELECT pg_stat_get_last_analyze_time('async.task'::regclass)
