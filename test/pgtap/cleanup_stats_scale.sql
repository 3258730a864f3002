-- test/pgtap/cleanup_stats_scale.sql -- cqrs_cleanup_stats(), which the
-- exporter calls on every scrape, reads a bounded part of the outbox: its
-- count of expired SENT rows looks at the next 100,000 rows the cleanup's
-- walk passes, whatever their status.  (It used to read every row from the
-- walk's start to the retention's cutoff that was not an expired SENT row: a
-- PENDING backlog older than cqrs_sync.sent_retention was read whole, on
-- every scrape.)  What it reads comes from the statistics of this
-- transaction (pg_stat_xact_*), not from timing.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(3);

CREATE FUNCTION pg_temp.reads() RETURNS bigint LANGUAGE sql AS $$
    SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
      FROM pg_class c
     WHERE c.oid = 'cqrs_outbox'::regclass
        OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'cqrs_outbox'::regclass)
$$;

-- 10 SENT rows past the retention (1 day), then a PENDING backlog of 200,000
-- rows enqueued two days ago (the relay stopped), then rows of today
INSERT INTO cqrs_outbox (topic, payload, status, sent_at, created_at)
SELECT 'pgtap.cleanup', '{}', 'SENT', now() - interval '2 days', now() - interval '3 days'
  FROM generate_series(1, 10) g;
INSERT INTO cqrs_outbox (topic, payload, created_at)
SELECT 'pgtap.cleanup', '{}', now() - interval '2 days' + g * interval '1 ms'
  FROM generate_series(1, 200000) g;
INSERT INTO cqrs_outbox (topic, payload, status, sent_at)
SELECT 'pgtap.cleanup', '{}', 'SENT', now() FROM generate_series(1, 10) g;
ANALYZE cqrs_outbox;

-- (one backend: what parallel workers read would not show in this transaction's statistics)
SET LOCAL max_parallel_workers_per_gather = 0;
SET LOCAL cqrs_sync.sent_retention = '1d';
CREATE TEMP TABLE r AS SELECT pg_temp.reads() AS before;
CREATE TEMP TABLE s AS SELECT * FROM cqrs_cleanup_stats();
-- an index scan of 100,000 rows counts each twice (index entry, heap tuple)
SELECT cmp_ok(pg_temp.reads() - (SELECT before FROM r), '<', 250000::bigint,
              'cqrs_cleanup_stats() reads about 100,000 rows of a 200,000-row PENDING backlog, not all of it');
SELECT is((SELECT sent_expired FROM s), 10::bigint, 'it counts the expired SENT rows before the backlog');
SELECT ok((SELECT sent_overdue_seconds BETWEEN 86000 AND 87000 FROM s),
          'and how long the oldest is past the retention (a day)');

SELECT * FROM finish();
ROLLBACK;
