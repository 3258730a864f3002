# Cleanup and retention end to end:
# (a) 1,000,000 outbox rows of mixed status and age: cqrs_cleanup() (two
#     calls: each stops at cqrs_sync.cleanup_max_rows_per_call) deletes
#     every SENT row past cqrs_sync.sent_retention and every approved
#     failed row past cqrs_sync.dlt_retention (one PURGE audit row each), and
#     no PENDING row, no unapproved failed row, nothing younger;
# (b) the cleanup worker: idle with cqrs_sync.cleanup_interval = 0, runs on
#     its own once the interval is set (reload), exits 1 on SIGTERM and comes
#     back;
# (c) pg_cron (Debian's 1.4: minute schedules): the job scheduled exactly as
#     docs/cleanup.md says runs the pass.
# The pg_cron node starts first, so that waiting for the next minute overlaps
# with (a) and (b).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $t_start = time;

# ---- (c) part 1: a pg_cron node, the job scheduled as the docs say ----------
my $docs = slurp_file("$ENV{CQRS_REPO}/docs/cleanup.md");
my ($schedule) = $docs =~ /^(SELECT cron\.schedule\('cqrs_cleanup',.*\);)$/m;
ok(defined $schedule, 'docs/cleanup.md has the cron.schedule call')
  or BAIL_OUT('no "SELECT cron.schedule(\'cqrs_cleanup\', ...);" line in docs/cleanup.md');
note("docs: $schedule");

my $cron = new_node(
	'cron',
	'shared_preload_libraries'   => 'cqrs_sync,pg_cron',
	'cron.database_name'         => 'postgres',
	'cqrs_sync.relay_enabled'    => 'off',
	'cqrs_sync.cleanup_interval' => '0',
	# approvals take effect at once here (the grace period after an
	# approval: test/pgtap/purge_grace.sql)
	'cqrs_sync.purge_grace' => '0',
	_start                  => 0);
# pg_cron's jobs connect through libpq; the test node listens on a socket only
$cron->append_conf('postgresql.conf', "cron.host = '" . $cron->host . "'\n");
$cron->start;
$cron->safe_psql('postgres', 'CREATE EXTENSION cqrs_sync; CREATE EXTENSION pg_cron;');
$cron->safe_psql(
	'postgres', q{
	INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at, last_error)
	SELECT 'cron', 'k' || g, jsonb_build_object('g', g),
	       CASE WHEN g <= 1000 THEN 'SENT' WHEN g <= 1010 THEN 'PENDING'
	            ELSE 'DLT_FAILED' END::cqrs_outbox_status,
	       now() - interval '9 days' + g * interval '1 second',
	       CASE WHEN g <= 1000 THEN now() - interval '9 days' + g * interval '1 second' END,
	       CASE WHEN g > 1010 THEN 'dlt refused' END
	  FROM generate_series(1, 1020) g;
	INSERT INTO cqrs_outbox (topic, key, payload, status, sent_at)
	SELECT 'cron', 'young' || g, '{}', 'SENT', now() FROM generate_series(1, 10) g;
	SELECT cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE status = 'DLT_FAILED' AND key <= 'k1015'));
});
my $cron_user = $cron->safe_psql('postgres', 'SELECT session_user');
my $jobid = $cron->safe_psql('postgres', $schedule);
like($jobid, qr/^\d+$/, "cron.schedule returned job $jobid");
is($cron->safe_psql('postgres', "SELECT schedule || ' ' || command FROM cron.job WHERE jobid = $jobid"),
	'* * * * * SELECT * FROM cqrs_cleanup()', 'the job runs cqrs_cleanup() every minute');

# ---- (a) 1,000,000 rows --------------------------------------------------------
my $node = new_node(
	'cleanup',
	'cqrs_sync.relay_enabled'    => 'off',
	'cqrs_sync.cleanup_interval' => '0',
	'cqrs_sync.purge_grace'      => '0',    # as above
	'shared_buffers'             => '256MB',
	'max_wal_size'               => '4GB');

ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync cleanup'", '1', 30),
	'the cleanup worker runs (idle: cleanup_interval = 0)');

