-- Unfinished tasks by state, through the partial indexes.
SELECT (SELECT count(*) FROM async.task t
         WHERE t.consumed IS NULL AND t.processed IS NULL AND t.yielded IS NULL),
       (SELECT count(*) FROM async.task t
         WHERE t.processed IS NULL AND (t.consumed IS NOT NULL OR t.yielded IS NOT NULL) AND t.yielded IS NULL),
       (SELECT count(*) FROM async.task t
         WHERE t.processed IS NULL AND (t.consumed IS NOT NULL OR t.yielded IS NOT NULL) AND t.yielded IS NOT NULL)
