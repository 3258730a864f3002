-- test/pgtap/apply_direct.sql -- cqrs_upsert() updates an existing row
-- without an UPDATE statement where that statement could do no more
-- (src/apply_fast.c), and runs the statement everywhere else.  Each case
-- below is one the direct update must not change: what the statement would
-- enforce (privileges, row security, triggers, rules, inheritance, domains,
-- type modifiers, identity columns, read-only transactions) and what the
-- direct update must do as the statement does (constraints, unique indexes,
-- replica identity, generated columns, keys in any column order, dropped
-- columns, large values).  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(64);

CREATE ROLE regress_direct IN ROLE cqrs_sync_reader;

--
-- The direct update itself: a newer version updates, an older one does not
--
CREATE TABLE d_plain (id bigint PRIMARY KEY, title text, body text, version bigint);
INSERT INTO d_plain VALUES (1, 'a', 'x', 5);
SELECT ok(cqrs_upsert('d_plain', '{"id": 1, "title": "b"}', 6), 'a newer version updates');
SELECT ok(NOT cqrs_upsert('d_plain', '{"id": 1, "title": "old"}', 4), 'an older version does not');
SELECT ok(NOT cqrs_upsert('d_plain', '{"id": 1, "title": "same"}', 6), 'the same version does not');
SELECT results_eq('SELECT title, body, version FROM d_plain',
                  $$VALUES ('b'::text, 'x'::text, 6::bigint)$$,
                  'columns not in the row keep their values');
SELECT ok(cqrs_upsert('d_plain', jsonb_build_object('id', 1, 'body', repeat('z', 100000)), 7),
          'a large value updates');
SELECT is((SELECT length(body) FROM d_plain WHERE id = 1), 100000, 'and is written whole');

-- a composite key, given in another order than the index's
CREATE TABLE d_pair (b text, a integer, n integer, version integer, PRIMARY KEY (a, b));
INSERT INTO d_pair VALUES ('k', 1, 0, 1), ('k', 2, 0, 1);
SELECT ok(cqrs_upsert('d_pair', '{"n": 9, "b": "k", "a": 2}', 2), 'a composite key updates');
SELECT results_eq('SELECT a, n, version FROM d_pair ORDER BY a',
                  $$VALUES (1, 0, 1), (2, 9, 2)$$, 'only the row of that key');

-- a dropped column before the written ones
CREATE TABLE d_dropped (gone text, id bigint PRIMARY KEY, title text, version bigint);
INSERT INTO d_dropped VALUES ('g', 1, 'a', 1);
ALTER TABLE d_dropped DROP COLUMN gone;
SELECT ok(cqrs_upsert('d_dropped', '{"id": 1, "title": "b"}', 2), 'a table with a dropped column updates');
SELECT is((SELECT title FROM d_dropped), 'b', 'the right column');

--
-- What the direct update must enforce as the statement does
--
CREATE TABLE d_checked (id bigint PRIMARY KEY, n integer CHECK (n >= 0), code text UNIQUE,
                        title text NOT NULL, version bigint);
INSERT INTO d_checked VALUES (1, 0, 'a', 't', 1), (2, 0, 'b', 't', 1);
SELECT throws_ok($$SELECT cqrs_upsert('d_checked', '{"id": 1, "n": -1}', 2)$$, '23514',
                 NULL, 'a CHECK constraint');
SELECT throws_ok($$SELECT cqrs_upsert('d_checked', '{"id": 1, "title": null}', 2)$$, '23502',
                 NULL, 'a NOT NULL constraint');
SELECT throws_ok($$SELECT cqrs_upsert('d_checked', '{"id": 1, "code": "b"}', 2)$$, '23505',
                 NULL, 'a unique index');
SELECT ok(cqrs_upsert('d_checked', '{"id": 1, "code": "c"}', 2), 'an indexed value changes');
SET LOCAL enable_seqscan = off;
SELECT results_eq($$SELECT id FROM d_checked WHERE code IN ('a', 'c')$$, $$VALUES (1::bigint)$$,
                  'and is found through its index under the new value only');
RESET enable_seqscan;

CREATE TABLE d_generated (id bigint PRIMARY KEY, title text,
                          upper_title text GENERATED ALWAYS AS (upper(title)) STORED, version bigint);
