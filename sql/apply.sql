--
-- apply: the read side's SQL surface -- the inbox, cqrs_upsert(),
-- cqrs_delete(), cqrs_apply_delta(), retention, privileges and errors.
--
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;
RESET client_min_messages;

--
-- Objects: comments, privileges, security
--
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
       CASE WHEN l.lanname = 'c' THEN p.prosrc END AS symbol,
       p.prosecdef AS definer, p.proconfig, p.proisstrict AS strict,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS commented,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,
       has_function_privilege('cqrs_sync_reader', p.oid, 'EXECUTE') AS reader_exec,
       has_function_privilege('cqrs_sync_operator', p.oid, 'EXECUTE') AS operator_exec
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.proname IN ('cqrs_mark_processed', 'cqrs_upsert', 'cqrs_delete',
                     'cqrs_apply_delta', 'cqrs_prune_read_side', 'cqrs_set_consumer_owner',
                     'cqrs_tombstone_key_hash', 'cqrs_consumer_changed')
 ORDER BY 1;

SELECT c.relname,
       obj_description(c.oid, 'pg_class') IS NOT NULL AS commented,
       (SELECT bool_and(col_description(c.oid, a.attnum) IS NOT NULL)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0) AS columns_commented,
       has_table_privilege('cqrs_sync_reader', c.oid, 'SELECT') AS reader_select,
       has_table_privilege('cqrs_sync_reader', c.oid, 'INSERT') AS reader_insert,
       has_table_privilege('cqrs_sync_reader', c.oid, 'UPDATE') AS reader_update,
       has_table_privilege('cqrs_sync_reader', c.oid, 'DELETE') AS reader_delete,
       has_table_privilege('public', c.oid, 'SELECT') AS public_select
  FROM pg_class c
 WHERE c.relname IN ('cqrs_inbox', 'cqrs_tombstone', 'cqrs_delta_inbox', 'cqrs_consumer')
 ORDER BY 1;

-- the four tables are dumped with the extension
SELECT c.relname
  FROM pg_extension e, unnest(e.extconfig) AS t(oid) JOIN pg_class c ON c.oid = t.oid
 WHERE e.extname = 'cqrs_sync' AND c.relname IN ('cqrs_inbox', 'cqrs_tombstone', 'cqrs_delta_inbox', 'cqrs_consumer')
 ORDER BY 1;

--
-- cqrs_mark_processed(): true the first time, false after
--
SELECT cqrs_mark_processed('board-view', 'e-1') AS first,
       cqrs_mark_processed('board-view', 'e-1') AS again,
       cqrs_mark_processed('search-index', 'e-1') AS other_consumer;
-- the inbox row goes away with the transaction
BEGIN;
SELECT cqrs_mark_processed('board-view', 'e-2');
ROLLBACK;
SELECT cqrs_mark_processed('board-view', 'e-2');
SELECT consumer, event_id FROM cqrs_inbox ORDER BY 1, 2;
SELECT cqrs_mark_processed(NULL, 'e-3');
SELECT cqrs_mark_processed('board-view', NULL);
SELECT cqrs_mark_processed('', 'e-3');

-- the settings exist once a helper ran (or cqrs_sync was preloaded)
SHOW cqrs_sync.version_column;
SHOW cqrs_sync.inbox_retention;

--
-- cqrs_upsert(): only a higher version overwrites
--
CREATE TABLE board_detail (
    id       bigint PRIMARY KEY,
    title    text NOT NULL DEFAULT '',
    body     text,
    tags     text[],
    meta     jsonb,
    likes    integer NOT NULL DEFAULT 0,
    comments integer NOT NULL DEFAULT 0,
    version  bigint NOT NULL DEFAULT 0
);

SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "Hello", "body": "first"}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "Hello again"}', 3);
SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "stale"}', 2);   -- older
SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "same"}', 3);    -- equal
-- columns missing from the row keep their value
SELECT id, title, body, version FROM board_detail;
-- keys spelled differently are the same key; the row may carry the version
SELECT cqrs_upsert('board_detail', '{"id": "1", "body": "second", "version": 4}', 4);
SELECT id, title, body, version FROM board_detail;
-- JSON values become the columns' types
SELECT cqrs_upsert('board_detail',
                   '{"id": 2, "title": "Typed", "tags": ["a", "b c", "d\"e", null],
                     "meta": {"pinned": true, "n": [1, 2]}, "likes": "7"}', 1);
