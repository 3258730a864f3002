-- test/pgtap/monitor_privileges.sql -- monitoring sees counts, ages and
-- errors, never payloads, keys or headers (issue 13, item 2).  A member of
-- pg_monitor only (as postgres_exporter connects) reads the stats, the
-- exporter views and the outbox's bookkeeping columns, and gets 42501 for
-- every column that carries an event's content.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(22);

CREATE ROLE regress_exporter IN ROLE pg_monitor;

INSERT INTO cqrs_outbox (topic, key, payload, headers, status, last_error, created_at)
VALUES ('pgtap.monitor', 'customer-17', '{"card": "4111 1111 1111 1111"}', '{"trace": "secret"}',
        'PENDING', NULL, now() - interval '5 minutes'),
       ('pgtap.monitor', 'customer-18', '{"card": "5500 0000 0000 0004"}', NULL,
        'DEAD_LETTERED', 'MSG_SIZE_TOO_LARGE', now() - interval '1 hour');
SELECT cqrs_discard(min(id), 'pgtap: the audit keeps the payload') FROM cqrs_outbox;

SET LOCAL ROLE regress_exporter;
SELECT throws_ok($$SELECT payload FROM cqrs_outbox$$, '42501', NULL, 'pg_monitor: no cqrs_outbox.payload');
SELECT throws_ok($$SELECT key FROM cqrs_outbox$$, '42501', NULL, 'pg_monitor: no cqrs_outbox.key');
SELECT throws_ok($$SELECT headers FROM cqrs_outbox$$, '42501', NULL, 'pg_monitor: no cqrs_outbox.headers');
SELECT throws_ok($$SELECT * FROM cqrs_outbox$$, '42501', NULL, 'pg_monitor: no SELECT * on cqrs_outbox');
SELECT throws_ok($$SELECT count(*) FROM cqrs_outbox WHERE payload ? 'card'$$, '42501', NULL,
                 'pg_monitor: no filtering on the payload either');
SELECT throws_ok($$SELECT payload FROM cqrs_outbox_audit$$, '42501', NULL, 'pg_monitor: no cqrs_outbox_audit.payload');
SELECT throws_ok($$SELECT key FROM cqrs_outbox_audit$$, '42501', NULL, 'pg_monitor: no cqrs_outbox_audit.key');
SELECT throws_ok($$SELECT * FROM cqrs_outbox_audit$$, '42501', NULL, 'pg_monitor: no SELECT * on cqrs_outbox_audit');
SELECT throws_ok($$SELECT * FROM cqrs_inbox$$, '42501', NULL, 'pg_monitor: no cqrs_inbox');
SELECT throws_ok($$SELECT * FROM cqrs_tombstone$$, '42501', NULL, 'pg_monitor: no cqrs_tombstone');

SELECT results_eq($$SELECT pending, sent, dead_lettered, dlt_failed, oldest_pending_age_seconds IS NULL
                      FROM cqrs_outbox_stats()$$,
                  $$VALUES (0::bigint, 0::bigint, 1::bigint, 0::bigint, false)$$,
                  'pg_monitor: cqrs_outbox_stats() counts the rows');
SELECT results_eq($$SELECT status, rows FROM cqrs_stats_outbox ORDER BY status$$,
                  $$VALUES ('DEAD_LETTERED', 1::bigint), ('DLT_FAILED', 0), ('PENDING', 0), ('SENT', 0)$$,
                  'pg_monitor: the exporter view cqrs_stats_outbox');
SELECT lives_ok($$SELECT * FROM cqrs_stats_relay$$, 'pg_monitor: the exporter view cqrs_stats_relay');
SELECT lives_ok($$SELECT * FROM cqrs_dlt_depth$$, 'pg_monitor: the exporter view cqrs_dlt_depth');
SELECT lives_ok($$SELECT * FROM cqrs_stats_cleanup$$, 'pg_monitor: the exporter view cqrs_stats_cleanup');
SELECT lives_ok($$SELECT * FROM cqrs_stats_dlt_depth$$, 'pg_monitor: the exporter view cqrs_stats_dlt_depth');
SELECT results_eq($$SELECT topic, status::text, count(*), max(last_error), min(created_at) < now()
                      FROM cqrs_outbox GROUP BY topic, status$$,
                  $$VALUES ('pgtap.monitor'::text, 'DEAD_LETTERED'::text, 1::bigint, 'MSG_SIZE_TOO_LARGE'::text, true)$$,
                  'pg_monitor: counts, errors and ages per topic and status');
SELECT lives_ok($$SELECT id, event_id, retry_count, dlt_retry_count, next_attempt_at, sent_at,
                         purge_approved_by, purge_approved_at FROM cqrs_outbox$$,
                'pg_monitor: the other bookkeeping columns');
SELECT results_eq($$SELECT action, topic, status::text, reason FROM cqrs_outbox_audit$$,
                  $$VALUES ('DISCARD'::text, 'pgtap.monitor'::text, 'PENDING'::text,
                            'pgtap: the audit keeps the payload'::text)$$,
                  'pg_monitor: what happened, in the audit');
SELECT lives_ok($$SELECT audit_id, outbox_id, event_id, approver, actor, at FROM cqrs_outbox_audit$$,
                'pg_monitor: who and when, in the audit');
RESET ROLE;

-- the views monitoring reads carry counts, ages, settings and errors: no
-- column of an event's content (key, payload, headers)
SELECT is(array_agg(c.relname || '.' || a.attname), NULL::text[],
          'no monitoring view has a key, payload or headers column')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relname IN ('cqrs_stats_outbox', 'cqrs_stats_relay', 'cqrs_dlt_depth',
                     'cqrs_stats_cleanup', 'cqrs_stats_dlt_depth')
   AND a.attnum > 0 AND a.attname ~ '(key|payload|header)';

SELECT ok(bool_and(NOT has_function_privilege('pg_monitor', p.oid, 'EXECUTE')),
          'pg_monitor executes none of the functions that change state')
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_retry', 'cqrs_retry_dlt_failed', 'cqrs_discard', 'cqrs_cleanup',
                     'cqrs_approve_purge', 'cqrs_prune_read_side', 'cqrs_wake_relay');

SELECT * FROM finish();
ROLLBACK;
