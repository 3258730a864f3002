--
-- What monitoring reads besides the outbox and relay views: the cleanup's
-- counters (cqrs_cleanup_counters(), cqrs_cleanup_stats(), the view
-- cqrs_stats_cleanup), the freshness of the dead-letter topic depths
-- (cqrs_dlt_depth_state(), cqrs_stats_dlt_depth), the relay's database in
-- cqrs_stats_relay; their shape and privileges; passes of cqrs_cleanup()
-- counted when their transaction commits, failed ones with their error.
-- The counters live in shared memory, per database: the figures below are
-- differences, whatever ran in this database before.
--
CREATE EXTENSION cqrs_sync;

-- the objects and their shape
\d cqrs_stats_cleanup
\d cqrs_stats_dlt_depth
SELECT p.oid::regprocedure AS function, pg_get_function_result(p.oid) AS result,
       p.prosecdef AS security_definer, p.proconfig AS settings
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_cleanup_counters', 'cqrs_cleanup_stats', 'cqrs_dlt_depth_state')
 ORDER BY p.oid::regprocedure::text;
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_attribute a
 WHERE a.attrelid = 'cqrs_stats_relay'::regclass AND a.attname IN ('relay_database', 'in_database')
 ORDER BY a.attnum;

-- privileges: pg_monitor and operators read them, PUBLIC nothing
SELECT c.relname,
       has_table_privilege('public', c.oid, 'SELECT') AS public,
       has_table_privilege('pg_monitor', c.oid, 'SELECT') AS monitor,
       has_table_privilege('cqrs_sync_operator', c.oid, 'SELECT') AS operator
  FROM pg_class c
 WHERE c.relname IN ('cqrs_stats_cleanup', 'cqrs_stats_dlt_depth')
 ORDER BY 1;
SELECT p.proname,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       has_function_privilege('pg_monitor', p.oid, 'EXECUTE') AS monitor,
       has_function_privilege('cqrs_sync_operator', p.oid, 'EXECUTE') AS operator
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_cleanup_counters', 'cqrs_cleanup_stats', 'cqrs_dlt_depth_state')
 ORDER BY 1;

-- a member of pg_monitor only (as an exporter connects) reads them
CREATE ROLE cqrs_regress_exporter LOGIN IN ROLE pg_monitor;
SET ROLE cqrs_regress_exporter;
SELECT count(*) AS cleanup_rows FROM cqrs_stats_cleanup;
SELECT count(*) AS dlt_depth_rows FROM cqrs_stats_dlt_depth;
-- the relay serves cqrs_sync.database, never this database
SELECT in_database FROM cqrs_stats_relay;
RESET ROLE;

-- the settings, as the cleanup reads them
SELECT interval_seconds = (SELECT setting::float8 FROM pg_settings WHERE name = 'cqrs_sync.cleanup_interval') AS cleanup_interval,
       sent_retention_seconds, dlt_retention_seconds
  FROM cqrs_stats_cleanup;
SELECT interval_seconds * 1000 = (SELECT setting::float8 FROM pg_settings WHERE name = 'cqrs_sync.dlt_depth_interval')
       AS dlt_depth_interval
  FROM cqrs_stats_dlt_depth;

-- this database's counters now
SELECT passes AS p0, errors AS e0, deleted_sent AS s0, deleted_dead_lettered AS dl0,
       deleted_dlt_failed AS df0, deleted_read_side AS r0
  FROM cqrs_stats_cleanup \gset

-- a pass by cqrs_cleanup() counts when its transaction commits
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
SELECT 't', 'a' || g, '{}', 'SENT', now() - interval '2 days', now() - interval '2 days'
  FROM generate_series(1, 3) g;
SELECT sent, complete FROM cqrs_cleanup();
SELECT passes - :p0 AS passes, errors - :e0 AS errors, deleted_sent - :s0 AS deleted_sent,
       last_success_at IS NOT NULL AND last_pass_end = last_success_at
       AND last_pass_start <= last_pass_end AS times
  FROM cqrs_stats_cleanup;

-- a pass whose transaction rolls back does not
BEGIN;
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
SELECT 't', 'b' || g, '{}', 'SENT', now() - interval '2 days', now() - interval '2 days'
  FROM generate_series(1, 2) g;
SELECT sent FROM cqrs_cleanup();
ROLLBACK;
SELECT passes - :p0 AS passes, deleted_sent - :s0 AS deleted_sent FROM cqrs_stats_cleanup;

-- nor one rolled back to a savepoint; the one released and committed does
BEGIN;
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
SELECT 't', 'c' || g, '{}', 'SENT', now() - interval '2 days', now() - interval '2 days'
  FROM generate_series(1, 2) g;
