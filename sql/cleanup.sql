--
-- Cleanup and retention, the SQL surface: cqrs_cleanup(),
-- cqrs_approve_purge(), cqrs_cancel_purge(), their settings, privileges and
-- errors, and the table sizes in cqrs_outbox_stats().  Runs on any server;
-- no worker is needed (pgTAP test/pgtap/cleanup.sql covers the behaviour in depth).
--
CREATE EXTENSION cqrs_sync;

-- the functions and their shape
SELECT p.proname, pg_get_function_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result, p.prosecdef AS security_definer,
       p.proconfig
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_cleanup', 'cqrs_approve_purge', 'cqrs_cancel_purge')
 ORDER BY 1;

-- the settings (boot values: the test cluster may set others)
SELECT name, boot_val, unit, context, min_val, max_val
  FROM pg_settings
 WHERE name IN ('cqrs_sync.cleanup_interval', 'cqrs_sync.sent_retention',
                'cqrs_sync.dlt_retention', 'cqrs_sync.cleanup_batch_size',
                'cqrs_sync.cleanup_max_rows_per_call', 'cqrs_sync.cleanup_delay',
                'cqrs_sync.purge_grace')
 ORDER BY name;
SELECT name FROM pg_settings
 WHERE name IN ('cqrs_sync.cleanup_interval', 'cqrs_sync.sent_retention',
                'cqrs_sync.dlt_retention', 'cqrs_sync.cleanup_batch_size',
                'cqrs_sync.cleanup_max_rows_per_call', 'cqrs_sync.cleanup_delay',
                'cqrs_sync.purge_grace')
   AND (short_desc IS NULL OR short_desc !~ '\.$' OR extra_desc IS NULL OR extra_desc !~ '\.$');

-- bad values
\set VERBOSITY terse
SET cqrs_sync.sent_retention = -2;
SET cqrs_sync.dlt_retention = '-5s';
SET cqrs_sync.cleanup_batch_size = 0;
SET cqrs_sync.cleanup_max_rows_per_call = -1;
SET cqrs_sync.cleanup_interval = '10s';
SET cqrs_sync.cleanup_delay = '20s';
SET cqrs_sync.purge_grace = -1;
\set VERBOSITY default
-- units
SET cqrs_sync.sent_retention = '2h';
SHOW cqrs_sync.sent_retention;
SET cqrs_sync.dlt_retention = '14d';
SHOW cqrs_sync.dlt_retention;
RESET cqrs_sync.sent_retention;
RESET cqrs_sync.dlt_retention;

-- privileges: not for PUBLIC, granted to cqrs_sync_operator
SELECT p.proname,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,
       has_function_privilege('cqrs_sync_operator', p.oid, 'EXECUTE') AS operator_exec,
       has_function_privilege('pg_monitor', p.oid, 'EXECUTE') AS monitor_exec
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_cleanup', 'cqrs_approve_purge', 'cqrs_cancel_purge')
 ORDER BY 1;

-- an empty outbox: nothing to do, and a pass says it finished
SELECT * FROM cqrs_cleanup();

-- rows of every status and age (inserted directly: a test, not an app)
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at, last_error)
VALUES ('t', 'a', '{"n": 1}', 'SENT',          now() - interval '10 days', now() - interval '10 days', NULL),
       ('t', 'b', '{"n": 2}', 'SENT',          now() - interval '9 days',  now() - interval '9 days', NULL),
       ('t', 'c', '{"n": 3}', 'PENDING',       now() - interval '9 days',  NULL, NULL),
       ('t', 'd', '{"n": 4}', 'DEAD_LETTERED', now() - interval '8 days',  NULL, 'MSG_SIZE_TOO_LARGE: Message size too large'),
       ('t', 'e', '{"n": 5}', 'DLT_FAILED',    now() - interval '8 days',  NULL, 'MSG_SIZE_TOO_LARGE: Message size too large'),
       ('t', 'f', '{"n": 6}', 'DEAD_LETTERED', now() - interval '8 days',  NULL, 'MSG_SIZE_TOO_LARGE: Message size too large'),
       ('t', 'g', '{"n": 7}', 'DLT_FAILED',    now() - interval '2 days',  NULL, 'MSG_SIZE_TOO_LARGE: Message size too large'),
       ('t', 'h', '{"n": 8}', 'SENT',          now() - interval '1 hour',  now() - interval '1 hour', NULL),
       ('t', 'i', '{"n": 9}', 'PENDING',       now(),                      NULL, NULL);
-- a failed row always has its error
\set VERBOSITY terse
INSERT INTO cqrs_outbox (topic, key, payload, status) VALUES ('t', 'x', '{}', 'DLT_FAILED');
\set VERBOSITY default
SELECT id, key, status FROM cqrs_outbox ORDER BY id;