INSERT INTO d_generated (id, title, version) VALUES (1, 'a', 1);
SELECT ok(cqrs_upsert('d_generated', '{"id": 1, "title": "b"}', 2), 'a table with a generated column updates');
SELECT is((SELECT upper_title FROM d_generated), 'B', 'the generated column is computed');

CREATE TABLE d_published (id bigint PRIMARY KEY, title text, version bigint);
INSERT INTO d_published VALUES (1, 'a', 1);
ALTER TABLE d_published REPLICA IDENTITY NOTHING;
SET LOCAL client_min_messages = error;   -- (no logical wal_level needed here)
CREATE PUBLICATION regress_direct_pub FOR TABLE d_published;
RESET client_min_messages;
SELECT throws_ok($$SELECT cqrs_upsert('d_published', '{"id": 1, "title": "b"}', 2)$$, '55000',
                 NULL, 'a table that publishes updates without a replica identity');

--
-- Where only the statement is right
--
-- privileges: UPDATE on the table is needed, column privileges suffice
CREATE TABLE d_priv (id bigint PRIMARY KEY, title text, secret text, version bigint);
INSERT INTO d_priv VALUES (1, 'a', 's', 1);
GRANT SELECT ON d_priv TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_upsert('d_priv', '{"id": 1, "title": "b"}', 2)$$, '42501',
                 NULL, 'no UPDATE privilege: permission denied');
RESET ROLE;
GRANT UPDATE (title, version) ON d_priv TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT ok(cqrs_upsert('d_priv', '{"id": 1, "title": "b"}', 2), 'UPDATE on the written columns suffices');
SELECT throws_ok($$SELECT cqrs_upsert('d_priv', '{"id": 1, "secret": "t"}', 3)$$, '42501',
                 NULL, 'but not for a column without it');
RESET ROLE;

-- row security: a row the policy hides is not updated
CREATE TABLE d_rls (id bigint PRIMARY KEY, title text, version bigint);
INSERT INTO d_rls VALUES (1, 'a', 1), (2, 'b', 1);
ALTER TABLE d_rls ENABLE ROW LEVEL SECURITY;
CREATE POLICY d_rls_p ON d_rls USING (id <> 2);
GRANT SELECT, INSERT, UPDATE ON d_rls TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT ok(cqrs_upsert('d_rls', '{"id": 1, "title": "a2"}', 2), 'row security: a visible row updates');
SELECT throws_ok($$SELECT cqrs_upsert('d_rls', '{"id": 2, "title": "b2"}', 2)$$, '42501',
                 NULL, 'row security: a hidden row is not updated');
RESET ROLE;
-- ... nor deleted, and no tombstone is written for it (it would keep the
-- row's key from being written again by anyone)
GRANT DELETE ON d_rls TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_delete('d_rls', '{"id": 2}', 9223372036854775807)$$, '42501',
                 NULL, 'row security: a hidden row is not deleted');
SELECT ok(cqrs_delete('d_rls', '{"id": 3}', 5), 'row security: a key with no row gets its tombstone');
RESET ROLE;
SELECT is((SELECT count(*) FROM cqrs_tombstone WHERE target = 'd_rls'::regclass AND key->>'id' = '2'),
          0::bigint, 'row security: no tombstone for the hidden row');
SELECT is((SELECT string_agg(id::text, ',' ORDER BY id) FROM d_rls), '1,2',
          'row security: the hidden row is still there');
-- row security that shows a row but does not let its role delete it: the
-- delete of a row whose version is not newer fails, as the docs say, rather
-- than return false as if the row were newer (the event then counted as
-- applied, and the row stayed)
CREATE TABLE d_rls_nodel (id bigint PRIMARY KEY, title text, version bigint);
INSERT INTO d_rls_nodel VALUES (1, 'a', 1), (2, 'b', 9);
ALTER TABLE d_rls_nodel ENABLE ROW LEVEL SECURITY;
CREATE POLICY d_rls_nodel_s ON d_rls_nodel FOR SELECT USING (true);
GRANT SELECT, DELETE ON d_rls_nodel TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_delete('d_rls_nodel', '{"id": 1}', 5)$$, '42501',
                 NULL, 'row security without a DELETE policy: a delete of an older row fails');
SELECT is(cqrs_delete('d_rls_nodel', '{"id": 2}', 5), false,
          '... and one of a newer row returns false');