# Ids follow age (oldest first), as in a real outbox.  Ages span 10 days,
# with no row within 10 minutes of the 1-day and 7-day retentions, so the
# expected counts do not depend on when exactly the pass runs.  By g % 100:
# 0..84 SENT (g % 100 = 0: enqueued long ago but sent an hour ago),
# 85..89 PENDING, 90..94 DEAD_LETTERED, 95..99 DLT_FAILED.
my $t0 = time;
$node->safe_psql(
	'postgres', q{
	INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at, last_error)
	SELECT 'bulk.' || (g % 5), 'key-' || (g % 1000),
	       jsonb_build_object('g', g, 'body', repeat('x', 100)),
	       CASE WHEN g % 100 < 85 THEN 'SENT' WHEN g % 100 < 90 THEN 'PENDING'
	            WHEN g % 100 < 95 THEN 'DEAD_LETTERED' ELSE 'DLT_FAILED' END::cqrs_outbox_status,
	       created_at,
	       CASE WHEN g % 100 = 0 THEN greatest(now() - interval '1 hour', created_at)
	            WHEN g % 100 < 85 THEN created_at + (g % 7) * interval '1 second' END,
	       CASE WHEN g % 100 >= 90 THEN 'MSG_SIZE_TOO_LARGE' END
	  FROM (SELECT g, now() - make_interval(secs => a2 + CASE WHEN a2 > 7 * 86400 - 600 THEN 1200 ELSE 0 END)
	                 AS created_at
	          FROM (SELECT g, a + CASE WHEN a > 86400 - 600 THEN 1200 ELSE 0 END AS a2
	                  FROM (SELECT g, (1000000 - g) * 0.864 AS a
	                          FROM generate_series(1, 1000000) g) s1) s2) s3;
	VACUUM ANALYZE cqrs_outbox;
});
is($node->safe_psql('postgres', 'SELECT count(*), min(id), max(id) FROM cqrs_outbox'),
	'1000000|1|1000000', 'direct inserts take their ids from the identity column');
note(sprintf('1,000,000 rows built in %.1f s', time - $t0));

# approve a third of the failed rows (of every age)
my $to_approve = $node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_outbox WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND id % 3 = 0");
is( $node->safe_psql('postgres',
		"SELECT cqrs_approve_purge(array(SELECT id FROM cqrs_outbox WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND id % 3 = 0))"
	),
	$to_approve,
	"cqrs_approve_purge() approved $to_approve failed rows");

# what the pass must and must not delete
$node->safe_psql(
	'postgres', q{
	CREATE TABLE expect_purge AS
	SELECT id, event_id, topic, key, status, purge_approved_by, payload FROM cqrs_outbox
	 WHERE purge_approved_at IS NOT NULL AND created_at < now() - interval '7 days';
	CREATE TABLE before AS
	SELECT count(*) FILTER (WHERE status = 'PENDING') AS pending,
	       count(*) FILTER (WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND purge_approved_at IS NULL) AS unapproved,
	       count(*) FILTER (WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND purge_approved_at IS NOT NULL
	                          AND created_at >= now() - interval '7 days') AS approved_young,
	       count(*) FILTER (WHERE status = 'SENT' AND sent_at < now() - interval '1 day') AS sent_expired,
	       count(*) FILTER (WHERE status = 'SENT' AND sent_at >= now() - interval '1 day') AS sent_kept,
	       count(*) FILTER (WHERE status = 'SENT' AND sent_at >= now() - interval '1 day'
	                          AND created_at < now() - interval '1 day') AS sent_late
	  FROM cqrs_outbox;
});
my $expect = $node->safe_psql('postgres',
	"SELECT b.sent_expired || '|' || (SELECT count(*) FILTER (WHERE status = 'DEAD_LETTERED') || '|' || count(*) FILTER (WHERE status = 'DLT_FAILED') FROM expect_purge) FROM before b"
);
my ($exp_sent, $exp_dl, $exp_df) = split /\|/, $expect;
cmp_ok($exp_sent, '>', 700000, "$exp_sent SENT rows past the retention");
cmp_ok($exp_dl + $exp_df, '>', 5000, ($exp_dl + $exp_df) . ' approved failed rows past the retention');
cmp_ok($node->safe_psql('postgres', 'SELECT sent_late FROM before'), '>', 5000,
	'and SENT rows enqueued long ago but sent within the retention');

