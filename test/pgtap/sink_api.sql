-- test/pgtap/sink_api.sql -- the sink's SQL surface (issue 14), without
-- Kafka: the contract shapes (type cqrs_event, view cqrs_sink_stats), what
-- cqrs_sink_create() refuses and what it records, who may run as whom, the
-- operator functions' preconditions, audit and privileges.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(81);
SET LOCAL client_min_messages = warning;

-- ---- contract shapes ---------------------------------------------------------

SELECT has_type('cqrs_event', 'type cqrs_event exists');
SELECT results_eq($$SELECT attname::text COLLATE "default", format_type(atttypid, atttypmod) FROM pg_attribute
                     WHERE attrelid = 'cqrs_event'::regclass AND attnum > 0 ORDER BY attnum$$,
                  $$VALUES ('topic', 'text'), ('partition', 'integer'), ('offset', 'bigint'),
                           ('key', 'text'), ('payload', 'jsonb'), ('headers', 'jsonb'),
                           ('event_id', 'text'), ('ts', 'timestamp with time zone')$$,
                  'cqrs_event has the contract''s columns');
SELECT has_function('cqrs_sink_create', ARRAY['text', 'text[]', 'regprocedure', 'jsonb']);
SELECT has_function('cqrs_sink_drop', ARRAY['text']);
SELECT has_function('cqrs_sink_pause', ARRAY['text']);
SELECT has_function('cqrs_sink_resume', ARRAY['text']);
SELECT has_function('cqrs_sink_rewind', ARRAY['text', 'timestamp with time zone']);
SELECT has_function('cqrs_sink_replay', ARRAY['bigint']);
SELECT has_view('cqrs_sink_stats');
SELECT columns_are('cqrs_sink_stats',
    ARRAY['sink', 'topic', 'partition', 'position', 'high_watermark', 'lag', 'lag_seconds',
          'applied', 'duplicates', 'retried', 'dead_lettered', 'failed', 'held', 'in_dlt',
          'dlt_failed', 'worker_pid', 'last_event_at', 'updated_at'],
    'cqrs_sink_stats has the contract''s columns (and more)');

-- ---- setup -------------------------------------------------------------------------

CREATE ROLE regress_sink_ops LOGIN IN ROLE cqrs_sync_operator;
CREATE ROLE regress_view NOLOGIN IN ROLE cqrs_sync_reader;
CREATE ROLE regress_other NOLOGIN;
CREATE ROLE regress_view_ops NOLOGIN IN ROLE cqrs_sync_operator, cqrs_sync_reader;
CREATE ROLE regress_nobody LOGIN;
GRANT regress_view, regress_view_ops TO regress_sink_ops;
CREATE TABLE sink_t (id bigint PRIMARY KEY, title text, version bigint);
CREATE TABLE sink_nopk (id bigint, version bigint);
CREATE FUNCTION sink_h(e cqrs_event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION sink_bad(e cqrs_event) RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION sink_private(e cqrs_event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
REVOKE EXECUTE ON FUNCTION sink_private(cqrs_event) FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON sink_t TO regress_view, regress_view_ops;

-- ---- what cqrs_sink_create() refuses ------------------------------------------------

SELECT throws_ok($$SELECT cqrs_sink_create('bad name', ARRAY['t'], 'sink_h(cqrs_event)')$$,
                 '22023', 'invalid sink name "bad name"', 'a sink name is a topic-safe name');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY[]::text[], 'sink_h(cqrs_event)')$$,
                 '22023', 'a sink needs at least one topic', 'at least one topic');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['no spaces'], 'sink_h(cqrs_event)')$$,
                 '22023', 'invalid topic name "no spaces"', 'topics are valid Kafka topic names');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['a', 'a'], 'sink_h(cqrs_event)')$$,
                 '22023', 'topics must not repeat a topic', 'no topic twice');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"retries": 3}')$$,
                 '22023', 'unknown sink option "retries"', 'unknown options are refused');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_bad(cqrs_event)')$$,
                 '22023', NULL, 'a handler returns void');
