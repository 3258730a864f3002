-- test/pgtap/apply_values.sql -- the read-side helpers give the right
-- values (issue 13, items 6 and 7):
--  - cqrs_apply_delta() on a NULL column counts from 0 instead of leaving
--    it NULL; a row it creates starts from the columns' defaults (DEFAULT
--    100 and a delta of -10 give 90);
--  - keys that are equal for the table are one key for the tombstones:
--    numeric 42 and 42.0, float -0 and 0, citext and a nondeterministic
--    collation ('ABC' and 'abc'), one timestamptz written in two time
--    zones.  A delete of one spelling stops an older upsert of the other.
-- Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;
CREATE EXTENSION IF NOT EXISTS citext;

SELECT plan(46);

--
-- Item 6: deltas on NULL columns, and rows created from deltas
--
CREATE TABLE counters (
    id      bigint PRIMARY KEY,
    likes   integer,                          -- nullable, no default
    score   numeric NOT NULL DEFAULT 100,
    ratio   double precision DEFAULT 0.5,
    version bigint NOT NULL DEFAULT 0
);
INSERT INTO counters (id, likes, score, ratio, version) VALUES (1, NULL, 7, NULL, 1);

SELECT ok(cqrs_apply_delta('counters', '{"id": 1}', '{"likes": 1, "ratio": 0.25}', 'c', 'e-1'),
          'a delta on NULL columns is applied');
SELECT results_eq($$SELECT likes, score, ratio FROM counters WHERE id = 1$$,
                  $$VALUES (1, 7::numeric, 0.25::float8)$$,
                  'a NULL column counts from 0');
SELECT ok(NOT cqrs_apply_delta('counters', '{"id": 1}', '{"likes": 1, "ratio": 0.25}', 'c', 'e-1'),
          'the same event again is not applied');
SELECT results_eq($$SELECT likes FROM counters WHERE id = 1$$, $$VALUES (1)$$, '... and adds nothing');

SELECT ok(cqrs_apply_delta('counters', '{"id": 2}', '{"score": -10}', 'c', 'e-2'),
          'a delta on a missing row creates it');
SELECT results_eq($$SELECT likes, score, ratio, version FROM counters WHERE id = 2$$,
                  $$VALUES (NULL::integer, 90::numeric, 0.5::float8, 0::bigint)$$,
                  'the created row starts from the defaults: DEFAULT 100 and -10 give 90');
SELECT ok(cqrs_apply_delta('counters', '{"id": 3}', '{"likes": 3, "ratio": 1}', 'c', 'e-3'),
          'a missing row created from a delta on a column without default');
SELECT results_eq($$SELECT likes, score, ratio FROM counters WHERE id = 3$$,
                  $$VALUES (3, 100::numeric, 1.5::float8)$$,
                  'the column without default counts from 0, the others from their defaults');

CREATE TABLE strict_counters (id int PRIMARY KEY, n integer NOT NULL, version bigint);
SELECT ok(cqrs_apply_delta('strict_counters', '{"id": 1}', '{"n": 5}', 'c', 'e-4'),
          'a NOT NULL column without default is created from its delta');
SELECT results_eq($$SELECT n FROM strict_counters$$, $$VALUES (5)$$, '... counting from 0');

-- a delta column with a default expression that is evaluated once
CREATE SEQUENCE counter_seq START 1000;
CREATE TABLE seq_counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT nextval('counter_seq'), version bigint);
SELECT ok(cqrs_apply_delta('seq_counters', '{"id": 1}', '{"n": 1}', 'c', 'e-5'), 'a default from a sequence');
SELECT results_eq($$SELECT n FROM seq_counters$$, $$VALUES (1001::bigint)$$,
                  '... is evaluated once, and the delta added to it');

--
-- Item 7: equal keys, one tombstone
--
CREATE TABLE by_numeric (id numeric PRIMARY KEY, title text, version bigint);
SELECT cqrs_upsert('by_numeric', '{"id": 42, "title": "x"}', 1);
SELECT ok(cqrs_delete('by_numeric', '{"id": 42}', 5), 'numeric: delete 42 at version 5');
SELECT ok(NOT cqrs_upsert('by_numeric', '{"id": 42.0, "title": "stale"}', 3),
          'numeric: an older upsert of 42.0 is not applied');
