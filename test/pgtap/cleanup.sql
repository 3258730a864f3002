-- test/pgtap/cleanup.sql -- what one cleanup pass deletes and what it never
-- deletes: PENDING rows never, unapproved failed rows never, SENT rows once
-- past cqrs_sync.sent_retention, approved failed rows once past
-- cqrs_sync.dlt_retention, each purge audited once; batching, the per-call
-- limit, approvals, and the table sizes in the stats.  Runs in one
-- transaction, rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(40);

-- the NOTICEs of cqrs_approve_purge() and cqrs_cleanup() are checked in sql/cleanup.sql
SET LOCAL client_min_messages = warning;

-- Defaults, whatever the server's configuration.
SET LOCAL cqrs_sync.sent_retention = '1d';
SET LOCAL cqrs_sync.dlt_retention = '7d';
-- approvals take effect at once here (the grace period: test/pgtap/purge_grace.sql)
SET LOCAL cqrs_sync.purge_grace = 0;
SET LOCAL cqrs_sync.cleanup_batch_size = 10000;
SET LOCAL cqrs_sync.cleanup_max_rows_per_call = 1000000;

-- An outbox row, inserted directly (as a test may): age in hours, status,
-- hours since it was sent.  Rows are inserted oldest first, as ids are
-- handed out in time order.
CREATE FUNCTION pg_temp.row(k text, age_h numeric, st cqrs_outbox_status,
                            sent_h numeric DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at, last_error)
    VALUES ('pgtap.cleanup', k, jsonb_build_object('k', k), st,
            clock_timestamp() - age_h * interval '1 hour',
            CASE WHEN st = 'SENT'
                 THEN clock_timestamp() - coalesce(sent_h, age_h) * interval '1 hour' END,
            CASE WHEN st IN ('DEAD_LETTERED', 'DLT_FAILED') THEN 'failed: ' || k END)
    RETURNING id
$$;
CREATE FUNCTION pg_temp.keys() RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(key, ',' ORDER BY id), '') FROM cqrs_outbox
$$;

DO $$ BEGIN
    PERFORM pg_temp.row('sent-old',        30 * 24, 'SENT');
    PERFORM pg_temp.row('pending-ancient', 29 * 24, 'PENDING');
    PERFORM pg_temp.row('dl-old-approved', 20 * 24, 'DEAD_LETTERED');
    PERFORM pg_temp.row('df-old-approved', 20 * 24, 'DLT_FAILED');
    PERFORM pg_temp.row('dl-old',          19 * 24, 'DEAD_LETTERED');
    PERFORM pg_temp.row('df-old',          19 * 24, 'DLT_FAILED');
    PERFORM pg_temp.row('sent-late',       10 * 24, 'SENT', 2);      -- enqueued long ago, sent 2 h ago
    PERFORM pg_temp.row('sent-25h',        25,      'SENT');
    PERFORM pg_temp.row('dl-young-approved', 48,    'DEAD_LETTERED');
    PERFORM pg_temp.row('sent-23h',        23,      'SENT');
    PERFORM pg_temp.row('pending-new',     0,       'PENDING');
END $$;

-- approvals
SELECT is(cqrs_approve_purge(array(SELECT id FROM cqrs_outbox
                                    WHERE key IN ('dl-old-approved', 'df-old-approved',
                                                  'dl-young-approved', 'pending-ancient', 'sent-old'))),
          3, 'cqrs_approve_purge() approves the three failed rows, not the PENDING or SENT one');
SELECT results_eq($$SELECT key, purge_approved_by = session_user, purge_approved_at BETWEEN now() AND clock_timestamp()
                      FROM cqrs_outbox WHERE purge_approved_at IS NOT NULL ORDER BY id$$,
                  $$VALUES ('dl-old-approved'::text, true, true), ('df-old-approved', true, true),
                           ('dl-young-approved', true, true)$$,
                  'it records who approved and when');
SELECT results_eq($$SELECT a.outbox_id, a.event_id, a.topic, a.key, a.status, a.approver, a.actor, a.reason
                      FROM cqrs_outbox_audit a WHERE a.action = 'APPROVE_PURGE' ORDER BY a.outbox_id$$,
                  $$SELECT o.id, o.event_id, o.topic, o.key, o.status, session_user::text COLLATE "default", session_user::text COLLATE "default", o.last_error
                      FROM cqrs_outbox o WHERE o.purge_approved_at IS NOT NULL ORDER BY o.id$$,
                  'one APPROVE_PURGE audit row per approved row');
SELECT is(cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE key = 'dl-old-approved')), 0,
          'a row already approved is not approved again');
SELECT is((SELECT count(*)::int FROM cqrs_outbox_audit WHERE action = 'APPROVE_PURGE'), 3,
          '... and gets no second audit row');

