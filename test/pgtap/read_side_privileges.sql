-- test/pgtap/read_side_privileges.sql -- no reader can corrupt another
-- service's read side (issue 13, item 1).  A second reader role, with no
-- privilege on table "ledger", tries every tampering: writing tombstones of
-- ledger keys (the maximum version, or lowering one), writing inbox entries
-- or delta memory of the consumer "ledger-view", forging the name
-- cqrs_apply_delta() used for its memory, and the helpers acting for a
-- table or a consumer that is not its own.  Each fails with 42501 and
-- leaves ledger-view's state as it was.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(46);

CREATE ROLE regress_ledger_view IN ROLE cqrs_sync_reader;
CREATE ROLE regress_ledger_view_2 IN ROLE regress_ledger_view;   -- a second instance of the service
CREATE ROLE regress_mallory IN ROLE cqrs_sync_reader;
CREATE ROLE regress_op IN ROLE cqrs_sync_operator;

CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric NOT NULL DEFAULT 0, version bigint);
CREATE TABLE mallory_view (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0, version bigint);
GRANT SELECT, INSERT, UPDATE, DELETE ON ledger TO regress_ledger_view;
GRANT SELECT, INSERT, UPDATE, DELETE ON mallory_view TO regress_mallory;

-- ledger-view's state: a row, a tombstone, an inbox entry and delta memory
SET LOCAL ROLE regress_ledger_view;
SELECT cqrs_upsert('ledger', '{"id": 1, "amount": 10}', 1);
SELECT cqrs_delete('ledger', '{"id": 2}', 5);
SELECT cqrs_mark_processed('ledger-view', 'e-1');
SELECT cqrs_apply_delta('ledger', '{"id": 1}', '{"amount": 5}', 'ledger-view', 'd-1');
RESET ROLE;

CREATE TEMP TABLE ledger_state AS
SELECT (SELECT jsonb_agg(to_jsonb(l) ORDER BY id) FROM ledger l) AS rows,
       (SELECT jsonb_agg(jsonb_build_array(key, version) ORDER BY key)
          FROM cqrs_tombstone WHERE target = 'ledger'::regclass) AS tombstones,
       (SELECT count(*) FROM cqrs_inbox WHERE consumer LIKE 'ledger-view%') AS inbox;
GRANT SELECT ON ledger_state TO PUBLIC;

-- The tables: readers may not write them directly.
SELECT ok(NOT has_table_privilege('cqrs_sync_reader', t, p),
          format('cqrs_sync_reader has no %s on %s', p, t))
  FROM unnest(ARRAY['cqrs_inbox', 'cqrs_tombstone']) AS t,
       unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p;

-- Each tampering, as the other reader.
SET LOCAL ROLE regress_mallory;
SELECT throws_ok($$INSERT INTO cqrs_tombstone (target, key, version)
                   VALUES ('ledger', '{"id": "1"}', 9223372036854775807)$$,
                 '42501', NULL, 'a tombstone with the maximum version for a ledger key: 42501');
SELECT throws_ok($$UPDATE cqrs_tombstone SET version = 0 WHERE target = 'ledger'::regclass$$,
                 '42501', NULL, 'lowering the ledger''s tombstone: 42501');
SELECT throws_ok($$DELETE FROM cqrs_tombstone$$, '42501', NULL, 'deleting tombstones: 42501');
SELECT throws_ok($$INSERT INTO cqrs_inbox (consumer, event_id) VALUES ('ledger-view', 'e-2')$$,
                 '42501', NULL, 'an inbox entry of another consumer, directly: 42501');
SELECT throws_ok($$DELETE FROM cqrs_inbox$$, '42501', NULL, 'deleting inbox entries: 42501');
SELECT throws_ok($$SELECT cqrs_mark_processed('ledger-view', 'e-3')$$,
                 '42501', 'consumer "ledger-view" belongs to role "regress_ledger_view"',
                 'cqrs_mark_processed() for another role''s consumer: 42501');
SELECT throws_ok($$SELECT cqrs_apply_delta('mallory_view', '{"id": 1}', '{"n": 1}', 'ledger-view', 'd-2')$$,
                 '42501', 'consumer "ledger-view" belongs to role "regress_ledger_view"',
                 'cqrs_apply_delta() under another role''s consumer, on its own table: 42501');
SELECT throws_ok($$SELECT cqrs_delete('ledger', '{"id": 1}', 9223372036854775807)$$,
                 '42501', 'permission denied for table ledger',
                 'cqrs_delete() of a ledger key (a tombstone) without DELETE on ledger: 42501');
SELECT throws_ok($$SELECT cqrs_delete('ledger', '{"id": 3}', 9223372036854775807)$$,
                 '42501', 'permission denied for table ledger',
                 '... also of a key that has no row');
SELECT throws_ok($$SELECT cqrs_upsert('ledger', '{"id": 1, "amount": 0}', 99)$$,
                 '42501', NULL, 'cqrs_upsert() on ledger: 42501');
SELECT throws_ok($$SELECT cqrs_apply_delta('ledger', '{"id": 1}', '{"amount": 1}', 'mallory', 'd-3')$$,
                 '42501', 'permission denied for table ledger',
                 'cqrs_apply_delta() on ledger under its own consumer: 42501');
SELECT throws_ok($$SELECT cqrs_apply_delta('ledger', '{"id": 1}', '{}', 'mallory', 'd-5')$$,
                 '42501', 'permission denied for table ledger',
                 '... also with empty deltas, which only record the event');
SELECT throws_ok($$INSERT INTO cqrs_delta_inbox (consumer, target, event_id, key)
                   VALUES ('ledger-view', 'ledger', 'd-4', '{"id": "1"}')$$,
                 '42501', NULL, 'delta memory of another consumer, directly: 42501');