SELECT is((SELECT count(*) FROM by_numeric), 0::bigint, 'numeric: 42 stays deleted');
SELECT ok(NOT cqrs_delete('by_numeric', '{"id": "42.000"}', 4), 'numeric: an older delete of 42.000 changes nothing');
SELECT ok(cqrs_delete('by_numeric', '{"id": "42.00"}', 6), 'numeric: a newer delete of 42.00 raises the tombstone');
SELECT results_eq($$SELECT count(*), max(version) FROM cqrs_tombstone WHERE target = 'by_numeric'::regclass$$,
                  $$VALUES (1::bigint, 6::bigint)$$, 'numeric: one tombstone for the key, at version 6');
SELECT ok(cqrs_upsert('by_numeric', '{"id": 42.0, "title": "new"}', 7),
          'numeric: a newer upsert creates the row again');

CREATE TABLE by_float (id double precision PRIMARY KEY, title text, version bigint);
SELECT cqrs_delete('by_float', '{"id": "-0"}', 5);
SELECT ok(NOT cqrs_upsert('by_float', '{"id": 0, "title": "stale"}', 3),
          'float: after a delete of -0, an older upsert of 0 is not applied');
SELECT is((SELECT count(*) FROM by_float), 0::bigint, 'float: the row stays deleted');

CREATE TABLE by_citext (code citext PRIMARY KEY, title text, version bigint);
SELECT cqrs_upsert('by_citext', '{"code": "ABC", "title": "x"}', 1);
SELECT cqrs_delete('by_citext', '{"code": "ABC"}', 5);
SELECT ok(NOT cqrs_upsert('by_citext', '{"code": "abc", "title": "stale"}', 3),
          'citext: after a delete of ABC, an older upsert of abc is not applied');
SELECT is((SELECT count(*) FROM by_citext), 0::bigint, 'citext: the row stays deleted');
SELECT ok(cqrs_upsert('by_citext', '{"code": "ABD", "title": "other"}', 1),
          'citext: another key is not affected');

CREATE COLLATION pgtap_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TABLE by_collation (code text COLLATE pgtap_ci PRIMARY KEY, title text, n int NOT NULL DEFAULT 0,
                           version bigint);
SELECT cqrs_delete('by_collation', '{"code": "ABC"}', 5);
SELECT ok(NOT cqrs_upsert('by_collation', '{"code": "abc", "title": "stale"}', 3),
          'nondeterministic collation: after a delete of ABC, an older upsert of abc is not applied');
SELECT is((SELECT count(*) FROM by_collation), 0::bigint, 'nondeterministic collation: the row stays deleted');
SELECT ok(NOT cqrs_apply_delta('by_collation', '{"code": "Abc"}', '{"n": 1}', 'c', 'e-6'),
          'nondeterministic collation: a delta of Abc does not create the deleted row either');

CREATE TABLE by_time (at timestamptz PRIMARY KEY, title text, version bigint);
SET LOCAL TimeZone = 'UTC';
SELECT cqrs_delete('by_time', '{"at": "2024-05-01 10:00:00+00"}', 5);
SET LOCAL TimeZone = 'Asia/Seoul';
SELECT ok(NOT cqrs_upsert('by_time', '{"at": "2024-05-01 19:00:00+09", "title": "stale"}', 3),
          'timestamptz: the same instant from a session in another time zone is the same key');
SELECT is((SELECT count(*) FROM by_time), 0::bigint, 'timestamptz: the row stays deleted');
RESET TimeZone;

-- the delta memory too: a redelivery applied from a session in another zone
CREATE TABLE likes_at (at timestamptz PRIMARY KEY, n bigint NOT NULL DEFAULT 0, version bigint);
INSERT INTO likes_at VALUES ('2024-05-01 10:00:00+00', 0);
SET LOCAL TimeZone = 'UTC';
SELECT ok(cqrs_apply_delta('likes_at', '{"at": "2024-05-01 10:00:00+00"}', '{"n": 1}', 'c', 'e-t1'),
          'timestamptz: a delta is added');
SET LOCAL TimeZone = 'Asia/Seoul';
SELECT ok(NOT cqrs_apply_delta('likes_at', '{"at": "2024-05-01 10:00:00+00"}', '{"n": 1}', 'c', 'e-t1'),
          'timestamptz: the same event again, from a session in another time zone, is not');
RESET TimeZone;
SELECT is((SELECT n FROM likes_at), 1::bigint, 'timestamptz: the delta was added once');

-- a delete of one spelling racing nothing: the upsert of the other
-- spelling with a higher version still creates the row
SELECT ok(cqrs_upsert('by_citext', '{"code": "abc", "title": "new"}', 6),
          'citext: a newer upsert of abc creates the row again');

