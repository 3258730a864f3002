-- test/pgtap/apply_idempotence.sql -- the read-side helpers are idempotent
-- and order-insensitive: every helper applied 1, 2 and 5 times gives the
-- same state; versions applied in any order end at the newest; a delete is
-- not undone by an older upsert.  Runs in one transaction, rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(41);

CREATE TABLE board_detail (
    id       bigint PRIMARY KEY,
    title    text,
    body     text,
    likes    integer NOT NULL DEFAULT 0,
    comments integer NOT NULL DEFAULT 0,
    version  bigint NOT NULL DEFAULT 0
);

-- The state a consumer leaves behind: the read model, its inbox, its delta
-- memory, its tombstones.
CREATE FUNCTION pg_temp.state() RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'rows', (SELECT coalesce(jsonb_agg(to_jsonb(b) ORDER BY b.id), '[]') FROM board_detail b),
        'inbox', (SELECT count(*) FROM cqrs_inbox),
        'delta_memory', (SELECT count(*) FROM cqrs_delta_inbox),
        'tombstones', (SELECT coalesce(jsonb_agg(jsonb_build_object('key', t.key, 'version', t.version)
                                                 ORDER BY t.key), '[]')
                         FROM cqrs_tombstone t WHERE t.target = 'board_detail'::regclass))
$$;

CREATE FUNCTION pg_temp.reset() RETURNS void LANGUAGE sql AS $$
    DELETE FROM board_detail;
    DELETE FROM cqrs_inbox;
    DELETE FROM cqrs_delta_inbox;
    DELETE FROM cqrs_tombstone;
$$;

-- Runs a statement n times; returns how many runs returned true.
CREATE FUNCTION pg_temp.times(n int, stmt text) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    applied int := 0;
    r boolean;
BEGIN
    FOR i IN 1..n LOOP
        EXECUTE stmt INTO r;
        IF r THEN
            applied := applied + 1;
        END IF;
    END LOOP;
    RETURN applied;
END
$$;

