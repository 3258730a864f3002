/* sql/cqrs_sync--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION cqrs_sync UPDATE TO '0.2.0'" to load this file. \quit

-- Every change made to cqrs_sync--0.2.0.sql relative to cqrs_sync--0.1.0.sql
-- is made here too, so that an updated installation has exactly the schema
-- of a fresh one (test/t/120_upgrade.pl compares pg_dump --schema-only of
-- both).  Rows are kept: nothing here drops a table that holds data.

-----------------------------------------------------------------------------
-- The relay's state: stalled partitions, window, phase timers (new layout,
-- new C entry point; the 0.1.0 one stays for databases not yet updated)
-----------------------------------------------------------------------------

DROP VIEW cqrs_stats_relay;
DROP FUNCTION cqrs_relay_state();
-- Internal: the relay's view of its own state, kept in shared memory.
CREATE FUNCTION cqrs_relay_state(
    OUT worker_pid integer,
    OUT events_sent bigint,
    OUT events_failed bigint,
    OUT batches bigint,
    OUT producer_restarts bigint,
    OUT dead_lettered bigint,
    OUT dlt_failed bigint,
    OUT last_success_at timestamptz,
    OUT last_error text,
    OUT last_error_at timestamptz,
    OUT state text,
    OUT paused_topic text,
    OUT paused_reason text,
    OUT stalled_partitions text,
    OUT "window" bigint,
    OUT transactions bigint,
    OUT acks bigint,
    OUT ack_wait_seconds double precision,
    OUT ack_wait_max_ms double precision,
    OUT record_seconds double precision,
    OUT claim_seconds double precision,
    OUT commit_seconds double precision,
    OUT flush_seconds double precision,
    OUT produce_seconds double precision,
    OUT poll_seconds double precision)
RETURNS record
AS 'MODULE_PATHNAME', 'cqrs_relay_state_0_2'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_relay_state() IS
    'Counters, phase timers and state of the relay worker since the server started (shared memory, kept across worker restarts); NULLs when cqrs_sync is not in shared_preload_libraries.';

REVOKE ALL ON FUNCTION cqrs_relay_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_relay_state() TO pg_monitor, cqrs_sync_operator;

CREATE VIEW cqrs_stats_relay AS
    SELECT (s.relay_pid IS NOT NULL)::integer AS relay_up,
           (s.relay_state IN ('paused', 'waiting for broker'))::integer AS paused,
           s.relay_state AS state,
           s.relay_paused_topic AS paused_topic,
           s.relay_paused_reason AS paused_reason,
           coalesce(s.relay_events_sent, 0) AS events_sent,
           coalesce(s.relay_events_failed, 0) AS events_failed,
           coalesce(s.relay_dead_lettered, 0) AS dead_lettered,
           coalesce(s.relay_dlt_failed, 0) AS dlt_failed,
           coalesce(s.relay_producer_restarts, 0) AS producer_restarts,
           extract(epoch FROM now() - s.relay_last_success_at)::float8 AS last_success_age_seconds,
           s.relay_last_error AS last_error,
           extract(epoch FROM now() - s.relay_last_error_at)::float8 AS last_error_age_seconds,
           s.oldest_pending_age_seconds,
           s.table_bytes,
           s.index_bytes,
           r.stalled_partitions,
           coalesce(cardinality(string_to_array(r.stalled_partitions, ', ')), 0) AS stalled_partition_count,
           coalesce(r."window", 0) AS "window",
           coalesce(r.transactions, 0) AS transactions,
           coalesce(r.acks, 0) AS acks,
           coalesce(r.ack_wait_seconds, 0) AS ack_wait_seconds,
           coalesce(r.ack_wait_max_ms, 0) AS ack_wait_max_ms,
           coalesce(r.record_seconds, 0) AS record_seconds,
           coalesce(r.claim_seconds, 0) AS claim_seconds,
           coalesce(r.commit_seconds, 0) AS commit_seconds,
           coalesce(r.flush_seconds, 0) AS flush_seconds,
           coalesce(r.produce_seconds, 0) AS produce_seconds,
           coalesce(r.poll_seconds, 0) AS poll_seconds
      FROM @extschema@.cqrs_outbox_stats() s,
           @extschema@.cqrs_relay_state() r;
COMMENT ON VIEW cqrs_stats_relay IS
    'One row: whether the relay runs and what it does (running, paused on a topic, waiting for broker, partition stalled, recording failed, no producer), its counters since the server started, ages of its last success and error, the oldest PENDING row''s age, the outbox size, the partitions whose keys wait, the rows between claim and recorded outcome (window), and the seconds spent per phase (record, claim, commit, flush, produce, poll) with the delivery reports and their total and longest wait; for exporters.';

REVOKE ALL ON cqrs_stats_relay FROM PUBLIC;
GRANT SELECT ON cqrs_stats_relay TO pg_monitor, cqrs_sync_operator;

-----------------------------------------------------------------------------
-- cqrs_discard() never races the relay
-----------------------------------------------------------------------------

CREATE FUNCTION cqrs_discard_check(id bigint, key text)
RETURNS void
AS 'MODULE_PATHNAME', 'cqrs_discard_check'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_discard_check(bigint, text) IS
    'Internal, for cqrs_discard(): keeps the relay from sending outbox row id (and later rows of its key) while the calling transaction may commit, and raises object_in_use (55006) if the relay has the row in flight already.';
REVOKE ALL ON FUNCTION cqrs_discard_check(bigint, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION cqrs_discard(id bigint, reason text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r @extschema@.cqrs_outbox;
BEGIN
    IF cqrs_discard.id IS NULL THEN
        RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF coalesce(btrim(cqrs_discard.reason), '') = '' THEN
        RAISE EXCEPTION 'a reason is required to discard an outbox row'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Say why the event may be dropped; the reason is kept in cqrs_outbox_audit.';
    END IF;
    SELECT * INTO r FROM @extschema@.cqrs_outbox o WHERE o.id = cqrs_discard.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox row % does not exist', cqrs_discard.id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF r.status = 'SENT' THEN
        RAISE EXCEPTION 'outbox row % was already sent', cqrs_discard.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Sent rows leave the outbox through cqrs_cleanup().';
    END IF;
    -- the relay must not send it from now on; refused if it is in flight
    PERFORM @extschema@.cqrs_discard_check(r.id, r.key);
    INSERT INTO @extschema@.cqrs_outbox_audit
           (action, outbox_id, event_id, topic, key, status, reason, payload)
    VALUES ('DISCARD', r.id, r.event_id, r.topic, r.key, r.status, cqrs_discard.reason, r.payload);
    DELETE FROM @extschema@.cqrs_outbox o WHERE o.id = r.id;
    RETURN true;
END
$$;
COMMENT ON FUNCTION cqrs_discard(bigint, text) IS
    'Operator: takes a PENDING, DEAD_LETTERED or DLT_FAILED row out of the outbox for good; the event, who, when and why are kept in cqrs_outbox_audit. Refused with object_in_use (55006) while the relay has the row in flight: a discarded event is never delivered.';
REVOKE ALL ON FUNCTION cqrs_discard(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_discard(bigint, text) TO cqrs_sync_operator;

COMMENT ON FUNCTION cqrs_wake_relay() IS
    'Wakes the relay when the calling transaction commits and has it scan the outbox from the start (the operator functions use it), so a row made PENDING again is sent at once.';
