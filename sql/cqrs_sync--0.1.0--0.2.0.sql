/* sql/cqrs_sync--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION cqrs_sync UPDATE TO '0.2.0'" to load this file. \quit

-- Every change made to cqrs_sync--0.2.0.sql relative to cqrs_sync--0.1.0.sql
-- is made here too, so that an updated installation has exactly the schema
-- of a fresh one (test/t/120_upgrade.pl compares pg_dump --schema-only of
-- both).  Rows are kept: nothing here drops a table that holds data.

-----------------------------------------------------------------------------
-- New events get time-ordered ids, so that the unique index on event_id
-- takes them at its right edge (rows already in the outbox keep theirs).
-----------------------------------------------------------------------------

CREATE FUNCTION cqrs_uuidv7() RETURNS uuid
AS 'MODULE_PATHNAME', 'cqrs_uuidv7'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_uuidv7() IS
    'A time-ordered UUID (version 7, RFC 9562): 48 bits of Unix time in milliseconds, 12 bits of sub-millisecond time, 62 random bits; strictly increasing within a session. The default of cqrs_outbox.event_id: the entries of recent events sit together in its unique index.';
-- only the outbox's inserts need it, and they run as its owner
REVOKE ALL ON FUNCTION cqrs_uuidv7() FROM PUBLIC;
ALTER TABLE cqrs_outbox ALTER COLUMN event_id SET DEFAULT cqrs_uuidv7();
COMMENT ON COLUMN cqrs_outbox.event_id IS 'Unique event id, sent as the Kafka header event_id; consumers deduplicate by it. Time-ordered (cqrs_uuidv7()) unless the event brought its own.';

-----------------------------------------------------------------------------
-- Monitoring sees counts, ages and errors, never an event's key, payload or
-- headers (pg_monitor had SELECT on both tables).
-----------------------------------------------------------------------------

REVOKE SELECT ON cqrs_outbox FROM pg_monitor;
GRANT SELECT (id, event_id, topic, status, retry_count, dlt_retry_count, next_attempt_at,
              last_error, created_at, sent_at, purge_approved_by, purge_approved_at)
    ON cqrs_outbox TO pg_monitor;

-- The audit records the person (the session user) besides the role acted
-- as, and cancelled purge approvals.  Rows audited before have no session
-- user: the column is added without a default, which is set afterwards.
ALTER TABLE cqrs_outbox_audit ADD COLUMN session_user_name text;
ALTER TABLE cqrs_outbox_audit ALTER COLUMN session_user_name SET DEFAULT session_user;
ALTER TABLE cqrs_outbox_audit DROP CONSTRAINT cqrs_outbox_audit_action_check;
ALTER TABLE cqrs_outbox_audit ADD CONSTRAINT cqrs_outbox_audit_action_check
    CHECK (action IN ('RETRY', 'DISCARD', 'APPROVE_PURGE', 'CANCEL_PURGE', 'PURGE',
                      'DLT_PUBLISH_FAILED'));
COMMENT ON COLUMN cqrs_outbox_audit.action IS 'RETRY, DISCARD, APPROVE_PURGE, CANCEL_PURGE, PURGE, or DLT_PUBLISH_FAILED (the relay: the row''s dead-letter publish failed).';
-- Every failed dead-letter publish counts and is audited (operator retries
-- no longer reset dlt_retry_count; the relay writes DLT_PUBLISH_FAILED rows).
COMMENT ON COLUMN cqrs_outbox.dlt_retry_count IS 'Failed attempts to publish the row to its dead-letter topic, all of them: an operator''s retry does not reset it (each attempt and its error are in cqrs_outbox_audit).';
COMMENT ON TABLE cqrs_outbox_audit IS
    'Audit trail of operator actions on outbox rows (retry, discard, purge approval), of purges of failed rows, and of the relay''s failed dead-letter publishes.';
COMMENT ON COLUMN cqrs_outbox_audit.reason IS 'Why: the operator''s reason, the row''s last error for a retry, or the errors of a failed dead-letter publish.';
COMMENT ON COLUMN cqrs_outbox_audit.approver IS 'For an approval, its cancellation and a purge: who approved the purge (the session user).';
COMMENT ON COLUMN cqrs_outbox_audit.actor IS 'Role acted as: the role set with SET ROLE, else the session user (the cleanup worker or cron job for purges).';
COMMENT ON COLUMN cqrs_outbox_audit.session_user_name IS 'Session user: the person (login role) who acted, whatever role they acted as; NULL for rows audited before version 0.2.0.';
REVOKE SELECT ON cqrs_outbox_audit FROM pg_monitor;
GRANT SELECT (audit_id, action, outbox_id, event_id, topic, status, reason, approver, actor, at,
              session_user_name)
    ON cqrs_outbox_audit TO pg_monitor;

-----------------------------------------------------------------------------
-- The relay's update to SENT becomes a HOT update (no index entry): no index
-- mentions status any more, and each page keeps room for the new versions.
-- The relay walks the primary key from its mark instead of a PENDING index;
-- failed rows are found through the index of rows with an error.
-----------------------------------------------------------------------------

-- enqueueing waits until the update commits; so do the relay and every
-- reader, since ALTER COLUMN ... SET DEFAULT above holds ACCESS EXCLUSIVE
LOCK TABLE cqrs_outbox IN EXCLUSIVE MODE;
-- new pages only: the rows already there keep their pages
ALTER TABLE cqrs_outbox SET (fillfactor = 50);
-- a failed row always has its error (0.1.0 could leave it empty)
UPDATE cqrs_outbox SET last_error = 'unknown error (failed before version 0.2.0)'
 WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND last_error IS NULL;
ALTER TABLE cqrs_outbox ADD CONSTRAINT cqrs_outbox_failed_error_check
    CHECK (status IN ('PENDING', 'SENT') OR last_error IS NOT NULL);

-- The mark starts at the lowest PENDING row (the LOCK TABLE above waited for
-- every transaction that had written to the outbox).
CREATE TABLE cqrs_relay_mark (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    scan_from bigint NOT NULL DEFAULT 1
);
COMMENT ON TABLE cqrs_relay_mark IS
    'Where the relay''s scan of the outbox starts after a restart (one row).';
COMMENT ON COLUMN cqrs_relay_mark.singleton IS 'Always true: the table has one row.';
COMMENT ON COLUMN cqrs_relay_mark.scan_from IS 'No committed outbox row below this id is PENDING; the relay moves it up about once a second while it records outcomes, the operator functions move it down.';
INSERT INTO cqrs_relay_mark (scan_from)
SELECT coalesce((SELECT min(id) FROM cqrs_outbox WHERE status = 'PENDING'),
                (SELECT max(id) + 1 FROM cqrs_outbox), 1);
REVOKE ALL ON cqrs_relay_mark FROM PUBLIC;
GRANT SELECT ON cqrs_relay_mark TO cqrs_sync_operator;

DROP INDEX cqrs_outbox_pending_idx;
DROP INDEX cqrs_outbox_failed_idx;
CREATE INDEX cqrs_outbox_error_idx ON cqrs_outbox (topic) WHERE last_error IS NOT NULL;
COMMENT ON INDEX cqrs_outbox_error_idx IS
    'Rows with an error: PENDING rows being retried, DEAD_LETTERED and DLT_FAILED rows; for the failed counts, the dead-letter topics and cleanup. The relay''s update to SENT of a row without an error leaves it alone.';

CREATE FUNCTION cqrs_relay_revisit(from_id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'cqrs_relay_revisit'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_relay_revisit(bigint) IS
    'Internal (the operator functions): a row at outbox id from_id was made PENDING again. Lowers cqrs_relay_mark.scan_from to it in the calling transaction, so that a restart goes back there too; when the transaction commits, wakes the relay and has its scan go back there.';
REVOKE ALL ON FUNCTION cqrs_relay_revisit(bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION cqrs_wake_relay()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@.cqrs_relay_revisit(1);
END
$$;

-- The stats run as the extension's owner, and estimate SENT rows on a large
-- outbox instead of counting them.
CREATE OR REPLACE FUNCTION cqrs_outbox_stats(
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
    OUT relay_last_error_at timestamptz,
    OUT table_bytes bigint,
    OUT index_bytes bigint,
    OUT relay_state text,
    OUT relay_paused_topic text,
    OUT relay_paused_reason text,
    OUT relay_dead_lettered bigint,
    OUT relay_dlt_failed bigint,
    OUT relay_producer_restarts bigint)
RETURNS record
LANGUAGE sql STABLE PARALLEL RESTRICTED
-- runs as the extension's owner: monitoring roles get the counts, and need
-- no privilege on the outbox's payloads
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- the plan's cost counts the exact SENT count of small tables, never run on
-- a large one: compiling it would take longer than the whole call
SET jit = off
AS $$
    -- PENDING rows are counted exactly by walking the primary key from the
    -- relay's mark (no committed row below it is PENDING); failed rows
    -- exactly, through the index of rows with an error.  SENT rows are the
    -- rest of the table: counted
    -- exactly while it has at most 1,000 pages (8 MB), estimated above that
    -- from the planner's statistics (live rows per page at the last VACUUM
    -- or ANALYZE, times the table's current number of pages) so that a
    -- scrape never reads a large outbox whole.
    SELECT p.pending,
           CASE WHEN sz.pages <= 1000
                THEN (SELECT count(*) FROM @extschema@.cqrs_outbox WHERE status = 'SENT')
                ELSE greatest(est.live - p.pending - f.dead_lettered - f.dlt_failed, 0)
           END,
           f.dead_lettered, f.dlt_failed,
           coalesce(extract(epoch FROM now() - o.oldest), 0)::float8,
           r.worker_pid, r.events_sent, r.events_failed,
           r.last_success_at, r.last_error, r.last_error_at,
           pg_table_size('@extschema@.cqrs_outbox'::regclass),
           pg_indexes_size('@extschema@.cqrs_outbox'::regclass),
           coalesce(r.state, 'stopped'), r.paused_topic, r.paused_reason,
           r.dead_lettered, r.dlt_failed, r.producer_restarts
      FROM (SELECT pg_relation_size('@extschema@.cqrs_outbox'::regclass)
                   / current_setting('block_size')::bigint AS pages) sz,
           LATERAL (SELECT CASE WHEN c.reltuples >= 0 AND c.relpages > 0
                                THEN round(c.reltuples / c.relpages * sz.pages)::bigint
                                ELSE pg_stat_get_live_tuples(c.oid) END AS live
                      FROM pg_class c
                     WHERE c.oid = '@extschema@.cqrs_outbox'::regclass) est,
           (SELECT coalesce((SELECT scan_from FROM @extschema@.cqrs_relay_mark), 1) AS scan_from) m,
           LATERAL (SELECT count(*) AS pending
                      FROM @extschema@.cqrs_outbox
                     WHERE id >= m.scan_from AND status = 'PENDING') p,
           (SELECT count(*) FILTER (WHERE status = 'DEAD_LETTERED') AS dead_lettered,
                   count(*) FILTER (WHERE status = 'DLT_FAILED')    AS dlt_failed
              FROM @extschema@.cqrs_outbox
             WHERE last_error IS NOT NULL AND status IN ('DEAD_LETTERED', 'DLT_FAILED')) f,
           -- the first PENDING row in outbox order
           LATERAL (SELECT (SELECT created_at FROM @extschema@.cqrs_outbox
                             WHERE id >= m.scan_from AND status = 'PENDING'
                             ORDER BY id LIMIT 1) AS oldest) o,
           @extschema@.cqrs_relay_state() r
$$;
COMMENT ON FUNCTION cqrs_outbox_stats() IS
    'One row for DBAs and exporters: rows per status (PENDING and failed rows exact; SENT rows exact up to 1,000 pages, estimated from the table''s statistics above), age in seconds of the oldest PENDING row (in outbox order), the relay worker''s state, totals and last error, and the size in bytes of the outbox table (with TOAST) and of its indexes.';

-----------------------------------------------------------------------------
-- Operators: a grace period after approvals, cancelled approvals audited,
-- approvals by the person; the cleanup's walk remembers where to start
-----------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION cqrs_retry(id bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r @extschema@.cqrs_outbox;
BEGIN
    IF cqrs_retry.id IS NULL THEN
        RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO r FROM @extschema@.cqrs_outbox o WHERE o.id = cqrs_retry.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox row % does not exist', cqrs_retry.id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF r.status = 'SENT' THEN
        RAISE EXCEPTION 'outbox row % was already sent', cqrs_retry.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only PENDING, DEAD_LETTERED and DLT_FAILED rows can be retried.';
    END IF;
    -- a row the relay has in flight (its message, or its dead letter) gets
    -- its outcome from Kafka first, which would overwrite the new budget
    IF r.status = 'PENDING' THEN
        PERFORM @extschema@.cqrs_discard_check(r.id, r.key);
    END IF;
    -- a retry cancels an approved purge; the audit says so
    IF r.purge_approved_at IS NOT NULL THEN
        INSERT INTO @extschema@.cqrs_outbox_audit
               (action, outbox_id, event_id, topic, key, status, reason, approver)
        VALUES ('CANCEL_PURGE', r.id, r.event_id, r.topic, r.key, r.status,
                'cancelled by cqrs_retry()', r.purge_approved_by);
    END IF;
    INSERT INTO @extschema@.cqrs_outbox_audit (action, outbox_id, event_id, topic, key, status, reason)
    VALUES ('RETRY', r.id, r.event_id, r.topic, r.key, r.status, r.last_error);
    UPDATE @extschema@.cqrs_outbox o
       SET status = 'PENDING', retry_count = 0,
           next_attempt_at = NULL, last_error = NULL,
           purge_approved_by = NULL, purge_approved_at = NULL
     WHERE o.id = r.id;
    -- the cleanup's walk may have passed the row, or be passing it now
    -- (having read it as failed): it comes back for it
    UPDATE @extschema@.cqrs_cleanup_state
       SET walk_from = LEAST(walk_from, r.id), retries = retries + 1;
    -- the relay's scan goes back to it, also after a restart
    PERFORM @extschema@.cqrs_relay_revisit(r.id);
    RETURN true;
END
$$;
COMMENT ON FUNCTION cqrs_retry(bigint) IS
    'Operator: puts a PENDING, DEAD_LETTERED or DLT_FAILED outbox row back to PENDING with a new retry budget (retry_count 0; dlt_retry_count keeps counting) and any purge approval cancelled, recording the row''s last error (and the cancelled approval) in cqrs_outbox_audit; the relay sends it at once.';

CREATE OR REPLACE FUNCTION cqrs_retry_dlt_failed()
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
    lowest bigint;
BEGIN
    WITH failed AS (
        SELECT o.id, o.event_id, o.topic, o.key, o.last_error, o.purge_approved_at, o.purge_approved_by
          FROM @extschema@.cqrs_outbox o
         WHERE o.status = 'DLT_FAILED'
           FOR UPDATE
    ), audited AS (
        INSERT INTO @extschema@.cqrs_outbox_audit (action, outbox_id, event_id, topic, key, status, reason, approver)
        SELECT a.action, f.id, f.event_id, f.topic, f.key, 'DLT_FAILED', a.reason, a.approver
          FROM failed f,
               LATERAL (VALUES (1, 'CANCEL_PURGE', 'cancelled by cqrs_retry_dlt_failed()', f.purge_approved_by),
                               (2, 'RETRY', f.last_error, NULL)) AS a(n, action, reason, approver)
         WHERE a.action = 'RETRY' OR f.purge_approved_at IS NOT NULL
         ORDER BY f.id, a.n
    ), reset AS (
        UPDATE @extschema@.cqrs_outbox o
           SET status = 'PENDING', retry_count = 0,
               next_attempt_at = NULL, last_error = NULL,
               purge_approved_by = NULL, purge_approved_at = NULL
          FROM failed f
         WHERE o.id = f.id
        RETURNING o.id
    )
    SELECT count(*), min(id) INTO n, lowest FROM reset;
    IF n > 0 THEN
        -- the cleanup's walk may have passed the rows, or be passing them
        -- now (having read them as failed): it comes back for them
        UPDATE @extschema@.cqrs_cleanup_state
           SET walk_from = LEAST(walk_from, lowest), retries = retries + 1;
        PERFORM @extschema@.cqrs_relay_revisit(lowest);
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION cqrs_retry_dlt_failed() IS
    'Operator: puts every DLT_FAILED row back to PENDING (as cqrs_retry does, audited, cancelling approved purges) and returns how many.';

CREATE OR REPLACE FUNCTION cqrs_approve_purge(ids bigint[])
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- who approves: the person (the session user), whatever role they act
    -- as; the audit row records the role too (actor)
    who text := session_user;
    approved bigint[];
    n_not integer;
    listed text;
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    WITH a AS (
        UPDATE @extschema@.cqrs_outbox o
           -- the grace counts from the approval itself, not from the start
           -- of a transaction that may have been open for longer than it
           SET purge_approved_by = who, purge_approved_at = clock_timestamp()
         WHERE o.id = ANY (ids)
           AND o.status IN ('DEAD_LETTERED', 'DLT_FAILED')
           AND o.purge_approved_at IS NULL
        RETURNING o.id, o.event_id, o.topic, o.key, o.status, o.last_error
    ), audited AS (
        INSERT INTO @extschema@.cqrs_outbox_audit
               (action, outbox_id, event_id, topic, key, status, reason, approver)
        SELECT 'APPROVE_PURGE', a.id, a.event_id, a.topic, a.key, a.status, a.last_error, who
          FROM a ORDER BY a.id
    )
    SELECT coalesce(array_agg(a.id), '{}') INTO approved FROM a;

    -- say which ids were not approved, and why
    SELECT count(*),
           string_agg(format('%s (%s)', coalesce(u.id::text, 'NULL'),
                             CASE WHEN u.id IS NULL THEN 'not an id'
                                  WHEN o.id IS NULL THEN 'not found'
                                  WHEN o.purge_approved_at IS NOT NULL
                                  THEN 'already approved by ' || o.purge_approved_by
                                  ELSE o.status::text END),
                      ', ' ORDER BY u.id) FILTER (WHERE u.n <= 20)
      INTO n_not, listed
      FROM (SELECT x.id, row_number() OVER (ORDER BY x.id) AS n
              FROM (SELECT DISTINCT i AS id FROM unnest(ids) AS i) x
             WHERE x.id IS NULL OR x.id <> ALL (approved)) u
      LEFT JOIN @extschema@.cqrs_outbox o ON o.id = u.id;
    IF n_not > 0 THEN
        IF n_not > 20 THEN
            listed := format('%s and %s more', listed, n_not - 20);
        END IF;
        RAISE NOTICE '% outbox row(s) not approved for purging: %', n_not, listed
            USING DETAIL = 'Only DEAD_LETTERED and DLT_FAILED rows that are not yet approved can be approved; the others are left as they are.';
    END IF;
    RETURN cardinality(approved);
END
$$;
COMMENT ON FUNCTION cqrs_approve_purge(bigint[]) IS
    'Operator: approves purging the DEAD_LETTERED and DLT_FAILED outbox rows with these ids (recording who (the session user) and when, and an APPROVE_PURGE row in cqrs_outbox_audit); the cleanup pass deletes them once older than cqrs_sync.dlt_retention and approved more than cqrs_sync.purge_grace ago. Ids that do not exist, are in another status or are already approved are left alone and listed in a NOTICE. Returns the number of rows approved.';

COMMENT ON FUNCTION cqrs_cleanup() IS
    'One cleanup pass, for pg_cron or by hand, in the caller''s transaction: purges DEAD_LETTERED/DLT_FAILED rows approved with cqrs_approve_purge() more than cqrs_sync.purge_grace ago and older than cqrs_sync.dlt_retention (audited), deletes SENT rows older than cqrs_sync.sent_retention, then prunes the read side (as cqrs_prune_read_side()), in batches of cqrs_sync.cleanup_batch_size, at most cqrs_sync.cleanup_max_rows_per_call rows per call in all (complete = false when it stopped early). Never deletes PENDING rows. Returns the rows deleted per status.';

CREATE FUNCTION cqrs_cancel_purge(ids bigint[])
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
    n_not integer;
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    WITH approved AS (
        SELECT o.id, o.purge_approved_by
          FROM @extschema@.cqrs_outbox o
         WHERE o.id = ANY (ids) AND o.purge_approved_at IS NOT NULL
           FOR UPDATE
    ), cancelled AS (
        UPDATE @extschema@.cqrs_outbox o
           SET purge_approved_by = NULL, purge_approved_at = NULL
          FROM approved a
         WHERE o.id = a.id
        RETURNING o.id, o.event_id, o.topic, o.key, o.status, a.purge_approved_by
    ), audited AS (
        INSERT INTO @extschema@.cqrs_outbox_audit
               (action, outbox_id, event_id, topic, key, status, reason, approver)
        SELECT 'CANCEL_PURGE', c.id, c.event_id, c.topic, c.key, c.status,
               'cancelled with cqrs_cancel_purge()', c.purge_approved_by
          FROM cancelled c ORDER BY c.id
    )
    SELECT count(*) INTO n FROM cancelled;

    SELECT count(DISTINCT i) - n INTO n_not FROM unnest(ids) AS i;
    IF n_not > 0 THEN
        RAISE NOTICE '% outbox row(s) had no approval to cancel', n_not
            USING DETAIL = 'Only rows approved with cqrs_approve_purge() and not yet purged have an approval.';
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION cqrs_cancel_purge(bigint[]) IS
    'Operator: cancels the purge approvals of the outbox rows with these ids (a CANCEL_PURGE row each in cqrs_outbox_audit, naming the approval cancelled); the rows stay until approved again. Returns the number of approvals cancelled.';
REVOKE ALL ON FUNCTION cqrs_cancel_purge(bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_cancel_purge(bigint[]) TO cqrs_sync_operator;

-- Where the cleanup pass's walk over SENT rows starts, so that a pass does
-- not read again the old rows it cannot delete (failed rows nobody
-- approved).  One row; written by the pass and, to bring the walk back, by
-- cqrs_retry() and cqrs_retry_dlt_failed().  Not dumped: after a restore
-- the next pass walks the whole outbox once.
CREATE TABLE cqrs_cleanup_state (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    walk_from     bigint NOT NULL DEFAULT 0,
    walk_pending  bigint[] NOT NULL DEFAULT '{}',
    settled_id    bigint NOT NULL DEFAULT 0,
    id_sample     bigint NOT NULL DEFAULT 0,
    id_sampled_at timestamptz,
    full_walk_at  timestamptz,
    retries       bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE cqrs_cleanup_state IS
    'Where the cleanup pass starts its walk over SENT rows (one row).';
COMMENT ON COLUMN cqrs_cleanup_state.singleton IS 'Always true: the table has one row.';
COMMENT ON COLUMN cqrs_cleanup_state.walk_from IS 'The walk starts at this outbox id: below it, rows are deleted, failed, or listed in walk_pending.';
COMMENT ON COLUMN cqrs_cleanup_state.walk_pending IS 'Ids below walk_from of rows that may still need deleting (PENDING, or SENT within the retention when the walk passed them); each pass looks them up by id.';
COMMENT ON COLUMN cqrs_cleanup_state.settled_id IS 'No transaction that could still commit holds an outbox id up to this one: the walk never moves past ids that may still become visible.';
COMMENT ON COLUMN cqrs_cleanup_state.id_sample IS 'The id sequence''s value read by the last pass ...';
COMMENT ON COLUMN cqrs_cleanup_state.id_sampled_at IS '... and when: once every transaction running then has ended, the ids up to id_sample are settled.';
COMMENT ON COLUMN cqrs_cleanup_state.retries IS 'How many times cqrs_retry() or cqrs_retry_dlt_failed() put rows back to PENDING: a pass that sees it changed since it read the row keeps walk_from where the retries put it.';
COMMENT ON COLUMN cqrs_cleanup_state.full_walk_at IS 'When a pass last walked from id 0; it does once a day, so that rows changed by hand are not missed.';
INSERT INTO cqrs_cleanup_state DEFAULT VALUES;
REVOKE ALL ON cqrs_cleanup_state FROM PUBLIC;
GRANT SELECT ON cqrs_cleanup_state TO cqrs_sync_operator;

-----------------------------------------------------------------------------
-- Read side: no reader writes the extension's tables (the helpers do, as
-- their owner); consumers have owners; equal keys share a tombstone; the
-- memory of cqrs_apply_delta() names its table by regclass, not by OID
-----------------------------------------------------------------------------

REVOKE ALL ON cqrs_inbox, cqrs_tombstone FROM cqrs_sync_reader;
COMMENT ON TABLE cqrs_inbox IS
    'Inbox of the read side: one row per (consumer, event) already processed, written by cqrs_mark_processed() in the consumer''s transaction; pruned by the cleanup pass (cqrs_prune_read_side()) after cqrs_sync.inbox_retention.';
COMMENT ON COLUMN cqrs_inbox.consumer IS 'Name of the consumer (e.g. the read model or consumer group); it belongs to a role (cqrs_consumer).';
COMMENT ON COLUMN cqrs_inbox.event_id IS 'Id of the event, normally the Kafka header event_id.';
COMMENT ON COLUMN cqrs_inbox.processed_at IS 'Start of the transaction that processed the event; drives retention.';

COMMENT ON TABLE cqrs_tombstone IS
    'Rows removed by cqrs_delete() and the version of the delete, so that an older upsert arriving later does not bring them back; pruned by the cleanup pass (cqrs_prune_read_side()) after cqrs_sync.inbox_retention.';
COMMENT ON COLUMN cqrs_tombstone.key IS 'Primary key of the deleted row, as the first delete spelled it: an object of the key columns'' text representations, e.g. {"id": "42"}.  Keys equal for the table (42 and 42.0, ''ABC'' and ''abc'' for citext) share one tombstone.';
ALTER TABLE cqrs_tombstone ADD COLUMN key_hash integer;
COMMENT ON COLUMN cqrs_tombstone.key_hash IS 'Hash of the key by the hash functions of its columns'' types and collations (equal keys, equal hashes); tombstones are found by it and then compared with the types'' equality.';
CREATE FUNCTION cqrs_set_consumer_owner(consumer text, owner regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF cqrs_set_consumer_owner.consumer IS NULL OR cqrs_set_consumer_owner.owner IS NULL THEN
        RAISE EXCEPTION 'consumer and owner must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cqrs_set_consumer_owner.consumer = '' THEN
        RAISE EXCEPTION 'consumer must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO @extschema@.cqrs_consumer AS c (consumer, owner)
    -- the role's name as it is (regrole's text quotes it where SQL needs quotes)
    VALUES (cqrs_set_consumer_owner.consumer, pg_catalog.pg_get_userbyid(cqrs_set_consumer_owner.owner)::text)
    ON CONFLICT ON CONSTRAINT cqrs_consumer_pkey
    DO UPDATE SET owner = excluded.owner, claimed_at = now();
END
$$;
COMMENT ON FUNCTION cqrs_set_consumer_owner(text, regrole) IS
    'Operator: gives a consumer name to a role (also one nobody used yet); from then on only that role, its members and superusers may record events under it.';

CREATE FUNCTION cqrs_tombstone_key_hash(target regclass, key jsonb)
RETURNS integer
AS 'MODULE_PATHNAME', 'cqrs_tombstone_key_hash'
LANGUAGE C STRICT STABLE PARALLEL SAFE;
COMMENT ON FUNCTION cqrs_tombstone_key_hash(regclass, jsonb) IS
    'Internal: the key_hash of a tombstone of target (0 when the table or its primary key no longer match the key); the update from 0.1.0 fills cqrs_tombstone.key_hash with it.';

-- 0.1.0 wrote the texts of a key (tombstones, the memory of deltas) with
-- the writing session's settings (TimeZone, DateStyle, IntervalStyle, ...);
-- 0.2.0 spells them with fixed ones, and compares the memory of deltas by
-- its text: each key is spelled again, parsed with this session's settings
-- (run the update with the consumers' settings).  A key that no longer
-- fits its table stays as it was.  Two spellings of one tombstone's key
-- become one, with the higher version.  (Dropped at the end of the update.)
CREATE FUNCTION cqrs_key_respelled(target regclass, key jsonb)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'cqrs_key_respelled'
LANGUAGE C STRICT VOLATILE;
CREATE FUNCTION cqrs_key_respelled_or_same(target regclass, key text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN @extschema@.cqrs_key_respelled(target, key::jsonb)::text;
EXCEPTION WHEN OTHERS THEN
    RETURN key;
END
$$;
DO $$
DECLARE
    r record;
    k jsonb;
BEGIN
    FOR r IN SELECT target, key, version, deleted_at FROM @extschema@.cqrs_tombstone LOOP
        k := @extschema@.cqrs_key_respelled_or_same(r.target, r.key::text)::jsonb;
        CONTINUE WHEN k = r.key;
        BEGIN
            UPDATE @extschema@.cqrs_tombstone SET key = k WHERE target = r.target AND key = r.key;
        EXCEPTION WHEN unique_violation THEN
            UPDATE @extschema@.cqrs_tombstone
               SET version = greatest(version, r.version),
                   deleted_at = CASE WHEN r.version > version THEN r.deleted_at ELSE deleted_at END
             WHERE target = r.target AND key = k;
            DELETE FROM @extschema@.cqrs_tombstone WHERE target = r.target AND key = r.key;
        END;
    END LOOP;
END
$$;

-- The hash of every tombstone; a key that no longer parses as its table's
-- primary key (its type changed since) gets 0, row by row.
DO $$
DECLARE
    r record;
BEGIN
    UPDATE @extschema@.cqrs_tombstone
       SET key_hash = @extschema@.cqrs_tombstone_key_hash(target, key);
EXCEPTION WHEN OTHERS THEN
    FOR r IN SELECT target, key FROM @extschema@.cqrs_tombstone LOOP
        BEGIN
            UPDATE @extschema@.cqrs_tombstone
               SET key_hash = @extschema@.cqrs_tombstone_key_hash(r.target, r.key)
             WHERE target = r.target AND key = r.key;
        EXCEPTION WHEN OTHERS THEN
            UPDATE @extschema@.cqrs_tombstone SET key_hash = 0
             WHERE target = r.target AND key = r.key;
        END;
    END LOOP;
END
$$;
ALTER TABLE cqrs_tombstone ALTER COLUMN key_hash SET NOT NULL;
CREATE INDEX cqrs_tombstone_key_hash_idx ON cqrs_tombstone (target, key_hash);
COMMENT ON INDEX cqrs_tombstone_key_hash_idx IS
    'Finds the tombstone of a key whatever its spelling.';
CREATE INDEX cqrs_tombstone_deleted_at_idx ON cqrs_tombstone (deleted_at);
COMMENT ON INDEX cqrs_tombstone_deleted_at_idx IS
    'Lets cqrs_prune_read_side() find expired tombstones without scanning the table.';

-- What cqrs_apply_delta() added, by target regclass (dumped and restored by
-- name, so a restored read model keeps its memory).
CREATE TABLE cqrs_delta_inbox (
    consumer     text COLLATE "C" NOT NULL,
    target       regclass NOT NULL,
    event_id     text COLLATE "C" NOT NULL,
    key          text COLLATE "C" NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, target, event_id, key)
);
COMMENT ON TABLE cqrs_delta_inbox IS
    'Memory of cqrs_apply_delta(): one row per (consumer, target, event, key) whose deltas were added, written in the consumer''s transaction; pruned by the cleanup pass (cqrs_prune_read_side()) after cqrs_sync.inbox_retention.';
COMMENT ON COLUMN cqrs_delta_inbox.consumer IS 'Name of the consumer that applied the deltas; it belongs to a role (cqrs_consumer).';
COMMENT ON COLUMN cqrs_delta_inbox.target IS 'Read-model table the deltas were added to.';
COMMENT ON COLUMN cqrs_delta_inbox.event_id IS 'Id of the event, normally the Kafka header event_id.';
COMMENT ON COLUMN cqrs_delta_inbox.key IS 'Primary key of the row the deltas were added to: the JSON object of the key columns'' text representations, e.g. {"board_id": "42"}.';
COMMENT ON COLUMN cqrs_delta_inbox.processed_at IS 'Start of the transaction that applied the deltas; drives retention.';
CREATE INDEX cqrs_delta_inbox_processed_at_idx ON cqrs_delta_inbox (processed_at);
COMMENT ON INDEX cqrs_delta_inbox_processed_at_idx IS
    'Lets cqrs_prune_read_side() find expired entries without scanning the table.';

-- Who may write a consumer's inbox entries and delta memory.
CREATE TABLE cqrs_consumer (
    consumer   text COLLATE "C" PRIMARY KEY,
    owner      text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE cqrs_consumer IS
    'Owners of consumer names: only the owner role and its members (and superusers) may record events under a consumer (cqrs_mark_processed(), cqrs_apply_delta()). A name belongs to the first role that uses it, or to the role an operator gives it to with cqrs_set_consumer_owner().';
COMMENT ON COLUMN cqrs_consumer.consumer IS 'Consumer name, as passed to cqrs_mark_processed() and cqrs_apply_delta().';
COMMENT ON COLUMN cqrs_consumer.owner IS 'Name of the role the consumer belongs to (as pg_cron keeps a job''s user: by name, so that a dump restores into another cluster).';
COMMENT ON COLUMN cqrs_consumer.claimed_at IS 'When the consumer was claimed or last given to a role.';

-- The helpers cache the owners; a change of cqrs_consumer tells every backend.
CREATE FUNCTION cqrs_consumer_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cqrs_consumer_changed'
LANGUAGE C;
COMMENT ON FUNCTION cqrs_consumer_changed() IS
    'Internal: trigger of cqrs_consumer that invalidates the consumer owners cached by the read-side helpers in every session.';
REVOKE ALL ON FUNCTION cqrs_consumer_changed() FROM PUBLIC;
CREATE TRIGGER cqrs_consumer_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON cqrs_consumer
    FOR EACH STATEMENT EXECUTE FUNCTION cqrs_consumer_changed();

SELECT pg_catalog.pg_extension_config_dump('cqrs_delta_inbox', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_consumer', '');
REVOKE ALL ON cqrs_delta_inbox, cqrs_consumer FROM PUBLIC;
GRANT SELECT ON cqrs_delta_inbox, cqrs_consumer TO cqrs_sync_operator;

-- 0.1.0 kept the memory of cqrs_apply_delta() in the inbox, as consumer
-- "<consumer>/delta/<target oid>" and event id "<event_id> <key>" (the key
-- a JSON object whose text holds ' {"' nowhere but at its start).  Moved,
-- not lost.  Only entries naming a table that exists: an ordinary inbox
-- entry may look like one (consumer "x/delta/123"), and stays.  (Memory of
-- a table dropped since, or of a database restored from a dump, whose
-- tables have new OIDs, named no table any more.)
WITH tables AS (
    SELECT c.oid::text AS oid FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'p')
), moved AS (
    DELETE FROM @extschema@.cqrs_inbox i
     WHERE i.consumer ~ '/delta/[0-9]+$' AND strpos(i.event_id, ' {"') > 0
       AND substring(i.consumer FROM '/delta/([0-9]+)$') IN (SELECT t.oid FROM tables t)
    RETURNING i.consumer, i.event_id, i.processed_at,
              length(i.event_id) - strpos(reverse(i.event_id), '"{ ') AS key_at
)
INSERT INTO @extschema@.cqrs_delta_inbox (consumer, target, event_id, key, processed_at)
SELECT regexp_replace(m.consumer, '/delta/[0-9]+$', ''),
       substring(m.consumer FROM '/delta/([0-9]+)$')::oid::regclass,
       substr(m.event_id, 1, m.key_at - 2),
       @extschema@.cqrs_key_respelled_or_same(substring(m.consumer FROM '/delta/([0-9]+)$')::oid::regclass,
                                              substr(m.event_id, m.key_at)),
       m.processed_at
  FROM moved m
    ON CONFLICT DO NOTHING;
DROP FUNCTION cqrs_key_respelled_or_same(regclass, text);
DROP FUNCTION cqrs_key_respelled(regclass, jsonb);

CREATE OR REPLACE FUNCTION cqrs_mark_processed(consumer text, event_id text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_mark_processed_0_2'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_mark_processed(text, text) IS
    'Records that consumer processed event_id, in the caller''s transaction: true the first time, false if it was already recorded (then skip the event). The consumer must belong to the caller''s role (the first use claims it).';

CREATE OR REPLACE FUNCTION cqrs_upsert(target regclass, "row" jsonb, version bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_upsert_0_2'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_upsert(regclass, jsonb, bigint) IS
    'Inserts or updates the row of target with the primary key in row (a JSON object of columns) if version is higher than the stored one and than any tombstone of the key; returns whether it was applied. Columns missing from row keep their value (or default).';

CREATE OR REPLACE FUNCTION cqrs_delete(target regclass, key jsonb, version bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_delete_0_2'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_delete(regclass, jsonb, bigint) IS
    'Deletes the row of target with the primary key key unless its version is higher than version, and records a tombstone so that an older upsert arriving later does not bring it back; returns whether anything changed. Needs DELETE on target.';

CREATE OR REPLACE FUNCTION cqrs_apply_delta(target regclass, key jsonb, deltas jsonb,
                                 consumer text, event_id text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cqrs_apply_delta_0_2'
LANGUAGE C CALLED ON NULL INPUT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_apply_delta(regclass, jsonb, jsonb, text, text) IS
    'Adds the numbers in deltas (e.g. {"likes": 1}) to the columns of the row of target with the primary key key, once per (consumer, target, event_id, key) (a NULL column counts from 0); creates a missing row from the columns'' defaults unless the key was deleted. Returns whether the deltas were added. The consumer must belong to the caller''s role.';

COMMENT ON FUNCTION cqrs_prune_read_side(interval) IS
    'Deletes inbox entries, delta memory and tombstones older than older_than (default and minimum: cqrs_sync.inbox_retention; 0 there keeps them) and those of dropped tables, in batches of cqrs_sync.cleanup_batch_size, at most cqrs_sync.cleanup_max_rows_per_call rows per call; returns the number of rows deleted.';
REVOKE ALL ON FUNCTION cqrs_set_consumer_owner(text, regrole) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_tombstone_key_hash(regclass, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_set_consumer_owner(text, regrole) TO cqrs_sync_operator;

-----------------------------------------------------------------------------
-- Adoption: an application's own outbox table, attached (new in 0.2.0)
-----------------------------------------------------------------------------

-- @@ATTACH_BEGIN@@

-- The trigger of an attached table: publishes each inserted row through the
-- path of cqrs_enqueue() (its key registered before its outbox id is taken;
-- the relay woken at commit).  Its one argument is the mapping, as JSON.
CREATE FUNCTION cqrs_outbox_attached()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cqrs_outbox_attached'
LANGUAGE C;
COMMENT ON FUNCTION cqrs_outbox_attached() IS
    'Internal: AFTER INSERT row trigger of an attached outbox table, created by cqrs_attach_outbox() with the table''s mapping as its argument; publishes each new row through the path of cqrs_enqueue(), only the insert into cqrs_outbox running as its owner.';
REVOKE ALL ON FUNCTION cqrs_outbox_attached() FROM PUBLIC;
-- such a trigger lets a table's inserts publish events: writers only may
-- create one (CREATE TRIGGER needs EXECUTE on the function)
GRANT EXECUTE ON FUNCTION cqrs_outbox_attached() TO cqrs_sync_writer;

CREATE FUNCTION cqrs_attached_outbox_enqueue(outbox regclass, "row" record)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cqrs_attached_outbox_enqueue'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_attached_outbox_enqueue(regclass, record) IS
    'Publishes a row of an attached outbox table (a value of the table''s row type) as its trigger would have, in the caller''s transaction, and returns its outbox id, or NULL when its event id is in cqrs_outbox already; cqrs_attach_outbox() uses it to publish the rows already in the table (option backfill).';
REVOKE ALL ON FUNCTION cqrs_attached_outbox_enqueue(regclass, record) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_attached_outbox_enqueue(regclass, record) TO cqrs_sync_writer;

CREATE FUNCTION cqrs_attach_outbox(outbox regclass, options jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
-- runs as the caller (the table's owner): the backfill's condition is the
-- caller's SQL
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    known constant text[] := ARRAY['topic', 'route_by', 'key', 'payload', 'event_id',
                                   'headers', 'backfill', 'backfill_order'];
    -- Debezium's outbox layout and the EventRouter's defaults
    defaults constant jsonb := jsonb_build_object(
        'topic', 'outbox.event.${routedByValue}', 'route_by', 'aggregatetype',
        'key', 'aggregateid', 'payload', 'payload', 'event_id', 'id',
        'headers', jsonb_build_object('id', 'id', 'type', 'type'));
    placeholder constant text := '${routedByValue}';
    trigfn constant regprocedure := '@extschema@.cqrs_outbox_attached()'::regprocedure;
    o jsonb := coalesce(options, '{}');
    m jsonb;
    opt text;
    rel record;
    c record;
    typ oid;
    base oid;
    cat "char";
    backfill text;
    has_rows boolean;
    r record;
    n bigint := 0;
    skipped bigint := 0;
    id bigint;
BEGIN
    IF outbox IS NULL THEN
        RAISE EXCEPTION 'outbox must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(o) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR opt IN SELECT k FROM jsonb_object_keys(o) AS k ORDER BY k LOOP
        IF NOT opt = ANY (known) THEN
            RAISE EXCEPTION 'unknown option "%"', opt
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'The options are ' || array_to_string(known, ', ') || '.';
        END IF;
    END LOOP;

    SELECT cl.relkind, cl.relowner, cl.relispartition INTO rel FROM pg_class cl WHERE cl.oid = outbox;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'relation with OID % does not exist', outbox::oid
            USING ERRCODE = 'undefined_table';
    END IF;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '"%" is not a table', outbox USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT pg_has_role(rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table %', outbox
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = 'pg_class'::regclass AND d.objid = outbox AND d.deptype = 'e') THEN
        RAISE EXCEPTION 'table % belongs to an extension', outbox
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Attach the application''s own outbox table; cqrs_outbox is published anyway.';
    END IF;
    -- (partitions fire the triggers of their partitioned table; inheritance
    -- children do not fire their parent's)
    IF rel.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = outbox) THEN
        RAISE EXCEPTION 'table % has inheritance children', outbox
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Rows inserted into a child table do not fire its parent''s triggers: they would not be published.',
                  HINT = 'Attach each table the application inserts into on its own.';
    END IF;

    -- No row is inserted while the table is attached: every row committed
    -- before is in the table (and the backfill's snapshot), every later one
    -- fires the trigger.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', outbox);
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = outbox AND t.tgfoid = trigfn) THEN
        RAISE EXCEPTION 'table % is already attached', outbox
            USING ERRCODE = 'duplicate_object',
                  HINT = 'To change its options, detach it with cqrs_detach_outbox() and attach it again.';
    END IF;

    -- the mapping: the defaults, each replaced by the option of that name
    m := defaults || (o - 'backfill' - 'backfill_order');
    IF jsonb_typeof(m->'topic') IS DISTINCT FROM 'string' OR m->>'topic' = '' THEN
        RAISE EXCEPTION 'option "topic" must be a topic name or a template with %', placeholder
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF position(placeholder IN m->>'topic') > 0 THEN
        IF jsonb_typeof(m->'route_by') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'the topic "%" needs option "route_by"', m->>'topic'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Name the column whose value replaces ' || placeholder || '.';
        END IF;
        IF replace(m->>'topic', placeholder, '') !~ '^[A-Za-z0-9._-]*$' THEN
            RAISE EXCEPTION 'invalid Kafka topic template "%"', m->>'topic'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Besides ' || placeholder || ', topic names hold only ASCII letters, digits, periods, underscores and hyphens.';
        END IF;
    ELSE
        IF o ? 'route_by' AND jsonb_typeof(o->'route_by') <> 'null' THEN
            RAISE EXCEPTION 'option "route_by" needs % in option "topic"', placeholder
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF m->>'topic' !~ '^[A-Za-z0-9._-]{1,249}$' OR m->>'topic' IN ('.', '..') THEN
            RAISE EXCEPTION 'invalid Kafka topic name "%"', m->>'topic'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Topic names are 1 to 249 ASCII letters, digits, periods, underscores or hyphens, and may not be "." or "..".';
        END IF;
        m := m || '{"route_by": null}';
    END IF;
    FOREACH opt IN ARRAY ARRAY['route_by', 'key', 'payload', 'event_id'] LOOP
        IF jsonb_typeof(m->opt) NOT IN ('string', 'null') OR m->>opt = ''
           OR (opt = 'payload' AND jsonb_typeof(m->opt) = 'null') THEN
            RAISE EXCEPTION 'option "%" must name a column%', opt,
                            CASE WHEN opt = 'payload' THEN '' ELSE ' or be null' END
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF (rel.relkind = 'p' OR rel.relispartition) AND jsonb_typeof(m->'event_id') = 'null' THEN
        RAISE EXCEPTION 'a partitioned table needs option "event_id"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'An UPDATE that moves a row to another partition inserts it there, which fires the trigger again: only the row''s event id tells that copy from a new event.',
                  HINT = 'Name a column holding each row''s unique id (a UUID) in option "event_id".';
    END IF;
    IF jsonb_typeof(m->'headers') IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'option "headers" must be a JSON object of header names and columns'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR c IN SELECT h.key, h.value FROM jsonb_each(m->'headers') h LOOP
        IF c.key = '' OR c.key = 'event_id' THEN
            RAISE EXCEPTION 'invalid header name "%"', c.key
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'The relay sends every message''s event id as the header event_id.';
        END IF;
        IF jsonb_typeof(c.value) <> 'string' THEN
            RAISE EXCEPTION 'header "%" must name a column', c.key
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    -- every column named exists, and payload and event id have types that fit
    FOR c IN SELECT x.opt, x.col
               FROM (VALUES (1, 'route_by', m->>'route_by'), (2, 'key', m->>'key'),
                            (3, 'payload', m->>'payload'), (4, 'event_id', m->>'event_id')) x(n, opt, col)
              WHERE x.col IS NOT NULL
             UNION ALL
             SELECT 'headers', h.value FROM jsonb_each_text(m->'headers') h
    LOOP
        SELECT a.atttypid INTO typ FROM pg_attribute a
         WHERE a.attrelid = outbox AND a.attname = c.col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column "%" of table % does not exist', c.col, outbox
                USING ERRCODE = 'undefined_column',
                      DETAIL = format('Option "%s" names it.', c.opt),
                      HINT = 'Without options the table must have Debezium''s outbox layout; for another layout name its columns in the options "topic" (or "route_by"), "key", "payload", "event_id" and "headers".';
        END IF;
        LOOP    -- through domains to the base type
            SELECT t.typbasetype INTO base FROM pg_type t WHERE t.oid = typ AND t.typtype = 'd';
            EXIT WHEN NOT FOUND;
            typ := base;
        END LOOP;
        SELECT t.typcategory INTO cat FROM pg_type t WHERE t.oid = typ;
        IF c.opt = 'payload' AND typ NOT IN ('jsonb'::regtype, 'json'::regtype) AND cat <> 'S' THEN
            RAISE EXCEPTION 'payload column "%" of table % is of type %', c.col, outbox, typ::regtype
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = 'cqrs_sync sends JSON: the payload must be jsonb, json or a text type holding JSON.';
        END IF;
        -- the text of a key or topic must not depend on the inserting
        -- session's settings (DateStyle, TimeZone, IntervalStyle,
        -- extra_float_digits, bytea_output)
        IF c.opt IN ('key', 'route_by')
           AND (cat IN ('D', 'T', 'G', 'R', 'A', 'C', 'P', 'X')
                OR typ IN ('float4'::regtype, 'float8'::regtype, 'money'::regtype, 'bytea'::regtype)) THEN
            RAISE EXCEPTION '% column "%" of table % is of type %',
                            CASE WHEN c.opt = 'key' THEN 'key' ELSE 'route_by' END, c.col, outbox, typ::regtype
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = CASE WHEN c.opt = 'key'
                                    THEN 'The text of a value of this type depends on the session''s settings (DateStyle, TimeZone, extra_float_digits...): one value could get two Kafka keys, and so two partitions, which breaks its order.'
                                    ELSE 'The text of a value of this type depends on the session''s settings (DateStyle, TimeZone, extra_float_digits...): one value could name two topics.' END,
                      HINT = 'Name a column of a text, integer, numeric, boolean, uuid or enum type.';
        END IF;
        IF c.opt = 'event_id' AND typ <> 'uuid'::regtype AND cat <> 'S' THEN
            RAISE EXCEPTION 'event id column "%" of table % is of type %', c.col, outbox, typ::regtype
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = 'Event ids are UUIDs: the column must be of type uuid or a text type holding UUIDs.',
                      HINT = 'Set option "event_id" to null to have an event id generated, and send your id as a header.';
        END IF;
    END LOOP;

    IF o ? 'backfill' AND jsonb_typeof(o->'backfill') <> 'null' AND o->'backfill' <> 'false' THEN
        IF o->'backfill' = 'true' THEN
            backfill := 'true';
        ELSIF jsonb_typeof(o->'backfill') = 'string' AND btrim(o->>'backfill') <> '' THEN
            backfill := o->>'backfill';
        ELSE
            RAISE EXCEPTION 'option "backfill" must be true, false or a condition on the table''s columns'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(o->'backfill_order') IS DISTINCT FROM 'string' OR btrim(o->>'backfill_order') = '' THEN
            RAISE EXCEPTION 'option "backfill" needs option "backfill_order"'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Name the columns that give the order in which the rows were written, for example "created_at, id": the events of a key reach Kafka in that order.';
        END IF;
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'cqrs_attach_outbox() with a backfill must run in a READ COMMITTED transaction'
                USING ERRCODE = 'invalid_transaction_state',
                      DETAIL = 'An older snapshot would miss rows committed before the table was locked.';
        END IF;
    ELSIF o ? 'backfill_order' THEN
        RAISE EXCEPTION 'option "backfill_order" needs option "backfill"'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- on a partitioned table the trigger sees deletes too: the old row of
    -- an UPDATE that moves a row to another partition tells that the row
    -- the trigger sees inserted next is its copy, not a new event
    EXECUTE format('CREATE TRIGGER cqrs_sync_attached AFTER INSERT%s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION %s(%L)',
                   CASE WHEN rel.relkind = 'p' OR rel.relispartition THEN ' OR DELETE' ELSE '' END,
                   outbox, trigfn::oid::regproc, m::text);

    IF backfill IS NOT NULL THEN
        -- rows already there, in the order given, before any later row
        -- (by tableoid and ctid: the table is locked, and each table has its
        -- own row type, which a plan of PL/pgSQL could not take in turn; the
        -- partitions or children of a table each have their own ctids)
        FOR r IN EXECUTE format('SELECT t.tableoid, t.ctid FROM %s AS t WHERE (%s) ORDER BY %s',
                                outbox, backfill, o->>'backfill_order') LOOP
            EXECUTE format('SELECT @extschema@.cqrs_attached_outbox_enqueue(%L, t) FROM %s AS t'
                           ' WHERE t.tableoid = $1 AND t.ctid = $2',
                           outbox, outbox)
               INTO id USING r.tableoid, r.ctid;
            IF id IS NOT NULL THEN
                n := n + 1;
            ELSE
                skipped := skipped + 1;
            END IF;
        END LOOP;
        IF skipped > 0 THEN
            RAISE NOTICE '% row(s) of table % were not published again', skipped, outbox
                USING DETAIL = 'Their event ids are in cqrs_outbox already.';
        END IF;
    ELSE
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', outbox) INTO has_rows;
        IF has_rows THEN
            RAISE NOTICE 'rows already in table % are not published', outbox
                USING DETAIL = 'Only rows inserted from now on are.',
                      HINT = 'To publish rows the previous relay has not sent, detach the table and attach it again with the options "backfill" and "backfill_order".';
        END IF;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION cqrs_attach_outbox(regclass, jsonb) IS
    'Attaches an application''s own outbox table: every row inserted into it from now on is published like an event of cqrs_enqueue() (order per key, dead letters, statistics, cleanup of cqrs_outbox). Without options the table has Debezium''s outbox layout and the EventRouter''s defaults apply (topic outbox.event.<aggregatetype>, key aggregateid, headers id and type, event id id); options name other columns (topic, route_by, key, payload, event_id, headers) and publish rows already there (backfill, backfill_order; rows whose event id is in cqrs_outbox already are left out). Returns the number of rows backfilled. For the table''s owner, a member of cqrs_sync_writer.';
REVOKE ALL ON FUNCTION cqrs_attach_outbox(regclass, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_attach_outbox(regclass, jsonb) TO cqrs_sync_writer;

CREATE FUNCTION cqrs_detach_outbox(outbox regclass)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tg name;
BEGIN
    IF outbox IS NULL THEN
        RAISE EXCEPTION 'outbox must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT t.tgname INTO tg FROM pg_trigger t
     WHERE t.tgrelid = outbox AND t.tgparentid = 0
       AND t.tgfoid = '@extschema@.cqrs_outbox_attached()'::regprocedure;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not attached', outbox
            USING ERRCODE = 'undefined_object',
                  HINT = 'View cqrs_attached_outboxes lists the attached tables.';
    END IF;
    EXECUTE format('DROP TRIGGER %I ON %s', tg, outbox);
END
$$;
COMMENT ON FUNCTION cqrs_detach_outbox(regclass) IS
    'Detaches an outbox table attached with cqrs_attach_outbox(): rows inserted from then on are no longer published. Events already taken into cqrs_outbox are still delivered; the table and its rows are left as they are.';
REVOKE ALL ON FUNCTION cqrs_detach_outbox(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_detach_outbox(regclass) TO cqrs_sync_writer;

CREATE FUNCTION cqrs_attached_mapping(args bytea, nargs smallint)
RETURNS jsonb
LANGUAGE plpgsql STABLE STRICT PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF nargs <> 1 THEN
        RETURN NULL;
    END IF;
    -- the argument is in the database's encoding, with a zero byte after it
    RETURN convert_from(substring(args FROM 1 FOR position('\x00'::bytea IN args) - 1),
                        current_setting('server_encoding'))::jsonb;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION cqrs_attached_mapping(bytea, smallint) IS
    'Internal: the mapping a trigger of cqrs_outbox_attached() passes it (pg_trigger.tgargs and tgnargs), for the view cqrs_attached_outboxes; NULL for a trigger made by hand without one mapping in JSON.';
REVOKE ALL ON FUNCTION cqrs_attached_mapping(bytea, smallint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_attached_mapping(bytea, smallint) TO pg_monitor, cqrs_sync_operator, cqrs_sync_writer;

CREATE VIEW cqrs_attached_outboxes AS
    SELECT t.tgrelid::regclass AS outbox,
           @extschema@.cqrs_attached_mapping(t.tgargs, t.tgnargs) AS mapping,
           t.tgenabled IN ('O', 'A') AS enabled
      FROM pg_catalog.pg_trigger t
     WHERE t.tgfoid = '@extschema@.cqrs_outbox_attached()'::regprocedure
       AND t.tgparentid = 0;
COMMENT ON VIEW cqrs_attached_outboxes IS
    'Attached outbox tables: the table, its mapping (topic or template, route_by, key, payload, event_id, headers; NULL for a trigger made by hand without a valid one) and whether its trigger fires in ordinary sessions (false when disabled, or enabled for replication sessions only).';
REVOKE ALL ON cqrs_attached_outboxes FROM PUBLIC;
GRANT SELECT ON cqrs_attached_outboxes TO pg_monitor, cqrs_sync_operator, cqrs_sync_writer;

-- @@ATTACH_END@@

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
    OUT stalled_partition_count integer,
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
    OUT poll_seconds double precision,
    OUT database text)
RETURNS record
AS 'MODULE_PATHNAME', 'cqrs_relay_state_0_2'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_relay_state() IS
    'Counters, phase timers and state of the relay worker since the server started (shared memory, kept across worker restarts), and the database it runs in; NULLs when cqrs_sync is not in shared_preload_libraries.';

REVOKE ALL ON FUNCTION cqrs_relay_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_relay_state() TO pg_monitor, cqrs_sync_operator;

CREATE VIEW cqrs_stats_relay AS
    SELECT (s.relay_pid IS NOT NULL)::integer AS relay_up,
           (s.relay_state IN ('paused', 'waiting for broker', 'waiting for standby'))::integer AS paused,
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
           coalesce(r.stalled_partition_count, 0) AS stalled_partition_count,
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
           coalesce(r.poll_seconds, 0) AS poll_seconds,
           r.database AS relay_database,
           (r.database IS NOT DISTINCT FROM current_database())::integer AS in_database
      FROM @extschema@.cqrs_outbox_stats() s,
           @extschema@.cqrs_relay_state() r;
COMMENT ON VIEW cqrs_stats_relay IS
    'One row: whether the relay runs and what it does (running, paused on a topic, waiting for broker, waiting for standby, partition stalled, recording failed, no producer), its counters since the server started, ages of its last success and error, the oldest PENDING row''s age, the outbox size, the partitions whose keys wait, the rows between claim and recorded outcome (window), and the seconds spent per phase (record, claim, commit, flush, produce, poll) with the delivery reports and their total and longest wait, and the database the relay runs in (in_database: 1 if it is this one); for exporters.';

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
    'Internal, for cqrs_discard() and cqrs_retry(): keeps the relay from sending outbox row id (and later rows of its key) while the calling transaction may commit, and raises object_in_use (55006) if the relay has the row in flight already.';
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
    'Wakes the relay when the calling transaction commits and has it scan the outbox from the start (also after a restart, until it has), so that rows made PENDING by hand are sent.';

-- @@MONITORING_BEGIN@@

-----------------------------------------------------------------------------
-- Watching the cleanup, and how fresh the dead-letter topic depths are
-----------------------------------------------------------------------------

-- Internal: this database's cleanup, kept in shared memory.
CREATE FUNCTION cqrs_cleanup_counters(
    OUT worker_pid integer,
    OUT interval_seconds double precision,
    OUT sent_retention_seconds double precision,
    OUT dlt_retention_seconds double precision,
    OUT passes bigint,
    OUT errors bigint,
    OUT deleted_sent bigint,
    OUT deleted_dead_lettered bigint,
    OUT deleted_dlt_failed bigint,
    OUT deleted_read_side bigint,
    OUT last_pass_start timestamptz,
    OUT last_pass_end timestamptz,
    OUT last_success_at timestamptz,
    OUT last_error text,
    OUT last_error_at timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'cqrs_cleanup_counters'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_cleanup_counters() IS
    'This database''s cleanup: the cleanup worker''s pid if it runs here, the settings the passes use (in seconds, -1 for ever), and since the server started (shared memory, kept across worker restarts) the passes that succeeded (the worker''s, and cqrs_cleanup() calls whose transaction committed), those that failed, the rows deleted per status, the last pass''s start and end, the last success, the last error; NULL counters when cqrs_sync is not in shared_preload_libraries.';
REVOKE ALL ON FUNCTION cqrs_cleanup_counters() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_cleanup_counters() TO pg_monitor, cqrs_sync_operator;

CREATE FUNCTION cqrs_cleanup_stats(
    OUT worker_pid integer,
    OUT interval_seconds double precision,
    OUT passes bigint,
    OUT errors bigint,
    OUT last_pass_start timestamptz,
    OUT last_pass_end timestamptz,
    OUT last_success_at timestamptz,
    OUT last_success_age_seconds double precision,
    OUT deleted_sent bigint,
    OUT deleted_dead_lettered bigint,
    OUT deleted_dlt_failed bigint,
    OUT deleted_read_side bigint,
    OUT last_error text,
    OUT last_error_at timestamptz,
    OUT sent_retention_seconds double precision,
    OUT sent_expired bigint,
    OUT sent_overdue_seconds double precision,
    OUT dlt_retention_seconds double precision,
    OUT awaiting_approval bigint,
    OUT awaiting_approval_max_wait_seconds double precision)
RETURNS record
LANGUAGE sql STABLE PARALLEL RESTRICTED
-- runs as the extension's owner: monitoring roles need no privilege on the
-- outbox, its id sequence or the cleanup's state
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
    WITH RECURSIVE
    st AS (SELECT * FROM @extschema@.cqrs_cleanup_counters()),
    cut AS (SELECT CASE WHEN st.sent_retention_seconds >= 0
                        THEN now() - make_interval(secs => st.sent_retention_seconds) END AS sent_cutoff,
                   CASE WHEN st.dlt_retention_seconds >= 0
                        THEN now() - make_interval(secs => st.dlt_retention_seconds) END AS dlt_cutoff
              FROM st),
    -- below walk_from the last pass left no expired SENT row but those it
    -- listed in walk_pending (the table cqrs_cleanup_state)
    w AS (SELECT walk_from, walk_pending FROM @extschema@.cqrs_cleanup_state),
    -- the first id enqueued at or after the cutoff, by bisection (ids follow
    -- enqueue time): a row from there on cannot have been sent before it
    b(lo, hi) AS (
        SELECT w.walk_from, (SELECT last_value FROM @extschema@.cqrs_outbox_id_seq) + 1 FROM w
        UNION ALL
        SELECT CASE WHEN x.c < cut.sent_cutoff THEN m.mid + 1 ELSE b.lo END,
               CASE WHEN x.c < cut.sent_cutoff THEN b.hi ELSE m.mid END
          FROM b, cut,
               LATERAL (SELECT b.lo + (b.hi - b.lo) / 2 AS mid) m,
               LATERAL (SELECT (SELECT o.created_at FROM @extschema@.cqrs_outbox o
                                 WHERE o.id >= m.mid ORDER BY o.id LIMIT 1) AS c) x
         WHERE b.lo < b.hi AND cut.sent_cutoff IS NOT NULL),
    -- expired SENT rows the cleanup has yet to delete, among the next 100,000
    -- rows its walk passes (in id order: the oldest first), so that a large
    -- backlog costs a scrape a bounded read, whatever the rows' status (a
    -- long PENDING backlog older than the retention, say)
    e AS (SELECT count(*) AS n, min(x.sent_at) AS oldest
            FROM (SELECT o.status, o.sent_at FROM @extschema@.cqrs_outbox o
                   WHERE o.id >= (SELECT walk_from FROM w)
                     AND o.id < (SELECT max(lo) FROM b)
                   ORDER BY o.id LIMIT 100000) x
           WHERE x.status = 'SENT' AND x.sent_at < (SELECT sent_cutoff FROM cut)),
    l AS (SELECT count(*) AS n, min(o.sent_at) AS oldest
            FROM @extschema@.cqrs_outbox o
           WHERE o.id = ANY ((SELECT walk_pending FROM w)::bigint[]) AND o.id < (SELECT walk_from FROM w)
             AND o.status = 'SENT' AND o.sent_at < (SELECT sent_cutoff FROM cut)),
    -- failed rows old enough to be purged that nobody approved (through the
    -- index of rows with an error)
    a AS (SELECT count(*) AS n, min(o.created_at) AS oldest
            FROM @extschema@.cqrs_outbox o
           WHERE o.last_error IS NOT NULL AND o.status IN ('DEAD_LETTERED', 'DLT_FAILED')
             AND o.purge_approved_at IS NULL
             AND o.created_at < (SELECT dlt_cutoff FROM cut))
    SELECT st.worker_pid, st.interval_seconds, st.passes, st.errors,
           st.last_pass_start, st.last_pass_end, st.last_success_at,
           extract(epoch FROM now() - coalesce(st.last_success_at, pg_postmaster_start_time()))::float8,
           st.deleted_sent, st.deleted_dead_lettered, st.deleted_dlt_failed, st.deleted_read_side,
           st.last_error, st.last_error_at,
           st.sent_retention_seconds, e.n + l.n,
           coalesce(extract(epoch FROM cut.sent_cutoff - least(e.oldest, l.oldest)), 0)::float8,
           st.dlt_retention_seconds, a.n,
           coalesce(extract(epoch FROM cut.dlt_cutoff - a.oldest), 0)::float8
      FROM st, cut, e, l, a
$$;
COMMENT ON FUNCTION cqrs_cleanup_stats() IS
    'One row for DBAs and exporters: this database''s cleanup (as cqrs_cleanup_counters(), with the age in seconds of the last successful pass, since the server started when none), the SENT rows past cqrs_sync.sent_retention still in the outbox (counted among the next 100,000 rows the cleanup walks past, for a bounded read) and by how many seconds the oldest is past it, and the DEAD_LETTERED and DLT_FAILED rows past cqrs_sync.dlt_retention nobody approved for purging and how long the oldest has waited beyond it; 0 when none, and when a retention is -1.';
REVOKE ALL ON FUNCTION cqrs_cleanup_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_cleanup_stats() TO pg_monitor, cqrs_sync_operator;

CREATE VIEW cqrs_stats_cleanup AS
    SELECT (s.worker_pid IS NOT NULL)::integer AS worker_up,
           s.worker_pid, s.interval_seconds,
           coalesce(s.passes, 0) AS passes,
           coalesce(s.errors, 0) AS errors,
           s.last_pass_start, s.last_pass_end, s.last_success_at, s.last_success_age_seconds,
           coalesce(s.deleted_sent, 0) AS deleted_sent,
           coalesce(s.deleted_dead_lettered, 0) AS deleted_dead_lettered,
           coalesce(s.deleted_dlt_failed, 0) AS deleted_dlt_failed,
           coalesce(s.deleted_read_side, 0) AS deleted_read_side,
           s.last_error, s.last_error_at,
           s.sent_retention_seconds, s.sent_expired, s.sent_overdue_seconds,
           s.dlt_retention_seconds, s.awaiting_approval, s.awaiting_approval_max_wait_seconds
      FROM @extschema@.cqrs_cleanup_stats() s;
COMMENT ON VIEW cqrs_stats_cleanup IS
    'One row: whether the cleanup worker runs in this database, its interval, the passes that succeeded and failed since the server started (the worker''s and cqrs_cleanup() calls''), the last pass''s start and end, the last success and its age, the rows deleted per status, the last error, the SENT rows past their retention still waiting and the oldest one''s delay, and the failed rows past theirs awaiting a purge approval and the longest wait; for exporters.';

-- Internal: how fresh the dead-letter topic depths in shared memory are.
CREATE FUNCTION cqrs_dlt_depth_state(
    OUT checked_at timestamptz,
    OUT oldest_checked_at timestamptz,
    OUT interval_seconds double precision,
    OUT topics integer,
    OUT partitions integer,
    OUT monitor_pid integer,
    OUT last_error text)
RETURNS record
AS 'MODULE_PATHNAME', 'cqrs_dlt_depth_state'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_dlt_depth_state() IS
    'How fresh the dead-letter topic depths are: when Kafka last answered the monitor worker''s round (NULL: not since the server started), the oldest partition figure, cqrs_sync.dlt_depth_interval in seconds, the topics watched and partitions measured, the monitor worker''s pid, and why its last round (or a partition) failed.';
REVOKE ALL ON FUNCTION cqrs_dlt_depth_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_dlt_depth_state() TO pg_monitor, cqrs_sync_operator;

CREATE VIEW cqrs_stats_dlt_depth AS
    SELECT (s.monitor_pid IS NOT NULL)::integer AS monitor_up,
           s.monitor_pid,
           s.interval_seconds,
           s.checked_at,
           -- no round answered yet: since the server started, whatever was measured
           extract(epoch FROM now() - least(coalesce(s.checked_at, pg_postmaster_start_time()),
                                            s.oldest_checked_at))::float8 AS age_seconds,
           s.topics,
           s.partitions,
           (SELECT coalesce(sum(d.messages), 0)
              FROM @extschema@.cqrs_dlt_depth_partitions() d)::bigint AS messages,
           s.last_error
      FROM @extschema@.cqrs_dlt_depth_state() s;
COMMENT ON VIEW cqrs_stats_dlt_depth IS
    'One row: whether the monitor worker runs, its poll interval, when Kafka last answered it, how old the dead-letter topic depths are (age_seconds: of the oldest figure or the last round answered, whichever is older; since the server started when no round was answered), the topics watched, the partitions measured, the messages they hold, and the last error; for exporters and the staleness alert.';

REVOKE ALL ON cqrs_stats_cleanup, cqrs_stats_dlt_depth FROM PUBLIC;
GRANT SELECT ON cqrs_stats_cleanup, cqrs_stats_dlt_depth TO pg_monitor, cqrs_sync_operator;

-- @@MONITORING_END@@

-----------------------------------------------------------------------------
-- Sink: the read side's consumer (version 0.2.0)
-----------------------------------------------------------------------------

-- @@SINK_BEGIN@@

-- A sink applies the events of Kafka topics to read models in this
-- database, exactly once: the sink workers ("cqrs_sync sink") consume the
-- topics in a consumer group, and store each partition's position in
-- cqrs_sink_offset in the same transaction as the handler's effects.  See
-- docs/sink.md.

CREATE TYPE cqrs_event AS (
    topic       text,
    "partition" integer,
    "offset"    bigint,
    key         text,
    payload     jsonb,
    headers     jsonb,
    event_id    text,
    ts          timestamptz
);
COMMENT ON TYPE cqrs_event IS
    'One Kafka message as a sink handler receives it: topic, partition and offset, key, value as jsonb (payload), headers as a JSON object of strings, the event_id header, and the message timestamp (ts).';

CREATE TABLE cqrs_sink (
    name       text COLLATE "C" PRIMARY KEY,
    topics     text[] NOT NULL,
    -- by name, not regprocedure: pg_upgrade refuses reg* types other than
    -- regclass, regrole and regtype in user tables (function OIDs change)
    handler    text,
    options    jsonb NOT NULL DEFAULT '{}',
    run_as     text NOT NULL,
    consumer   text COLLATE "C" NOT NULL,
    group_id   text NOT NULL,
    paused     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    changed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT cqrs_sink_name_check CHECK (name ~ '^[A-Za-z0-9._-]{1,63}$'),
    CONSTRAINT cqrs_sink_topics_check CHECK (cardinality(topics) > 0),
    CONSTRAINT cqrs_sink_options_check CHECK (jsonb_typeof(options) = 'object'),
    CONSTRAINT cqrs_sink_handler_check CHECK ((handler IS NULL) = (options ? 'route'))
);
COMMENT ON TABLE cqrs_sink IS
    'Sinks declared with cqrs_sink_create(): the topics each applies, its handler (or declarative route in options), the role it runs as and the consumer name its inbox entries use. The sink workers pick up changes without a restart.';
COMMENT ON COLUMN cqrs_sink.name IS 'Sink name: 1 to 63 ASCII letters, digits, ".", "_" or "-".';
COMMENT ON COLUMN cqrs_sink.topics IS 'Kafka topics the sink consumes.';
COMMENT ON COLUMN cqrs_sink.handler IS 'Function f(e cqrs_event) RETURNS void called once per event, by its schema-qualified signature (as regprocedure text; a function renamed or moved to another schema is no longer found); NULL when options.route does the work.';
COMMENT ON COLUMN cqrs_sink.options IS 'route, max_retries, retry_backoff (ms), dlt_topic, dlt_suffix, start, search_path, version_column, as given to cqrs_sink_create() (see docs/sink.md).';
COMMENT ON COLUMN cqrs_sink.run_as IS 'Role the handler or route runs as (by name, as cqrs_consumer.owner).';
COMMENT ON COLUMN cqrs_sink.consumer IS 'Consumer name of the sink''s inbox entries (cqrs_inbox), owned by run_as.';
COMMENT ON COLUMN cqrs_sink.group_id IS 'Kafka consumer group of the sink''s workers.';
COMMENT ON COLUMN cqrs_sink.paused IS 'True after cqrs_sink_pause(): no event is applied until cqrs_sink_resume().';
COMMENT ON COLUMN cqrs_sink.created_at IS 'When the sink was created.';
COMMENT ON COLUMN cqrs_sink.changed_at IS 'When the sink was last paused, resumed or rewound.';

-- Each partition's position: the offset of the next message to apply,
-- written in the same transaction as the effects of the messages before
-- it.  epoch changes with every rewind, so that a worker drops what it
-- fetched from the old position.
CREATE TABLE cqrs_sink_offset (
    sink          text COLLATE "C" NOT NULL REFERENCES cqrs_sink ON DELETE CASCADE,
    topic         text COLLATE "C" NOT NULL,
    "partition"   integer NOT NULL,
    next_offset   bigint NOT NULL,
    epoch         integer NOT NULL DEFAULT 0,
    applied       bigint NOT NULL DEFAULT 0,
    duplicates    bigint NOT NULL DEFAULT 0,
    retried       bigint NOT NULL DEFAULT 0,
    dead_lettered bigint NOT NULL DEFAULT 0,
    dlt_failed    bigint NOT NULL DEFAULT 0,
    last_event_at timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, topic, "partition")
) WITH (fillfactor = 50);
COMMENT ON TABLE cqrs_sink_offset IS
    'Position of each sink in each partition, written in the same transaction as the effects of the events before it: on assignment a worker resumes from here, not from Kafka''s committed offset. The counters count since the sink was created.';
COMMENT ON COLUMN cqrs_sink_offset.next_offset IS 'Offset of the next message to apply; messages below it were applied, skipped as duplicates or held.';
COMMENT ON COLUMN cqrs_sink_offset.epoch IS 'Incremented by every rewind: workers drop what they fetched from the old position.';
COMMENT ON COLUMN cqrs_sink_offset.applied IS 'Events applied (their handler or route ran and committed).';
COMMENT ON COLUMN cqrs_sink_offset.duplicates IS 'Events skipped because the sink''s consumer had already applied their event_id.';
COMMENT ON COLUMN cqrs_sink_offset.retried IS 'Retry attempts of held events (after a handler error).';
COMMENT ON COLUMN cqrs_sink_offset.dead_lettered IS 'Events written to the dead-letter topic.';
COMMENT ON COLUMN cqrs_sink_offset.dlt_failed IS 'Events whose dead-letter publish failed too (kept as DLT_FAILED in cqrs_sink_held).';
COMMENT ON COLUMN cqrs_sink_offset.last_event_at IS 'Kafka timestamp of the last event applied.';
COMMENT ON COLUMN cqrs_sink_offset.updated_at IS 'When the position last moved.';

-- Events taken out of the stream: a handler error holds the event (RETRY)
-- and the later events of its key (BLOCKED) until it succeeds or is
-- dead-lettered; dead-lettered events (DEAD_LETTERED) and those whose
-- dead-letter publish failed (DLT_FAILED) stay for an operator.
CREATE TABLE cqrs_sink_held (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sink             text COLLATE "C" NOT NULL REFERENCES cqrs_sink ON DELETE CASCADE,
    topic            text COLLATE "C",
    "partition"      integer,
    "offset"         bigint,
    key              text COLLATE "C",
    value            bytea,
    headers          jsonb,
    raw_key          bytea,
    raw_headers      jsonb,
    event_id         text,
    ts               timestamptz,
    status           text NOT NULL,
    replay           boolean NOT NULL DEFAULT false,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_error       text,
    held_at          timestamptz NOT NULL DEFAULT now(),
    dlt_topic        text,
    dlt_partition    integer,
    dlt_offset       bigint,
    dead_lettered_at timestamptz,
    CONSTRAINT cqrs_sink_held_status_check
        CHECK (status IN ('RETRY', 'BLOCKED', 'DEAD_LETTERED', 'DLT_FAILED', 'FETCH')),
    CONSTRAINT cqrs_sink_held_event_check
        CHECK (status = 'FETCH' OR (topic IS NOT NULL AND "partition" IS NOT NULL AND "offset" IS NOT NULL))
);
COMMENT ON TABLE cqrs_sink_held IS
    'Events a sink took out of its stream: RETRY (the handler failed; tried again at next_attempt_at), BLOCKED (waits behind an earlier held event of its key), DEAD_LETTERED (in the dead-letter topic), DLT_FAILED (the dead-letter publish failed too: kept here, alerted on), FETCH (a replay from the dead-letter topic not yet read). Operators replay or discard them.';
COMMENT ON COLUMN cqrs_sink_held.value IS 'The message value as Kafka holds it.';
COMMENT ON COLUMN cqrs_sink_held.headers IS 'The message headers, a JSON object of strings.';
COMMENT ON COLUMN cqrs_sink_held.raw_key IS 'The key''s bytes when they are not valid text (key then shows them as \x and hex digits), else NULL. The dead letter carries these bytes.';
COMMENT ON COLUMN cqrs_sink_held.raw_headers IS 'The message headers exactly as Kafka held them, in their order, a name given twice included: an array of [name, value] pairs in base64 (value null for a null header); NULL for none. The dead letter carries these.';
COMMENT ON COLUMN cqrs_sink_held.status IS 'RETRY, BLOCKED, DEAD_LETTERED, DLT_FAILED or FETCH.';
COMMENT ON COLUMN cqrs_sink_held.replay IS 'Put back by an operator (cqrs_sink_replay()): applied on its own, outside the order of its key.';
COMMENT ON COLUMN cqrs_sink_held.attempts IS 'Failed attempts of the handler; over the sink''s max_retries the event is dead-lettered.';
COMMENT ON COLUMN cqrs_sink_held.next_attempt_at IS 'When a RETRY event is tried again (NULL: as soon as it is the first held event of its key).';
COMMENT ON COLUMN cqrs_sink_held.last_error IS 'The last error of the handler (or of the dead-letter publish).';
COMMENT ON COLUMN cqrs_sink_held.dlt_topic IS 'Dead-letter topic (and below, partition and offset) where the event was written, or read from for a replay.';
COMMENT ON SEQUENCE cqrs_sink_held_id_seq IS 'Ids of cqrs_sink_held rows.';
-- a hash of the key, not the key: a Kafka key may be longer than a B-tree entry can be
CREATE INDEX cqrs_sink_held_key_idx ON cqrs_sink_held (sink, topic, "partition", hashtextextended(key, 0), "offset")
    WHERE status IN ('RETRY', 'BLOCKED') AND NOT replay;
COMMENT ON INDEX cqrs_sink_held_key_idx IS
    'Finds the first held event of each key of a partition (later events of those keys are held too).  It holds a 64-bit hash of the key, as a Kafka key may be longer than a B-tree entry can be.';
CREATE INDEX cqrs_sink_held_due_idx ON cqrs_sink_held (sink, next_attempt_at)
    WHERE status IN ('RETRY', 'BLOCKED', 'FETCH');
COMMENT ON INDEX cqrs_sink_held_due_idx IS 'Finds the held events that are due.';
CREATE INDEX cqrs_sink_held_failed_idx ON cqrs_sink_held (sink, status)
    WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED');
COMMENT ON INDEX cqrs_sink_held_failed_idx IS 'Counts dead-lettered and DLT_FAILED events for the stats.';

-- Every operator action on a sink, and every event that left
-- cqrs_sink_held other than by being applied, leaves a row here.
CREATE TABLE cqrs_sink_audit (
    audit_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action            text NOT NULL,
    sink              text NOT NULL,
    held_id           bigint,
    topic             text,
    "partition"       integer,
    "offset"          bigint,
    event_id          text,
    detail            jsonb,
    actor             text NOT NULL DEFAULT (CASE WHEN current_setting('role') = 'none'
                                                  THEN session_user::text
                                                  ELSE current_setting('role') END),
    session_user_name text NOT NULL DEFAULT session_user,
    at                timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT cqrs_sink_audit_action_check
        CHECK (action IN ('CREATE', 'DROP', 'PAUSE', 'RESUME', 'REWIND', 'REPLAY', 'DISCARD', 'FORGET'))
);
COMMENT ON TABLE cqrs_sink_audit IS
    'Audit trail of the sinks: created, dropped (with the held events that went with it), paused, resumed, rewound, events replayed or discarded, applied events forgotten.';
COMMENT ON COLUMN cqrs_sink_audit.action IS 'CREATE, DROP, PAUSE, RESUME, REWIND, REPLAY, DISCARD or FORGET.';
COMMENT ON COLUMN cqrs_sink_audit.held_id IS 'The cqrs_sink_held row acted on, if any.';
COMMENT ON COLUMN cqrs_sink_audit.detail IS 'What was done: options, positions before and after, the event (key, value, headers) of a discarded or dropped one, the reason.';
COMMENT ON COLUMN cqrs_sink_audit.actor IS 'Role acted as: the role set with SET ROLE, else the session user.';
COMMENT ON COLUMN cqrs_sink_audit.session_user_name IS 'Session user: the person (login role) who acted.';
COMMENT ON COLUMN cqrs_sink_audit.at IS 'When it happened.';
COMMENT ON SEQUENCE cqrs_sink_audit_audit_id_seq IS 'Ids of cqrs_sink_audit rows.';

SELECT pg_catalog.pg_extension_config_dump('cqrs_sink', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_sink_offset', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_sink_held', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_sink_held_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_sink_audit', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs_sink_audit_audit_id_seq', '');

REVOKE ALL ON cqrs_sink, cqrs_sink_offset, cqrs_sink_held, cqrs_sink_audit FROM PUBLIC;
REVOKE ALL ON SEQUENCE cqrs_sink_held_id_seq, cqrs_sink_audit_audit_id_seq FROM PUBLIC;
GRANT SELECT ON cqrs_sink, cqrs_sink_offset, cqrs_sink_held, cqrs_sink_audit TO cqrs_sync_operator;
-- monitoring: positions and counts, never an event's key, value or headers,
-- nor a handler's error, which may quote them ("invalid input syntax for
-- type integer: ...")
GRANT SELECT ON cqrs_sink_offset TO pg_monitor;
GRANT SELECT (name, topics, handler, run_as, consumer, group_id, paused, created_at, changed_at)
    ON cqrs_sink TO pg_monitor;
GRANT SELECT (id, sink, topic, "partition", "offset", event_id, ts, status, replay, attempts,
              next_attempt_at, held_at, dlt_topic, dlt_partition, dlt_offset,
              dead_lettered_at)
    ON cqrs_sink_held TO pg_monitor;

-- ---- internals: shared memory, wake-ups, Kafka look-ups (C) ----------------

CREATE FUNCTION cqrs_sink_wake()
RETURNS void
AS 'MODULE_PATHNAME', 'cqrs_sink_wake'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_sink_wake() IS
    'Internal: when the calling transaction commits, the sink workers read the sinks again and look for due held events at once.';

CREATE FUNCTION cqrs_sink_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cqrs_sink_changed'
LANGUAGE C;
COMMENT ON FUNCTION cqrs_sink_changed() IS
    'Internal: trigger of cqrs_sink; the sink workers read the sinks again when the transaction commits.';
CREATE TRIGGER cqrs_sink_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cqrs_sink
    FOR EACH STATEMENT EXECUTE FUNCTION cqrs_sink_changed();

CREATE FUNCTION cqrs_sink_kafka_offsets(topics text[], "at" timestamptz,
    OUT topic text, OUT "partition" integer, OUT "offset" bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cqrs_sink_kafka_offsets'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs_sink_kafka_offsets(text[], timestamptz) IS
    'Internal: asks Kafka (cqrs_sync.brokers) for every partition of the topics the first offset whose timestamp is at or after "at" (the end of the partition if none; 0 for -infinity).';

CREATE FUNCTION cqrs_sink_workers(
    OUT worker integer, OUT pid integer, OUT state text, OUT sinks integer,
    OUT partitions integer, OUT started_at timestamptz, OUT waiting_since timestamptz,
    OUT last_error text, OUT last_error_at timestamptz, OUT workers_wanted integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cqrs_sink_workers_sql'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_sink_workers() IS
    'The sink workers of this server from shared memory: state (idle, running, waiting for database, waiting for broker, no consumer), the sinks and partitions each consumes, its last error.';

CREATE FUNCTION cqrs_sink_partitions(
    OUT sink text, OUT topic text, OUT "partition" integer, OUT worker_pid integer,
    OUT high_watermark bigint, OUT low_watermark bigint, OUT fetched_position bigint,
    OUT oldest_unapplied_at timestamptz, OUT updated_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cqrs_sink_partitions'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION cqrs_sink_partitions() IS
    'The partitions assigned to this server''s sink workers, from shared memory: Kafka''s watermarks as last seen, and the timestamp of the oldest message fetched and not yet applied.';

REVOKE ALL ON FUNCTION cqrs_sink_wake() FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_changed() FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_kafka_offsets(text[], timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_workers() FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_partitions() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_sink_workers() TO pg_monitor, cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_partitions() TO pg_monitor, cqrs_sync_operator;

-- ---- declaring sinks ---------------------------------------------------------

-- The role acting: SET ROLE counts, SECURITY DEFINER does not (as in the
-- audit tables' defaults).
CREATE FUNCTION cqrs_sink_acting_role()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user::text
                ELSE current_setting('role') END
$$;
COMMENT ON FUNCTION cqrs_sink_acting_role() IS
    'Internal: the role acting in this session (the role set with SET ROLE, else the session user), also inside SECURITY DEFINER functions.';
REVOKE ALL ON FUNCTION cqrs_sink_acting_role() FROM PUBLIC;

CREATE FUNCTION cqrs_sink_topic_valid(topic text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT topic ~ '^[A-Za-z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')
$$;
COMMENT ON FUNCTION cqrs_sink_topic_valid(text) IS
    'Internal: whether Kafka accepts the name as a topic name.';
REVOKE ALL ON FUNCTION cqrs_sink_topic_valid(text) FROM PUBLIC;

CREATE FUNCTION cqrs_sink_create(name text, topics text[], handler regprocedure,
                                 options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acting     text := @extschema@.cqrs_sink_acting_role();
    opts       jsonb := coalesce(cqrs_sink_create.options, '{}');
    v_run_as   text;
    v_consumer text;
    v_owner    text;
    t        text;
    k        text;
    route    jsonb;
    target_name text;
    target   regclass;
    dlt      text;
    backoff  numeric;
    p        pg_proc;
BEGIN
    IF cqrs_sink_create.name IS NULL OR cqrs_sink_create.topics IS NULL THEN
        RAISE EXCEPTION 'name and topics must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cqrs_sink_create.name !~ '^[A-Za-z0-9._-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid sink name "%"', cqrs_sink_create.name
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A sink name has 1 to 63 ASCII letters, digits, ".", "_" or "-": it names the consumer group and the dead-letter topics.';
    END IF;
    IF cardinality(cqrs_sink_create.topics) = 0 THEN
        RAISE EXCEPTION 'a sink needs at least one topic' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH t IN ARRAY cqrs_sink_create.topics LOOP
        IF t IS NULL OR NOT @extschema@.cqrs_sink_topic_valid(t) THEN
            RAISE EXCEPTION 'invalid topic name "%"', t
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A Kafka topic name has 1 to 249 ASCII letters, digits, ".", "_" or "-", and is not "." or "..".';
        END IF;
    END LOOP;
    IF (SELECT count(DISTINCT u) FROM unnest(cqrs_sink_create.topics) u) <> cardinality(cqrs_sink_create.topics) THEN
        RAISE EXCEPTION 'topics must not repeat a topic' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(opts) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR k IN SELECT jsonb_object_keys(opts) LOOP
        IF k NOT IN ('route', 'max_retries', 'retry_backoff', 'dlt_topic', 'dlt_suffix', 'start',
                     'run_as', 'consumer', 'group_id', 'search_path', 'version_column') THEN
            RAISE EXCEPTION 'unknown sink option "%"', k
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Options are route, max_retries, retry_backoff, dlt_topic, dlt_suffix, start, run_as, consumer, group_id, search_path and version_column.';
        END IF;
        IF jsonb_typeof(opts->k) = 'null' THEN
            opts := opts - k;
        END IF;
    END LOOP;

    -- who the handler runs as: the acting role, or a role it may become
    v_run_as := coalesce(opts->>'run_as', acting);
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_run_as) THEN
        RAISE EXCEPTION 'role "%" does not exist', v_run_as USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT pg_has_role(acting, v_run_as, 'MEMBER') THEN
        RAISE EXCEPTION 'permission denied to create a sink that runs as role "%"', v_run_as
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('Role "%s" is not a member of role "%s".', acting, v_run_as);
    END IF;

    -- the handler, or the declarative route
    IF cqrs_sink_create.handler IS NOT NULL THEN
        IF opts ? 'route' THEN
            RAISE EXCEPTION 'a sink has a handler or a route, not both' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO p FROM pg_proc WHERE oid = cqrs_sink_create.handler;
        IF p.pronargs <> 1 OR p.proargtypes[0] <> '@extschema@.cqrs_event'::regtype
           OR p.prorettype <> 'void'::regtype OR p.prokind <> 'f' OR p.proretset THEN
            RAISE EXCEPTION 'sink handler % must be a function f(e cqrs_event) RETURNS void', cqrs_sink_create.handler
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT has_function_privilege(v_run_as, cqrs_sink_create.handler, 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied for function %', cqrs_sink_create.handler
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The sink runs as role "%s", which may not execute the handler.', v_run_as);
        END IF;
    ELSE
        route := opts->'route';
        IF route IS NULL OR jsonb_typeof(route) <> 'object' OR NOT route ? 'target' THEN
            RAISE EXCEPTION 'a sink without a handler needs options.route, an object with a target'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'For example {"route": {"target": "board_detail", "version": "version", "delete": "deleted"}}.';
        END IF;
        FOR k IN SELECT jsonb_object_keys(route) LOOP
            IF k NOT IN ('target', 'version', 'delete') THEN
                RAISE EXCEPTION 'unknown route option "%"', k
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'A route has target, version (the payload field holding the version) and delete (a field name, or an object of field values, that marks a delete).';
            END IF;
        END LOOP;
        -- the target is named as the handlers' code would: with the sink's
        -- search_path, which must name nothing else (this function runs as
        -- the extension's owner): no operator, function or type of this
        -- statement is looked up in it
        target_name := route->>'target';
        PERFORM pg_catalog.set_config('search_path', coalesce(opts->>'search_path', '"$user", public'), true);
        target := target_name::pg_catalog.regclass;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        IF NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = target AND indisprimary) THEN
            RAISE EXCEPTION 'route target % has no primary key', target USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF route ? 'version' AND jsonb_typeof(route->'version') <> 'string' THEN
            RAISE EXCEPTION 'route version must be the name of a payload field' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF route ? 'delete' AND jsonb_typeof(route->'delete') NOT IN ('string', 'object') THEN
            RAISE EXCEPTION 'route delete must be a payload field name or an object of field values'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- the worker reads the target by its OID: store it schema-qualified
        opts := jsonb_set(opts, '{route,target}', to_jsonb(target::text));
    END IF;

    -- retries, dead letters, start, group
    IF opts ? 'max_retries' AND (jsonb_typeof(opts->'max_retries') <> 'number'
                                 OR (opts->>'max_retries')::numeric NOT BETWEEN 0 AND 1000
                                 OR (opts->>'max_retries')::numeric <> trunc((opts->>'max_retries')::numeric)) THEN
        RAISE EXCEPTION 'max_retries must be an integer from 0 to 1000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- stored as an integer: 5.0 is one, but its text is not an int4's
    IF opts ? 'max_retries' THEN
        opts := jsonb_set(opts, '{max_retries}', to_jsonb((opts->>'max_retries')::numeric::integer));
    END IF;
    IF opts ? 'retry_backoff' THEN
        IF jsonb_typeof(opts->'retry_backoff') = 'number' THEN
            backoff := (opts->>'retry_backoff')::numeric;
        ELSIF jsonb_typeof(opts->'retry_backoff') = 'string' THEN
            backoff := extract(epoch FROM (opts->>'retry_backoff')::interval) * 1000;
        END IF;
        IF backoff IS NULL OR backoff < 1 OR backoff > 3600000 THEN
            RAISE EXCEPTION 'retry_backoff must be from 1 ms to 1 hour (a number of milliseconds or an interval such as ''500ms'')'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        opts := jsonb_set(opts, '{retry_backoff}', to_jsonb(round(backoff)::integer));
    END IF;
    IF opts ? 'start' AND opts->>'start' NOT IN ('earliest', 'latest') THEN
        RAISE EXCEPTION 'start must be "earliest" or "latest"' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF opts ? 'dlt_topic' AND opts ? 'dlt_suffix' THEN
        RAISE EXCEPTION 'give dlt_topic or dlt_suffix, not both' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH t IN ARRAY cqrs_sink_create.topics LOOP
        dlt := coalesce(opts->>'dlt_topic', t || coalesce(opts->>'dlt_suffix', '.' || cqrs_sink_create.name || '.DLT'));
        IF NOT @extschema@.cqrs_sink_topic_valid(dlt) OR dlt = t THEN
            RAISE EXCEPTION 'invalid dead-letter topic "%" for topic "%"', dlt, t
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'The dead-letter topic must be a valid Kafka topic name (at most 249 characters) other than the topic itself.';
        END IF;
    END LOOP;
    FOR k IN SELECT unnest(ARRAY['run_as', 'consumer', 'group_id', 'search_path', 'version_column']) LOOP
        IF opts ? k AND (jsonb_typeof(opts->k) <> 'string' OR opts->>k = '') THEN
            RAISE EXCEPTION '% must be a non-empty string', k USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    -- the consumer name of its inbox entries belongs to run_as
    v_consumer := coalesce(opts->>'consumer', cqrs_sink_create.name);
    SELECT c.owner INTO v_owner FROM @extschema@.cqrs_consumer c WHERE c.consumer = v_consumer FOR UPDATE;
    IF v_owner IS NULL THEN
        INSERT INTO @extschema@.cqrs_consumer (consumer, owner) VALUES (v_consumer, v_run_as);
    ELSIF v_owner <> v_run_as AND NOT (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_owner)
                                       AND pg_has_role(v_run_as, v_owner, 'MEMBER')) THEN
        RAISE EXCEPTION 'consumer "%" belongs to role "%"', v_consumer, v_owner
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Choose another consumer name (option consumer), or run the sink as that role.';
    END IF;

    IF EXISTS (SELECT 1 FROM @extschema@.cqrs_sink s WHERE s.name = cqrs_sink_create.name) THEN
        RAISE EXCEPTION 'sink "%" already exists', cqrs_sink_create.name USING ERRCODE = 'duplicate_object';
    END IF;
    INSERT INTO @extschema@.cqrs_sink (name, topics, handler, options, run_as, consumer, group_id)
    -- (the handler's text is schema-qualified: search_path is pg_catalog here)
    VALUES (cqrs_sink_create.name, cqrs_sink_create.topics, cqrs_sink_create.handler::text,
            opts - 'run_as' - 'consumer' - 'group_id', v_run_as, v_consumer,
            coalesce(opts->>'group_id', 'cqrs_sync.' || current_database() || '.' || cqrs_sink_create.name));
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, detail)
    VALUES ('CREATE', cqrs_sink_create.name,
            jsonb_build_object('topics', cqrs_sink_create.topics, 'handler', cqrs_sink_create.handler::text,
                               'options', opts, 'run_as', v_run_as));
END
$$;
COMMENT ON FUNCTION cqrs_sink_create(text, text[], regprocedure, jsonb) IS
    'Operator: declares a sink that applies the events of the topics to this database exactly once, calling handler(e cqrs_event) per event as role options.run_as (default: the acting role), or, with a NULL handler, the declarative options.route; the sink workers start on it without a restart (audited).';

CREATE FUNCTION cqrs_sink_drop(name text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s @extschema@.cqrs_sink;
BEGIN
    -- waits for the workers' transactions on the sink
    SELECT * INTO s FROM @extschema@.cqrs_sink WHERE cqrs_sink.name = cqrs_sink_drop.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sink "%" does not exist', cqrs_sink_drop.name USING ERRCODE = 'undefined_object';
    END IF;
    -- the held events go with the sink: the audit keeps them
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, held_id, topic, "partition", "offset", event_id, detail)
    SELECT 'DROP', h.sink, h.id, h.topic, h."partition", h."offset", h.event_id,
           jsonb_build_object('status', h.status, 'key', h.key, 'value', encode(h.value, 'base64'),
                              'headers', h.headers, 'raw_key', encode(h.raw_key, 'base64'),
                              'raw_headers', h.raw_headers, 'last_error', h.last_error)
      FROM @extschema@.cqrs_sink_held h
     WHERE h.sink = s.name
     ORDER BY h.id;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, detail)
    SELECT 'DROP', s.name,
           jsonb_build_object('topics', s.topics, 'handler', s.handler::text, 'options', s.options,
                              'positions', coalesce(jsonb_agg(jsonb_build_object('topic', o.topic, 'partition', o."partition",
                                                                                  'position', o.next_offset)
                                                              ORDER BY o.topic, o."partition"), '[]'))
      FROM @extschema@.cqrs_sink_offset o
     WHERE o.sink = s.name;
    DELETE FROM @extschema@.cqrs_sink WHERE cqrs_sink.name = s.name;
END
$$;
COMMENT ON FUNCTION cqrs_sink_drop(text) IS
    'Operator: drops a sink with its positions and held events (each kept in cqrs_sink_audit); its workers leave the consumer group. The inbox entries of its consumer stay.';

-- Pause and resume: the row lock waits for the workers' transactions in
-- progress, so that once a pause commits, nothing more is applied.
CREATE FUNCTION cqrs_sink_set_paused(sink_name text, pause boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE @extschema@.cqrs_sink SET paused = pause, changed_at = now()
     WHERE cqrs_sink.name = sink_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sink "%" does not exist', sink_name USING ERRCODE = 'undefined_object';
    END IF;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink)
    VALUES (CASE WHEN pause THEN 'PAUSE' ELSE 'RESUME' END, sink_name);
END
$$;
COMMENT ON FUNCTION cqrs_sink_set_paused(text, boolean) IS
    'Internal: pauses or resumes a sink, audited, for cqrs_sink_pause() and cqrs_sink_resume().';
REVOKE ALL ON FUNCTION cqrs_sink_set_paused(text, boolean) FROM PUBLIC;

CREATE FUNCTION cqrs_sink_pause(name text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@.cqrs_sink_set_paused(name, true) $$;
COMMENT ON FUNCTION cqrs_sink_pause(text) IS
    'Operator: pauses a sink: once the call commits, no event is applied (the workers keep their partitions and fetch nothing) until cqrs_sink_resume() (audited).';

CREATE FUNCTION cqrs_sink_resume(name text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@.cqrs_sink_set_paused(name, false) $$;
COMMENT ON FUNCTION cqrs_sink_resume(text) IS
    'Operator: resumes a paused sink from its stored positions (audited).';

-- Moves positions: the workers drop what they fetched and start again there.
-- Held events at or after a new position come again from Kafka: they are
-- deleted (dead-lettered and DLT_FAILED ones stay).
CREATE FUNCTION cqrs_sink_set_positions(sink_name text, positions jsonb, reason jsonb)
RETURNS TABLE (topic text, "partition" integer, old_position bigint, new_position bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    WITH p AS (
        SELECT e->>'topic' AS topic, (e->>'partition')::integer AS part, (e->>'offset')::bigint AS off
          FROM jsonb_array_elements(positions) e
    ), old AS (
        SELECT p.topic, p.part, p.off, o.next_offset
          FROM p LEFT JOIN @extschema@.cqrs_sink_offset o
            ON o.sink = sink_name AND o.topic = p.topic AND o."partition" = p.part
    ), moved AS (
        INSERT INTO @extschema@.cqrs_sink_offset AS o (sink, topic, "partition", next_offset, epoch)
        SELECT sink_name, old.topic, old.part, old.off, 1 FROM old
        ON CONFLICT ON CONSTRAINT cqrs_sink_offset_pkey
        DO UPDATE SET next_offset = excluded.next_offset, epoch = o.epoch + 1, updated_at = now()
        RETURNING o.topic, o."partition"
    ), unheld AS (
        DELETE FROM @extschema@.cqrs_sink_held h
         USING p
         WHERE h.sink = sink_name AND h.topic = p.topic AND h."partition" = p.part
           AND h."offset" >= p.off AND h.status IN ('RETRY', 'BLOCKED') AND NOT h.replay
        RETURNING h.id
    )
    SELECT old.topic, old.part, old.next_offset, old.off
      FROM old
     ORDER BY 1, 2;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, detail)
    VALUES ('REWIND', sink_name, reason || jsonb_build_object('positions', positions));
    UPDATE @extschema@.cqrs_sink SET changed_at = now() WHERE name = sink_name;
END
$$;
COMMENT ON FUNCTION cqrs_sink_set_positions(text, jsonb, jsonb) IS
    'Internal: sets positions of a sink (and drops its held events at or after them, which Kafka delivers again), for cqrs_sink_rewind().';
REVOKE ALL ON FUNCTION cqrs_sink_set_positions(text, jsonb, jsonb) FROM PUBLIC;

CREATE FUNCTION cqrs_sink_rewind(name text, "to" timestamptz)
RETURNS TABLE (topic text, "partition" integer, old_position bigint, new_position bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s @extschema@.cqrs_sink;
    positions jsonb;
BEGIN
    IF cqrs_sink_rewind."to" IS NULL THEN
        RAISE EXCEPTION 'to must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- waits for the workers' transactions on the sink
    SELECT * INTO s FROM @extschema@.cqrs_sink WHERE cqrs_sink.name = cqrs_sink_rewind.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sink "%" does not exist', cqrs_sink_rewind.name USING ERRCODE = 'undefined_object';
    END IF;
    SELECT jsonb_agg(jsonb_build_object('topic', k.topic, 'partition', k."partition", 'offset', k."offset"))
      INTO positions
      FROM @extschema@.cqrs_sink_kafka_offsets(s.topics, cqrs_sink_rewind."to") k;
    IF positions IS NULL THEN
        RAISE EXCEPTION 'Kafka knows no partition of the topics of sink "%"', s.name
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN QUERY SELECT * FROM @extschema@.cqrs_sink_set_positions(s.name, positions,
                                                                   jsonb_build_object('to', cqrs_sink_rewind."to"));
END
$$;
COMMENT ON FUNCTION cqrs_sink_rewind(text, timestamptz) IS
    'Operator: moves every partition of the sink to the first message at or after "to" (-infinity: the beginning), asking Kafka; the workers apply again from there, and skip the events the sink''s consumer already applied unless cqrs_sink_forget_applied() ran (audited). Returns the positions before and after.';

CREATE FUNCTION cqrs_sink_rewind(name text, topic text, "partition" integer, "offset" bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s @extschema@.cqrs_sink;
    old bigint;
BEGIN
    IF $2 IS NULL OR $3 IS NULL OR $4 IS NULL THEN
        RAISE EXCEPTION 'topic, partition and offset must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF $3 < 0 OR $4 < 0 THEN
        RAISE EXCEPTION 'partition and offset must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- waits for the workers' transactions on the sink
    SELECT * INTO s FROM @extschema@.cqrs_sink WHERE cqrs_sink.name = $1 FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sink "%" does not exist', $1 USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT $2 = ANY (s.topics) THEN
        RAISE EXCEPTION 'sink "%" does not consume topic "%"', s.name, $2 USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT r.old_position INTO old
      FROM @extschema@.cqrs_sink_set_positions(
               s.name, jsonb_build_array(jsonb_build_object('topic', $2, 'partition', $3, 'offset', $4)),
               '{}') r;
    RETURN old;
END
$$;
COMMENT ON FUNCTION cqrs_sink_rewind(text, text, integer, bigint) IS
    'Operator: moves one partition of the sink to an offset, and returns its position before (NULL if it had none); the workers apply again from there (audited). See cqrs_sink_rewind(text, timestamptz).';

CREATE FUNCTION cqrs_sink_forget_applied(name text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s @extschema@.cqrs_sink;
    n_inbox bigint;
    n_delta bigint;
BEGIN
    SELECT * INTO s FROM @extschema@.cqrs_sink WHERE cqrs_sink.name = cqrs_sink_forget_applied.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sink "%" does not exist', cqrs_sink_forget_applied.name USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT s.paused THEN
        RAISE EXCEPTION 'sink "%" must be paused to forget what it applied', s.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'To rebuild a read model: cqrs_sink_pause(), empty the read model, cqrs_sink_forget_applied(), cqrs_sink_rewind(), cqrs_sink_resume().';
    END IF;
    DELETE FROM @extschema@.cqrs_inbox WHERE consumer = s.consumer;
    GET DIAGNOSTICS n_inbox = ROW_COUNT;
    DELETE FROM @extschema@.cqrs_delta_inbox WHERE consumer = s.consumer;
    GET DIAGNOSTICS n_delta = ROW_COUNT;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, detail)
    VALUES ('FORGET', s.name, jsonb_build_object('consumer', s.consumer, 'inbox', n_inbox, 'delta_memory', n_delta));
    RETURN n_inbox + n_delta;
END
$$;
COMMENT ON FUNCTION cqrs_sink_forget_applied(text) IS
    'Operator: deletes the inbox entries and delta memory of a paused sink''s consumer, so that a rewind applies every event again: for rebuilding an emptied read model (audited). Returns the rows deleted.';

-- ---- held events -------------------------------------------------------------

CREATE FUNCTION cqrs_sink_replay(id bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h @extschema@.cqrs_sink_held;
BEGIN
    IF cqrs_sink_replay.id IS NULL THEN
        RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO h FROM @extschema@.cqrs_sink_held WHERE cqrs_sink_held.id = cqrs_sink_replay.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'held event % does not exist', cqrs_sink_replay.id USING ERRCODE = 'no_data_found';
    END IF;
    IF h.status NOT IN ('DEAD_LETTERED', 'DLT_FAILED') THEN
        RAISE EXCEPTION 'held event % is %, not dead-lettered', h.id, h.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'RETRY and BLOCKED events are being retried already; only DEAD_LETTERED and DLT_FAILED events can be replayed.';
    END IF;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, held_id, topic, "partition", "offset", event_id, detail)
    VALUES ('REPLAY', h.sink, h.id, h.topic, h."partition", h."offset", h.event_id,
            jsonb_build_object('status', h.status, 'last_error', h.last_error, 'dlt_topic', h.dlt_topic,
                               'dlt_partition', h.dlt_partition, 'dlt_offset', h.dlt_offset));
    UPDATE @extschema@.cqrs_sink_held
       SET status = 'RETRY', replay = true, attempts = 0, next_attempt_at = now()
     WHERE cqrs_sink_held.id = h.id;
    PERFORM @extschema@.cqrs_sink_wake();
END
$$;
COMMENT ON FUNCTION cqrs_sink_replay(bigint) IS
    'Operator: applies a DEAD_LETTERED or DLT_FAILED event of cqrs_sink_held again, with a fresh retry budget (audited); once applied the row is deleted. Use it after fixing the handler.';

CREATE FUNCTION cqrs_sink_replay(name text, dlt_topic text, dlt_partition integer, dlt_offset bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s @extschema@.cqrs_sink;
    new_id bigint;
    acting text := @extschema@.cqrs_sink_acting_role();
BEGIN
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL OR $4 IS NULL THEN
        RAISE EXCEPTION 'name, dlt_topic, dlt_partition and dlt_offset must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT @extschema@.cqrs_sink_topic_valid($2) OR $3 < 0 OR $4 < 0 THEN
        RAISE EXCEPTION 'invalid dead-letter message %[%] at offset %', $2, $3, $4
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO s FROM @extschema@.cqrs_sink WHERE cqrs_sink.name = $1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sink "%" does not exist', $1 USING ERRCODE = 'undefined_object';
    END IF;
    -- the message is applied as the sink's role, as its headers say: from a
    -- topic other than the sink's own dead-letter topics, only for a member
    -- of that role (who could create such a sink anyway)
    IF $2 <> ALL (ARRAY(SELECT coalesce(s.options->>'dlt_topic',
                                        t || coalesce(s.options->>'dlt_suffix', '.' || s.name || '.DLT'))
                          FROM unnest(s.topics) t))
       AND NOT (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = s.run_as)
                AND pg_has_role(acting, s.run_as, 'MEMBER')) THEN
        RAISE EXCEPTION 'permission denied to replay a message of topic "%" through sink "%"', $2, s.name
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('The sink applies it as role "%s", and role "%s" is not a member of that role.', s.run_as, acting),
                  HINT = 'Replay from one of the sink''s dead-letter topics (cqrs_sink_held.dlt_topic), or as a member of the sink''s role.';
    END IF;
    INSERT INTO @extschema@.cqrs_sink_held (sink, status, replay, next_attempt_at, dlt_topic, dlt_partition, dlt_offset)
    VALUES (s.name, 'FETCH', true, now(), $2, $3, $4)
    RETURNING cqrs_sink_held.id INTO new_id;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, held_id, detail)
    VALUES ('REPLAY', s.name, new_id,
            jsonb_build_object('dlt_topic', $2, 'dlt_partition', $3, 'dlt_offset', $4));
    PERFORM @extschema@.cqrs_sink_wake();
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION cqrs_sink_replay(text, text, integer, bigint) IS
    'Operator: reads the message at dlt_offset of dlt_topic[dlt_partition] and applies it through the sink again, as the event named by its x-original-topic, x-original-partition and x-original-offset headers (audited). Returns the id of its cqrs_sink_held row (status FETCH until a worker read it).';

CREATE FUNCTION cqrs_sink_discard(id bigint, reason text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h @extschema@.cqrs_sink_held;
BEGIN
    IF cqrs_sink_discard.id IS NULL THEN
        RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cqrs_sink_discard.reason IS NULL OR btrim(cqrs_sink_discard.reason) = '' THEN
        RAISE EXCEPTION 'a reason is required to discard an event' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Say why the event may be dropped; the reason is kept in cqrs_sink_audit.';
    END IF;
    SELECT * INTO h FROM @extschema@.cqrs_sink_held WHERE cqrs_sink_held.id = cqrs_sink_discard.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'held event % does not exist', cqrs_sink_discard.id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO @extschema@.cqrs_sink_audit (action, sink, held_id, topic, "partition", "offset", event_id, detail)
    VALUES ('DISCARD', h.sink, h.id, h.topic, h."partition", h."offset", h.event_id,
            jsonb_build_object('status', h.status, 'key', h.key, 'value', encode(h.value, 'base64'),
                               'headers', h.headers, 'raw_key', encode(h.raw_key, 'base64'),
                               'raw_headers', h.raw_headers, 'last_error', h.last_error,
                               'reason', cqrs_sink_discard.reason));
    DELETE FROM @extschema@.cqrs_sink_held WHERE cqrs_sink_held.id = h.id;
    PERFORM @extschema@.cqrs_sink_wake();
END
$$;
COMMENT ON FUNCTION cqrs_sink_discard(bigint, text) IS
    'Operator: drops a held event for good (the audit keeps it, who, when and why); discarding a RETRY event lets the later events of its key go on.';

REVOKE ALL ON FUNCTION cqrs_sink_create(text, text[], regprocedure, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_drop(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_pause(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_resume(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_rewind(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_rewind(text, text, integer, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_forget_applied(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_replay(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_replay(text, text, integer, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs_sink_discard(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_sink_create(text, text[], regprocedure, jsonb) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_drop(text) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_pause(text) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_resume(text) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_rewind(text, timestamptz) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_rewind(text, text, integer, bigint) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_forget_applied(text) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_replay(bigint) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_replay(text, text, integer, bigint) TO cqrs_sync_operator;
GRANT EXECUTE ON FUNCTION cqrs_sink_discard(bigint, text) TO cqrs_sync_operator;

-- ---- seeing it -------------------------------------------------------------------

CREATE VIEW cqrs_sink_stats AS
    SELECT coalesce(o.sink, p.sink) AS sink,
           coalesce(o.topic, p.topic) AS topic,
           coalesce(o."partition", p."partition") AS "partition",
           o.next_offset AS "position",
           p.high_watermark,
           CASE WHEN p.high_watermark IS NOT NULL
                THEN greatest(p.high_watermark
                              - greatest(coalesce(o.next_offset, p.fetched_position, 0),
                                         coalesce(p.low_watermark, 0)), 0)
           END AS lag,
           CASE WHEN p.high_watermark IS NULL THEN NULL
                WHEN p.high_watermark <= greatest(coalesce(o.next_offset, p.fetched_position, 0),
                                                  coalesce(p.low_watermark, 0)) THEN 0::float8
                WHEN p.oldest_unapplied_at IS NOT NULL
                THEN greatest(extract(epoch FROM now() - p.oldest_unapplied_at), 0)::float8
                ELSE greatest(extract(epoch FROM now() - coalesce(o.updated_at, p.updated_at)), 0)::float8
           END AS lag_seconds,
           coalesce(o.applied, 0) AS applied,
           coalesce(o.duplicates, 0) AS duplicates,
           coalesce(o.retried, 0) AS retried,
           coalesce(o.dead_lettered, 0) AS dead_lettered,
           coalesce(h.failed, 0) AS failed,
           coalesce(h.held, 0) AS held,
           coalesce(h.in_dlt, 0) AS in_dlt,
           coalesce(o.dlt_failed, 0) AS dlt_failed,
           p.worker_pid,
           o.last_event_at,
           o.updated_at
      FROM @extschema@.cqrs_sink_offset o
      FULL JOIN @extschema@.cqrs_sink_partitions() p
        ON p.sink = o.sink AND p.topic = o.topic AND p."partition" = o."partition"
      LEFT JOIN LATERAL (
            SELECT count(*) FILTER (WHERE x.status = 'DLT_FAILED') AS failed,
                   count(*) FILTER (WHERE x.status IN ('RETRY', 'BLOCKED')) AS held,
                   count(*) FILTER (WHERE x.status = 'DEAD_LETTERED') AS in_dlt
              FROM @extschema@.cqrs_sink_held x
             WHERE x.sink = coalesce(o.sink, p.sink) AND x.topic = coalesce(o.topic, p.topic)
               AND x."partition" = coalesce(o."partition", p."partition")) h ON true;
COMMENT ON VIEW cqrs_sink_stats IS
    'One row per sink and partition: stored position (next offset to apply), Kafka''s high watermark as the assigned worker last saw it, lag in messages and seconds (age of the oldest message fetched and not applied; else the time since the position last moved), applied, duplicates, retried and dead_lettered counts, failed (DLT_FAILED events kept), held (RETRY and BLOCKED events), in_dlt (DEAD_LETTERED events not replayed or discarded).';

CREATE VIEW cqrs_stats_sink AS
    SELECT s.name AS sink,
           s.paused,
           cardinality(s.topics) AS topics,
           count(st."partition") AS partitions,
           count(st.worker_pid) AS partitions_assigned,
           count(DISTINCT st.worker_pid) AS workers,
           coalesce(sum(st.lag), 0)::bigint AS lag,
           coalesce(max(st.lag_seconds), 0)::float8 AS lag_seconds,
           coalesce(sum(st.applied), 0)::bigint AS applied,
           coalesce(sum(st.duplicates), 0)::bigint AS duplicates,
           coalesce(sum(st.retried), 0)::bigint AS retried,
           coalesce(sum(st.dead_lettered), 0)::bigint AS dead_lettered,
           coalesce(sum(st.dlt_failed), 0)::bigint AS dlt_failed,
           (SELECT count(*) FROM @extschema@.cqrs_sink_held x
             WHERE x.sink = s.name AND x.status IN ('RETRY', 'BLOCKED', 'FETCH')) AS held,
           (SELECT count(*) FROM @extschema@.cqrs_sink_held x
             WHERE x.sink = s.name AND x.status = 'DEAD_LETTERED') AS in_dlt,
           (SELECT count(*) FROM @extschema@.cqrs_sink_held x
             WHERE x.sink = s.name AND x.status = 'DLT_FAILED') AS failed
      FROM @extschema@.cqrs_sink s
      LEFT JOIN @extschema@.cqrs_sink_stats st ON st.sink = s.name
     GROUP BY s.name, s.paused, s.topics;
COMMENT ON VIEW cqrs_stats_sink IS
    'One row per sink, for exporters: paused, partitions (and those assigned to a worker of this server), total lag in messages, largest lag in seconds, counters, and held, dead-lettered (in_dlt) and DLT_FAILED (failed) events kept in cqrs_sink_held.';

CREATE VIEW cqrs_stats_sink_workers AS
    SELECT w.worker, w.pid, w.state, w.sinks, w.partitions, w.started_at, w.waiting_since,
           CASE WHEN w.waiting_since IS NULL THEN 0::float8
                ELSE extract(epoch FROM now() - w.waiting_since)::float8 END AS waiting_seconds,
           w.last_error, w.last_error_at, w.workers_wanted
      FROM @extschema@.cqrs_sink_workers() w;
COMMENT ON VIEW cqrs_stats_sink_workers IS
    'The sink workers of this server (one row each, also the ones expected and not running, with pid NULL and state stopped): state, how long they have been waiting for the database or the broker, sinks and partitions they consume, last error.';

REVOKE ALL ON cqrs_sink_stats, cqrs_stats_sink, cqrs_stats_sink_workers FROM PUBLIC;
GRANT SELECT ON cqrs_sink_stats, cqrs_stats_sink, cqrs_stats_sink_workers TO pg_monitor, cqrs_sync_operator;

-- @@SINK_END@@

-- the dead-letter topic depths are measured by the monitor worker
COMMENT ON FUNCTION cqrs_dlt_depth_partitions() IS
    'Watermark offsets of the dead-letter topic partitions, as the monitor worker last asked Kafka (shared memory).';
COMMENT ON VIEW cqrs_dlt_depth IS
    'Messages per dead-letter topic and partition (high minus low watermark), refreshed by the monitor worker every cqrs_sync.dlt_depth_interval: the DLT topics the relay wrote to and those in cqrs_sync.read_side_dlt_topics.';
