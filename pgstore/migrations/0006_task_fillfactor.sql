-- async.task keeps 30 % of each heap page free when rows are pushed, so the
-- update that marks an attempt started can be a heap-only (HOT) update: it
-- changes no indexed column and no column of a partial-index predicate, so
-- when the new row version fits on the same page no index entry is written.
-- With the default fillfactor of 100 pages are full after a push and most
-- starts wrote new entries into task_pkey and task_running_idx: in one-node
-- runs of 42,000 trivial tasks 4,367 to 5,573 starts were HOT, with 70
-- 25,950 to 26,986. See docs/performance.md for what it changed.
-- Only pages filled after this change are affected; the cost is about 1.4
-- times the heap for the history. Operators may choose another value with
-- ALTER TABLE async.task SET (fillfactor = N).

ALTER TABLE async.task SET (fillfactor = 70);
