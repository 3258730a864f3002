--
-- Attached outbox tables: cqrs_attach_outbox(), cqrs_detach_outbox(), the
-- trigger's mapping of a row to an event, backfill, privileges and errors.
-- No relay runs here: the rows are looked at in cqrs_outbox.
--
CREATE EXTENSION cqrs_sync;
\set VERBOSITY default
\set SHOW_CONTEXT never

-- ---- Debezium's outbox layout, the EventRouter's defaults -----------------
CREATE TABLE outboxevent (
    id            uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb
);
-- a row from before: left alone, and said so
INSERT INTO outboxevent VALUES
    ('00000000-0000-4000-8000-000000000001', 'order', '1', 'OrderCreated', '{"n": 0}');
SELECT cqrs_attach_outbox('outboxevent');
SELECT outbox, mapping, enabled FROM cqrs_attached_outboxes;
-- the view reads each mapping in a subtransaction, which a parallel plan may not start
SET force_parallel_mode = on;
SELECT outbox, mapping IS NOT NULL AS mapped FROM cqrs_attached_outboxes;
RESET force_parallel_mode;
SELECT tgname, tgtype, tgenabled FROM pg_trigger WHERE tgrelid = 'outboxevent'::regclass;

-- plain INSERTs: several rows in one statement keep their order
INSERT INTO outboxevent VALUES
    ('00000000-0000-4000-8000-000000000002', 'order', '1', 'OrderUpdated', '{"n": 1}'),
    ('00000000-0000-4000-8000-000000000003', 'customer', 'c-7', 'CustomerCreated', NULL),
    ('00000000-0000-4000-8000-000000000004', 'order', '1', 'OrderShipped', '{"n": 2, "lines": [1, 2]}');
SELECT id, event_id, topic, key, payload, headers, status FROM cqrs_outbox ORDER BY id;

-- rolled back with the application's transaction, or its subtransaction
BEGIN;
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000005', 'order', '2', 'X', '{}');
ROLLBACK;
BEGIN;
SAVEPOINT s;
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000006', 'order', '2', 'X', '{}');
ROLLBACK TO SAVEPOINT s;
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000007', 'order', '2', 'Y', '{}');
COMMIT;
SELECT event_id, key, headers->>'type' AS type FROM cqrs_outbox WHERE key = '2';

-- COPY fires the trigger too; ON CONFLICT DO NOTHING that skips does not
COPY outboxevent FROM stdin;
00000000-0000-4000-8000-000000000008	invoice	i-1	InvoiceIssued	{"total": 12.5}
\.
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000008', 'invoice', 'i-1', 'Again', '{}')
    ON CONFLICT (id) DO NOTHING;
SELECT topic, key, payload FROM cqrs_outbox WHERE key = 'i-1';

-- updates and deletes publish nothing (as the EventRouter ignores them)
UPDATE outboxevent SET payload = '{"changed": true}' WHERE aggregateid = 'i-1';
DELETE FROM outboxevent WHERE aggregateid = 'i-1';
SELECT count(*) AS events FROM cqrs_outbox;

-- a row that cannot become an event fails the application's statement
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000009', 'bad topic', '1', 'X', '{}');
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000002', 'order', '1', 'Dup', '{}');
SELECT count(*) AS events FROM cqrs_outbox;

-- twice is refused; detaching stops the flow and leaves the rest alone
SELECT cqrs_attach_outbox('outboxevent');
SELECT cqrs_detach_outbox('outboxevent');
INSERT INTO outboxevent VALUES ('00000000-0000-4000-8000-000000000010', 'order', '1', 'AfterDetach', '{}');
SELECT count(*) AS events, count(*) FILTER (WHERE status = 'PENDING') AS pending FROM cqrs_outbox;
SELECT count(*) AS rows_in_table FROM outboxevent;
SELECT count(*) AS attached FROM cqrs_attached_outboxes;
SELECT cqrs_detach_outbox('outboxevent');

