-- test/pgtap/purge_grace.sql -- an approval leaves time to change one's
-- mind (issue 13, item 11): an approved failed row is purged only once
-- cqrs_sync.purge_grace (default 1 hour) has passed since the approval,
-- however old the row is; cqrs_cancel_purge() cancels approvals, and a
-- cancelled approval is audited as such (CANCEL_PURGE), also when
-- cqrs_retry() or cqrs_retry_dlt_failed() cancels it.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(21);
SET LOCAL client_min_messages = warning;
SET LOCAL cqrs_sync.dlt_retention = '7d';

CREATE ROLE regress_grace_op IN ROLE cqrs_sync_operator;

-- four failed rows enqueued a month ago: far past cqrs_sync.dlt_retention
INSERT INTO cqrs_outbox (topic, key, payload, status, last_error, created_at)
SELECT 'pgtap.grace', 'k' || g, '{}', CASE WHEN g = 4 THEN 'DLT_FAILED' ELSE 'DEAD_LETTERED' END::cqrs_outbox_status,
       'failed', now() - interval '30 days'
  FROM generate_series(1, 4) g;
CREATE TEMP TABLE r AS SELECT key, id FROM cqrs_outbox WHERE topic = 'pgtap.grace';
CREATE FUNCTION pg_temp.id(k text) RETURNS bigint LANGUAGE sql AS $$ SELECT id FROM r WHERE key = k $$;

SELECT is(cqrs_approve_purge(ARRAY[pg_temp.id('k1'), pg_temp.id('k2'), pg_temp.id('k3'), pg_temp.id('k4')]), 4,
          'approve the four rows');
SELECT results_eq($$SELECT dead_lettered, dlt_failed FROM cqrs_cleanup()$$, $$VALUES (0::bigint, 0::bigint)$$,
                  'a pass right after the approval purges nothing, though the rows are a month old');
SELECT is((SELECT count(*) FROM cqrs_outbox WHERE topic = 'pgtap.grace'), 4::bigint, 'the four rows are there');

SELECT is(current_setting('cqrs_sync.purge_grace'), '1h', 'cqrs_sync.purge_grace defaults to one hour');
SET LOCAL ROLE regress_grace_op;
SELECT throws_ok($$SET LOCAL cqrs_sync.purge_grace = 0$$, '42501', NULL,
                 'an operator cannot shorten the grace period');
RESET ROLE;


-- changing one's mind
SELECT is(cqrs_cancel_purge(ARRAY[pg_temp.id('k2'), pg_temp.id('k2'), -1]), 1, 'cqrs_cancel_purge() cancels an approval');
SELECT results_eq($$SELECT purge_approved_by, purge_approved_at FROM cqrs_outbox WHERE id = pg_temp.id('k2')$$,
                  $$VALUES (NULL::text, NULL::timestamptz)$$, '... clearing it');
SELECT results_eq($$SELECT action, status::text, approver, session_user_name FROM cqrs_outbox_audit
                     WHERE outbox_id = pg_temp.id('k2') ORDER BY audit_id$$,
                  $$VALUES ('APPROVE_PURGE'::text, 'DEAD_LETTERED'::text, session_user::text COLLATE "default", session_user::text COLLATE "default"),
                           ('CANCEL_PURGE', 'DEAD_LETTERED', session_user::text COLLATE "default", session_user::text COLLATE "default")$$,
                  '... and auditing it as CANCEL_PURGE, with whose approval it cancelled');
SELECT is(cqrs_cancel_purge(ARRAY[pg_temp.id('k2')]), 0, 'a row that is not approved has nothing to cancel');
SELECT ok(cqrs_retry(pg_temp.id('k3')), 'cqrs_retry() of an approved row');
SELECT results_eq($$SELECT action FROM cqrs_outbox_audit WHERE outbox_id = pg_temp.id('k3') ORDER BY audit_id$$,
                  $$VALUES ('APPROVE_PURGE'::text), ('CANCEL_PURGE'), ('RETRY')$$,
                  '... audits the cancelled approval before the retry');
SELECT is(cqrs_retry_dlt_failed(), 1, 'cqrs_retry_dlt_failed() of an approved row');
SELECT results_eq($$SELECT action FROM cqrs_outbox_audit WHERE outbox_id = pg_temp.id('k4') ORDER BY audit_id$$,
                  $$VALUES ('APPROVE_PURGE'::text), ('CANCEL_PURGE'), ('RETRY')$$,
                  '... too');
SELECT throws_ok($$SELECT cqrs_cancel_purge(NULL)$$, '22004', 'ids must not be null', 'cqrs_cancel_purge(NULL)');
SELECT ok(NOT has_function_privilege('public', 'cqrs_cancel_purge(bigint[])', 'EXECUTE')
          AND has_function_privilege('cqrs_sync_operator', 'cqrs_cancel_purge(bigint[])', 'EXECUTE'),
          'cqrs_cancel_purge() is for operators only');

-- the grace period passes
UPDATE cqrs_outbox SET purge_approved_at = now() - interval '59 minutes' WHERE id = pg_temp.id('k1');
SELECT is((SELECT dead_lettered FROM cqrs_cleanup()), 0::bigint, '59 minutes after the approval: not yet');
UPDATE cqrs_outbox SET purge_approved_at = now() - interval '61 minutes' WHERE id = pg_temp.id('k1');
SELECT is((SELECT dead_lettered FROM cqrs_cleanup()), 1::bigint, '61 minutes after the approval: purged');
SELECT is((SELECT count(*) FROM cqrs_outbox WHERE topic = 'pgtap.grace'), 3::bigint,
          'only that row; the cancelled ones stay');
SET LOCAL cqrs_sync.purge_grace = 0;
SELECT is(cqrs_approve_purge(ARRAY[pg_temp.id('k2')]), 1, 'approve k2 again');
SELECT is((SELECT dead_lettered FROM cqrs_cleanup()), 1::bigint, 'with purge_grace 0 the next pass purges it');

-- the grace counts from the approval, not from the start of the approving
-- transaction: one open for longer than the grace left no time to cancel
INSERT INTO cqrs_outbox (topic, key, payload, status, last_error, created_at)
VALUES ('pgtap.grace', 'late', '{}', 'DEAD_LETTERED', 'failed', now() - interval '30 days');
SELECT pg_sleep(0.2);
SELECT cqrs_approve_purge(ARRAY[(SELECT id FROM cqrs_outbox WHERE topic = 'pgtap.grace' AND key = 'late')]);
SELECT ok((SELECT purge_approved_at > now() FROM cqrs_outbox WHERE topic = 'pgtap.grace' AND key = 'late'),
          'an approval is stamped with the time it was made, not its transaction''s start');

SELECT * FROM finish();
ROLLBACK;
