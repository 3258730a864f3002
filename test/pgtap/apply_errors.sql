-- test/pgtap/apply_errors.sql -- bad targets, bad JSON and bad arguments
-- give errors that name the problem, with the SQLSTATE an application can
-- act on; and a failed call leaves nothing behind.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(43);

CREATE TABLE board_detail (
    id       bigint PRIMARY KEY,
    title    text NOT NULL DEFAULT '',
    tags     text[],
    likes    integer NOT NULL DEFAULT 0,
    version  bigint NOT NULL DEFAULT 0
);
CREATE TABLE no_pk (id int, version bigint);
CREATE TABLE no_version (id int PRIMARY KEY, title text);
CREATE TABLE text_version (id int PRIMARY KEY, version text);
CREATE TABLE small_version (id int PRIMARY KEY, version smallint);
CREATE TABLE deferred_pk (id int PRIMARY KEY DEFERRABLE, version bigint);
CREATE TABLE gen_view (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED,
                       version bigint);
CREATE TABLE strict_view (id int PRIMARY KEY, title text NOT NULL, likes int NOT NULL DEFAULT 0,
                          version bigint);
CREATE VIEW board_titles AS SELECT id, title, version FROM board_detail;
CREATE SEQUENCE some_seq;

-- bad targets
SELECT throws_ok($$SELECT cqrs_upsert('no_pk', '{"id": 1}', 1)$$,
                 '55000', 'relation "no_pk" has no primary key', 'a table without a primary key');
SELECT throws_ok($$SELECT cqrs_delete('no_pk', '{"id": 1}', 1)$$,
                 '55000', 'relation "no_pk" has no primary key', '... also for cqrs_delete()');
SELECT throws_ok($$SELECT cqrs_apply_delta('no_pk', '{"id": 1}', '{}', 'c', 'e')$$,
                 '55000', 'relation "no_pk" has no primary key', '... and cqrs_apply_delta()');
SELECT throws_ok($$SELECT cqrs_upsert('deferred_pk', '{"id": 1}', 1)$$,
                 '0A000', 'primary key of relation "deferred_pk" is deferrable', 'a deferrable primary key');
SELECT throws_ok($$SELECT cqrs_upsert('no_version', '{"id": 1}', 1)$$,
                 '42703', 'relation "no_version" has no version column "version"', 'a table without the version column');
SELECT throws_ok($$SELECT cqrs_upsert('text_version', '{"id": 1}', 1)$$,
                 '42804', 'version column "version" of relation "text_version" must be of type bigint, integer or smallint',
                 'a version column that is not an integer');
SELECT throws_ok($$SELECT cqrs_upsert('small_version', '{"id": 1}', 100000)$$,
                 '22003', 'version 100000 is out of range for version column "version" of relation "small_version"',
                 'a version the column cannot hold');
SELECT throws_ok($$SELECT cqrs_upsert('board_titles', '{"id": 1}', 1)$$,
                 '42809', '"board_titles" is not a table', 'a view');
SELECT throws_ok($$SELECT cqrs_upsert('some_seq', '{"id": 1}', 1)$$,
                 '42809', '"some_seq" is not a table', 'a sequence');
SELECT throws_ok($$SELECT cqrs_upsert('no_such_table', '{"id": 1}', 1)$$,
                 '42P01', NULL, 'a table that does not exist');
SELECT throws_ok($$SET LOCAL cqrs_sync.version_column = ''$$,
                 '22023', NULL, 'an empty cqrs_sync.version_column');

-- bad rows
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "titel": "typo"}', 1)$$,
                 '42703', 'column "titel" of relation "board_detail" does not exist', 'an unknown column');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "likes": "many"}', 1)$$,
                 '22P02', 'invalid input syntax for type integer: "many"', 'a string that is not a number');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "likes": 1.5}', 1)$$,
                 '22P02', 'invalid input syntax for type integer: "1.5"', 'a fraction for an integer');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "likes": 99999999999}', 1)$$,
                 '22003', NULL, 'a number too large for the column');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "likes": {"n": 1}}', 1)$$,
                 '42804', 'cannot convert a JSON object to type integer', 'an object for an integer');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "likes": [1]}', 1)$$,
                 '42804', 'cannot convert a JSON array to type integer', 'an array for an integer');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "tags": [[1], 2]}', 1)$$,
                 '22P02', NULL, 'a ragged array');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '[{"id": 1}]', 1)$$,
                 '22023', 'row must be a JSON object', 'a row that is an array');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '42', 1)$$,
                 '22023', 'row must be a JSON object', 'a row that is a number');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"title": "x"}', 1)$$,
                 '22023', 'row lacks primary key column "id" of relation "board_detail"', 'a row without its key');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": null}', 1)$$,
                 '22004', 'primary key column "id" must not be null', 'a null key');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "title": null}', 1)$$,
                 '23502', NULL, 'a null for a NOT NULL column');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1, "version": 2}', 1)$$,
                 '22023', 'version member "version" of the row (2) differs from the version argument (1)',
                 'a row whose version differs from the argument');
