-- What the planner believes about async.task against what it holds
-- (TaskStatistics). The planner does not use pg_class.reltuples as it is:
-- it scales the density reltuples / relpages to the table's size in pages
-- now, and when relpages is 0 it assumes full pages instead (NULL here: an
-- overestimate, harmless to the node's statements). The live row count is
-- the cumulative statistics' n_live_tup, which lags each session's writes
-- by up to about ten seconds, and which an ANALYZE overwrites with what it
-- sampled: rows committed while it sampled are lost from it until the next
-- VACUUM or ANALYZE. The rows inserted, updated and deleted since the last
-- ANALYZE are counted too. Analysing needs the table's or the database's
-- owner (a superuser is both).
SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0
            THEN c.reltuples::float8 / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::int)
       END AS planner_rows,
       pg_stat_get_live_tuples(c.oid) AS live_rows,
       pg_stat_get_mod_since_analyze(c.oid) AS changed_rows,
       pg_has_role(c.relowner, 'USAGE')
         OR pg_has_role((SELECT d.datdba FROM pg_database d WHERE d.datname = current_database()), 'USAGE') AS may_analyze
  FROM pg_class c
 WHERE c.oid = 'async.task'::regclass
