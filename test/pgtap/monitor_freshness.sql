-- test/pgtap/monitor_freshness.sql -- what the staleness and "where does it
-- run" alerts read (issue 16, item 2): the test cluster's workers serve
-- cqrs_sync.database (postgres), not this database.  The relay's view says
-- in which database the relay runs and that it is not this one
-- (CqrsSyncRelayNotInDatabase); the cleanup's view shows no worker here;
-- the dead-letter topic depths are measured by a running monitor worker and
-- are fresh (CqrsSyncDltDepthStale).  Rolled back.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;

SELECT plan(7);

SELECT is(relay_database, current_setting('cqrs_sync.database'),
          'cqrs_stats_relay.relay_database: the database the relay runs in')
  FROM cqrs_stats_relay;
SELECT is(in_database, 0, 'cqrs_stats_relay.in_database: 0, it does not run in this one')
  FROM cqrs_stats_relay;
SELECT is(relay_up, 1, 'while it runs (relay_up)') FROM cqrs_stats_relay;

SELECT is(worker_pid, NULL, 'cqrs_stats_cleanup: no cleanup worker in this database')
  FROM cqrs_stats_cleanup;

SELECT is(monitor_up, 1, 'cqrs_stats_dlt_depth: the monitor worker runs') FROM cqrs_stats_dlt_depth;
SELECT ok(age_seconds >= 0 AND age_seconds <= 3 * interval_seconds,
          format('and its figures are fresh: %s s old, polled every %s s', round(age_seconds::numeric, 1), interval_seconds))
  FROM cqrs_stats_dlt_depth;
SELECT is(last_error, NULL, 'and its last round had no error') FROM cqrs_stats_dlt_depth;

SELECT * FROM finish();
ROLLBACK;