-- approvals: an operator (the approver is the session user, postgres here;
-- the audit's actor the role acted as)
CREATE ROLE cqrs_regress_op LOGIN IN ROLE cqrs_sync_operator;
CREATE ROLE cqrs_regress_nobody LOGIN;
SET ROLE cqrs_regress_op;
-- 4 (old DEAD_LETTERED), 5 (old DLT_FAILED), 7 (young DLT_FAILED); the rest
-- are not approved, and a NOTICE says why
SELECT cqrs_approve_purge(ARRAY[4, 5, 7, 1, 3, 42, NULL, 4]) AS approved;
-- approving again changes nothing
SELECT cqrs_approve_purge(ARRAY[4]) AS approved_again;
SELECT cqrs_approve_purge('{}') AS approved_none;
RESET ROLE;
SELECT id, status, purge_approved_by, purge_approved_at IS NOT NULL AS approved
  FROM cqrs_outbox WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') ORDER BY id;
SELECT action, outbox_id, key, status, reason, approver, actor, payload
  FROM cqrs_outbox_audit ORDER BY audit_id;

-- and an expired inbox entry of the read side (cqrs_sync.inbox_retention)
INSERT INTO cqrs_inbox (consumer, event_id, processed_at)
VALUES ('board-view', 'e-old', now() - interval '30 days'), ('board-view', 'e-new', now());

-- a pass right after the approvals: the old SENT rows and the expired inbox
-- entry, but no approved row before cqrs_sync.purge_grace (1 hour) passed
SET ROLE cqrs_regress_op;
SELECT * FROM cqrs_cleanup();
-- changing one's mind about 7 within the grace period
SELECT cqrs_cancel_purge(ARRAY[7, 6]) AS cancelled;
RESET ROLE;
SELECT action, outbox_id, status, reason, approver, actor
  FROM cqrs_outbox_audit WHERE action = 'CANCEL_PURGE';
SELECT cqrs_approve_purge(ARRAY[7]) AS approved_again;

-- an hour later: the pass by the operator purges the old approved rows
UPDATE cqrs_outbox SET purge_approved_at = purge_approved_at - interval '61 minutes'
 WHERE purge_approved_at IS NOT NULL;
SET ROLE cqrs_regress_op;
SELECT * FROM cqrs_cleanup();
RESET ROLE;
SELECT id, key, status FROM cqrs_outbox ORDER BY id;
SELECT action, outbox_id, key, status, reason, approver, actor, payload
  FROM cqrs_outbox_audit WHERE action = 'PURGE' ORDER BY audit_id;
SELECT event_id FROM cqrs_inbox;
-- nothing left to do
SELECT * FROM cqrs_cleanup();

-- retention settings (superuser only)
SET cqrs_sync.sent_retention = 0;
SET cqrs_sync.dlt_retention = 0;
SET cqrs_sync.purge_grace = 0;
SELECT * FROM cqrs_cleanup();
SELECT id, key, status FROM cqrs_outbox ORDER BY id;
-- -1 keeps rows for ever
TRUNCATE cqrs_outbox;
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
VALUES ('t', 'j', '{}', 'SENT', now() - interval '400 days', now() - interval '400 days');
SET cqrs_sync.sent_retention = -1;
SELECT sent FROM cqrs_cleanup();
RESET cqrs_sync.sent_retention;
SELECT sent FROM cqrs_cleanup();
RESET cqrs_sync.dlt_retention;
RESET cqrs_sync.purge_grace;

-- one call deletes at most cqrs_sync.cleanup_max_rows_per_call rows
INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
SELECT 't', 'k' || g, '{}', 'SENT', now() - interval '3 days', now() - interval '3 days'
  FROM generate_series(1, 5) g;
SET cqrs_sync.cleanup_max_rows_per_call = 4;
SET cqrs_sync.cleanup_batch_size = 3;
SELECT * FROM cqrs_cleanup();
SELECT * FROM cqrs_cleanup();
RESET cqrs_sync.cleanup_max_rows_per_call;
RESET cqrs_sync.cleanup_batch_size;
SELECT count(*) AS sent_left FROM cqrs_outbox WHERE status = 'SENT';

-- errors
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT cqrs_approve_purge(NULL);
SELECT cqrs_cancel_purge(NULL);
SET ROLE cqrs_regress_op;
SET cqrs_sync.sent_retention = 0;
SET cqrs_sync.purge_grace = 0;
RESET ROLE;
SET ROLE cqrs_regress_nobody;
SELECT * FROM cqrs_cleanup();
SELECT cqrs_approve_purge(ARRAY[1]);
SELECT cqrs_cancel_purge(ARRAY[1]);
RESET ROLE;
-- operators may not write the outbox or the audit trail directly
SET ROLE cqrs_regress_op;
DELETE FROM cqrs_outbox;
DELETE FROM cqrs_outbox_audit;
UPDATE cqrs_outbox SET purge_approved_at = now();
RESET ROLE;

-- the table's and indexes' sizes in the stats
SELECT table_bytes > 0 AS has_table_bytes, index_bytes > 0 AS has_index_bytes,
       index_bytes >= pg_relation_size('cqrs_outbox_purge_idx') AS counts_all_indexes
  FROM cqrs_outbox_stats();

-- a pass in a transaction whose snapshot is older than the pass: its walk
-- would pass rows committed in between
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT * FROM cqrs_cleanup();
ROLLBACK;

-- with cqrs_sync.inbox_retention 0 (kept for ever) the memory of a dropped
-- table still goes: a table created later may get its OID
ALTER SYSTEM SET cqrs_sync.inbox_retention = 0;
SELECT pg_reload_conf();
SELECT pg_sleep(0.5);
SHOW cqrs_sync.inbox_retention;
CREATE TABLE cleanup_gone (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, version bigint);
SELECT count(cqrs_delete('cleanup_gone', to_jsonb(g), 1)) FROM generate_series(1, 3) g;
DROP TABLE cleanup_gone;
SELECT read_side, complete FROM cqrs_cleanup();
SELECT cqrs_prune_read_side();
SELECT count(*) AS tombstones_left FROM cqrs_tombstone;
CREATE TABLE cleanup_gone (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, version bigint);
SELECT count(cqrs_delete('cleanup_gone', to_jsonb(g), 1)) FROM generate_series(1, 2) g;
DROP TABLE cleanup_gone;
SELECT cqrs_prune_read_side();
ALTER SYSTEM RESET cqrs_sync.inbox_retention;
SELECT pg_reload_conf();

DROP ROLE cqrs_regress_op;
DROP ROLE cqrs_regress_nobody;
DROP EXTENSION cqrs_sync;