RESET ROLE;
-- ... but a soft delete (a BEFORE DELETE trigger that keeps the row) on a
-- table with row security is the table's decision: false, as without it
CREATE TABLE d_rls_soft (id bigint PRIMARY KEY, deleted boolean NOT NULL DEFAULT false, version bigint);
INSERT INTO d_rls_soft VALUES (1, false, 1);
ALTER TABLE d_rls_soft ENABLE ROW LEVEL SECURITY;
CREATE POLICY d_rls_soft_all ON d_rls_soft USING (true);
CREATE FUNCTION d_rls_soft_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE d_rls_soft SET deleted = true WHERE id = OLD.id; RETURN NULL; END $$;
CREATE TRIGGER d_rls_soft_del BEFORE DELETE ON d_rls_soft FOR EACH ROW EXECUTE FUNCTION d_rls_soft_del();
GRANT SELECT, UPDATE, DELETE ON d_rls_soft TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT is(cqrs_delete('d_rls_soft', '{"id": 1}', 5), false,
          'row security and a soft-delete trigger: the delete returns false');
RESET ROLE;
SELECT is((SELECT deleted FROM d_rls_soft), true, '... and the trigger marked the row');

-- row security forced on the table's owner: the check for a hidden row runs
-- as the owner without the policies, in a plan of its own (the plan cache
-- plans again for another role, not when FORCE ROW LEVEL SECURITY is lifted;
-- sharing one plan, the check saw what the policies show, and the owner's
-- delete wrote a tombstone for a hidden row; or the owner's delete saw the
-- hidden row as newer and returned false)
CREATE TABLE d_rls_f1 (id bigint PRIMARY KEY, tenant text, version bigint);
CREATE TABLE d_rls_f2 (id bigint PRIMARY KEY, tenant text, version bigint);
INSERT INTO d_rls_f1 VALUES (1, 'b', 1);
INSERT INTO d_rls_f2 VALUES (1, 'b', 1);
ALTER TABLE d_rls_f1 OWNER TO regress_direct;
ALTER TABLE d_rls_f2 OWNER TO regress_direct;
ALTER TABLE d_rls_f1 ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE d_rls_f2 ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY d_rls_f1_p ON d_rls_f1 USING (tenant = 'a');
CREATE POLICY d_rls_f2_p ON d_rls_f2 USING (tenant = 'a');
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_delete('d_rls_f1', '{"id": 1}', 9223372036854775807)$$, '42501',
                 NULL, 'forced row security: a row hidden from the owner is not deleted');
SELECT throws_ok($$SELECT cqrs_upsert('d_rls_f2', '{"id": 1, "tenant": "a"}', 2)$$, '42501',
                 NULL, 'forced row security: a row hidden from the owner is not updated');
SELECT throws_ok($$SELECT cqrs_delete('d_rls_f2', '{"id": 1}', 9223372036854775807)$$, '42501',
                 NULL, 'forced row security: ... nor deleted after that');
RESET ROLE;
SELECT is((SELECT count(*) FROM cqrs_tombstone WHERE target IN ('d_rls_f1'::regclass, 'd_rls_f2'::regclass)),
          0::bigint, 'forced row security: no tombstone for the hidden rows');

-- ... nor added to: a permission error, not a serialization failure that a
-- consumer would retry for ever
-- (the row it would insert passes the policy; the one there is another's)
CREATE TABLE d_rls_n (id bigint PRIMARY KEY, likes bigint NOT NULL DEFAULT 0,
                      owner name NOT NULL DEFAULT current_user, version bigint);
INSERT INTO d_rls_n VALUES (1, 0, 'regress_direct', 1), (2, 0, 'someone_else', 1);
ALTER TABLE d_rls_n ENABLE ROW LEVEL SECURITY;
CREATE POLICY d_rls_n_p ON d_rls_n USING (owner = current_user);
GRANT SELECT, INSERT, UPDATE, DELETE ON d_rls_n TO regress_direct;
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_apply_delta('d_rls_n', '{"id": 2}', '{"likes": 1}', 'direct-rls', 'rl-1')$$,
                 '42501', NULL, 'row security: deltas to a hidden row fail with 42501');
RESET ROLE;