-- the stats see the rows and the table's size
SELECT results_eq($$SELECT pending, sent, dead_lettered, dlt_failed FROM cqrs_outbox_stats()$$,
                  $$VALUES (2::bigint, 4::bigint, 3::bigint, 2::bigint)$$, 'stats before the pass');
SELECT ok((SELECT table_bytes = pg_table_size('cqrs_outbox') AND index_bytes = pg_indexes_size('cqrs_outbox')
             FROM cqrs_outbox_stats()), 'stats: table_bytes and index_bytes are the outbox''s sizes');

CREATE TEMP TABLE before AS SELECT * FROM cqrs_outbox;

-- one pass
SELECT results_eq($$SELECT * FROM cqrs_cleanup()$$,
                  $$VALUES (2::bigint, 1::bigint, 1::bigint, 0::bigint, true)$$,
                  'the pass deletes 2 SENT rows and purges 1 DEAD_LETTERED and 1 DLT_FAILED row');
SELECT is(pg_temp.keys(),
          'pending-ancient,dl-old,df-old,sent-late,dl-young-approved,sent-23h,pending-new',
          'what is left: PENDING, unapproved or young failed rows, and SENT rows sent within the retention');
SELECT is((SELECT count(*)::int FROM cqrs_outbox WHERE status = 'PENDING'), 2, 'no PENDING row deleted');
SELECT ok(NOT EXISTS (SELECT FROM cqrs_outbox WHERE key = 'sent-25h'), 'a SENT row past the retention is gone');
SELECT ok(EXISTS (SELECT FROM cqrs_outbox WHERE key = 'sent-late'),
          'a SENT row enqueued long ago but sent recently is kept (the retention counts from sent_at)');
SELECT ok(EXISTS (SELECT FROM cqrs_outbox WHERE key = 'dl-young-approved'),
          'an approved failed row younger than cqrs_sync.dlt_retention is kept');
SELECT is((SELECT count(*)::int FROM cqrs_outbox WHERE key IN ('dl-old', 'df-old')), 2,
          'old failed rows nobody approved are kept');
-- each purge: one audit row with everything needed to explain and replay it
SELECT results_eq($$SELECT a.outbox_id, a.event_id, a.topic, a.key, a.status, a.approver, a.payload,
                           a.reason, a.actor, a.at = now()
                      FROM cqrs_outbox_audit a WHERE a.action = 'PURGE' ORDER BY a.outbox_id$$,
                  $$SELECT b.id, b.event_id, b.topic, b.key, b.status, b.purge_approved_by, b.payload,
                           b.last_error, session_user::text COLLATE "default", true
                      FROM before b WHERE b.key IN ('dl-old-approved', 'df-old-approved') ORDER BY b.id$$,
                  'one PURGE audit row per purged row: event_id, topic, key, status, approver, payload, last error, actor, time');
SELECT results_eq($$SELECT pending, sent, dead_lettered, dlt_failed FROM cqrs_outbox_stats()$$,
                  $$VALUES (2::bigint, 2::bigint, 2::bigint, 1::bigint)$$, 'stats after the pass');

-- a second pass has nothing to do
SELECT results_eq($$SELECT * FROM cqrs_cleanup()$$,
                  $$VALUES (0::bigint, 0::bigint, 0::bigint, 0::bigint, true)$$,
                  'a second pass deletes nothing');
SELECT is((SELECT count(*)::int FROM cqrs_outbox_audit WHERE action = 'PURGE'), 2,
          'and writes no audit row');

-- retention 0: every SENT row and every approved failed row, still no PENDING
SET LOCAL cqrs_sync.sent_retention = 0;
SET LOCAL cqrs_sync.dlt_retention = 0;
SELECT results_eq($$SELECT sent, dead_lettered, dlt_failed FROM cqrs_cleanup()$$,
                  $$VALUES (2::bigint, 1::bigint, 0::bigint)$$,
                  'retention 0: all SENT rows and the young approved row go');
SELECT is(pg_temp.keys(), 'pending-ancient,dl-old,df-old,pending-new',
          'PENDING and unapproved failed rows stay, whatever the retention');

-- -1: kept for ever
DO $$ BEGIN
    PERFORM pg_temp.row('sent-ancient', 1000 * 24, 'SENT');
END $$;
SET LOCAL cqrs_sync.sent_retention = -1;
SELECT is((SELECT sent FROM cqrs_cleanup()), 0::bigint, 'sent_retention -1 keeps SENT rows');
SET LOCAL cqrs_sync.dlt_retention = -1;
SELECT is(cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE key = 'dl-old')), 1, 'approve dl-old');
SELECT is((SELECT dead_lettered FROM cqrs_cleanup()), 0::bigint, 'dlt_retention -1 purges nothing');
SET LOCAL cqrs_sync.sent_retention = '1d';
SET LOCAL cqrs_sync.dlt_retention = '7d';
SELECT results_eq($$SELECT sent, dead_lettered FROM cqrs_cleanup()$$, $$VALUES (1::bigint, 1::bigint)$$,
                  'with a retention again, dl-old is purged and sent-ancient deleted');

