--
-- The write-side SQL surface: cqrs_outbox, cqrs_enqueue(), cqrs_outbox_stats().
-- Runs on any server; no relay is needed (nothing here waits for Kafka).
--
CREATE EXTENSION cqrs_sync;

-- objects and their shape
\d cqrs_outbox
SELECT enum_range(NULL::cqrs_outbox_status);

-- a valid event, inside a transaction that commits
BEGIN;
SELECT cqrs_enqueue('board.events', 'board-1', '{"type": "BoardCreated", "title": "hello"}') > 0 AS enqueued;
SELECT cqrs_enqueue('board.events', 'board-1', '{"type": "BoardUpdated"}', '{"trace-id": "t-1"}') > 0 AS enqueued;
COMMIT;
SELECT topic, key, payload, headers, status, retry_count, dlt_retry_count,
       next_attempt_at IS NULL AS no_backoff, event_id IS NOT NULL AS has_event_id
  FROM cqrs_outbox ORDER BY id;

-- ids follow enqueue order
SELECT array_agg(id ORDER BY id) = array_agg(id ORDER BY created_at, id) AS ordered FROM cqrs_outbox;

-- event ids are time-ordered UUIDs (cqrs_uuidv7(), RFC 9562 version 7):
-- the first 48 bits are the Unix time in ms, then the version (7); the
-- variant is 10; 62 bits are random; a session's ids strictly increase
SELECT substr(event_id::text, 15, 1) AS version,
       substr(event_id::text, 20, 1) IN ('8', '9', 'a', 'b') AS rfc_variant,
       abs(extract(epoch FROM created_at) * 1000
           - ('x' || lpad(replace(substr(event_id::text, 1, 13), '-', ''), 16, '0'))::bit(64)::bigint) < 60000
         AS time_is_the_enqueue_time
  FROM cqrs_outbox ORDER BY id;
WITH g AS (SELECT n, cqrs_uuidv7() AS u FROM generate_series(1, 10000) n)
SELECT count(DISTINCT u) AS distinct_ids, bool_and(u > prev) AS increasing,
       count(DISTINCT right(u::text, 12)) AS distinct_random_tails,
       bool_and(substr(u::text, 15, 1) = '7') AS all_version_7
  FROM (SELECT u, lag(u) OVER (ORDER BY n) AS prev FROM g) s;

-- an event of a rolled-back transaction does not exist
BEGIN;
SELECT cqrs_enqueue('board.events', 'board-2', '{"type": "BoardCreated"}') > 0 AS enqueued;
ROLLBACK;
SELECT count(*) AS board2_events FROM cqrs_outbox WHERE key = 'board-2';

-- and neither does one of a rolled-back subtransaction
BEGIN;
SAVEPOINT s;
SELECT cqrs_enqueue('board.events', 'board-3', '{}') > 0 AS enqueued;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) AS board3_events FROM cqrs_outbox WHERE key = 'board-3';

-- NULL key and JSON null payload are allowed
SELECT cqrs_enqueue('board.events', NULL, 'null') > 0 AS enqueued;

-- bad input: clear errors, nothing written
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT cqrs_enqueue(NULL, 'k', '{}');
SELECT cqrs_enqueue('', 'k', '{}');
SELECT cqrs_enqueue('bad topic', 'k', '{}');
SELECT cqrs_enqueue('..', 'k', '{}');
SELECT cqrs_enqueue(repeat('t', 250), 'k', '{}');
SELECT cqrs_enqueue('ok', 'k', NULL);
SELECT cqrs_enqueue('ok', 'k', '{}', '[1, 2]');
SELECT cqrs_enqueue('ok', 'k', '{}', '"text"');
SELECT cqrs_enqueue('ok', 'k', '{}', '{"n": 1}');
SELECT cqrs_enqueue('ok', 'k', '{}', '{"nested": {"a": "b"}}');
SELECT cqrs_enqueue('ok', 'k', '{}', '{"event_id": "forged"}');
\set VERBOSITY terse
SELECT count(*) AS rows_after_errors FROM cqrs_outbox;

-- the SQLSTATEs of those errors
CREATE FUNCTION pg_temp.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;
SELECT stmt, pg_temp.sqlstate_of(stmt) FROM (VALUES
    ($q$SELECT cqrs_enqueue(NULL, 'k', '{}')$q$),
    ($q$SELECT cqrs_enqueue('', 'k', '{}')$q$),
    ($q$SELECT cqrs_enqueue('bad topic', 'k', '{}')$q$),
    ($q$SELECT cqrs_enqueue('ok', 'k', NULL)$q$),
    ($q$SELECT cqrs_enqueue('ok', 'k', '{}', '[1]')$q$),
    ($q$SELECT cqrs_enqueue('ok', 'k', '{}', '{"n": 1}')$q$),
    ($q$SELECT cqrs_enqueue('ok', 'k', '{}', '{"event_id": "x"}')$q$),
    ($q$INSERT INTO cqrs_outbox (id, topic, payload) VALUES (1, 't', '{}')$q$)
) AS t(stmt);