--
-- Each helper on its own, 1, 2 and 5 times
--
CREATE FUNCTION pg_temp.helper_state(n int, stmt text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    applied int;
BEGIN
    PERFORM pg_temp.reset();
    INSERT INTO board_detail (id, title, version) VALUES (1, 'existing', 1);
    applied := pg_temp.times(n, stmt);
    RETURN pg_temp.state() || jsonb_build_object('applied', applied);
END
$$;

CREATE TEMP TABLE helper_calls (name text, stmt text);
INSERT INTO helper_calls VALUES
    ('cqrs_mark_processed', $$SELECT cqrs_mark_processed('board-view', 'e-1')$$),
    ('cqrs_upsert (update)', $$SELECT cqrs_upsert('board_detail', '{"id": 1, "title": "edited"}', 2)$$),
    ('cqrs_upsert (insert)', $$SELECT cqrs_upsert('board_detail', '{"id": 2, "title": "new", "body": "b"}', 1)$$),
    ('cqrs_delete (existing row)', $$SELECT cqrs_delete('board_detail', '{"id": 1}', 2)$$),
    ('cqrs_delete (missing row)', $$SELECT cqrs_delete('board_detail', '{"id": 3}', 4)$$),
    ('cqrs_apply_delta (existing row)', $$SELECT cqrs_apply_delta('board_detail', '{"id": 1}', '{"likes": 1, "comments": 2}', 'board-view', 'like-1')$$),
    ('cqrs_apply_delta (missing row)', $$SELECT cqrs_apply_delta('board_detail', '{"id": 4}', '{"likes": 1}', 'board-view', 'like-2')$$);

SELECT is(pg_temp.helper_state(2, stmt), pg_temp.helper_state(1, stmt), name || ': twice = once')
  FROM helper_calls ORDER BY name;
SELECT is(pg_temp.helper_state(5, stmt), pg_temp.helper_state(1, stmt), name || ': five times = once')
  FROM helper_calls ORDER BY name;

SELECT is(pg_temp.helper_state(1, stmt) -> 'applied', '1', name || ': applied the first time')
  FROM helper_calls ORDER BY name;

--
-- A consumer of the community events, each delivered 1, 2 or 5 times
--
CREATE TEMP TABLE events (seq int, event_id text, type text, board_id bigint,
                          payload jsonb, version bigint);
INSERT INTO events VALUES
    (1,  'e1',  'BoardCreated', 1, '{"id": 1, "title": "Hello", "body": "first board"}', 1),
    (2,  'e2',  'BoardCreated', 2, '{"id": 2, "title": "Second", "body": "another"}', 1),
    (3,  'e3',  'CommentAdded', 1, NULL, NULL),
    (4,  'e4',  'BoardLiked',   1, NULL, NULL),
    (5,  'e5',  'BoardUpdated', 1, '{"id": 1, "title": "Hello, edited"}', 2),
    (6,  'e6',  'BoardLiked',   2, NULL, NULL),
    (7,  'e7',  'CommentAdded', 1, NULL, NULL),
    (8,  'e8',  'BoardDeleted', 2, NULL, 2),
    (9,  'e9',  'BoardLiked',   1, NULL, NULL),
    (10, 'e10', 'BoardLiked',   2, NULL, NULL),   -- the board is gone: dropped
    (11, 'e11', 'BoardLiked',   3, NULL, NULL),   -- before its board: kept
    (12, 'e12', 'BoardCreated', 3, '{"id": 3, "title": "Third", "body": "late"}', 1);

-- One event in its own transaction block, the way docs/read-side.md shows.
CREATE FUNCTION pg_temp.consume(e events) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    CASE e.type
    WHEN 'BoardCreated', 'BoardUpdated' THEN
        RETURN cqrs_mark_processed('board-view', e.event_id)
               AND cqrs_upsert('board_detail', e.payload, e.version);
    WHEN 'BoardDeleted' THEN
        RETURN cqrs_mark_processed('board-view', e.event_id)
               AND cqrs_delete('board_detail', jsonb_build_object('id', e.board_id), e.version);
    WHEN 'CommentAdded' THEN
        RETURN cqrs_apply_delta('board_detail', jsonb_build_object('id', e.board_id),
                                '{"comments": 1}', 'board-view', e.event_id);
    WHEN 'BoardLiked' THEN
        RETURN cqrs_apply_delta('board_detail', jsonb_build_object('id', e.board_id),
                                '{"likes": 1}', 'board-view', e.event_id);
    END CASE;
END
$$;

-- mode 'each': every event n times in a row; 'stream': the whole stream n times
CREATE FUNCTION pg_temp.consume_all(n int, mode text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    e events;
BEGIN
    PERFORM pg_temp.reset();
    IF mode = 'each' THEN
        FOR e IN SELECT * FROM events ORDER BY seq LOOP
            FOR i IN 1..n LOOP
                PERFORM pg_temp.consume(e);
            END LOOP;
        END LOOP;
    ELSE
        FOR i IN 1..n LOOP
            FOR e IN SELECT * FROM events ORDER BY seq LOOP
                PERFORM pg_temp.consume(e);
            END LOOP;
        END LOOP;
    END IF;
    RETURN pg_temp.state();
END
$$;

SELECT is(pg_temp.consume_all(1, 'each') -> 'rows',
          '[{"id": 1, "body": "first board", "likes": 2, "title": "Hello, edited", "version": 2, "comments": 2},
            {"id": 3, "body": "late", "likes": 1, "title": "Third", "version": 1, "comments": 0}]'::jsonb,
          'the community stream builds the expected read model');
SELECT is(pg_temp.consume_all(1, 'each') -> 'tombstones',
          '[{"key": {"id": "2"}, "version": 2}]'::jsonb,
          'the deleted board leaves a tombstone');
SELECT is(pg_temp.consume_all(2, 'each'), pg_temp.consume_all(1, 'each'),
          'every event delivered twice: same state');
SELECT is(pg_temp.consume_all(5, 'each'), pg_temp.consume_all(1, 'each'),
          'every event delivered five times: same state');
SELECT is(pg_temp.consume_all(2, 'stream'), pg_temp.consume_all(1, 'each'),
          'the whole stream replayed twice: same state');
SELECT is(pg_temp.consume_all(5, 'stream'), pg_temp.consume_all(1, 'each'),
          'the whole stream replayed five times: same state');

--
-- Out of order: every order of the versions ends at the newest.  (Events
-- carry the state they change; a row has one version, so an older partial
-- update arriving after a newer one is dropped, as documented.)
--
CREATE TEMP TABLE versioned (name text, version bigint, stmt text);
INSERT INTO versioned VALUES
    ('create', 1, $$SELECT cqrs_upsert('board_detail', '{"id": 7, "title": "v1", "body": "b1"}', 1)$$),
    ('update', 2, $$SELECT cqrs_upsert('board_detail', '{"id": 7, "title": "v2", "body": "b1"}', 2)$$),
    ('update', 3, $$SELECT cqrs_upsert('board_detail', '{"id": 7, "title": "v3", "body": "b1"}', 3)$$),
    ('update', 4, $$SELECT cqrs_upsert('board_detail', '{"id": 7, "title": "v3", "body": "b4"}', 4)$$);

-- all permutations of the rows of versioned whose version is in vs
CREATE FUNCTION pg_temp.orders(vs bigint[]) RETURNS SETOF bigint[] LANGUAGE sql AS $$
    WITH RECURSIVE p(done, rest) AS (
        SELECT ARRAY[]::bigint[], vs
        UNION ALL
        SELECT done || v, array_remove(rest, v) FROM p, unnest(rest) v
    )
    SELECT done FROM p WHERE cardinality(rest) = 0
$$;

CREATE FUNCTION pg_temp.apply_in_order(o bigint[]) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    PERFORM pg_temp.reset();
    FOREACH v IN ARRAY o LOOP
        PERFORM pg_temp.times(1, (SELECT stmt FROM versioned WHERE version = v));
    END LOOP;
    RETURN pg_temp.state() - 'inbox' - 'delta_memory';
END
$$;

SELECT is(count(DISTINCT pg_temp.apply_in_order(o)), 1::bigint,
          'upserts of versions 1-4 in all 24 orders give one state')
  FROM pg_temp.orders(ARRAY[1, 2, 3, 4]) o;
SELECT is(pg_temp.apply_in_order(ARRAY[4, 2, 3, 1]) -> 'rows',
          '[{"id": 7, "body": "b4", "likes": 0, "title": "v3", "version": 4, "comments": 0}]'::jsonb,
          'that state is version 4''s');

-- with a delete among them: in any order the row ends deleted
INSERT INTO versioned VALUES
    ('delete', 5, $$SELECT cqrs_delete('board_detail', '{"id": 7}', 5)$$);
SELECT is(count(DISTINCT pg_temp.apply_in_order(o)), 1::bigint,
          'create, updates and delete in all 120 orders give one state')
  FROM pg_temp.orders(ARRAY[1, 2, 3, 4, 5]) o;
SELECT is(pg_temp.apply_in_order(ARRAY[5, 4, 3, 2, 1]),
          '{"rows": [], "tombstones": [{"key": {"id": "7"}, "version": 5}]}'::jsonb,
          'that state is: deleted, with a tombstone at version 5');

-- and a re-creation after the delete survives any order
INSERT INTO versioned VALUES
    ('recreate', 6, $$SELECT cqrs_upsert('board_detail', '{"id": 7, "title": "v6", "body": "b6"}', 6)$$);
SELECT is(count(DISTINCT pg_temp.apply_in_order(o) -> 'rows'), 1::bigint,
          'create, delete and re-create in all orders give one row')
  FROM pg_temp.orders(ARRAY[1, 3, 5, 6]) o;
SELECT is(pg_temp.apply_in_order(ARRAY[6, 5, 3, 1]) -> 'rows',
          '[{"id": 7, "body": "b6", "likes": 0, "title": "v6", "version": 6, "comments": 0}]'::jsonb,
          'that state is the re-created row');

--
-- Delete, then stale upserts
--
SELECT pg_temp.reset();
SELECT ok(cqrs_upsert('board_detail', '{"id": 8, "title": "doomed"}', 3), 'created at version 3');
SELECT ok(cqrs_delete('board_detail', '{"id": 8}', 4), 'deleted at version 4');
SELECT is(pg_temp.times(1, $$SELECT cqrs_upsert('board_detail', '{"id": 8, "title": "stale"}', 3)$$)
          + pg_temp.times(1, $$SELECT cqrs_upsert('board_detail', '{"id": 8, "title": "stale"}', 4)$$)
          + pg_temp.times(5, $$SELECT cqrs_upsert('board_detail', '{"id": 8, "title": "stale"}', 1)$$),
          0, 'upserts at versions up to the delete''s are not applied');
SELECT is_empty($$SELECT * FROM board_detail WHERE id = 8$$, 'the row stays deleted');
SELECT is(cqrs_apply_delta('board_detail', '{"id": 8}', '{"likes": 1}', 'board-view', 'late-like'),
          false, 'a delta for the deleted row is consumed but not applied');
SELECT is_empty($$SELECT * FROM board_detail WHERE id = 8$$, 'and does not bring the row back');
SELECT ok(cqrs_upsert('board_detail', '{"id": 8, "title": "reborn"}', 5), 'a newer version re-creates it');
SELECT results_eq($$SELECT title, version FROM board_detail WHERE id = 8$$,
                  $$VALUES ('reborn'::text, 5::bigint)$$, 'with the newer values');

SELECT * FROM finish();
ROLLBACK;
