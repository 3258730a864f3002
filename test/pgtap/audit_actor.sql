-- test/pgtap/audit_actor.sql -- one SET ROLE does not make an operator
-- anonymous (issue 13, item 3): every audit row records the session user
-- (the person who logged in) and the role acted as; a purge approval names
-- the person.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(8);
SET LOCAL client_min_messages = warning;

CREATE ROLE regress_alice LOGIN IN ROLE cqrs_sync_operator;
CREATE ROLE regress_bob LOGIN IN ROLE cqrs_sync_operator;

INSERT INTO cqrs_outbox (topic, key, payload, status, last_error, created_at)
SELECT 'pgtap.audit', 'k' || g, '{}', 'DEAD_LETTERED', 'failed', now() - interval '30 days'
  FROM generate_series(1, 4) g;
CREATE TEMP TABLE ids AS SELECT array_agg(id ORDER BY id) AS a FROM cqrs_outbox WHERE topic = 'pgtap.audit';
GRANT SELECT ON ids TO PUBLIC;

-- alice logs in, then acts as the shared operator role
SET SESSION AUTHORIZATION regress_alice;
SET ROLE cqrs_sync_operator;
SELECT cqrs_retry((SELECT a[1] FROM ids));
SELECT cqrs_discard((SELECT a[2] FROM ids), 'pgtap: not needed');
SELECT cqrs_approve_purge(ARRAY[(SELECT a[3] FROM ids)]);
RESET ROLE;
RESET SESSION AUTHORIZATION;
-- bob acts as himself
SET SESSION AUTHORIZATION regress_bob;
SELECT cqrs_approve_purge(ARRAY[(SELECT a[4] FROM ids)]);
RESET SESSION AUTHORIZATION;

SELECT has_column('cqrs_outbox_audit', 'session_user_name', 'the audit has the session user');
SELECT results_eq($$SELECT action, session_user_name, actor FROM cqrs_outbox_audit
                     WHERE outbox_id = (SELECT a[1] FROM ids)$$,
                  $$VALUES ('RETRY'::text, 'regress_alice'::text, 'cqrs_sync_operator'::text)$$,
                  'a retry after SET ROLE names alice and the role she acted as');
SELECT results_eq($$SELECT action, session_user_name, actor FROM cqrs_outbox_audit
                     WHERE outbox_id = (SELECT a[2] FROM ids)$$,
                  $$VALUES ('DISCARD'::text, 'regress_alice'::text, 'cqrs_sync_operator'::text)$$,
                  '... a discard too');
SELECT results_eq($$SELECT action, session_user_name, actor, approver FROM cqrs_outbox_audit
                     WHERE outbox_id = (SELECT a[3] FROM ids)$$,
                  $$VALUES ('APPROVE_PURGE'::text, 'regress_alice'::text, 'cqrs_sync_operator'::text,
                            'regress_alice'::text)$$,
                  '... and an approval, whose approver is alice');
SELECT is((SELECT purge_approved_by FROM cqrs_outbox WHERE id = (SELECT a[3] FROM ids)), 'regress_alice',
          'the approved row names alice as its approver');
SELECT results_eq($$SELECT action, session_user_name, actor, approver FROM cqrs_outbox_audit
                     WHERE outbox_id = (SELECT a[4] FROM ids)$$,
                  $$VALUES ('APPROVE_PURGE'::text, 'regress_bob'::text, 'regress_bob'::text, 'regress_bob'::text)$$,
                  'without SET ROLE, the session user and the role are the same');

-- the purge of alice's approval, by the pass of someone else
SET LOCAL cqrs_sync.dlt_retention = 0;
SET LOCAL cqrs_sync.purge_grace = 0;
SELECT dead_lettered FROM cqrs_cleanup();
SELECT results_eq($$SELECT action, session_user_name, actor, approver FROM cqrs_outbox_audit
                     WHERE outbox_id = (SELECT a[3] FROM ids) AND action = 'PURGE'$$,
                  $$VALUES ('PURGE'::text, session_user::text COLLATE "default", session_user::text COLLATE "default",
                            'regress_alice'::text)$$,
                  'the purge names who ran the pass and who approved it');
SELECT col_is_null('cqrs_outbox_audit', 'session_user_name',
                   'rows written before 0.2.0 have no session user (NULL)');

SELECT * FROM finish();
ROLLBACK;