-- a transaction that enqueued cannot be prepared
BEGIN;
SELECT cqrs_enqueue('board.events', 'board-4', '{}') > 0 AS enqueued;
PREPARE TRANSACTION 'cqrs_p1';
SELECT count(*) AS board4_events FROM cqrs_outbox WHERE key = 'board-4';

-- stats: counts per status and age of the oldest PENDING row
SELECT pending, sent, dead_lettered, dlt_failed, oldest_pending_age_seconds >= 0 AS age_ok
  FROM cqrs_outbox_stats();
UPDATE cqrs_outbox SET status = 'SENT' WHERE key = 'board-1';
SELECT pending, sent FROM cqrs_outbox_stats();

-- privileges: mutating functions are not for PUBLIC
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'cqrs_sync'
 WHERE p.proname IN ('cqrs_enqueue', 'cqrs_outbox_stats', 'cqrs_relay_state')
 ORDER BY 1;
SELECT has_table_privilege('public', 'cqrs_outbox', 'INSERT') AS public_insert,
       has_table_privilege('cqrs_sync_writer', 'cqrs_outbox', 'INSERT') AS writer_insert,
       has_function_privilege('cqrs_sync_writer', 'cqrs_enqueue(text,text,jsonb,jsonb)', 'EXECUTE') AS writer_enqueue,
       has_table_privilege('pg_monitor', 'cqrs_outbox', 'SELECT') AS monitor_select;
-- monitoring reads the bookkeeping columns, never an event's content
SELECT a.attname, has_column_privilege('pg_monitor', 'cqrs_outbox', a.attname, 'SELECT') AS monitor_select
  FROM pg_attribute a WHERE a.attrelid = 'cqrs_outbox'::regclass AND a.attnum > 0 ORDER BY a.attnum;

-- a role holding cqrs_sync_writer enqueues, but cannot write the outbox directly
CREATE ROLE cqrs_regress_app LOGIN IN ROLE cqrs_sync_writer;
SET ROLE cqrs_regress_app;
SELECT cqrs_enqueue('board.events', 'board-5', '{}') > 0 AS enqueued;
INSERT INTO cqrs_outbox (topic, payload) VALUES ('board.events', '{}');
RESET ROLE;
SELECT count(*) AS board5_events FROM cqrs_outbox WHERE key = 'board-5';
DROP ROLE cqrs_regress_app;

-- every object of the extension has a comment
SELECT pg_describe_object(d.classid, d.objid, 0) AS uncommented
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'cqrs_sync'
 WHERE d.deptype = 'e'
   AND obj_description(d.objid, (SELECT relname FROM pg_class WHERE oid = d.classid)) IS NULL
 ORDER BY 1;

-- every SECURITY DEFINER function pins its search_path, and PUBLIC may
-- execute none of the functions
SELECT p.oid::regprocedure AS unsafe, p.prosecdef, p.proconfig,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'cqrs_sync'
  JOIN pg_proc p ON p.oid = d.objid
 WHERE d.deptype = 'e' AND d.classid = 'pg_proc'::regclass
   AND ((p.prosecdef AND NOT coalesce(array_to_string(p.proconfig, ',') LIKE '%search_path=pg_catalog, pg_temp%', false))
        OR has_function_privilege('public', p.oid, 'EXECUTE'))
 ORDER BY 1;

-- a sequence that caches ids per session is refused before an id is taken:
-- a cached id comes after higher ones, and the relay could pass its row over
ALTER SEQUENCE cqrs_outbox_id_seq CACHE 50;
\set VERBOSITY default
SELECT cqrs_enqueue('board.events', 'board-1', '{}');
\set VERBOSITY terse
SELECT pg_temp.sqlstate_of($$SELECT cqrs_enqueue('board.events', 'board-1', '{}')$$);
SELECT last_value = (SELECT max(id) FROM cqrs_outbox) AS no_id_taken FROM cqrs_outbox_id_seq;
ALTER SEQUENCE cqrs_outbox_id_seq CACHE 1;
SELECT cqrs_enqueue('board.events', 'board-1', '{}') > 0 AS enqueued;

DROP EXTENSION cqrs_sync;