SELECT id, title, tags, meta, likes, version FROM board_detail WHERE id = 2;
SELECT cqrs_upsert('board_detail', '{"id": 2, "meta": null, "tags": "{x,y}"}', 2);
SELECT id, tags, meta, version FROM board_detail WHERE id = 2;
-- a negative or huge version is just a number
SELECT cqrs_upsert('board_detail', '{"id": 3, "title": "neg"}', -5);
SELECT cqrs_upsert('board_detail', '{"id": 3, "title": "max"}', 9223372036854775807);
SELECT cqrs_upsert('board_detail', '{"id": 3, "title": "never"}', 9223372036854775807);
SELECT id, title, version FROM board_detail WHERE id = 3;

--
-- cqrs_delete(): removes the row and leaves a tombstone
--
SELECT cqrs_delete('board_detail', '{"id": 1}', 6);
SELECT cqrs_delete('board_detail', '{"id": 1}', 6);       -- again: nothing to do
SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "stale create"}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "stale update"}', 6);
SELECT count(*) FROM board_detail WHERE id = 1;
-- a higher version creates the row again
SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "reborn"}', 7);
SELECT id, title, body, version FROM board_detail WHERE id = 1;
-- an older delete does not remove a newer row, and leaves no tombstone
SELECT cqrs_delete('board_detail', '1', 6);
SELECT cqrs_delete('board_detail', '{"id": 2}', 1);
SELECT id, version FROM board_detail WHERE id IN (1, 2) ORDER BY id;
-- a delete that arrives before the create
SELECT cqrs_delete('board_detail', '{"id": 9}', 2);
SELECT cqrs_upsert('board_detail', '{"id": 9, "title": "late create"}', 1);
SELECT cqrs_delete('board_detail', '{"id": 9}', 3);       -- raises the tombstone
SELECT cqrs_delete('board_detail', '{"id": 9}', 2);       -- lower: nothing
SELECT cqrs_upsert('board_detail', '{"id": 9, "title": "v3"}', 3);
SELECT cqrs_upsert('board_detail', '{"id": 9, "title": "v4"}', 4);
SELECT target, key, version FROM cqrs_tombstone ORDER BY key;

--
-- cqrs_apply_delta(): adds once per (consumer, event, target, key)
--
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": 1, "comments": 2}', 'board-view', 'like-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": 1, "comments": 2}', 'board-view', 'like-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": -3}', 'board-view', 'unlike-1');
SELECT id, likes, comments FROM board_detail WHERE id = 2;
-- one event may add to several rows; cqrs_mark_processed() of the same
-- event id does not suppress it
SELECT cqrs_mark_processed('board-view', 'comment-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"comments": 1}', 'board-view', 'comment-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 3}', '{"comments": 1}', 'board-view', 'comment-1');
SELECT id, comments FROM board_detail WHERE id IN (2, 3) ORDER BY id;
-- a missing row is created from the deltas (other columns take defaults);
-- a deleted one is not
SELECT cqrs_apply_delta('board_detail', '{"id": 4}', '{"likes": 2}', 'board-view', 'like-2');
SELECT id, title, likes, comments, version FROM board_detail WHERE id = 4;
SELECT cqrs_upsert('board_detail', '{"id": 4, "title": "created after its like"}', 1);
SELECT id, title, likes, version FROM board_detail WHERE id = 4;
SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"likes": 1}', 'board-view', 'like-3');  -- exists
SELECT cqrs_delete('board_detail', '{"id": 1}', 8);
SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"likes": 1}', 'board-view', 'like-4');  -- deleted
SELECT count(*) FROM board_detail WHERE id = 1;
-- empty deltas only record the event
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{}', 'board-view', 'noop-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{}', 'board-view', 'noop-1');
SELECT consumer, target, event_id, key FROM cqrs_delta_inbox ORDER BY event_id, key;

--
-- Other key shapes, partitioned targets, a custom version column
--
CREATE TABLE member_stats (
    board_id bigint,
    user_name text,
    posts bigint NOT NULL DEFAULT 0,
    score numeric(10, 2) NOT NULL DEFAULT 0,
    rank real,
    version integer,
    PRIMARY KEY (board_id, user_name)
);
SELECT cqrs_apply_delta('member_stats', '{"user_name": "ann", "board_id": 1}',
                        '{"posts": 1, "score": 1.25, "rank": 0.5}', 'stats', 'p-1');
SELECT cqrs_apply_delta('member_stats', '{"board_id": 1, "user_name": "ann"}',
                        '{"posts": 1, "score": 0.25}', 'stats', 'p-2');