-- ---- backfill: rows already there, in the order given, before any new one -
SELECT cqrs_attach_outbox('outboxevent', '{"backfill": "type <> ''OrderCreated''"}');
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT cqrs_attach_outbox('outboxevent', '{"backfill": true, "backfill_order": "id"}');
ROLLBACK;
-- rows published before (their event ids are in cqrs_outbox) are not again
SELECT cqrs_attach_outbox('outboxevent', '{"backfill": true, "backfill_order": "aggregateid DESC, id"}');
SELECT id, key, headers->>'type' AS type FROM cqrs_outbox ORDER BY id DESC LIMIT 2;
SELECT cqrs_detach_outbox('outboxevent');

-- ---- any layout by naming its columns: a JPA entity of a Spring service ----
CREATE TABLE outbox_event (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_uuid     varchar(36) NOT NULL,
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255),
    event_type     varchar(255) NOT NULL,
    payload        text NOT NULL,
    created_at     timestamp NOT NULL DEFAULT now(),
    processed_at   timestamp
);
INSERT INTO outbox_event (event_uuid, aggregate_type, aggregate_id, event_type, payload, processed_at)
VALUES ('10000000-0000-4000-8000-000000000001', 'board', '42', 'BoardCreated', '{"v": 1}', now()),
       ('10000000-0000-4000-8000-000000000002', 'board', '42', 'BoardRenamed', '{"v": 2}', NULL),
       ('10000000-0000-4000-8000-000000000003', 'board', '43', 'BoardCreated', '{"v": 1}', NULL);
SELECT cqrs_attach_outbox('outbox_event', '{
    "topic": "community.${routedByValue}.events", "route_by": "aggregate_type",
    "key": "aggregate_id", "payload": "payload", "event_id": "event_uuid",
    "headers": {"eventType": "event_type", "eventId": "event_uuid", "outboxId": "id"},
    "backfill": "processed_at IS NULL", "backfill_order": "id"}');
INSERT INTO outbox_event (event_uuid, aggregate_type, aggregate_id, event_type, payload)
VALUES ('10000000-0000-4000-8000-000000000004', 'board', NULL, 'BoardsPurged', '[]');
SELECT event_id, topic, key, payload, headers FROM cqrs_outbox
 WHERE topic LIKE 'community.%' ORDER BY id;
-- a text event id that is not a UUID, a payload that is not JSON
INSERT INTO outbox_event (event_uuid, aggregate_type, aggregate_id, event_type, payload)
VALUES ('not-a-uuid', 'board', '1', 'X', '{}');
INSERT INTO outbox_event (event_uuid, aggregate_type, aggregate_id, event_type, payload)
VALUES ('10000000-0000-4000-8000-000000000005', 'board', '1', 'X', 'plain text');
-- a column the mapping names, dropped later
ALTER TABLE outbox_event DROP COLUMN event_type;
INSERT INTO outbox_event (event_uuid, aggregate_type, aggregate_id, payload)
VALUES ('10000000-0000-4000-8000-000000000006', 'board', '1', '{}');
-- a column the mapping names, of another type now
ALTER TABLE outbox_event ALTER payload TYPE bytea USING convert_to(payload, 'UTF8');
INSERT INTO outbox_event (event_uuid, aggregate_type, aggregate_id, payload)
VALUES ('10000000-0000-4000-8000-000000000007', 'board', '1', '\x7b7d');
SELECT cqrs_detach_outbox('outbox_event');

-- a fixed topic, no event id of its own (one is generated), no headers
CREATE TABLE simple_outbox (k text, body json);
SELECT cqrs_attach_outbox('simple_outbox', '{"topic": "simple", "key": "k", "payload": "body",
                                             "event_id": null, "headers": {}}');
INSERT INTO simple_outbox VALUES ('a', '{"x": 1}');
SELECT topic, key, payload, headers, event_id IS NOT NULL AS has_event_id
  FROM cqrs_outbox WHERE topic = 'simple';

-- a partitioned table: rows routed to any partition are published
CREATE TABLE part_outbox (LIKE outboxevent) PARTITION BY LIST (aggregatetype);
CREATE TABLE part_outbox_order PARTITION OF part_outbox FOR VALUES IN ('order');
CREATE TABLE part_outbox_other PARTITION OF part_outbox DEFAULT;
SELECT cqrs_attach_outbox('part_outbox');
INSERT INTO part_outbox VALUES ('20000000-0000-4000-8000-000000000001', 'order', 'p1', 'A', '{}'),
                               ('20000000-0000-4000-8000-000000000002', 'misc', 'p2', 'B', '{}');