# cqrs_sync.cleanup_max_rows_per_call (500,000) bounds each call's
# transaction: the first call stops there, the next one finishes.
my $max_per_call = $node->safe_psql('postgres', 'SHOW cqrs_sync.cleanup_max_rows_per_call');
my @calls;
$t0 = time;
for (1 .. 5)
{
	push @calls,
	  $node->safe_psql('postgres', 'SELECT sent, dead_lettered, dlt_failed, complete FROM cqrs_cleanup()');
	last if $calls[-1] =~ /\|t$/;
}
my $secs = time - $t0;
my ($sum_sent, $sum_dl, $sum_df) = (0, 0, 0);
for (@calls)
{
	my ($s, $dl, $df) = split /\|/;
	$sum_sent += $s;
	$sum_dl   += $dl;
	$sum_df   += $df;
}
note("cqrs_cleanup() calls: @calls");
my ($s1, $dl1, $df1, $c1) = split /\|/, $calls[0];
is($s1 + $dl1 + $df1 . "|$c1", "$max_per_call|f",
	"the first call stopped at cqrs_sync.cleanup_max_rows_per_call ($max_per_call rows), complete = false");
is(scalar(@calls) . " calls: $sum_sent|$sum_dl|$sum_df", "2 calls: $exp_sent|$exp_dl|$exp_df",
	'the second call finished; together they deleted exactly the rows due');
note(sprintf('cqrs_cleanup() deleted %d rows in %.1f s (%.0f rows/s, with cqrs_sync.cleanup_delay)',
		$exp_sent + $exp_dl + $exp_df, $secs, ($exp_sent + $exp_dl + $exp_df) / $secs));

is( $node->safe_psql('postgres', q{
		SELECT (SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING') - pending FROM before}),
	'0', '0 PENDING rows deleted');
is( $node->safe_psql('postgres', q{
		SELECT (SELECT count(*) FROM cqrs_outbox
		         WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND purge_approved_at IS NULL) - unapproved
		  FROM before}),
	'0', '0 unapproved failed rows deleted');
is( $node->safe_psql('postgres', q{
		SELECT (SELECT count(*) FROM cqrs_outbox
		         WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') AND purge_approved_at IS NOT NULL) - approved_young
		  FROM before}),
	'0', 'approved failed rows younger than the retention kept');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT' AND sent_at < now() - interval '1 day'"),
	'0', 'every SENT row past the retention is gone');
is( $node->safe_psql('postgres', q{
		SELECT (SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT') - sent_kept FROM before}),
	'0', 'every SENT row within the retention is kept (also those enqueued long ago)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM cqrs_outbox o JOIN expect_purge e USING (id)'),
	'0', 'every approved and old failed row is gone');
is( $node->safe_psql('postgres', q{
		SELECT count(*) FROM expect_purge e
		 WHERE (SELECT count(*) FROM cqrs_outbox_audit a
		         WHERE a.action = 'PURGE' AND a.outbox_id = e.id AND a.event_id = e.event_id
		           AND a.topic = e.topic AND a.key = e.key AND a.status = e.status
		           AND a.approver = e.purge_approved_by AND a.payload = e.payload
		           AND a.reason = 'MSG_SIZE_TOO_LARGE') = 1}),
	$exp_dl + $exp_df,
	'each has exactly one PURGE audit row (event_id, topic, key, status, approver, payload, reason)');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox_audit WHERE action = 'PURGE'"),
	$exp_dl + $exp_df, 'and there are no other PURGE rows');
is($node->safe_psql('postgres', 'SELECT sent, complete FROM cqrs_cleanup()'),
	'0|t', 'a second call finds nothing to do');

# ---- (b) the cleanup worker ------------------------------------------------------
my $superuser = $node->safe_psql('postgres', 'SELECT session_user');
my $due = $node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE status = 'SENT' AND sent_at < now() - interval '1 hour') || '|' ||
	       count(*) FILTER (WHERE purge_approved_at IS NOT NULL AND created_at < now() - interval '1 hour')
	  FROM cqrs_outbox});
my ($due_sent, $due_purge) = split /\|/, $due;
cmp_ok($due_sent, '>', 50000, "$due_sent SENT rows older than 1 hour");
cmp_ok($due_purge, '>', 1000, "$due_purge approved failed rows older than 1 hour");
my $pending = $node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'");
my $unapproved = $node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT' AND purge_approved_at IS NULL");

$t0 = time;
my $reload_at = $node->safe_psql('postgres', 'SELECT now()');
$node->safe_psql(
	'postgres', q{
	ALTER SYSTEM SET cqrs_sync.sent_retention = '1h';
	ALTER SYSTEM SET cqrs_sync.dlt_retention = '1h';
	ALTER SYSTEM SET cqrs_sync.cleanup_interval = '1s';
	SELECT pg_reload_conf();
});
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE (status = 'SENT' AND sent_at < now() - interval '1 hour' - interval '1 minute') OR (purge_approved_at IS NOT NULL AND created_at < now() - interval '1 hour' - interval '1 minute')",
		'0', 60),
	sprintf('after the reload the worker deleted the rows due on its own (%.1f s)', time - $t0));