SELECT throws_ok($$UPDATE cqrs_consumer SET owner = 'regress_mallory'$$,
                 '42501', NULL, 'taking over a consumer name directly: 42501');
SELECT throws_ok($$SELECT cqrs_set_consumer_owner('ledger-view', 'regress_mallory')$$,
                 '42501', NULL, '... or with the operator function: 42501');
-- the name 0.1.0 derived for ledger-view's delta memory, claimed as a consumer of its own
SELECT ok(cqrs_mark_processed(format('ledger-view/delta/%s', 'ledger'::regclass::oid),
                              'd-9 {"id": "1"}'),
          'a consumer name of its own that spells another''s delta memory is just a name');
-- its own consumer and table work
SELECT ok(cqrs_mark_processed('mallory', 'm-1'), 'the other reader''s own consumer works');
SELECT ok(cqrs_apply_delta('mallory_view', '{"id": 1}', '{"n": 1}', 'mallory', 'm-2'),
          '... and its own table');
RESET ROLE;

SELECT is((SELECT (SELECT jsonb_agg(to_jsonb(l) ORDER BY id) FROM ledger l)), (SELECT rows FROM ledger_state),
          'the ledger rows are unchanged');
SELECT is((SELECT jsonb_agg(jsonb_build_array(key, version) ORDER BY key)
             FROM cqrs_tombstone WHERE target = 'ledger'::regclass),
          (SELECT tombstones FROM ledger_state), 'the ledger tombstones are unchanged');
SELECT is((SELECT count(*) FROM cqrs_inbox WHERE consumer = 'ledger-view'), 1::bigint,
          'ledger-view''s inbox holds only its own entry');
SELECT is((SELECT owner::text FROM cqrs_consumer WHERE consumer = 'ledger-view'), 'regress_ledger_view',
          'ledger-view still belongs to its role');

-- ledger-view carries on: the events the other reader tried to spoil apply
SET LOCAL ROLE regress_ledger_view;
SELECT ok(cqrs_mark_processed('ledger-view', 'e-2'), 'ledger-view: e-2 is new');
SELECT ok(cqrs_mark_processed('ledger-view', 'e-3'), 'ledger-view: e-3 is new');
SELECT ok(cqrs_apply_delta('ledger', '{"id": 1}', '{"amount": 1}', 'ledger-view', 'd-9'),
          'ledger-view: delta d-9 applies despite the forged name');
SELECT ok(NOT cqrs_upsert('ledger', '{"id": 2, "amount": 1}', 4),
          'ledger-view: the tombstone of key 2 still stops an older upsert');
SELECT ok(NOT cqrs_apply_delta('ledger', '{"id": 1}', '{"amount": 5}', 'ledger-view', 'd-1'),
          'ledger-view: delta d-1 is still remembered');
RESET ROLE;
-- a member of the owning role may write the consumer too
SET LOCAL ROLE regress_ledger_view_2;
SELECT ok(cqrs_mark_processed('ledger-view', 'e-4'), 'a member of the consumer''s role writes it');
RESET ROLE;

-- a superuser may write any consumer, and claims none
SELECT ok(cqrs_mark_processed('ledger-view', 'e-5'), 'a superuser writes another role''s consumer');
SELECT ok(cqrs_mark_processed('replay-by-hand', 'x-1'), 'a superuser uses a new consumer');
SELECT is((SELECT count(*) FROM cqrs_consumer WHERE consumer = 'replay-by-hand'), 0::bigint,
          '... without claiming it');

-- an operator gives a consumer to another role
SET LOCAL ROLE regress_op;
SELECT lives_ok($$SELECT cqrs_set_consumer_owner('ledger-view', 'regress_mallory')$$,
                'an operator reassigns a consumer');
RESET ROLE;
SET LOCAL ROLE regress_ledger_view;
SELECT throws_ok($$SELECT cqrs_mark_processed('ledger-view', 'e-6')$$, '42501', NULL,
                 'then its former role may no longer write it');
RESET ROLE;

-- a claim rolled back to a savepoint is no claim: the session does not remember it
SET LOCAL ROLE regress_mallory;
SAVEPOINT before_claim;
SELECT cqrs_mark_processed('billing-view', 'b-1');
ROLLBACK TO SAVEPOINT before_claim;
RESET ROLE;
SELECT is((SELECT count(*) FROM cqrs_consumer WHERE consumer = 'billing-view'), 0::bigint,
          'a claim rolled back to a savepoint leaves no owner');
SET LOCAL ROLE regress_ledger_view;
SELECT lives_ok($$SELECT cqrs_mark_processed('billing-view', 'b-2')$$,
                '... and another role claims the consumer, in the same session');
RESET ROLE;
SET LOCAL ROLE regress_mallory;
SELECT throws_ok($$SELECT cqrs_mark_processed('billing-view', 'b-3')$$,
                 '42501', 'consumer "billing-view" belongs to role "regress_ledger_view"',
                 '... which the role whose claim was rolled back may not write');
RESET ROLE;

-- an operator gives a consumer to a role whose name must be quoted in SQL:
-- the role, not one named with the quotes, may then use it
CREATE ROLE "regress-Board View" IN ROLE cqrs_sync_reader;
SET LOCAL ROLE regress_op;
SELECT cqrs_set_consumer_owner('quoted-view', '"regress-Board View"');
RESET ROLE;
SELECT is((SELECT owner FROM cqrs_consumer WHERE consumer = 'quoted-view'), 'regress-Board View',
          'the consumer''s owner is the role''s name, not its quoted form');
SET LOCAL ROLE "regress-Board View";
SELECT lives_ok($$SELECT cqrs_mark_processed('quoted-view', 'q-1')$$,
                'and that role records events under it');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