SELECT throws_ok($$SELECT cqrs_upsert('gen_view', '{"id": 1, "b": 2}', 1)$$,
                 '428C9', 'column "b" of relation "gen_view" is a generated column', 'a generated column');

-- bad keys
SELECT throws_ok($$SELECT cqrs_delete('board_detail', '[1]', 1)$$,
                 '22023', 'key must be a JSON object', 'a key that is an array');
SELECT throws_ok($$SELECT cqrs_delete('board_detail', '{"id": 1, "title": "x"}', 1)$$,
                 '22023', 'column "title" is not part of the primary key of relation "board_detail"',
                 'a key with a non-key column');
SELECT throws_ok($$SELECT cqrs_delete('board_detail', '{}', 1)$$,
                 '22023', 'key lacks primary key column "id" of relation "board_detail"', 'an empty key');
SELECT throws_ok($$SELECT cqrs_delete('board_detail', '{"id": "one"}', 1)$$,
                 '22P02', 'invalid input syntax for type bigint: "one"', 'a mistyped key');

-- bad deltas
SELECT throws_ok($$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"title": 1}', 'c', 'bad')$$,
                 '42804', 'column "title" of relation "board_detail" is not a numeric column', 'a delta on a text column');
SELECT throws_ok($$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"likes": "1"}', 'c', 'bad')$$,
                 '42804', 'delta for column "likes" must be a JSON number, not a JSON string', 'a delta that is a string');
SELECT throws_ok($$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"nope": 1}', 'c', 'bad')$$,
                 '42703', 'column "nope" of relation "board_detail" does not exist', 'a delta on an unknown column');
SELECT throws_ok($$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"version": 1}', 'c', 'bad')$$,
                 '22023', 'cannot apply a delta to version column "version" of relation "board_detail"', 'a delta on the version');
SELECT throws_ok($$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '[1]', 'c', 'bad')$$,
                 '22023', 'deltas must be a JSON object', 'deltas that are an array');
SELECT throws_ok($$SELECT cqrs_apply_delta('strict_view', '{"id": 1}', '{"likes": 1}', 'c', 'bad')$$,
                 '23502', 'cannot create the missing row {"id": "1"} of relation "strict_view" from deltas',
                 'a missing row that deltas cannot create');

-- NULL and empty arguments
SELECT throws_ok($$SELECT cqrs_mark_processed(NULL, 'e')$$, '22004', 'consumer must not be null', 'a null consumer');
SELECT throws_ok($$SELECT cqrs_mark_processed('c', '')$$, '22023', 'event_id must not be empty', 'an empty event id');
SELECT throws_ok($$SELECT cqrs_upsert(NULL, '{"id": 1}', 1)$$, '22004', 'target must not be null', 'a null target');
SELECT throws_ok($$SELECT cqrs_upsert('board_detail', '{"id": 1}', NULL)$$, '22004', 'version must not be null', 'a null version');
SELECT throws_ok($$SELECT cqrs_delete('board_detail', NULL, 1)$$, '22004', 'key must not be null', 'a null key');
SELECT throws_ok($$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{}', 'c', NULL)$$,
                 '22004', 'event_id must not be null', 'a null event id');
SELECT throws_ok($$SELECT cqrs_prune_read_side('-1 day')$$, '22023', 'older_than must not be negative', 'a negative retention');

-- failed calls changed nothing
SELECT is((SELECT count(*) FROM cqrs_inbox) + (SELECT count(*) FROM cqrs_tombstone)
          + (SELECT count(*) FROM board_detail), 0::bigint, 'no inbox entry, tombstone or row was left behind');

SELECT * FROM finish();
ROLLBACK;
