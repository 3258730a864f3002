# Rebalance (issue 14): a second sink worker joins the sink's consumer group
# while it consumes (cqrs_sync.sink_workers raised from 1 to 2 by a reload)
# and leaves again (lowered to 1), so partitions move between workers in
# both directions mid-stream.  Each new owner resumes from the positions in
# the database; the read model must stay exact, every event applied once and
# every copy skipped once.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $KEYS    = 1_000;
my $PER_KEY = 40;
my $N       = $KEYS * $PER_KEY;

my $node = new_node('sink_rebalance',
	'cqrs_sync.relay_enabled'   => 'off',
	'cqrs_sync.sink_workers'    => '1',
	'cqrs_sync.sink_batch_size' => '100');
my $topic = unique_topic('sink-rebalance');
create_topic($topic, 8);

my ($events, $expected) = exact_events($KEYS, $PER_KEY, 2);
is(kafka_produce_events($topic, $events), 2 * $N, "$N events published twice");

sub progress
{
	return $node->safe_psql('postgres',
		"SELECT coalesce(sum(applied + duplicates), 0) FROM cqrs_sink_offset WHERE sink = 'rebalance'");
}

sub reach
{
	my ($fraction) = @_;
	my $deadline = time + 180;
	while (time < $deadline)
	{
		my $p = progress();
		return $p if $p >= $fraction * 2 * $N;
		usleep(50_000);
	}
	return progress();
}

# the workers that own partitions of the sink now
sub owners
{
	return $node->safe_psql('postgres',
		"SELECT count(DISTINCT worker_pid) FROM cqrs_sink_stats WHERE sink = 'rebalance' AND worker_pid IS NOT NULL");
}

# a slow read model: the stream lasts while the workers come and go
exact_setup($node, 'rebalance', $topic, _sleep => 0.0005);
is(scalar(sink_worker_pids($node)), 1, 'one sink worker to begin with');

my $p = reach(0.15);
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.sink_workers = 2");
$node->reload;
ok(wait_for($node, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink'", '2', 30),
	'a second sink worker started after the reload');
ok(wait_for($node,
	"SELECT count(DISTINCT worker_pid) FROM cqrs_sink_stats WHERE sink = 'rebalance' AND worker_pid IS NOT NULL",
	'2', 60), 'the group rebalanced: both workers own partitions');
my $joined = progress();
cmp_ok($joined, '<', 2 * $N, "the second worker joined mid-stream ($p before, $joined after, of " . 2 * $N . ')');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_stats_sink_workers WHERE state = 'running'"),
	'2', 'cqrs_stats_sink_workers shows two running workers');

$p = reach(0.55);
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.sink_workers = 1");
$node->reload;
ok(wait_for($node, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink'", '1', 30),
	'the second sink worker left after the reload');
ok(wait_for($node,
	"SELECT count(DISTINCT worker_pid) || '/' || count(*) FROM cqrs_sink_stats WHERE sink = 'rebalance' AND worker_pid IS NOT NULL",
	'1/8', 60), 'the group rebalanced: the remaining worker owns all 8 partitions');
my $left = progress();
cmp_ok($left, '<', 2 * $N, "the worker left mid-stream ($p before, $left after)");
ok($node->log_contains('cqrs_sync sink worker 1 is no longer wanted'), 'the leaving worker said why');

ok(wait_applied($node, 'rebalance', 2 * $N, 300), 'the sink accounted for every message');
my $c = sink_counts($node, 'rebalance');
is($c->{applied},    $N, 'each event applied exactly once across the rebalances');
is($c->{duplicates}, $N, 'each copy skipped exactly once');
exact_check($node, $expected, 'the read model is exact after the rebalances');

$node->stop;
done_testing();