-- a bytea key: its text follows bytea_output, which the memory does not
CREATE TABLE likes_by_blob (id bytea PRIMARY KEY, n bigint NOT NULL DEFAULT 0, version bigint);
SET LOCAL bytea_output = 'hex';
SELECT ok(cqrs_apply_delta('likes_by_blob', '{"id": "\\x0102"}', '{"n": 1}', 'c', 'e-b1'),
          'bytea: a delta is added');
SET LOCAL bytea_output = 'escape';
SELECT ok(NOT cqrs_apply_delta('likes_by_blob', '{"id": "\\x0102"}', '{"n": 1}', 'c', 'e-b1'),
          'bytea: the same event again, from a session with bytea_output = escape, is not');
RESET bytea_output;

-- a key column with a type modifier: the key is the value the row stores
-- (1.04 in a numeric(6,1) column is 1.0), for the lookup, the tombstone and
-- the delta memory alike
CREATE TABLE by_rounded (id numeric(6,1) PRIMARY KEY, title text, version bigint);
SELECT cqrs_upsert('by_rounded', '{"id": 1.04, "title": "v1"}', 1);
SELECT ok(cqrs_delete('by_rounded', '{"id": 1.04}', 2), 'numeric(6,1): the row of key 1.04 (stored 1.0) is deleted');
SELECT is((SELECT count(*) FROM by_rounded), 0::bigint, 'numeric(6,1): and is gone');
SELECT ok(NOT cqrs_upsert('by_rounded', '{"id": 1.04, "title": "stale"}', 1),
          'numeric(6,1): its tombstone stops the stale upsert');
CREATE TABLE likes_at_second (at timestamp(0) PRIMARY KEY, n bigint NOT NULL DEFAULT 0, version bigint);
SELECT cqrs_apply_delta('likes_at_second', '{"at": "2024-01-01 10:00:00.6"}', '{"n": 1}', 'c', 'e-s1');
SELECT is((SELECT n FROM likes_at_second WHERE at = '2024-01-01 10:00:01'), 1::bigint,
          'timestamp(0): a delta on a key with fractions is added to the row it rounds to');

-- a range key's text does not depend on the session's TimeZone: the same
-- delta from a session in another time zone is the same delta (before, its
-- memory held another text, and it was counted twice)
CREATE TABLE v_slots (slot tstzrange PRIMARY KEY, n int NOT NULL DEFAULT 0, version bigint);
SET LOCAL TimeZone = 'UTC';
SELECT ok(cqrs_apply_delta('v_slots', '{"slot": "[2024-05-01 00:00+00,2024-05-01 01:00+00)"}', '{"n": 1}',
                           'v-slots', 'e-1'), 'a delta to a range key');
SET LOCAL TimeZone = 'Asia/Seoul';
SELECT ok(NOT cqrs_apply_delta('v_slots', '{"slot": "[2024-05-01 00:00+00,2024-05-01 01:00+00)"}', '{"n": 1}',
                               'v-slots', 'e-1'), 'the same delta from another time zone is a duplicate');
SELECT is((SELECT n FROM v_slots), 1, '... counted once');
RESET TimeZone;

--
-- Arrays of json and jsonb: each element is a JSON value, not text in an
-- element type's input format ("a" was refused as invalid JSON, "123" and
-- "true" became a number and a boolean, a nested array another dimension)
--
CREATE TABLE docs_model (id int PRIMARY KEY, docs jsonb[], raw json[], tags text[], version bigint);
SELECT ok(cqrs_upsert('docs_model',
                      '{"id": 1, "docs": ["a", "123", 123, true, {"x": 1}, [1, 2], null],
                        "raw": ["a\"b", {"y": [true]}], "tags": ["a", "123"]}', 1),
          'arrays of jsonb, json and text are upserted');
SELECT is((SELECT docs FROM docs_model),
          ARRAY['"a"', '"123"', '123', 'true', '{"x": 1}', '[1, 2]', NULL]::jsonb[],
          'a jsonb[] keeps each JSON value: strings stay strings, a nested array is one element, null is NULL');
SELECT results_eq($$SELECT raw[1]::text, raw[2]::text FROM docs_model$$,
                  $$VALUES ('"a\"b"'::text, '{"y": [true]}'::text)$$,
                  'a json[] too');
SELECT is((SELECT tags FROM docs_model), ARRAY['a', '123'], 'a text[] takes the strings as they are');

SELECT * FROM finish();
ROLLBACK;
