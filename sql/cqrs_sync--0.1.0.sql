/* sql/cqrs_sync--0.1.0.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION cqrs_sync" to load this file. \quit

-----------------------------------------------------------------------------
-- Roles
-----------------------------------------------------------------------------

-- Operators of the outbox (retry, discard, approve purges) are members of
-- cqrs_sync_operator; write services that enqueue events, of cqrs_sync_writer.  The role is cluster-wide, so it may already exist
-- when the extension is created in a second database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cqrs_sync_operator') THEN
        CREATE ROLE cqrs_sync_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cqrs_sync_writer') THEN
        CREATE ROLE cqrs_sync_writer NOLOGIN;
    END IF;
END
$$;

-----------------------------------------------------------------------------
-- Write side: the outbox
-----------------------------------------------------------------------------

CREATE TYPE cqrs_outbox_status AS ENUM
    ('PENDING', 'SENT', 'DEAD_LETTERED', 'DLT_FAILED');
COMMENT ON TYPE cqrs_outbox_status IS
    'Life cycle of an outbox row: PENDING until Kafka acknowledged it (SENT), or until it was written to the dead-letter topic (DEAD_LETTERED) or even that failed (DLT_FAILED).';

CREATE TABLE cqrs_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    event_id        uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    topic           text NOT NULL,
    key             text,
    payload         jsonb NOT NULL,
    headers         jsonb,
    status          cqrs_outbox_status NOT NULL DEFAULT 'PENDING',
    retry_count     integer NOT NULL DEFAULT 0,
    dlt_retry_count integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    CONSTRAINT cqrs_outbox_topic_check CHECK (topic <> ''),
    CONSTRAINT cqrs_outbox_headers_check
        CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object')
);
COMMENT ON TABLE cqrs_outbox IS
    'Transactional outbox: one row per event, written by cqrs_enqueue() in the caller''s transaction and published to Kafka by the cqrs_sync relay worker.';
COMMENT ON COLUMN cqrs_outbox.id IS 'Outbox order; events of one key reach Kafka in id order.';
COMMENT ON COLUMN cqrs_outbox.event_id IS 'Unique event id, sent as the Kafka header event_id; consumers deduplicate by it.';
COMMENT ON COLUMN cqrs_outbox.topic IS 'Kafka topic the event is published to.';
COMMENT ON COLUMN cqrs_outbox.key IS 'Kafka message key; also the unit of ordering.';
COMMENT ON COLUMN cqrs_outbox.payload IS 'Message value, sent as JSON text.';
COMMENT ON COLUMN cqrs_outbox.headers IS 'Extra Kafka headers: a JSON object of strings.';
COMMENT ON COLUMN cqrs_outbox.status IS 'PENDING, SENT, DEAD_LETTERED or DLT_FAILED.';
COMMENT ON COLUMN cqrs_outbox.retry_count IS 'Failed delivery attempts that counted against cqrs_sync.max_retries.';
COMMENT ON COLUMN cqrs_outbox.dlt_retry_count IS 'Failed attempts to publish the row to its dead-letter topic.';
COMMENT ON COLUMN cqrs_outbox.next_attempt_at IS 'A PENDING row is not sent before this time (retry backoff).';
COMMENT ON COLUMN cqrs_outbox.last_error IS 'Why the last attempt failed.';
COMMENT ON COLUMN cqrs_outbox.created_at IS 'When the event was enqueued (transaction start time).';
COMMENT ON COLUMN cqrs_outbox.sent_at IS 'When Kafka acknowledged the last message of the row''s batch.';

-- The relay's scan: only PENDING rows, in id order.
COMMENT ON SEQUENCE cqrs_outbox_id_seq IS
    'Outbox ids; the relay reads its high-water mark to keep per-key order across out-of-order commits.';

CREATE INDEX cqrs_outbox_pending_idx ON cqrs_outbox (id) WHERE status = 'PENDING';

REVOKE ALL ON cqrs_outbox FROM PUBLIC;
REVOKE ALL ON SEQUENCE cqrs_outbox_id_seq FROM PUBLIC;
GRANT SELECT ON cqrs_outbox TO pg_monitor, cqrs_sync_operator;

CREATE FUNCTION cqrs_enqueue(topic text, key text, payload jsonb,
                             headers jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cqrs_enqueue'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE
-- writers may enqueue, never insert into the outbox directly
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION cqrs_enqueue(text, text, jsonb, jsonb) IS
    'Writes an event to the outbox inside the caller''s transaction and returns its outbox id; the event exists if and only if the transaction commits.';
REVOKE ALL ON FUNCTION cqrs_enqueue(text, text, jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_enqueue(text, text, jsonb, jsonb) TO cqrs_sync_writer;

-- Internal: the relay's view of its own state, kept in shared memory.
CREATE FUNCTION cqrs_relay_state(
    OUT worker_pid integer,
    OUT events_sent bigint,
    OUT events_failed bigint,
    OUT batches bigint,
    OUT producer_restarts bigint,
    OUT last_success_at timestamptz,
    OUT last_error text,
    OUT last_error_at timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'cqrs_relay_state'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_relay_state() IS
    'Counters of the relay worker since the server started (shared memory); NULLs when cqrs_sync is not in shared_preload_libraries.';

CREATE FUNCTION cqrs_outbox_stats(
    OUT pending bigint,
    OUT sent bigint,
    OUT dead_lettered bigint,
    OUT dlt_failed bigint,
    OUT oldest_pending_age_seconds double precision,
    OUT relay_pid integer,
    OUT relay_events_sent bigint,
    OUT relay_events_failed bigint,
    OUT relay_last_success_at timestamptz,
    OUT relay_last_error text,
    OUT relay_last_error_at timestamptz)
RETURNS record
LANGUAGE sql STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.pending, c.sent, c.dead_lettered, c.dlt_failed,
           coalesce(extract(epoch FROM now() - p.oldest), 0)::float8,
           r.worker_pid, r.events_sent, r.events_failed,
           r.last_success_at, r.last_error, r.last_error_at
      FROM (SELECT count(*) FILTER (WHERE status = 'PENDING')       AS pending,
                   count(*) FILTER (WHERE status = 'SENT')          AS sent,
                   count(*) FILTER (WHERE status = 'DEAD_LETTERED') AS dead_lettered,
                   count(*) FILTER (WHERE status = 'DLT_FAILED')    AS dlt_failed
              FROM @extschema@.cqrs_outbox) c,
           (SELECT min(created_at) AS oldest
              FROM @extschema@.cqrs_outbox WHERE status = 'PENDING') p,
           @extschema@.cqrs_relay_state() r
$$;
COMMENT ON FUNCTION cqrs_outbox_stats() IS
    'One row for DBAs and exporters: rows per status, age of the oldest PENDING row in seconds, and the relay worker''s totals and last error.';
REVOKE ALL ON FUNCTION cqrs_outbox_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_outbox_stats() TO pg_monitor, cqrs_sync_operator;
REVOKE ALL ON FUNCTION cqrs_relay_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_relay_state() TO pg_monitor, cqrs_sync_operator;

-----------------------------------------------------------------------------
-- Read side (idempotent apply helpers and the inbox)
-----------------------------------------------------------------------------

-- @@READ_SIDE_BEGIN@@

-- Read services call the helpers below as members of cqrs_sync_reader (plus
-- their own privileges on the read-model tables).  The role is cluster-wide,
-- so it may already exist when the extension is created in a second database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cqrs_sync_reader') THEN
        CREATE ROLE cqrs_sync_reader NOLOGIN;
    END IF;
END
$$;

-- "C" collation: ids are compared bytewise, which is faster and does not
-- depend on the operating system's collation rules.
CREATE TABLE cqrs_inbox (
    consumer     text COLLATE "C" NOT NULL,
    event_id     text COLLATE "C" NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
COMMENT ON TABLE cqrs_inbox IS
    'Inbox of the read side: one row per (consumer, event) already applied, written by cqrs_mark_processed() and cqrs_apply_delta() in the consumer''s transaction; pruned by cqrs_prune_read_side() after cqrs_sync.inbox_retention.';
COMMENT ON COLUMN cqrs_inbox.consumer IS 'Name of the consumer (e.g. the read model or consumer group); cqrs_apply_delta() uses "<consumer>/delta/<target oid>".';
COMMENT ON COLUMN cqrs_inbox.event_id IS 'Id of the event, normally the Kafka header event_id; cqrs_apply_delta() appends the row''s key.';
COMMENT ON COLUMN cqrs_inbox.processed_at IS 'Start of the transaction that applied the event; drives retention.';

-- Retention deletes by age.
CREATE INDEX cqrs_inbox_processed_at_idx ON cqrs_inbox (processed_at);
COMMENT ON INDEX cqrs_inbox_processed_at_idx IS
    'Lets cqrs_prune_read_side() find expired inbox entries without scanning the table.';

CREATE TABLE cqrs_tombstone (
    target     regclass NOT NULL,
    key        jsonb NOT NULL,
    version    bigint NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, key)
);
COMMENT ON TABLE cqrs_tombstone IS
    'Rows removed by cqrs_delete() and the version of the delete, so that an older upsert arriving later does not bring them back; pruned by cqrs_prune_read_side() after cqrs_sync.inbox_retention.';
COMMENT ON COLUMN cqrs_tombstone.target IS 'Read-model table the row was deleted from.';
COMMENT ON COLUMN cqrs_tombstone.key IS 'Primary key of the deleted row: an object of the key columns'' text representations, e.g. {"id": "42"}.';
COMMENT ON COLUMN cqrs_tombstone.version IS 'Highest version deleted; upserts of the key with a version up to this one are ignored.';
COMMENT ON COLUMN cqrs_tombstone.deleted_at IS 'When the tombstone was written or last raised; drives retention.';

-- Both tables are state of the read model: pg_dump must keep their rows.
SELECT pg_catalog.pg_extension_config_dump('cqrs_inbox', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_tombstone', '');

-- The helpers run as their caller (SECURITY INVOKER): the caller needs its
-- own privileges on the target table and those of cqrs_sync_reader on the
-- inbox and the tombstones.
REVOKE ALL ON cqrs_inbox, cqrs_tombstone FROM PUBLIC;
GRANT SELECT, INSERT ON cqrs_inbox TO cqrs_sync_reader;
GRANT SELECT, INSERT, UPDATE ON cqrs_tombstone TO cqrs_sync_reader;
GRANT SELECT ON cqrs_inbox, cqrs_tombstone TO cqrs_sync_operator;

CREATE FUNCTION cqrs_mark_processed(consumer text, event_id text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_mark_processed'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_mark_processed(text, text) IS
    'Records that consumer processed event_id, in the caller''s transaction: true the first time, false if it was already recorded (then skip the event).';

CREATE FUNCTION cqrs_upsert(target regclass, "row" jsonb, version bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_upsert'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_upsert(regclass, jsonb, bigint) IS
    'Inserts or updates the row of target with the primary key in row (a JSON object of columns) if version is higher than the stored one and than any tombstone of the key; returns whether it was applied. Columns missing from row keep their value (or default).';

CREATE FUNCTION cqrs_delete(target regclass, key jsonb, version bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_delete'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_delete(regclass, jsonb, bigint) IS
    'Deletes the row of target with the primary key key unless its version is higher than version, and records a tombstone so that an older upsert arriving later does not bring it back; returns whether anything changed.';

CREATE FUNCTION cqrs_apply_delta(target regclass, key jsonb, deltas jsonb,
                                 consumer text, event_id text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_apply_delta'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_apply_delta(regclass, jsonb, jsonb, text, text) IS
    'Adds the numbers in deltas (e.g. {"likes": 1}) to the columns of the row of target with the primary key key, once per (consumer, event_id, target, key); creates a missing row from the deltas unless the key was deleted. Returns whether the deltas were added.';

CREATE FUNCTION cqrs_prune_read_side(older_than interval DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cqrs_prune_read_side'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION cqrs_prune_read_side(interval) IS
    'Deletes inbox entries and tombstones older than older_than (default: cqrs_sync.inbox_retention; 0 there keeps them) and tombstones of dropped tables; returns the number of rows deleted.';

REVOKE ALL ON FUNCTION cqrs_mark_processed(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_upsert(regclass, jsonb, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_delete(regclass, jsonb, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_apply_delta(regclass, jsonb, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_prune_read_side(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_mark_processed(text, text) TO cqrs_sync_reader;
GRANT EXECUTE ON FUNCTION cqrs_upsert(regclass, jsonb, bigint) TO cqrs_sync_reader;
GRANT EXECUTE ON FUNCTION cqrs_delete(regclass, jsonb, bigint) TO cqrs_sync_reader;
GRANT EXECUTE ON FUNCTION cqrs_apply_delta(regclass, jsonb, jsonb, text, text) TO cqrs_sync_reader;
GRANT EXECUTE ON FUNCTION cqrs_prune_read_side(interval) TO cqrs_sync_operator;

-- @@READ_SIDE_END@@