-- A retried row loses its approval: it is not purged if it fails again.
SELECT is(cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE key = 'df-old')), 1, 'approve df-old');
SELECT ok(cqrs_retry((SELECT id FROM cqrs_outbox WHERE key = 'df-old')), 'retry df-old');
UPDATE cqrs_outbox SET status = 'DLT_FAILED', last_error = 'failed again' WHERE key = 'df-old';   -- it fails again
SELECT is((SELECT dlt_failed FROM cqrs_cleanup()), 0::bigint, 'a retried row that failed again is not purged without a new approval');

-- The walk in id order stops after the window (batch) holding the first
-- row enqueued after the cutoff: a SENT row in a later window waits until
-- that row is old too (never happens with real ids and clocks, where a row
-- is enqueued before its successors are sent; made-up created_at values
-- show it).
DELETE FROM cqrs_outbox;
SET LOCAL cqrs_sync.cleanup_batch_size = 1;
DO $$ BEGIN
    PERFORM pg_temp.row('young-first', 1, 'PENDING');
    PERFORM pg_temp.row('old-after', 48, 'SENT');
END $$;
SELECT is((SELECT sent FROM cqrs_cleanup()), 0::bigint, 'a SENT row behind a younger row waits');
SET LOCAL cqrs_sync.sent_retention = '30min';
SELECT is((SELECT sent FROM cqrs_cleanup()), 1::bigint, '... until the younger row is past the retention too');
SET LOCAL cqrs_sync.cleanup_batch_size = 10000;

-- Batches: 25 SENT rows interleaved with PENDING rows, 3 approved failed
-- rows, batches of 2 rows.
DELETE FROM cqrs_outbox;
DO $$ BEGIN
    PERFORM count(pg_temp.row(CASE WHEN g % 3 = 0 THEN 'p' ELSE 's' END || g, 100 - g,
                             CASE WHEN g % 3 = 0 THEN 'PENDING' ELSE 'SENT' END::cqrs_outbox_status))
      FROM generate_series(1, 37) g;
    PERFORM count(pg_temp.row('f' || g, 9 * 24, 'DLT_FAILED')) FROM generate_series(1, 3) g;
END $$;
SELECT is(cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE status = 'DLT_FAILED')), 3, 'approve 3');
SET LOCAL cqrs_sync.cleanup_batch_size = 2;
SET LOCAL cqrs_sync.sent_retention = 0;
SELECT results_eq($$SELECT sent, dlt_failed, complete FROM cqrs_cleanup()$$,
                  $$VALUES (25::bigint, 3::bigint, true)$$, 'batches of 2 delete every row due');
SELECT is((SELECT count(*)::int FROM cqrs_outbox WHERE status = 'PENDING'), 12, 'the 12 PENDING rows stay');
SELECT is((SELECT count(*)::int FROM cqrs_outbox_audit WHERE action = 'PURGE' AND key LIKE 'f%'), 3,
          'each purged row audited once across batches');

-- The per-call limit: complete = false and a NOTICE; the next call goes on.
DO $$ BEGIN
    PERFORM count(pg_temp.row('s' || g, 50, 'SENT')) FROM generate_series(1, 7) g;
END $$;
SET LOCAL cqrs_sync.cleanup_max_rows_per_call = 5;
SELECT results_eq($$SELECT sent, complete FROM cqrs_cleanup()$$, $$VALUES (5::bigint, false)$$,
                  'a call stops at cqrs_sync.cleanup_max_rows_per_call');
SELECT results_eq($$SELECT sent, complete FROM cqrs_cleanup()$$, $$VALUES (2::bigint, true)$$,
                  'the next call deletes the rest');
SET LOCAL cqrs_sync.cleanup_max_rows_per_call = 0;
DO $$ BEGIN
    PERFORM count(pg_temp.row('t' || g, 50, 'SENT')) FROM generate_series(1, 7) g;
END $$;
SELECT results_eq($$SELECT sent, complete FROM cqrs_cleanup()$$, $$VALUES (7::bigint, true)$$,
                  '0: no limit');

-- errors
SELECT throws_ok($$SELECT cqrs_approve_purge(NULL)$$, '22004', 'ids must not be null',
                 'cqrs_approve_purge(NULL) is an error');
SELECT throws_ok($$SET LOCAL cqrs_sync.sent_retention = -2$$, '22023', NULL, 'sent_retention below -1');
SELECT throws_ok($$SET LOCAL cqrs_sync.cleanup_interval = '1s'$$, '55P02', NULL,
                 'cleanup_interval is a server setting (reload)');

-- a read-only transaction cannot clean up
SELECT throws_ok($$SET LOCAL transaction_read_only = on; SELECT * FROM cqrs_cleanup()$$, '25006', NULL,
                 'cqrs_cleanup() in a read-only transaction is an error');

SELECT * FROM finish();
ROLLBACK;