SELECT cqrs_upsert('member_stats', '{"board_id": 1, "user_name": "bob", "posts": 5}', 1);
SELECT * FROM member_stats ORDER BY user_name;
SELECT cqrs_delete('member_stats', '{"board_id": 1, "user_name": "bob"}', 2);
SELECT cqrs_upsert('member_stats', '{"board_id": 1, "user_name": "bob", "posts": 6}', 2);
SELECT key, version FROM cqrs_tombstone WHERE target = 'member_stats'::regclass;

CREATE TABLE region_view (id int, region text, n int NOT NULL DEFAULT 0, version bigint,
                          PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE region_view_eu PARTITION OF region_view FOR VALUES IN ('eu');
CREATE TABLE region_view_us PARTITION OF region_view FOR VALUES IN ('us');
SELECT cqrs_upsert('region_view', '{"id": 1, "region": "eu", "n": 1}', 1);
SELECT cqrs_upsert('region_view', '{"id": 1, "region": "eu", "n": 2}', 2);
SELECT cqrs_upsert('region_view', '{"id": 1, "region": "eu", "n": 0}', 1);
SELECT cqrs_delete('region_view', '{"id": 1, "region": "us"}', 5);
SELECT cqrs_upsert('region_view', '{"id": 1, "region": "us", "n": 9}', 4);
SELECT cqrs_apply_delta('region_view', '{"id": 1, "region": "eu"}', '{"n": 10}', 'r', 'r-1');
SELECT tableoid::regclass AS part, * FROM region_view ORDER BY 1, 2;

CREATE TABLE doc_view (id uuid PRIMARY KEY, body text, rev smallint);
SET cqrs_sync.version_column = 'rev';
SELECT cqrs_upsert('doc_view', '{"id": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "body": "x"}', 1);
SELECT cqrs_upsert('doc_view', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "body": "y"}', 2);
SELECT * FROM doc_view;
SELECT cqrs_upsert('doc_view', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}', 40000);
SELECT cqrs_delete('doc_view', '"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', -40000);
SELECT cqrs_upsert('board_detail', '{"id": 1}', 1);
RESET cqrs_sync.version_column;
SET cqrs_sync.version_column = '';

--
-- Errors
--
-- bad targets
CREATE TABLE no_pk (id int, version bigint);
SELECT cqrs_upsert('no_pk', '{"id": 1}', 1);
CREATE TABLE no_version (id int PRIMARY KEY);
SELECT cqrs_delete('no_version', '{"id": 1}', 1);
CREATE TABLE text_version (id int PRIMARY KEY, version text);
SELECT cqrs_upsert('text_version', '{"id": 1}', 1);
CREATE VIEW board_titles AS SELECT id, title, version FROM board_detail;
SELECT cqrs_upsert('board_titles', '{"id": 1}', 1);
CREATE TABLE deferred_pk (id int PRIMARY KEY DEFERRABLE, version bigint);
SELECT cqrs_upsert('deferred_pk', '{"id": 1}', 1);
SELECT cqrs_upsert('no_such_table', '{"id": 1}', 1);
-- bad rows
SELECT cqrs_upsert('board_detail', '{"id": 5, "titel": "typo"}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "likes": "many"}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "likes": 1.5}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5.0}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "likes": {"n": 1}}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "likes": 99999999999}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "tags": [[1], 2]}', 1);
SELECT cqrs_upsert('board_detail', '[{"id": 5}]', 1);
SELECT cqrs_upsert('board_detail', '"id"', 1);
SELECT cqrs_upsert('board_detail', '{"title": "no key"}', 1);
SELECT cqrs_upsert('board_detail', '{"id": null}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "title": null}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "version": 2}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "version": "x"}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "version": true}', 1);
SELECT cqrs_upsert('board_detail', '{"id": 5, "xmin": 1}', 1);
CREATE TABLE gen_view (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED,
                       version bigint);
SELECT cqrs_upsert('gen_view', '{"id": 1, "a": 1, "b": 2}', 1);
SELECT cqrs_upsert('gen_view', '{"id": 1, "a": 1}', 1);
SELECT * FROM gen_view;
-- bad keys
SELECT cqrs_delete('board_detail', '[1]', 1);
SELECT cqrs_delete('board_detail', '{"id": 1, "title": "x"}', 1);
SELECT cqrs_delete('board_detail', '{"nope": 1}', 1);
SELECT cqrs_delete('board_detail', '{}', 1);
SELECT cqrs_delete('board_detail', 'null', 1);
SELECT cqrs_delete('board_detail', '{"id": "one"}', 1);
SELECT cqrs_delete('member_stats', '1', 1);
SELECT cqrs_delete('member_stats', '{"board_id": 1}', 1);
-- bad deltas
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"title": 1}', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": "1"}', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": 0.5}', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"id": 1}', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"version": 1}', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": 1, "nope": 1}', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '[1]', 'c', 'bad-1');
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"likes": 2147483647}', 'c', 'bad-1');
CREATE TABLE strict_view (id int PRIMARY KEY, title text NOT NULL, likes int NOT NULL DEFAULT 0,
                          version bigint);