SELECT topic, key FROM cqrs_outbox WHERE key IN ('p1', 'p2') ORDER BY id;
SELECT outbox FROM cqrs_attached_outboxes ORDER BY outbox::text;
DROP TABLE part_outbox;
SELECT outbox FROM cqrs_attached_outboxes ORDER BY outbox::text;

-- ... and backfilled: each row once, in the order given, across partitions
-- whose rows have the same ctids
CREATE TABLE part_backfill (LIKE outboxevent, seq int NOT NULL) PARTITION BY RANGE (seq);
CREATE TABLE part_backfill_old PARTITION OF part_backfill FOR VALUES FROM (0) TO (10);
CREATE TABLE part_backfill_new PARTITION OF part_backfill FOR VALUES FROM (10) TO (20);
INSERT INTO part_backfill VALUES
    ('40000000-0000-4000-8000-000000000001', 'order', 'pb', 'E1', '{}', 1),
    ('40000000-0000-4000-8000-000000000002', 'order', 'pb', 'E2', '{}', 2),
    ('40000000-0000-4000-8000-000000000011', 'order', 'pb', 'E11', '{}', 11);
SELECT tableoid::regclass, ctid, seq FROM part_backfill ORDER BY seq;
SELECT cqrs_attach_outbox('part_backfill', '{"backfill": true, "backfill_order": "seq"}');
SELECT event_id, key FROM cqrs_outbox WHERE key = 'pb' ORDER BY id;
DROP TABLE part_backfill;

-- ---- options and tables refused ----------------------------------------------
SELECT cqrs_attach_outbox('outboxevent', '{"paylaod": "payload"}');
SELECT cqrs_attach_outbox('outboxevent', '[]');
SELECT cqrs_attach_outbox('outboxevent', '{"payload": "body"}');
SELECT cqrs_attach_outbox('outboxevent', '{"payload": null}');
SELECT cqrs_attach_outbox('outboxevent', '{"topic": ""}');
SELECT cqrs_attach_outbox('outboxevent', '{"topic": "orders", "route_by": "type"}');
SELECT cqrs_attach_outbox('outboxevent', '{"topic": "orders and more"}');
SELECT cqrs_attach_outbox('outboxevent', '{"topic": "a/${routedByValue}"}');
SELECT cqrs_attach_outbox('outboxevent', '{"route_by": null}');
SELECT cqrs_attach_outbox('outboxevent', '{"headers": {"event_id": "id"}}');
SELECT cqrs_attach_outbox('outboxevent', '{"headers": {"x": 1}}');
SELECT cqrs_attach_outbox('outboxevent', '{"headers": ["id"]}');
SELECT cqrs_attach_outbox('outboxevent', '{"backfill": 5, "backfill_order": "id"}');
SELECT cqrs_attach_outbox('outboxevent', '{"backfill_order": "id"}');
CREATE TABLE binary_outbox (id uuid, aggregatetype text, aggregateid text, type text, payload bytea);
SELECT cqrs_attach_outbox('binary_outbox');
CREATE TABLE numbered_outbox (id bigint, aggregatetype text, aggregateid text, type text, payload jsonb);
SELECT cqrs_attach_outbox('numbered_outbox');
SELECT cqrs_attach_outbox('cqrs_outbox');
CREATE VIEW outbox_view AS SELECT * FROM outboxevent;
SELECT cqrs_attach_outbox('outbox_view');
SELECT cqrs_attach_outbox(NULL);
SELECT count(*) AS attached FROM cqrs_attached_outboxes;

-- the trigger function is for cqrs_attach_outbox()'s AFTER INSERT row trigger
CREATE TRIGGER wrong BEFORE INSERT ON simple_outbox FOR EACH ROW
    EXECUTE FUNCTION cqrs_outbox_attached('{"topic": "t", "payload": "body"}');
INSERT INTO simple_outbox VALUES ('b', '{}');
DROP TRIGGER wrong ON simple_outbox;

