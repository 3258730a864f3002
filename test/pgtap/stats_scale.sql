-- test/pgtap/stats_scale.sql -- cqrs_outbox_stats() does not count the
-- whole outbox (issue 13, item 13): on a table larger than 1,000 pages it
-- reads only the rows from the relay's mark on (the PENDING ones: none is
-- below it) and the failed rows (through the index of rows with an error),
-- both exact, and estimates the SENT rows from the table's statistics and its current
-- size; on small tables every count is exact.  What it reads comes from the
-- statistics of this transaction (pg_stat_xact_*), not from timing.
-- Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(6);

CREATE FUNCTION pg_temp.reads() RETURNS bigint LANGUAGE sql AS $$
    SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
      FROM pg_class c
     WHERE c.oid = 'cqrs_outbox'::regclass
        OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'cqrs_outbox'::regclass)
$$;

-- small: exact
INSERT INTO cqrs_outbox (topic, payload, status, sent_at)
SELECT 'pgtap.stats', '{}', CASE WHEN g <= 7 THEN 'SENT' ELSE 'PENDING' END::cqrs_outbox_status,
       CASE WHEN g <= 7 THEN now() END
  FROM generate_series(1, 10) g;
SELECT results_eq($$SELECT pending, sent, dead_lettered, dlt_failed FROM cqrs_outbox_stats()$$,
                  $$VALUES (3::bigint, 7::bigint, 0::bigint, 0::bigint)$$, 'a small outbox: exact counts');

-- (the relay sent those)
UPDATE cqrs_outbox SET status = 'SENT', sent_at = now() WHERE status = 'PENDING';
-- large: 120,000 SENT rows, 300 PENDING (the newest, where the relay is),
-- 40 DEAD_LETTERED, 20 DLT_FAILED
INSERT INTO cqrs_outbox (topic, key, payload, status, sent_at, last_error)
SELECT 'pgtap.stats', 'k' || (g % 100), jsonb_build_object('n', g, 'body', repeat('x', 100)),
       CASE WHEN g > 119700 THEN 'PENDING'
            WHEN g % 3000 = 1 THEN 'DEAD_LETTERED'
            WHEN g % 6000 = 2 THEN 'DLT_FAILED'
            ELSE 'SENT' END::cqrs_outbox_status,
       now(), CASE WHEN g % 3000 = 1 OR g % 6000 = 2 THEN 'failed' END
  FROM generate_series(1, 120000) g;
-- the relay's mark, as the relay leaves it: at the first PENDING row
UPDATE cqrs_relay_mark SET scan_from = (SELECT min(id) FROM cqrs_outbox WHERE status = 'PENDING');
ANALYZE cqrs_outbox;
CREATE TEMP TABLE truth AS
SELECT count(*) FILTER (WHERE status = 'PENDING') AS pending, count(*) FILTER (WHERE status = 'SENT') AS sent,
       count(*) FILTER (WHERE status = 'DEAD_LETTERED') AS dead_lettered,
       count(*) FILTER (WHERE status = 'DLT_FAILED') AS dlt_failed
  FROM cqrs_outbox;
SELECT cmp_ok(pg_relation_size('cqrs_outbox') / current_setting('block_size')::bigint, '>', 1000::bigint,
              'the outbox is larger than 1,000 pages');

-- (one backend: what parallel workers read would not show in this transaction's statistics)
SET LOCAL max_parallel_workers_per_gather = 0;
CREATE TEMP TABLE r AS SELECT pg_temp.reads() AS before;
CREATE TEMP TABLE s AS SELECT * FROM cqrs_outbox_stats();
SELECT cmp_ok(pg_temp.reads() - (SELECT before FROM r), '<', 2000::bigint,
              'the stats read fewer than 2,000 tuples of a 120,000-row outbox');
SELECT results_eq($$SELECT pending, dead_lettered, dlt_failed FROM s$$,
                  $$SELECT pending, dead_lettered, dlt_failed FROM truth$$,
                  'PENDING and failed rows are counted exactly');
SELECT ok((SELECT abs(s.sent - t.sent) <= t.sent * 0.05 FROM s, truth t),
          'SENT rows are estimated within 5%');
SELECT results_eq($$SELECT status, rows FROM cqrs_stats_outbox WHERE status <> 'SENT' ORDER BY status$$,
                  $$SELECT * FROM (VALUES ('DEAD_LETTERED', (SELECT dead_lettered FROM truth)),
                                          ('DLT_FAILED', (SELECT dlt_failed FROM truth)),
                                          ('PENDING', (SELECT pending FROM truth))) v ORDER BY 1$$,
                  'the exporter view shows the same');

SELECT * FROM finish();
ROLLBACK;
