--
-- Operator functions: cqrs_retry, cqrs_retry_dlt_failed, cqrs_discard.
-- Rows are made by hand (no relay runs in this database).
--
CREATE EXTENSION cqrs_sync;
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT cqrs_enqueue('orders', 'o-' || g, jsonb_build_object('n', g)) FROM generate_series(1, 5) g \g /dev/null
UPDATE cqrs_outbox SET status = 'DLT_FAILED', retry_count = 6, dlt_retry_count = 1,
       last_error = 'MSG_SIZE_TOO_LARGE: too big; dead-letter topic "orders.DLT": too big'
 WHERE key IN ('o-1', 'o-2');
UPDATE cqrs_outbox SET status = 'DEAD_LETTERED', retry_count = 6, last_error = 'INVALID_RECORD'
 WHERE key = 'o-3';
UPDATE cqrs_outbox SET status = 'SENT', sent_at = now() WHERE key = 'o-4';
SELECT key, status, retry_count, dlt_retry_count FROM cqrs_outbox ORDER BY id;

-- privileges: nobody but cqrs_sync_operator (and superusers)
SELECT p.oid::regprocedure AS function,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       has_function_privilege('cqrs_sync_operator', p.oid, 'EXECUTE') AS operator,
       p.prosecdef AS security_definer,
       p.proconfig AS settings
  FROM pg_proc p
 WHERE p.proname IN ('cqrs_retry', 'cqrs_retry_dlt_failed', 'cqrs_discard', 'cqrs_wake_relay',
                     'cqrs_relay_revisit')
 ORDER BY p.oid::regprocedure::text COLLATE "C";

CREATE ROLE cqrs_regress_nobody LOGIN;
CREATE ROLE cqrs_regress_ops LOGIN IN ROLE cqrs_sync_operator;
SET ROLE cqrs_regress_nobody;
SELECT cqrs_retry(1);
SELECT cqrs_retry_dlt_failed();
SELECT cqrs_discard(1, 'no');
RESET ROLE;

SET ROLE cqrs_regress_ops;
-- errors
SELECT cqrs_retry(NULL);
SELECT cqrs_retry(-1);
SELECT cqrs_retry((SELECT id FROM cqrs_outbox WHERE key = 'o-4'));
SELECT cqrs_discard((SELECT id FROM cqrs_outbox WHERE key = 'o-3'), '  ');
SELECT cqrs_discard((SELECT id FROM cqrs_outbox WHERE key = 'o-4'), 'sent already');

RESET ROLE;
CREATE FUNCTION pg_temp.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;
SELECT stmt, pg_temp.sqlstate_of(stmt) FROM (VALUES
    ('SELECT cqrs_retry(NULL)'),
    ('SELECT cqrs_retry(-1)'),
    ('SELECT cqrs_retry(4)'),
    ('SELECT cqrs_discard(3, NULL)'),
    ('SELECT cqrs_discard(4, ''sent'')'),
    ('SET ROLE cqrs_regress_nobody; SELECT cqrs_retry(1)')
) AS t(stmt);
RESET ROLE;
SET ROLE cqrs_regress_ops;

-- retry one DEAD_LETTERED row, then all DLT_FAILED rows
SELECT cqrs_retry((SELECT id FROM cqrs_outbox WHERE key = 'o-3'));
SELECT cqrs_retry_dlt_failed();
SELECT cqrs_retry_dlt_failed();
-- discard one with a reason
SELECT cqrs_discard((SELECT id FROM cqrs_outbox WHERE key = 'o-5'), 'test event, never meant for Kafka');
RESET ROLE;

SELECT key, status, retry_count, dlt_retry_count, last_error, next_attempt_at
  FROM cqrs_outbox ORDER BY id;
SELECT action, key, status, reason, actor, payload
  FROM cqrs_outbox_audit ORDER BY audit_id;

DROP EXTENSION cqrs_sync;
DROP ROLE cqrs_regress_nobody;
DROP ROLE cqrs_regress_ops;