-- ---- privileges ------------------------------------------------------------
SELECT p.oid::regprocedure AS function,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       has_function_privilege('cqrs_sync_writer', p.oid, 'EXECUTE') AS writer,
       has_function_privilege('cqrs_sync_operator', p.oid, 'EXECUTE') AS operator
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_attach_outbox', 'cqrs_detach_outbox', 'cqrs_outbox_attached',
                     'cqrs_attached_outbox_enqueue')
 ORDER BY 1;
CREATE ROLE regress_attach_app LOGIN;
CREATE ROLE regress_attach_writer LOGIN IN ROLE cqrs_sync_writer;
CREATE TABLE app_outbox (LIKE outboxevent);
ALTER TABLE app_outbox OWNER TO regress_attach_app;
GRANT INSERT ON app_outbox TO regress_attach_writer;
-- the owner, not a writer: may neither attach nor create the trigger by hand
SET ROLE regress_attach_app;
SELECT cqrs_attach_outbox('app_outbox');
CREATE TRIGGER by_hand AFTER INSERT ON app_outbox FOR EACH ROW
    EXECUTE FUNCTION cqrs_outbox_attached('{"topic": "t", "payload": "payload"}');
RESET ROLE;
-- a writer that does not own the table
SET ROLE regress_attach_writer;
SELECT cqrs_attach_outbox('app_outbox');
RESET ROLE;
-- the owner once a writer: attaches; an application role with INSERT only
-- publishes by inserting, and still cannot read the outbox
GRANT cqrs_sync_writer TO regress_attach_app;
SET ROLE regress_attach_app;
SELECT cqrs_attach_outbox('app_outbox');
RESET ROLE;
CREATE ROLE regress_attach_service LOGIN;
GRANT INSERT ON app_outbox TO regress_attach_service;
SET ROLE regress_attach_service;
INSERT INTO app_outbox VALUES ('30000000-0000-4000-8000-000000000001', 'order', 'svc', 'ByService', '{}');
SELECT count(*) FROM cqrs_outbox;
SELECT cqrs_enqueue('orders', 'k', '{}');
RESET ROLE;
SELECT topic, key, headers->>'type' AS type FROM cqrs_outbox WHERE key = 'svc';
-- publishing a row value as the trigger would needs INSERT on the table: a
-- writer without it may not forge a row (and its event id) through the mapping
CREATE ROLE regress_attach_forger LOGIN IN ROLE cqrs_sync_writer;
SET ROLE regress_attach_forger;
SELECT cqrs_attached_outbox_enqueue('app_outbox',
    ROW('30000000-0000-4000-8000-000000000009', 'order', 'forged', 'Forged', '{}')::app_outbox);
RESET ROLE;
SET ROLE regress_attach_writer;
SELECT cqrs_attached_outbox_enqueue('app_outbox',
    ROW('30000000-0000-4000-8000-000000000008', 'order', 'written', 'Written', '{}')::app_outbox) > 0 AS published;
RESET ROLE;
SELECT key FROM cqrs_outbox WHERE key IN ('forged', 'written');
DROP ROLE regress_attach_forger;
-- detaching needs the table's owner too
SET ROLE regress_attach_writer;
SELECT cqrs_detach_outbox('app_outbox');
RESET ROLE;
SET ROLE regress_attach_app;
SELECT cqrs_detach_outbox('app_outbox');
RESET ROLE;

-- ---- partitions: an UPDATE that moves a row to another partition inserts
-- it there, which fires the trigger of that partition: the copy is not a new
-- event, and must neither be published again nor fail the UPDATE
CREATE TABLE part_outbox (
    id            uuid NOT NULL,
    aggregatetype text NOT NULL,
    aggregateid   text NOT NULL,
    type          text NOT NULL,
    payload       jsonb,
    published     boolean NOT NULL DEFAULT false
) PARTITION BY LIST (published);
CREATE TABLE part_outbox_new PARTITION OF part_outbox FOR VALUES IN (false);
CREATE TABLE part_outbox_done PARTITION OF part_outbox FOR VALUES IN (true);
SELECT cqrs_attach_outbox('part_outbox');
INSERT INTO part_outbox VALUES ('50000000-0000-4000-8000-000000000001', 'part', 'p1', 'Made', '{}');
UPDATE part_outbox SET published = true;
SELECT tableoid::regclass, id FROM part_outbox;
SELECT event_id, topic, key FROM cqrs_outbox WHERE topic = 'outbox.event.part';
-- nor once its event has left cqrs_outbox (cleaned up after it was sent,
-- deleted on sending): moving it back publishes nothing
DELETE FROM cqrs_outbox WHERE topic = 'outbox.event.part';
UPDATE part_outbox SET published = false;
SELECT count(*) AS published_again FROM cqrs_outbox WHERE topic = 'outbox.event.part';
-- rows moved and a new row in one statement: only the new row is an event
INSERT INTO part_outbox VALUES ('50000000-0000-4000-8000-000000000002', 'part', 'p2', 'Made', '{}');
DELETE FROM cqrs_outbox WHERE topic = 'outbox.event.part';
WITH m AS (UPDATE part_outbox SET published = true RETURNING id)
INSERT INTO part_outbox SELECT '50000000-0000-4000-8000-000000000003', 'part', 'p3', 'Made', '{}', false
  FROM (SELECT count(*) FROM m) x;