SELECT throws_like($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_bad(cqrs_event)')$$,
                   '%must be a function f(e cqrs_event) RETURNS void%', '... with a message saying so');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"route": {"target": "sink_t"}}')$$,
                 '22023', 'a sink has a handler or a route, not both', 'not both a handler and a route');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], NULL)$$,
                 '22023', 'a sink without a handler needs options.route, an object with a target',
                 'a route without a handler');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], NULL, '{"route": {"target": "sink_nopk"}}')$$,
                 '22023', 'route target public.sink_nopk has no primary key', 'a route target has a primary key');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], NULL, '{"route": {"target": "sink_t", "when": 1}}')$$,
                 '22023', 'unknown route option "when"', 'unknown route options are refused');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], NULL, '{"route": {"target": "no_such_table"}}')$$,
                 '42P01', NULL, 'a route target exists');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"max_retries": -1}')$$,
                 '22023', 'max_retries must be an integer from 0 to 1000', 'max_retries in range');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"retry_backoff": "2 hours"}')$$,
                 '22023', NULL, 'retry_backoff at most an hour');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"start": "middle"}')$$,
                 '22023', 'start must be "earliest" or "latest"', 'start is earliest or latest');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"dlt_topic": "x", "dlt_suffix": ".y"}')$$,
                 '22023', 'give dlt_topic or dlt_suffix, not both', 'one way to name dead-letter topics');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY[repeat('t', 245)], 'sink_h(cqrs_event)')$$,
                 '22023', NULL, 'the dead-letter topic name must fit Kafka''s 249 characters');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"dlt_topic": "t"}')$$,
                 '22023', NULL, 'a topic is not its own dead-letter topic');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"run_as": "regress_no_such_role"}')$$,
                 '42704', 'role "regress_no_such_role" does not exist', 'run_as must exist');

-- ---- who runs as whom -----------------------------------------------------------------

SET SESSION AUTHORIZATION regress_nobody;
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)')$$,
                 '42501', NULL, 'PUBLIC may not create sinks');
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION regress_sink_ops;
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_h(cqrs_event)', '{"run_as": "regress_other"}')$$,
                 '42501', 'permission denied to create a sink that runs as role "regress_other"',
                 'an operator may not run a sink as a role it is not a member of');
SELECT throws_ok($$SELECT cqrs_sink_create('s', ARRAY['t'], 'sink_private(cqrs_event)', '{"run_as": "regress_view"}')$$,
                 '42501', NULL, 'the sink''s role must be allowed to execute the handler');
SELECT lives_ok($$SELECT cqrs_sink_create('s1', ARRAY['topic-a', 'topic-b'], 'sink_h(cqrs_event)',
                                         '{"run_as": "regress_view", "retry_backoff": "500ms", "max_retries": 3}')$$,
                'an operator creates a sink that runs as a role it belongs to');
SET ROLE regress_view_ops;
SELECT lives_ok($$SELECT cqrs_sink_create('s2', ARRAY['topic-a'], NULL,
                                         '{"route": {"target": "sink_t", "delete": "deleted"}, "consumer": "s2-consumer", "group_id": "g2", "dlt_topic": "read.DLT"}')$$,
                'without run_as, the sink runs as the acting role (SET ROLE)');
RESET ROLE;
RESET SESSION AUTHORIZATION;

SELECT results_eq($$SELECT name COLLATE "default", run_as, consumer COLLATE "default", group_id, handler::text, options FROM cqrs_sink ORDER BY name$$,
                  $$VALUES ('s1'::text, 'regress_view'::text, 's1'::text, ('cqrs_sync.' || current_database() || '.s1') COLLATE "default",
                            'public.sink_h(public.cqrs_event)'::text, '{"max_retries": 3, "retry_backoff": 500}'::jsonb),
                           ('s2', 'regress_view_ops', 's2-consumer', 'g2', NULL,
                            '{"route": {"target": "public.sink_t", "delete": "deleted"}, "dlt_topic": "read.DLT"}')$$,
                  'the sinks as recorded: role, consumer, group, handler, options normalized');
SELECT results_eq($$SELECT consumer COLLATE "default", owner FROM cqrs_consumer WHERE consumer IN ('s1', 's2-consumer') ORDER BY 1$$,
                  $$VALUES ('s1'::text, 'regress_view'::text), ('s2-consumer', 'regress_view_ops')$$,
                  'their consumers belong to their role');
