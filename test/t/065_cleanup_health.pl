# A cleanup you can watch, end to end: the cleanup worker's counters in
# shared memory and the view cqrs_stats_cleanup, seen by the real
# postgres_exporter (docs/monitoring/postgres_exporter.yml) and Prometheus
# (docs/monitoring/alerts.yml, as it is):
#  - healthy passes: counted, no error, the expression of
#    CqrsSyncCleanupFailing is false;
#  - a lock held on an expired SENT row makes every pass fail (the worker's
#    lock_timeout 5 s): errors and the last error are counted, and the
#    expression of CqrsSyncCleanupFailing, queried from Prometheus exactly as
#    the rule has it, becomes true (the rule pending: its "for:" is untouched);
#  - once the lock is gone the next pass succeeds and the expression is false
#    again;
#  - the counters survive a restart of the worker.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsMonitoring;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $mon = CqrsMonitoring->new('065_cleanup_health');

my $node = new_node(
	'cleanup_health',
	'cqrs_sync.relay_enabled'    => 'off',
	'cqrs_sync.cleanup_interval' => '1s',
	'cqrs_sync.sent_retention'   => '1h');

# $n SENT rows of key $key, sent $age ago (the retention is 1 hour)
sub sent_rows
{
	my ($n, $key, $age) = @_;
	$node->safe_psql('postgres', qq{
		INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
		SELECT 'health', '$key', '{}', 'SENT', now() - interval '$age', now() - interval '$age'
		  FROM generate_series(1, $n)});
}

sub stats
{
	my $row = $node->safe_psql('postgres',
		'SELECT passes, errors, deleted_sent, coalesce(last_error, \'\'), worker_pid IS NOT NULL FROM cqrs_stats_cleanup');
	my %s;
	@s{qw(passes errors deleted_sent last_error worker)} = split /\|/, $row, 5;
	return \%s;
}

sent_rows(100, 'first', '2 hours');
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox", '0', 30),
	'the cleanup worker deletes the expired SENT rows');
ok(wait_for($node, 'SELECT passes >= 2 AND errors = 0 AND deleted_sent = 100 FROM cqrs_stats_cleanup', 't', 30),
	'cqrs_stats_cleanup counts its passes and the rows deleted, no error');
is(stats()->{worker}, 't', 'and shows the worker');

# ---- the chain ------------------------------------------------------------
my $exp  = $mon->exporter_start($node);
my $prom = $mon->prometheus_start(exporter => $exp);
my $rule = $mon->rules->{CqrsSyncCleanupFailing};
ok($rule, 'Prometheus loaded CqrsSyncCleanupFailing') or BAIL_OUT('no rule CqrsSyncCleanupFailing');
my $expr = $rule->{query};
note("CqrsSyncCleanupFailing: $expr (for $rule->{duration} s)");
cmp_ok($rule->{duration}, '>', 60, 'its "for:" is the real one, minutes');

sub expr_true
{
	my $r = $mon->prom_query($expr);
	return defined $r ? scalar(@$r) : undef;
}

ok( $mon->wait_until('Prometheus to scrape the cleanup\'s metrics', 60,
		sub { my $r = $mon->prom_query('cqrs_cleanup_passes_total > 0 and cqrs_cleanup_interval_seconds == 1'); $r && @$r }),
	'Prometheus scrapes the cleanup\'s passes and interval')
  or diag($mon->log_tail('exporter', 20), $mon->log_tail('prometheus', 20));
is(expr_true(), 0, 'passes succeed: the expression of CqrsSyncCleanupFailing is false');

# ---- a lock stops the cleanup ----------------------------------------------
# Rows that expire in 10 seconds, one of them locked before they do: passes
# succeed (nothing to delete yet) until they expire, then every pass fails
# on the lock (the worker's lock_timeout), so that only failed passes make
# the expression true.
sent_rows(10, 'locked', '3590 seconds');
my $locker = $node->background_psql('postgres');
$locker->query_safe(
	"BEGIN; SELECT id FROM cqrs_outbox WHERE key = 'locked' ORDER BY id LIMIT 1 FOR UPDATE");
my $before = stats();
my $t_lock = time;

ok( $mon->wait_until('the expression of CqrsSyncCleanupFailing to become true', 90, sub { expr_true() }),
	sprintf('with every pass failing, the expression of CqrsSyncCleanupFailing becomes true (%.0f s)',
		time - $t_lock))
  or diag(explain(stats()), $node->safe_psql('postgres', 'SELECT * FROM cqrs_stats_cleanup'));
ok( $mon->wait_until('the rule pending', 30,
		sub { my $r = $mon->prom_query('ALERTS{alertname="CqrsSyncCleanupFailing",alertstate="pending"}'); $r && @$r }),
	'the rule is pending (its "for:" runs)');
ok(wait_for($node, "SELECT errors > $before->{errors} FROM cqrs_stats_cleanup", 't', 30),
	'the failed passes are counted');
my $during = stats();
usleep(3_000_000);
is(stats()->{passes}, $during->{passes}, 'no pass succeeds while the lock is held');
like($during->{last_error}, qr/lock timeout/, "the last error says why: $during->{last_error}");
ok( $mon->wait_until('Prometheus to scrape the errors', 15,
		sub { my $r = $mon->prom_query('cqrs_cleanup_errors_total > ' . $before->{errors}); $r && @$r }),
	'cqrs_cleanup_errors_total counts them');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE key = 'locked'"), '10',
	'the rows stay');

# ---- the lock goes, the cleanup succeeds again -------------------------------
$locker->query_safe('ROLLBACK');
$locker->quit;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE key = 'locked'", '0', 30),
	'the next pass deletes the rows');
ok( $mon->wait_until('the expression of CqrsSyncCleanupFailing to become false', 60,
		sub { defined(my $t = expr_true()) or return 0; $t == 0 }),
	'the expression of CqrsSyncCleanupFailing is false again');
ok( $mon->wait_until('the rule to be inactive', 30,
		sub { my $r = $mon->prom_query('ALERTS{alertname="CqrsSyncCleanupFailing"}'); $r && !@$r }),
	'and the rule is no longer pending');

# ---- the counters survive a restart of the worker ------------------------------
my $old = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync cleanup'");
my $kept = stats();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync cleanup' AND pid <> $old", '1', 30),
	'a new cleanup worker runs after SIGTERM');
ok( wait_for($node, "SELECT passes > $kept->{passes} AND errors >= $kept->{errors} AND deleted_sent >= $kept->{deleted_sent}"
		  . ' AND worker_pid IS NOT NULL FROM cqrs_stats_cleanup', 't', 30),
	'its passes add to the counters kept in shared memory');

$mon->stop;
$node->stop;
done_testing();