SELECT tableoid::regclass, id FROM part_outbox ORDER BY id;
SELECT event_id, key FROM cqrs_outbox WHERE topic = 'outbox.event.part';
-- a partition attached on its own: a row moved out of it to a partition
-- that is not attached leaves no copy to skip, and a later row inserted into
-- it, also without an event id, is a new event
CREATE TABLE mv_outbox (id uuid, aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
                        payload jsonb, published boolean NOT NULL DEFAULT false) PARTITION BY LIST (published);
CREATE TABLE mv_outbox_new PARTITION OF mv_outbox FOR VALUES IN (false);
CREATE TABLE mv_outbox_done PARTITION OF mv_outbox FOR VALUES IN (true);
SELECT cqrs_attach_outbox('mv_outbox_new');
BEGIN;
INSERT INTO mv_outbox VALUES (NULL, 'mv', 'k1', 'Made', '{}');
UPDATE mv_outbox SET published = true;
INSERT INTO mv_outbox VALUES (NULL, 'mv', 'k2', 'Made', '{}');
COMMIT;
SELECT key FROM cqrs_outbox WHERE topic = 'outbox.event.mv' ORDER BY id;
-- ... also when one statement moves rows out and inserts a new one: the row
-- the trigger sees next is not a copy (the copies fire no trigger)
DELETE FROM cqrs_outbox WHERE topic = 'outbox.event.mv';
INSERT INTO mv_outbox VALUES (NULL, 'mv', 'k3', 'Made', '{}');
WITH m AS (UPDATE mv_outbox SET published = true WHERE NOT published RETURNING 1)
INSERT INTO mv_outbox SELECT NULL, 'mv', 'k4', 'Made', '{}', false FROM (SELECT count(*) FROM m) x;
SELECT key FROM cqrs_outbox WHERE topic = 'outbox.event.mv' ORDER BY id;
DROP TABLE mv_outbox;
-- attached on the parent, the copy fires the same trigger next: it is known
-- as the copy without an event id, also when the UPDATE changed its payload
CREATE TABLE pn_outbox (id uuid, aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
                        payload jsonb, published boolean NOT NULL DEFAULT false) PARTITION BY LIST (published);
CREATE TABLE pn_outbox_new PARTITION OF pn_outbox FOR VALUES IN (false);
CREATE TABLE pn_outbox_done PARTITION OF pn_outbox FOR VALUES IN (true);
SELECT cqrs_attach_outbox('pn_outbox');
INSERT INTO pn_outbox VALUES (NULL, 'pn', 'k1', 'Made', '{}');
UPDATE pn_outbox SET published = true, payload = '{"done": true}';
SELECT key, payload FROM cqrs_outbox WHERE topic = 'outbox.event.pn' ORDER BY id;
DROP TABLE pn_outbox;
-- without an event id the copy could not be told from a new event
SELECT cqrs_detach_outbox('part_outbox');
SELECT cqrs_attach_outbox('part_outbox', '{"event_id": null}');
SELECT cqrs_attach_outbox('part_outbox_new', '{"event_id": null}');