SELECT results_eq($$SELECT action, sink, actor, session_user_name FROM cqrs_sink_audit ORDER BY audit_id$$,
                  $$VALUES ('CREATE'::text, 's1'::text, 'regress_sink_ops'::text, 'regress_sink_ops'::text),
                           ('CREATE', 's2', 'regress_view_ops', 'regress_sink_ops')$$,
                  'creations are audited with the role acted as and the person');
SELECT throws_ok($$SELECT cqrs_sink_create('s1', ARRAY['t'], 'sink_h(cqrs_event)')$$,
                 '42710', 'sink "s1" already exists', 'a name is taken once');
SELECT throws_ok($$SELECT cqrs_sink_create('s3', ARRAY['t'], 'sink_h(cqrs_event)', '{"run_as": "regress_other", "consumer": "s1"}')$$,
                 '42501', 'consumer "s1" belongs to role "regress_view"',
                 'a sink may not use another role''s consumer');

-- ---- operator functions --------------------------------------------------------------

SET SESSION AUTHORIZATION regress_sink_ops;
SELECT lives_ok($$SELECT cqrs_sink_pause('s1')$$, 'pause');
SELECT is((SELECT paused FROM cqrs_sink WHERE name = 's1'), true, 'paused');
SELECT lives_ok($$SELECT cqrs_sink_resume('s1')$$, 'resume');
SELECT is((SELECT paused FROM cqrs_sink WHERE name = 's1'), false, 'resumed');
SELECT throws_ok($$SELECT cqrs_sink_pause('nope')$$, '42704', 'sink "nope" does not exist', 'no such sink');
SELECT throws_ok($$SELECT cqrs_sink_forget_applied('s1')$$, '55000', 'sink "s1" must be paused to forget what it applied',
                 'forgetting what a running sink applied is refused');
SELECT throws_ok($$SELECT cqrs_sink_rewind('s1', 'topic-c', 0, 0)$$, '22023', 'sink "s1" does not consume topic "topic-c"',
                 'a rewind to an offset names one of the sink''s topics');
SELECT is(cqrs_sink_rewind('s1', 'topic-a', 2, 40), NULL::bigint, 'a rewind of a partition without position returns NULL');
RESET SESSION AUTHORIZATION;

-- held events of s1 as a worker leaves them
INSERT INTO cqrs_sink_offset (sink, topic, "partition", next_offset) VALUES ('s1', 'topic-a', 0, 50);
INSERT INTO cqrs_sink_held (sink, topic, "partition", "offset", key, value, headers, event_id, status, attempts, last_error)
VALUES ('s1', 'topic-a', 0, 10, 'k', '{"n":1}', '{"event_id":"e10"}', 'e10', 'RETRY', 1, 'boom'),
       ('s1', 'topic-a', 0, 11, 'k', '{"n":2}', '{"event_id":"e11"}', 'e11', 'BLOCKED', 0, NULL),
       ('s1', 'topic-a', 0, 5, 'j', '{"n":0}', '{"event_id":"e5"}', 'e5', 'DEAD_LETTERED', 6, 'boom'),
       ('s1', 'topic-a', 0, 3, 'i', '{"n":9}', '{"event_id":"e3"}', 'e3', 'DLT_FAILED', 6, 'boom; dead-letter topic refused');
CREATE TEMP TABLE held_ids AS SELECT event_id, id FROM cqrs_sink_held;
GRANT SELECT ON held_ids TO PUBLIC;

SET SESSION AUTHORIZATION regress_sink_ops;
SELECT throws_ok($$SELECT cqrs_sink_replay((SELECT id FROM held_ids WHERE event_id = 'e10'))$$,
                 '55000', NULL, 'an event being retried cannot be replayed');
SELECT lives_ok($$SELECT cqrs_sink_replay((SELECT id FROM held_ids WHERE event_id = 'e5'))$$,
                'a dead-lettered event is replayed');
SELECT results_eq($$SELECT status, replay, attempts, next_attempt_at <= now() FROM cqrs_sink_held WHERE event_id = 'e5'$$,
                  $$VALUES ('RETRY'::text, true, 0, true)$$, '... with a fresh budget, due now, outside its key''s order');