-- triggers: row and statement triggers fire
CREATE TABLE d_trig (id bigint PRIMARY KEY, title text, version bigint);
CREATE TABLE d_trig_log (what text);
INSERT INTO d_trig VALUES (1, 'a', 1);
CREATE FUNCTION d_trig_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.title := NEW.title || '!'; RETURN NEW; END $$;
CREATE FUNCTION d_trig_stmt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO d_trig_log VALUES (TG_OP); RETURN NULL; END $$;
CREATE TRIGGER d_trig_row BEFORE UPDATE ON d_trig FOR EACH ROW EXECUTE FUNCTION d_trig_row();
CREATE TRIGGER d_trig_stmt AFTER UPDATE ON d_trig FOR EACH STATEMENT EXECUTE FUNCTION d_trig_stmt();
SELECT ok(cqrs_upsert('d_trig', '{"id": 1, "title": "b"}', 2), 'a table with triggers updates');
SELECT is((SELECT title FROM d_trig), 'b!', 'its row trigger fired');
SELECT is((SELECT count(*) FROM d_trig_log), 1::bigint, 'its statement trigger fired');

-- a BEFORE INSERT trigger that skips the row (returns NULL) is the table's
-- decision, as for an INSERT: nothing is inserted and the helpers return
-- false; a delta's event stays recorded (not a retryable 40001, which a sink
-- would wait on for ever)
CREATE TABLE d_skip (id bigint PRIMARY KEY, likes int NOT NULL DEFAULT 0, version bigint);
CREATE FUNCTION d_skip_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RETURN CASE WHEN NEW.id < 100 THEN NULL ELSE NEW END; END $$;
CREATE TRIGGER d_skip_row BEFORE INSERT ON d_skip FOR EACH ROW EXECUTE FUNCTION d_skip_row();
SELECT is(cqrs_upsert('d_skip', '{"id": 1}', 1), false, 'an upsert whose insert a trigger skips returns false');
SELECT is(cqrs_apply_delta('d_skip', '{"id": 1}', '{"likes": 1}', 'direct-skip', 'sk-1'), false,
          'a delta whose row a trigger skips returns false');
SELECT is((SELECT count(*) FROM d_skip), 0::bigint, 'no row was inserted');
SELECT is(cqrs_apply_delta('d_skip', '{"id": 1}', '{"likes": 1}', 'direct-skip', 'sk-1'), false,
          'the same event again: false');
SELECT is(cqrs_apply_delta('d_skip', '{"id": 100}', '{"likes": 1}', 'direct-skip', 'sk-2'), true,
          'a row the trigger lets in is created');
SELECT is((SELECT likes FROM d_skip WHERE id = 100), 1, 'with its delta');

-- rules: refused as INSERT ... ON CONFLICT refuses them (when its statement is
-- prepared, before any update), not updated behind them
CREATE TABLE d_rule (id bigint PRIMARY KEY, title text, version bigint);
CREATE TABLE d_rule_log (id bigint);
INSERT INTO d_rule VALUES (1, 'a', 1);
CREATE RULE d_rule_r AS ON UPDATE TO d_rule DO INSTEAD INSERT INTO d_rule_log VALUES (NEW.id);
SELECT throws_ok($$SELECT cqrs_upsert('d_rule', '{"id": 1, "title": "b"}', 2)$$, '0A000',
                 NULL, 'a table with an update rule');
SELECT is((SELECT title FROM d_rule), 'a', 'its row unchanged');

-- inheritance: the row of a child table is the parent's
CREATE TABLE d_parent (id bigint PRIMARY KEY, title text, version bigint);
CREATE TABLE d_child () INHERITS (d_parent);
INSERT INTO d_child VALUES (5, 'kid', 1);
SELECT ok(cqrs_upsert('d_parent', '{"id": 5, "title": "kid2"}', 2), 'a row of a child table updates');
SELECT results_eq('SELECT tableoid::regclass::text, title FROM d_parent',
                  $$VALUES ('d_child'::text, 'kid2'::text)$$, 'in the child, with no new row in the parent');

-- values that need a coercion to the column's type
CREATE DOMAIN d_positive AS integer CHECK (VALUE > 0);
CREATE TABLE d_typed (id bigint PRIMARY KEY, n d_positive, price numeric(10, 2), code varchar(3),
                      version bigint);
