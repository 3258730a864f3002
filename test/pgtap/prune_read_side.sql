-- test/pgtap/prune_read_side.sql -- pruning the read side keeps the
-- retention and the per-call budget (issue 13, item 12):
-- cqrs_prune_read_side(older_than) refuses to prune entries younger than
-- cqrs_sync.inbox_retention (an operator cannot empty the inbox and the
-- tombstones with '0'), deletes in batches of cqrs_sync.cleanup_batch_size
-- and stops after cqrs_sync.cleanup_max_rows_per_call rows, also inside
-- cqrs_cleanup(), whose budget it shares.  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(20);
SET LOCAL client_min_messages = warning;

CREATE ROLE regress_prune_op IN ROLE cqrs_sync_operator;
CREATE TABLE board (id bigint PRIMARY KEY, likes int NOT NULL DEFAULT 0, version bigint);

-- 25 inbox entries, 5 tombstones and 5 delta memories a month old; 3 of each from today
INSERT INTO cqrs_inbox (consumer, event_id, processed_at)
SELECT 'board-view', 'old-' || g, now() - interval '30 days' FROM generate_series(1, 25) g
UNION ALL SELECT 'board-view', 'new-' || g, now() FROM generate_series(1, 3) g;
SELECT cqrs_delete('board', to_jsonb(g), 1) FROM generate_series(1, 8) g;
UPDATE cqrs_tombstone SET deleted_at = now() - interval '30 days' WHERE (key->>'id')::int <= 5;
-- (5 delta memories a month old, 3 from today: added below, 0.2.0's table)

-- the retention is a floor
SET LOCAL ROLE regress_prune_op;
SELECT throws_ok($$SELECT cqrs_prune_read_side('0')$$, '22023',
                 'older_than must not be less than cqrs_sync.inbox_retention (7 days)',
                 'an operator cannot prune everything with 0');
SELECT throws_ok($$SELECT cqrs_prune_read_side('1 day')$$, '22023', NULL,
                 '... nor anything younger than the retention');
-- an interval comparison counts a month as 30 days; the cutoff is a calendar's
SELECT throws_ok($$SELECT cqrs_prune_read_side('-120 mons 3607 days')$$, '22023', NULL,
                 '... nor with months and days of opposite signs, 7 days by the month of 30 days, whose cutoff is in the future');
SELECT throws_ok($$SELECT cqrs_prune_read_side('-12 mons 367 days')$$, '22023', NULL,
                 '... or a day or two back');
RESET ROLE;
SELECT throws_ok($$SELECT cqrs_prune_read_side('0')$$, '22023', NULL, 'nor can a superuser, by mistake');
SELECT is((SELECT count(*) FROM cqrs_inbox), 28::bigint, 'nothing was pruned');
SELECT cqrs_apply_delta('board', to_jsonb(100 + g), '{"likes": 1}', 'board-view', 'd-' || g)
  FROM generate_series(1, 8) g;
UPDATE cqrs_delta_inbox SET processed_at = now() - interval '30 days' WHERE event_id <= 'd-5';

-- the budget
SET LOCAL cqrs_sync.cleanup_batch_size = 4;
SET LOCAL cqrs_sync.cleanup_max_rows_per_call = 10;
SET LOCAL ROLE regress_prune_op;
SELECT is(cqrs_prune_read_side('30 days' ), 0::bigint, 'older than 30 days: nothing yet');
SELECT is(cqrs_prune_read_side(), 10::bigint, 'a call stops at cqrs_sync.cleanup_max_rows_per_call');
SELECT is(cqrs_prune_read_side('7 days'), 10::bigint, '... and the next goes on');
SELECT is(cqrs_prune_read_side(), 10::bigint, '... and the next');
SELECT is(cqrs_prune_read_side(), 5::bigint, '... until the 35 old entries are gone');
SELECT is(cqrs_prune_read_side(), 0::bigint, 'then there is nothing left');
RESET ROLE;
SELECT results_eq($$SELECT (SELECT count(*) FROM cqrs_inbox), (SELECT count(*) FROM cqrs_tombstone),
                           (SELECT count(*) FROM cqrs_delta_inbox)$$,
                  $$VALUES (3::bigint, 3::bigint, 3::bigint)$$, 'what is younger than the retention stays');

-- tombstones and delta memory of a dropped table go too, within the budget
CREATE TABLE gone (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, version bigint);
SELECT cqrs_delete('gone', to_jsonb(g), 1) FROM generate_series(1, 6) g;
SELECT cqrs_apply_delta('gone', to_jsonb(100 + g), '{"n": 1}', 'board-view', 'g-' || g) FROM generate_series(1, 6) g;
DROP TABLE gone;
SELECT is(cqrs_prune_read_side(), 10::bigint, 'the memory of a dropped table: 10 at a time');
SELECT is(cqrs_prune_read_side(), 2::bigint, '... and the rest');

-- cqrs_cleanup() shares its budget with the read side
INSERT INTO cqrs_inbox (consumer, event_id, processed_at)
SELECT 'board-view', 'older-' || g, now() - interval '30 days' FROM generate_series(1, 25) g;
INSERT INTO cqrs_outbox (topic, payload, status, created_at, sent_at)
SELECT 'pgtap.prune', '{}', 'SENT', now() - interval '3 days', now() - interval '3 days'
  FROM generate_series(1, 4);
SELECT results_eq($$SELECT sent, read_side, complete FROM cqrs_cleanup()$$,
                  $$VALUES (4::bigint, 6::bigint, false)$$,
                  'cqrs_cleanup(): 4 SENT rows and 6 inbox entries make the 10 of its budget');
SELECT results_eq($$SELECT sent, read_side, complete FROM cqrs_cleanup()$$,
                  $$VALUES (0::bigint, 10::bigint, false)$$, 'the next call goes on');
SELECT results_eq($$SELECT sent, read_side, complete FROM cqrs_cleanup()$$,
                  $$VALUES (0::bigint, 9::bigint, true)$$, 'and the next finishes');
SELECT throws_ok($$SELECT cqrs_prune_read_side('-1 day')$$, '22023', 'older_than must not be negative',
                 'a negative interval');
SELECT is(cqrs_prune_read_side('300000 years'), 0::bigint,
          'an interval reaching before the earliest timestamp: nothing is that old');

SELECT * FROM finish();
ROLLBACK;