SAVEPOINT a;
SELECT sent FROM cqrs_cleanup();
ROLLBACK TO SAVEPOINT a;
SAVEPOINT b;
SELECT sent FROM cqrs_cleanup();
RELEASE SAVEPOINT b;
COMMIT;
SELECT passes - :p0 AS passes, deleted_sent - :s0 AS deleted_sent FROM cqrs_stats_cleanup;

-- a pass that fails counts as an error, with its message (here a
-- statement_timeout during cqrs_sync.cleanup_delay's pause after a batch)
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
SELECT 't', 'd' || g, '{}', 'SENT', now() - interval '2 days', now() - interval '2 days'
  FROM generate_series(1, 3) g;
SET cqrs_sync.cleanup_batch_size = 1;
SET cqrs_sync.cleanup_delay = '5s';
SET statement_timeout = '200ms';
SELECT sent FROM cqrs_cleanup();
RESET statement_timeout;
RESET cqrs_sync.cleanup_delay;
RESET cqrs_sync.cleanup_batch_size;
SELECT passes - :p0 AS passes, errors - :e0 AS errors, deleted_sent - :s0 AS deleted_sent,
       last_error, last_error_at IS NOT NULL AS error_time, last_pass_end = last_error_at AS last_pass_failed
  FROM cqrs_stats_cleanup;
-- and the next one that succeeds is the last success again
SELECT sent FROM cqrs_cleanup();
SELECT passes - :p0 AS passes, errors - :e0 AS errors, deleted_sent - :s0 AS deleted_sent,
       last_pass_end = last_success_at AS last_pass_succeeded
  FROM cqrs_stats_cleanup;

-- purged failed rows count per status
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, last_error)
VALUES ('t', 'e1', '{}', 'DEAD_LETTERED', now() - interval '10 days', 'x'),
       ('t', 'e2', '{}', 'DLT_FAILED', now() - interval '10 days', 'x'),
       ('t', 'e3', '{}', 'DLT_FAILED', now() - interval '10 days', 'x');
SELECT cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE key LIKE 'e%')) AS approved;
SET cqrs_sync.purge_grace = 0;
SELECT dead_lettered, dlt_failed FROM cqrs_cleanup();
RESET cqrs_sync.purge_grace;
SELECT deleted_dead_lettered - :dl0 AS deleted_dead_lettered, deleted_dlt_failed - :df0 AS deleted_dlt_failed
  FROM cqrs_stats_cleanup;

-- what waits: SENT rows past the retention, failed rows past theirs that
-- nobody approved (days ago, as the rows' ages say)
TRUNCATE cqrs_outbox;
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at, last_error)
VALUES ('t', 'f1', '{}', 'SENT',          now() - interval '3 days', now() - interval '3 days', NULL),
       ('t', 'f2', '{}', 'SENT',          now() - interval '2 days', now() - interval '2 days', NULL),
       ('t', 'f3', '{}', 'PENDING',       now() - interval '2 days', NULL, NULL),
       ('t', 'f4', '{}', 'DEAD_LETTERED', now() - interval '9 days', NULL, 'x'),
       ('t', 'f5', '{}', 'DLT_FAILED',    now() - interval '8 days', NULL, 'x'),
       ('t', 'f6', '{}', 'DLT_FAILED',    now() - interval '8 days', NULL, 'x'),
       ('t', 'f7', '{}', 'DLT_FAILED',    now() - interval '1 day',  NULL, 'x'),
       ('t', 'f8', '{}', 'SENT',          now() - interval '1 hour', now() - interval '1 hour', NULL);
SELECT cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE key = 'f6')) AS approved;
SELECT sent_expired, round(sent_overdue_seconds / 3600) AS sent_overdue_hours,
       awaiting_approval, round(awaiting_approval_max_wait_seconds / 3600) AS awaiting_hours
  FROM cqrs_stats_cleanup;
-- nothing waits when the retention keeps rows for ever
SET cqrs_sync.sent_retention = -1;
SET cqrs_sync.dlt_retention = -1;
SELECT sent_expired, sent_overdue_seconds, awaiting_approval, awaiting_approval_max_wait_seconds
  FROM cqrs_stats_cleanup;
RESET cqrs_sync.sent_retention;
RESET cqrs_sync.dlt_retention;

-- the C functions check the row layout their SQL definition asks for
\set VERBOSITY default
CREATE FUNCTION pg_temp.old_cleanup_state(OUT passes bigint, OUT errors bigint) RETURNS record
    AS 'cqrs_sync', 'cqrs_cleanup_counters' LANGUAGE C;
SELECT * FROM pg_temp.old_cleanup_state();
CREATE FUNCTION pg_temp.old_dlt_depth_state(OUT age float8, OUT topics integer) RETURNS record
    AS 'cqrs_sync', 'cqrs_dlt_depth_state' LANGUAGE C;
SELECT * FROM pg_temp.old_dlt_depth_state();
\set VERBOSITY terse

DROP ROLE cqrs_regress_exporter;
DROP EXTENSION cqrs_sync;