SELECT throws_ok($$SELECT cqrs_sink_discard((SELECT id FROM held_ids WHERE event_id = 'e3'), ' ')$$,
                 '22023', 'a reason is required to discard an event', 'a discard needs a reason');
SELECT lives_ok($$SELECT cqrs_sink_discard((SELECT id FROM held_ids WHERE event_id = 'e3'), 'pgtap: bad data')$$,
                'a DLT_FAILED event is discarded');
SELECT results_eq($$SELECT detail->>'reason', detail->>'status', convert_from(decode(detail->>'value', 'base64'), 'UTF8') COLLATE "default", actor
                      FROM cqrs_sink_audit WHERE action = 'DISCARD'$$,
                  $$VALUES ('pgtap: bad data'::text, 'DLT_FAILED'::text, '{"n":9}'::text, 'regress_sink_ops'::text)$$,
                  'the audit keeps the discarded event, why and who');
SELECT is(cqrs_sink_rewind('s1', 'topic-a', 0, 7), 50::bigint, 'a rewind to an offset returns the old position');
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT next_offset, epoch FROM cqrs_sink_offset WHERE sink = 's1' AND "partition" = 0$$,
                  $$VALUES (7::bigint, 1)$$, 'the position moved and its epoch changed (workers fetch again)');
SELECT results_eq($$SELECT event_id, status FROM cqrs_sink_held WHERE sink = 's1' ORDER BY event_id$$,
                  $$VALUES ('e5'::text, 'RETRY'::text)$$,
                  'held events at or after the new position are dropped (Kafka delivers them again); replays stay');

SET SESSION AUTHORIZATION regress_sink_ops;
SELECT lives_ok($$SELECT cqrs_sink_pause('s1')$$, 'paused again');
SELECT is(cqrs_sink_forget_applied('s1'), 0::bigint, 'a paused sink forgets what it applied (nothing yet)');
SELECT lives_ok($$SELECT cqrs_sink_drop('s1')$$, 'drop');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT count(*) FROM cqrs_sink_held WHERE sink = 's1'), 0::bigint, 'its held events went with it');
SELECT is((SELECT count(*) FROM cqrs_sink_offset WHERE sink = 's1'), 0::bigint, 'its positions too');
SELECT results_eq($$SELECT held_id IS NOT NULL, detail->>'status' FROM cqrs_sink_audit WHERE action = 'DROP' ORDER BY audit_id$$,
                  $$VALUES (true, 'RETRY'::text), (false, NULL)$$,
                  'the audit keeps the held events that went with it, then the drop');
SELECT results_eq($$SELECT string_agg(action, ',' ORDER BY audit_id) FROM cqrs_sink_audit WHERE sink = 's1'$$,
                  $$VALUES ('CREATE,PAUSE,RESUME,REWIND,REPLAY,DISCARD,REWIND,PAUSE,FORGET,DROP,DROP'::text)$$,
                  'every action on s1 is audited');

-- ---- what a caller's search_path may name ------------------------------------------------

-- cqrs_sink_create() names a route's target with the sink's search_path; no
-- operator, function or type of its own code may come from that path (it
-- runs as the extension's owner)
CREATE SCHEMA regress_evil AUTHORIZATION regress_sink_ops;
SET SESSION AUTHORIZATION regress_sink_ops;
CREATE TABLE regress_evil.called (who text);
CREATE FUNCTION regress_evil.arrow(jsonb, text) RETURNS text LANGUAGE plpgsql AS
$$ BEGIN INSERT INTO regress_evil.called VALUES (current_user); RETURN 'public.sink_t'; END $$;
CREATE OPERATOR regress_evil.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = regress_evil.arrow);
-- a statement planned after the caller's path took effect would find this
-- one before pg_catalog's, and run it as the extension's owner
CREATE FUNCTION regress_evil.set_config(text, text, boolean) RETURNS text LANGUAGE plpgsql AS
$$ BEGIN INSERT INTO regress_evil.called VALUES (current_user); RETURN pg_catalog.set_config($1, $2, $3); END $$;
SELECT lives_ok($$SELECT cqrs_sink_create('s_path', ARRAY['topic-p'], NULL,
                                         '{"route": {"target": "sink_t"}, "search_path": "regress_evil, public, pg_catalog"}')$$,
                'a route target is named with the sink''s search_path');