SELECT cqrs_apply_delta('strict_view', '{"id": 1}', '{"likes": 1}', 'c', 'bad-2');
-- failed calls recorded nothing
SELECT count(*) FROM cqrs_inbox WHERE event_id LIKE 'bad-%';
-- NULL arguments
SELECT cqrs_upsert(NULL, '{"id": 1}', 1);
SELECT cqrs_upsert('board_detail', NULL, 1);
SELECT cqrs_upsert('board_detail', '{"id": 1}', NULL);
SELECT cqrs_delete('board_detail', NULL, 1);
SELECT cqrs_delete('board_detail', '{"id": 1}', NULL);
SELECT cqrs_apply_delta('board_detail', '{"id": 1}', NULL, 'c', 'e');
SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{}', NULL, 'e');
SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{}', 'c', '');

--
-- The cache follows the table's definition
--
ALTER TABLE board_detail ADD COLUMN views bigint NOT NULL DEFAULT 0;
SELECT cqrs_apply_delta('board_detail', '{"id": 2}', '{"views": 10}', 'board-view', 'view-1');
ALTER TABLE board_detail DROP COLUMN tags;
SELECT cqrs_upsert('board_detail', '{"id": 2, "tags": ["x"]}', 10);
SELECT cqrs_upsert('board_detail', '{"id": 2, "title": "Renamed table"}', 10);
ALTER TABLE board_detail RENAME TO board_page;
SELECT cqrs_upsert('board_page', '{"id": 2, "title": "after rename"}', 11);
SELECT id, title, likes, views, version FROM board_page WHERE id = 2;
ALTER TABLE board_page RENAME TO board_detail;

--
-- Retention
--
INSERT INTO cqrs_inbox (consumer, event_id, processed_at)
VALUES ('old', 'e-old', now() - interval '30 days');
UPDATE cqrs_tombstone SET deleted_at = now() - interval '30 days'
 WHERE target = 'board_detail'::regclass AND key = '{"id": "9"}';
CREATE TABLE dropped_view (id int PRIMARY KEY, version bigint);
SELECT cqrs_delete('dropped_view', '1', 1);
DROP TABLE dropped_view;
SELECT cqrs_prune_read_side('7 days');
SELECT cqrs_prune_read_side();          -- cqrs_sync.inbox_retention
SELECT count(*) FROM cqrs_inbox WHERE consumer = 'old';
SELECT key FROM cqrs_tombstone WHERE target = 'board_detail'::regclass ORDER BY key;
SELECT cqrs_prune_read_side('-1 day');

--
-- Privileges: a read service is a member of cqrs_sync_reader
--
CREATE ROLE regress_apply_reader IN ROLE cqrs_sync_reader;
CREATE ROLE regress_apply_stranger;
GRANT SELECT, INSERT, UPDATE, DELETE ON board_detail TO regress_apply_reader;
GRANT SELECT, INSERT, UPDATE ON member_stats TO regress_apply_reader;
SET ROLE regress_apply_reader;
SELECT cqrs_mark_processed('reader', 'r-1');
SELECT cqrs_upsert('board_detail', '{"id": 20, "title": "by the reader"}', 1);
SELECT cqrs_apply_delta('board_detail', '{"id": 20}', '{"likes": 1}', 'reader', 'r-2');
SELECT cqrs_delete('board_detail', '{"id": 20}', 2);
SELECT cqrs_delete('member_stats', '{"board_id": 1, "user_name": "ann"}', 9);   -- no DELETE
SELECT cqrs_upsert('region_view', '{"id": 1, "region": "eu"}', 9);         -- no grant
DELETE FROM cqrs_inbox;
SELECT cqrs_prune_read_side('1 day');
RESET ROLE;
SET ROLE regress_apply_stranger;
SELECT cqrs_mark_processed('stranger', 's-1');
RESET ROLE;
SELECT count(*) FROM cqrs_tombstone WHERE target = 'member_stats'::regclass;
REVOKE ALL ON board_detail, member_stats FROM regress_apply_reader;
DROP ROLE regress_apply_reader;
DROP ROLE regress_apply_stranger;

DROP TABLE board_detail, member_stats, region_view, doc_view, no_pk, no_version,
    text_version, deferred_pk, gen_view, strict_view CASCADE;
DROP EXTENSION cqrs_sync;