INSERT INTO d_typed VALUES (1, 1, 0, 'a', 1);
SELECT throws_ok($$SELECT cqrs_upsert('d_typed', '{"id": 1, "n": -1}', 2)$$, '23514',
                 NULL, 'a domain''s constraint');
SELECT throws_ok($$SELECT cqrs_upsert('d_typed', '{"id": 1, "code": "abcd"}', 3)$$, '22001',
                 NULL, 'a type modifier''s length');
SELECT ok(cqrs_upsert('d_typed', '{"id": 1, "price": 1.239}', 4), 'a numeric(10, 2) updates');
SELECT is((SELECT price FROM d_typed)::text, '1.24', 'rounded to the type modifier''s scale');

-- identity columns GENERATED ALWAYS (refused when the UPDATE is prepared)
CREATE TABLE d_identity (id bigint PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, version bigint);
INSERT INTO d_identity (id, version) VALUES (1, 1);
SELECT throws_ok($$SELECT cqrs_upsert('d_identity', '{"id": 1, "n": 5}', 2)$$, '428C9',
                 NULL, 'an identity column GENERATED ALWAYS');

-- row security without a DELETE policy: the row a delta inserted for a key
-- deleted meanwhile cannot be removed, so the call fails (before, it left
-- the row, and an older upsert then brought the deleted key back)
CREATE TABLE d_rls_del (id bigint PRIMARY KEY, likes int NOT NULL DEFAULT 0, title text,
                        version bigint NOT NULL DEFAULT 0);
ALTER TABLE d_rls_del ENABLE ROW LEVEL SECURITY;
CREATE POLICY d_rls_del_s ON d_rls_del FOR SELECT USING (true);
CREATE POLICY d_rls_del_i ON d_rls_del FOR INSERT WITH CHECK (true);
CREATE POLICY d_rls_del_u ON d_rls_del FOR UPDATE USING (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON d_rls_del TO regress_direct;
SELECT cqrs_delete('d_rls_del', '{"id": 8}', 4);
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_apply_delta('d_rls_del', '{"id": 8}', '{"likes": 1}', 'd-counter', 'late')$$,
                 '42501', 'cannot remove the row of relation "d_rls_del" this call inserted for a deleted key',
                 'row security without a DELETE policy: a delta to a deleted key fails');
SELECT ok(NOT cqrs_upsert('d_rls_del', '{"id": 8, "title": "stale"}', 3),
          '... and an older upsert does not bring the key back');
RESET ROLE;
SELECT is_empty('SELECT * FROM d_rls_del', '... the table has no row');
-- a table whose BEFORE DELETE trigger skips deletes (a soft delete): a
-- delta to a key deleted earlier is dropped before any row is made for it.
-- Before, it inserted the row and could not remove it again: it failed every
-- time, with 42501, naming row security the table does not have.  Only a
-- delete that commits while the delta runs leaves a row to remove:
-- test/isolation/specs/apply_races.spec.
CREATE TABLE d_soft_del (id bigint PRIMARY KEY, likes int NOT NULL DEFAULT 0,
                         deleted boolean NOT NULL DEFAULT false, version bigint NOT NULL DEFAULT 0);
CREATE FUNCTION d_soft_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE d_soft_del SET deleted = true WHERE id = OLD.id; RETURN NULL; END $$;
CREATE TRIGGER d_soft_del BEFORE DELETE ON d_soft_del FOR EACH ROW EXECUTE FUNCTION d_soft_del();
SELECT cqrs_delete('d_soft_del', '{"id": 8}', 4);
SELECT is(cqrs_apply_delta('d_soft_del', '{"id": 8}', '{"likes": 1}', 'd-counter', 'late'), false,
          'a soft-delete trigger: a delta to a deleted key is dropped');
SELECT is_empty('SELECT * FROM d_soft_del', '... and no row was made for it');
-- ... but a key re-created since, its row hidden from the role by row
-- security, is not taken for deleted: 42501, as for any hidden row
CREATE TABLE d_rls_hid (id bigint PRIMARY KEY, tenant text NOT NULL DEFAULT 'a',
                        likes int NOT NULL DEFAULT 0, version bigint NOT NULL DEFAULT 0);