-- ---- inheritance: a child's rows do not fire its parent's triggers --------
CREATE TABLE inh_outbox (id uuid, aggregatetype text, aggregateid text, type text, payload jsonb);
CREATE TABLE inh_outbox_child () INHERITS (inh_outbox);
SELECT cqrs_attach_outbox('inh_outbox');
SELECT cqrs_attach_outbox('inh_outbox_child');
SELECT cqrs_detach_outbox('inh_outbox_child');

-- ---- a key or topic whose text would depend on the session's settings
-- (DateStyle, TimeZone, extra_float_digits...): the same value would get
-- another key, partition or topic in another session
CREATE TABLE typed_outbox (id uuid, at timestamptz, day date, f float8, n numeric, b boolean, payload jsonb);
SELECT cqrs_attach_outbox('typed_outbox', '{"topic": "typed", "key": "at", "event_id": "id", "headers": {}}');
SELECT cqrs_attach_outbox('typed_outbox', '{"topic": "typed.${routedByValue}", "route_by": "f", "key": null,
                                            "event_id": "id", "headers": {}}');
SELECT cqrs_attach_outbox('typed_outbox', '{"topic": "typed", "key": "day", "event_id": "id", "headers": {}}');
-- numbers other than floats, booleans and text types are the same everywhere
SELECT cqrs_attach_outbox('typed_outbox', '{"topic": "typed.${routedByValue}", "route_by": "b", "key": "n",
                                            "event_id": "id", "headers": {"at": "at"}}');
SELECT cqrs_detach_outbox('typed_outbox');

-- ---- a trigger replaced in place (CREATE OR REPLACE TRIGGER keeps its oid):
-- a session that used the old mapping uses the new one
SELECT cqrs_attach_outbox('simple_outbox', '{"topic": "simple", "key": "k", "payload": "body",
                                             "event_id": null, "headers": {}}');
INSERT INTO simple_outbox VALUES ('before-replace', '{}');
CREATE OR REPLACE TRIGGER cqrs_sync_attached AFTER INSERT ON simple_outbox FOR EACH ROW
    EXECUTE FUNCTION cqrs_outbox_attached('{"topic": "simple.replaced", "key": "k", "payload": "body", "event_id": null, "headers": {}}');
INSERT INTO simple_outbox VALUES ('after-replace', '{}');
SELECT topic, key FROM cqrs_outbox WHERE key LIKE '%-replace' ORDER BY id;
-- a trigger enabled for replication sessions only publishes nothing in others
ALTER TABLE simple_outbox ENABLE REPLICA TRIGGER cqrs_sync_attached;
SELECT outbox, enabled FROM cqrs_attached_outboxes WHERE outbox = 'simple_outbox'::regclass;
ALTER TABLE simple_outbox ENABLE TRIGGER cqrs_sync_attached;
SELECT cqrs_detach_outbox('simple_outbox');

-- ---- a trigger made by hand with a wrong argument does not break the view
CREATE TABLE handmade_outbox (payload jsonb);
CREATE TRIGGER no_mapping AFTER INSERT ON handmade_outbox FOR EACH ROW
    EXECUTE FUNCTION cqrs_outbox_attached();
CREATE TRIGGER not_json AFTER INSERT ON handmade_outbox FOR EACH ROW
    EXECUTE FUNCTION cqrs_outbox_attached('not json');
SELECT outbox, mapping, enabled FROM cqrs_attached_outboxes WHERE outbox = 'handmade_outbox'::regclass;
DROP TABLE handmade_outbox;

-- ---- a table that does not exist
SELECT cqrs_attach_outbox(4294967295::oid::regclass);
SELECT cqrs_attached_outbox_enqueue(4294967295::oid::regclass, ROW(1));

-- DROP EXTENSION refuses while a table is attached
SELECT cqrs_attach_outbox('simple_outbox', '{"topic": "simple", "key": "k", "payload": "body",
                                             "event_id": null, "headers": {}}');
DROP EXTENSION cqrs_sync;
SELECT cqrs_detach_outbox('simple_outbox');

DROP TABLE outboxevent, outbox_event, simple_outbox, binary_outbox, numbered_outbox, app_outbox,
    part_outbox, inh_outbox, typed_outbox CASCADE;
DROP ROLE regress_attach_app;
DROP ROLE regress_attach_writer;
DROP ROLE regress_attach_service;
DROP EXTENSION cqrs_sync;
