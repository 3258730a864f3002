-- test/pgtap/cleanup_walk.sql -- the cleanup pass does not read the same
-- old rows again and again (issue 13, item 14):
--  - its window stays cqrs_sync.cleanup_batch_size rows when the per-call
--    budget is nearly spent, so a cluster of failed rows is read in a few
--    statements, not one row at a time;
--  - a pass starts its walk where the rows that may still need deleting
--    begin, not at id 0: old unapproved failed rows are read once, not at
--    every pass;
--  - yet nothing is missed: a PENDING row that is sent later, a failed row
--    retried and sent, rows due later, and rows after the id sequence went
--    back are deleted by later passes.
-- Counts of the index scans and of the rows read come from the statistics
-- of this transaction (pg_stat_xact_*).  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(17);
SET LOCAL client_min_messages = warning;
SET LOCAL cqrs_sync.sent_retention = '1d';
SET LOCAL cqrs_sync.dlt_retention = -1;

-- rows in id order: age in hours, status, hours since sent
CREATE FUNCTION pg_temp.rows(n int, k text, age_h numeric, st cqrs_outbox_status, sent_h numeric DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at, last_error)
    SELECT 'pgtap.walk', k, '{}', st, now() - age_h * interval '1 hour',
           CASE WHEN st = 'SENT' THEN now() - coalesce(sent_h, age_h) * interval '1 hour' END,
           CASE WHEN st IN ('DEAD_LETTERED', 'DLT_FAILED') THEN 'failed' END
      FROM generate_series(1, n)
$$;
-- index scans of, and rows read from, the outbox and its indexes so far in this transaction
CREATE FUNCTION pg_temp.reads() RETURNS TABLE (scans bigint, tuples bigint) LANGUAGE sql AS $$
    SELECT sum(pg_stat_get_xact_numscans(c.oid)),
           sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
      FROM pg_class c
     WHERE c.oid = 'cqrs_outbox'::regclass
        OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'cqrs_outbox'::regclass)