SELECT is_empty('SELECT who FROM regress_evil.called',
                'no operator or function of that search_path runs inside cqrs_sink_create()');
SELECT is((SELECT options->'route'->>'target' FROM cqrs_sink WHERE name = 's_path'), 'public.sink_t',
          '... and the target is the table that path names');
RESET SESSION AUTHORIZATION;

-- ---- replaying from a dead-letter topic ----------------------------------------------------

-- a replay applies a message as the sink's role: an operator who is not a
-- member of it may replay only from the sink's own dead-letter topics
SELECT cqrs_sink_create('s_replay', ARRAY['topic-r'], 'sink_h(cqrs_event)', '{"run_as": "regress_other"}');
SET SESSION AUTHORIZATION regress_sink_ops;
SELECT throws_ok($$SELECT cqrs_sink_replay('s_replay', 'scratch', 0, 0)$$,
                 '42501', 'permission denied to replay a message of topic "scratch" through sink "s_replay"',
                 'an operator outside the sink''s role may not replay from any topic');
SELECT lives_ok($$SELECT cqrs_sink_replay('s_replay', 'topic-r.s_replay.DLT', 0, 0)$$,
                '... but may from the sink''s own dead-letter topic');
RESET SESSION AUTHORIZATION;
SELECT lives_ok($$SELECT cqrs_sink_replay('s_replay', 'scratch', 0, 0)$$,
                'a member of the sink''s role may replay from a topic of its choice');
SELECT throws_ok('SELECT cqrs_sink_replay(-1)', 'P0002', 'held event -1 does not exist',
                 'replaying a held event that does not exist: P0002, as docs/sql-api.md says');
-- a whole number written with a decimal point (Python's json.dumps(5.0)) is
-- stored as an integer: the workers read every sink's max_retries as int4
SELECT lives_ok($$SELECT cqrs_sink_create('s_float', ARRAY['topic-f'], 'sink_h(cqrs_event)', '{"max_retries": 5.0}')$$,
                'max_retries 5.0 is an integer');
SELECT is((SELECT (options->>'max_retries')::int4 FROM cqrs_sink WHERE name = 's_float'), 5,
          '... stored as one, which the workers'' catalog read can take');

-- ---- privileges -------------------------------------------------------------------------

SELECT is(has_function_privilege('regress_nobody', 'cqrs_sink_pause(text)', 'EXECUTE'), false,
          'PUBLIC may not pause');
SELECT is(has_function_privilege('regress_nobody', 'cqrs_sink_set_paused(text, boolean)', 'EXECUTE'), false,
          'PUBLIC may not pause through the internal function either');
SELECT is(has_function_privilege('regress_nobody', 'cqrs_sink_replay(text, text, integer, bigint)', 'EXECUTE'), false,
          'PUBLIC may not replay from a dead-letter topic');
SELECT is(has_function_privilege('regress_nobody', 'cqrs_sink_kafka_offsets(text[], timestamptz)', 'EXECUTE'), false,
          'PUBLIC may not ask Kafka through the extension');
SELECT is(has_table_privilege('regress_nobody', 'cqrs_sink_held', 'SELECT'), false, 'PUBLIC may not read held events');
SELECT is(has_column_privilege('pg_monitor', 'cqrs_sink_held', 'value', 'SELECT'), false,
          'pg_monitor may not read held event values');
-- a handler's error may quote the event ("invalid input syntax for type
-- integer: ..."): it is the operators' to read, not the exporter's
SELECT is(has_column_privilege('pg_monitor', 'cqrs_sink_held', 'last_error', 'SELECT'), false,
          'pg_monitor may not read a held event''s error, which may quote its values');
SELECT is(has_column_privilege('pg_monitor', 'cqrs_sink_held', 'attempts', 'SELECT'), true,
          'pg_monitor reads a held event''s status, attempts and times');
SELECT is(has_table_privilege('pg_monitor', 'cqrs_sink_stats', 'SELECT'), true, 'pg_monitor reads cqrs_sink_stats');

SELECT * FROM finish();
ROLLBACK;