CREATE FUNCTION d_rls_hid_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RETURN NULL; END $$;
CREATE TRIGGER d_rls_hid_del BEFORE DELETE ON d_rls_hid FOR EACH ROW EXECUTE FUNCTION d_rls_hid_del();
ALTER TABLE d_rls_hid ENABLE ROW LEVEL SECURITY;
CREATE POLICY d_rls_hid_s ON d_rls_hid FOR SELECT USING (tenant = 'a');
CREATE POLICY d_rls_hid_i ON d_rls_hid FOR INSERT WITH CHECK (true);
CREATE POLICY d_rls_hid_u ON d_rls_hid FOR UPDATE USING (tenant = 'a');
GRANT SELECT, INSERT, UPDATE, DELETE ON d_rls_hid TO regress_direct;
SELECT cqrs_delete('d_rls_hid', '{"id": 8}', 4);
INSERT INTO d_rls_hid VALUES (8, 'b', 0, 5);
SET LOCAL ROLE regress_direct;
SELECT throws_ok($$SELECT cqrs_apply_delta('d_rls_hid', '{"id": 8}', '{"likes": 1}', 'd-counter', 'hid')$$,
                 '42501', NULL, 'a soft delete under row security: a delta to a key re-created in a row the role cannot see fails');
RESET ROLE;

-- a change to a table makes its plans again; the old ones are freed.  (The
-- INSERT of an upsert was kept for ever, one per change and column set; and
-- after an error caught by a savepoint, as the throws_ok() above, no plan
-- was freed until the transaction ended.)
CREATE TABLE d_replan (id bigint PRIMARY KEY, title text, version bigint);
SELECT cqrs_upsert('d_replan', '{"id": 1, "title": "a"}', 1);
DO $$
BEGIN
    FOR i IN 2..11 LOOP
        EXECUTE format('ALTER TABLE d_replan SET (fillfactor = %s)', 80 + i);
        PERFORM cqrs_upsert('d_replan', jsonb_build_object('id', 1, 'title', 't' || i), i);
    END LOOP;
END
$$;
SELECT is((SELECT count(*) FROM pg_backend_memory_contexts
            WHERE name = 'CachedPlanSource' AND ident LIKE 'INSERT INTO public.d_replan AS t%'),
          1::bigint, 'after ten changes to a table one INSERT plan of its upserts is kept');
SELECT is((SELECT count(*) FROM pg_backend_memory_contexts
            WHERE name = 'CachedPlanSource' AND ident LIKE 'UPDATE public.d_replan AS t%'),
          1::bigint, '... and one UPDATE plan');

-- at most 64 plans per table are kept, and the memory of those let go is
-- freed: events that carry ever new sets of columns (partial updates) do not
-- grow a session's memory (the plans went, their entries stayed)
CREATE TABLE d_sets (id int PRIMARY KEY, c1 int, c2 int, c3 int, c4 int, c5 int, c6 int,
                     c7 int, c8 int, c9 int, c10 int, c11 int, c12 int, version bigint);
CREATE FUNCTION pg_temp.upsert_sets(lo int, hi int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN lo..hi LOOP
        PERFORM cqrs_upsert('d_sets', '{"id": 1}'::jsonb ||
                            (SELECT jsonb_object_agg('c' || k, 1) FROM generate_series(1, 12) k
                              WHERE ((i >> (k - 1)) & 1) = 1), i);
    END LOOP;
END
$$;
SELECT pg_temp.upsert_sets(1, 640);
CREATE TEMP TABLE d_sets_mem AS
    SELECT sum(total_bytes) AS bytes FROM pg_backend_memory_contexts WHERE name = 'cqrs_sync apply target';
SELECT pg_temp.upsert_sets(641, 1920);
SELECT cmp_ok((SELECT sum(total_bytes) FROM pg_backend_memory_contexts WHERE name = 'cqrs_sync apply target'),
              '<=', (SELECT bytes FROM d_sets_mem),
              '1,280 more sets of columns, 20 more times 64 plans let go: the targets'' memory did not grow');

-- a read-only transaction (throws_ok's subtransaction undoes the setting)
SELECT throws_ok($$SELECT set_config('transaction_read_only', 'on', true),
                          cqrs_upsert('d_plain', '{"id": 1, "title": "ro"}', 99)$$, '25006',
                 NULL, 'a read-only transaction');

SELECT * FROM finish();
ROLLBACK;