$$;
CREATE TEMP TABLE m (pass text, scans bigint, tuples bigint);
-- one cqrs_cleanup() pass, recording what it read; returns the SENT rows deleted
CREATE FUNCTION pg_temp.pass(name text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r record;
    deleted bigint;
BEGIN
    SELECT * INTO r FROM pg_temp.reads();
    SELECT sent INTO deleted FROM cqrs_cleanup();
    INSERT INTO m SELECT name, x.scans - r.scans, x.tuples - r.tuples FROM pg_temp.reads() x;
    RETURN deleted;
END
$$;

--
-- The window when the budget is nearly spent
--
SELECT pg_temp.rows(5, 'sent-a', 48, 'SENT');
SELECT pg_temp.rows(2000, 'failed', 40, 'DEAD_LETTERED');
SELECT pg_temp.rows(5, 'sent-b', 30, 'SENT');
SET LOCAL cqrs_sync.cleanup_batch_size = 500;
SET LOCAL cqrs_sync.cleanup_max_rows_per_call = 6;
SELECT is((SELECT pg_temp.pass('budget')), 6::bigint, 'a call deletes its budget of 6 rows');
SELECT cmp_ok((SELECT scans FROM m WHERE pass = 'budget'), '<', 30::bigint,
              'the 2,000 failed rows in between were read in windows of 500, not one at a time');
SELECT is((SELECT sent FROM cqrs_cleanup()), 4::bigint, 'the next call deletes the other 4');
SET LOCAL cqrs_sync.cleanup_max_rows_per_call = 500000;

--
-- The walk starts where rows that may need deleting begin
--
SELECT pg_temp.rows(1, 'pending-stuck', 30, 'PENDING');
SELECT pg_temp.rows(1000, 'failed-2', 30, 'DLT_FAILED');
SELECT pg_temp.rows(50, 'sent-due', 28, 'SENT');
SELECT pg_temp.rows(10, 'sent-recent', 2, 'SENT');
SELECT pg_temp.pass('first'), pg_temp.pass('second'), pg_temp.pass('third');
SELECT cmp_ok((SELECT tuples FROM m WHERE pass = 'first'), '>', 1000::bigint,
              'the first pass reads the new rows (1,000 failed rows among them)');
SELECT cmp_ok((SELECT tuples FROM m WHERE pass = 'second'), '<', 200::bigint,
              'the second pass does not read them again, though a PENDING row before them waits');
SELECT cmp_ok((SELECT tuples FROM m WHERE pass = 'third'), '<', 200::bigint, '... nor the third');
SELECT is((SELECT count(*) FROM cqrs_outbox WHERE key = 'sent-due'), 0::bigint, 'the due SENT rows were deleted');

-- the stuck PENDING row is sent at last: the next pass finds it
UPDATE cqrs_outbox SET status = 'SENT', sent_at = now() - interval '25 hours' WHERE key = 'pending-stuck';
SELECT is((SELECT pg_temp.pass('pending sent')), 1::bigint, 'a PENDING row sent later is deleted');
SELECT cmp_ok((SELECT tuples FROM m WHERE pass = 'pending sent'), '<', 200::bigint,
              '... and the walk after it skips the failed rows again');

-- an old failed row is retried and sent: the walk goes back for it
SELECT cqrs_retry(min(id)) FROM cqrs_outbox WHERE key = 'failed';
UPDATE cqrs_outbox SET status = 'SENT', sent_at = now() - interval '25 hours'
 WHERE id = (SELECT min(id) FROM cqrs_outbox WHERE key = 'failed' AND status = 'PENDING');
SELECT is((SELECT pg_temp.pass('retried')), 1::bigint, 'a retried failed row, once sent, is deleted');
SELECT is((SELECT pg_temp.pass('after retried')), 0::bigint, 'nothing else is due');
SELECT cmp_ok((SELECT tuples FROM m WHERE pass = 'after retried'), '<', 200::bigint,
              '... and the failed rows are not read again');

-- the recent rows become due
UPDATE cqrs_outbox SET created_at = now() - interval '26 hours', sent_at = now() - interval '25 hours'
 WHERE key = 'sent-recent';
SELECT is((SELECT pg_temp.pass('recent due')), 10::bigint, 'rows that became due later are deleted');
SELECT is((SELECT count(*) FROM cqrs_outbox WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED')), 2999::bigint,
          'no unapproved failed row was deleted');

-- rows listed as PENDING that become due together are all deleted by the
-- next pass, in batches, however small a batch is
SELECT pg_temp.rows(20, 'pending-many', 30, 'PENDING');
SELECT pg_temp.rows(3, 'sent-after', 28, 'SENT');
SELECT pg_temp.pass('lists them');
UPDATE cqrs_outbox SET status = 'SENT', sent_at = now() - interval '25 hours' WHERE key = 'pending-many';
SET LOCAL cqrs_sync.cleanup_batch_size = 7;
SELECT is((SELECT pg_temp.pass('listed due')), 20::bigint,
          'the 20 listed rows that became due are deleted by one pass, 7 at a time');

-- the id sequence goes back (TRUNCATE ... RESTART IDENTITY): new rows take
-- ids below where the walk would start, and the ids it settled are not
-- settled any more; the next pass starts over from id 0
TRUNCATE cqrs_outbox RESTART IDENTITY;
SELECT pg_temp.rows(3, 'after-restart', 30, 'SENT');
SELECT is((SELECT pg_temp.pass('after restart')), 3::bigint,
          'after TRUNCATE ... RESTART IDENTITY the walk starts over: the new expired rows are deleted');
SELECT is((SELECT settled_id FROM cqrs_cleanup_state) <= 3, true,
          '... and the ids settled are counted anew');

SELECT * FROM finish();
ROLLBACK;