# (rows keep crossing the 1-hour line: a purge or two more is fine)
cmp_ok( $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox_audit WHERE action = 'PURGE' AND at > '$reload_at' AND actor = '$superuser'"),
	'>=', $due_purge, 'its purges are audited, actor = the worker\'s user');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox_audit a JOIN cqrs_outbox o ON o.id = a.outbox_id WHERE a.action = 'PURGE'"),
	'0', 'every audited purge left the outbox');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'"),
	$pending, 'the worker deleted no PENDING row');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT' AND purge_approved_at IS NULL"),
	$unapproved, 'nor an unapproved failed row');

# new rows: the worker keeps going, pass after pass
$node->safe_psql('postgres',
	"INSERT INTO cqrs_outbox (topic, key, payload, status, sent_at) SELECT 't', 'new', '{}', 'SENT', now() FROM generate_series(1, 1000)"
);
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.sent_retention = 0; SELECT pg_reload_conf();");
ok( wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '0', 30),
	'with sent_retention = 0 the next passes delete every SENT row');

# SIGTERM: exit 1, restarted, no server restart
my $start_time = $node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()');
my $old = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync cleanup'");
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync cleanup' AND pid <> $old",
		'1', 30),
	'a new cleanup worker runs after SIGTERM');
ok($node->log_contains(qr/background worker "cqrs_sync cleanup" \(PID $old\) exited with exit code 1/),
	'the old one exited with code 1 (restart, not crash)');
is($node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()'), $start_time, 'the server did not restart');
$node->safe_psql('postgres',
	"INSERT INTO cqrs_outbox (topic, key, payload, status, sent_at) SELECT 't', 'newer', '{}', 'SENT', now() FROM generate_series(1, 10)"
);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '0', 30),
	'and it cleans up');

# interval 0: the worker idles
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.cleanup_interval = 0; SELECT pg_reload_conf();");
usleep(1_500_000);
$node->safe_psql('postgres',
	"INSERT INTO cqrs_outbox (topic, key, payload, status, sent_at) SELECT 't', 'idle', '{}', 'SENT', now() - interval '1 minute' FROM generate_series(1, 10)"
);
usleep(3_000_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'"),
	'10', 'with cleanup_interval = 0 the worker deletes nothing');
$node->stop;

# ---- (c) part 2: the pg_cron job ran -------------------------------------------
ok( wait_for($cron,
		"SELECT status FROM cron.job_run_details WHERE jobid = $jobid ORDER BY runid DESC LIMIT 1",
		'succeeded', 90),
	'the pg_cron job ran and succeeded');
is( $cron->safe_psql('postgres', q{
		SELECT count(*) FILTER (WHERE status = 'SENT' AND sent_at < now() - interval '1 day') || '|' ||
		       count(*) FILTER (WHERE status = 'SENT') || '|' ||
		       count(*) FILTER (WHERE status = 'PENDING') || '|' ||
		       count(*) FILTER (WHERE status = 'DLT_FAILED')
		  FROM cqrs_outbox}),
	'0|10|10|5',
	'it deleted the 1,000 old SENT rows and the 5 approved DLT_FAILED rows, kept the young SENT, PENDING and unapproved rows');
is( $cron->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox_audit WHERE action = 'PURGE' AND actor = '$cron_user'"),
	'5', 'its purges are audited with the job\'s user as actor');
$cron->stop;

note(sprintf('060_cleanup took %.0f s', time - $t_start));
done_testing();
