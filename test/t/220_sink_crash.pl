# Crashes while the sink consumes (issue 14): the sink worker is killed
# with SIGKILL three times (each time the postmaster restarts the cluster)
# and the postmaster itself once, at 10%, 30%, 50% and 70% of a stream of
# 60,000 events over 1,000 keys each published twice.  The read model must
# be exactly the one computed from the events (counters exact, not close),
# every event applied once and every copy skipped once: a crash at any
# moment loses the last transaction whole, effects and positions together.
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
my $PER_KEY = 60;
my $N       = $KEYS * $PER_KEY;

# small batches: many commits to land between
my $node = new_node('sink_crash',
	'cqrs_sync.relay_enabled'  => 'off',
	'cqrs_sync.sink_batch_size' => '100');
my $topic = unique_topic('sink-crash');
create_topic($topic, 6);

my ($events, $expected) = exact_events($KEYS, $PER_KEY, 2);
is(kafka_produce_events($topic, $events), 2 * $N, "$N events published twice");

# psql that tolerates a server in crash recovery
sub progress
{
	my ($out, $err) = ('', '');
	# (in eval: see sink_worker_pids())
	my $rc = eval {
		$node->psql('postgres',
			"SELECT coalesce(sum(applied + duplicates), 0) FROM cqrs_sink_offset WHERE sink = 'crash'",
			stdout => \$out, stderr => \$err, timeout => 30);
	};
	return (defined $rc && $rc == 0 && $out =~ /^\d+$/) ? $out : undef;
}

# wait until the sink moved past $fraction of the stream; its progress
sub reach
{
	my ($fraction) = @_;
	my $deadline = time + 180;
	while (time < $deadline)
	{
		my $p = progress();
		return $p if defined $p && $p >= $fraction * 2 * $N;
		usleep(20_000);
	}
	return progress() // -1;
}

# seconds until a sink worker other than $old runs
sub worker_back
{
	my ($old) = @_;
	my $t0 = time;
	while (time - $t0 < 60)
	{
		my @pids = sink_worker_pids($node);
		return time - $t0 if @pids && (!defined $old || !grep { $_ == $old } @pids);
		usleep(100_000);
	}
	return undef;
}

exact_setup($node, 'crash', $topic);

my $kills = 0;
for my $fraction (0.1, 0.3, 0.5)
{
	my $p = reach($fraction);
	my ($pid) = sink_worker_pids($node);
	ok(defined $pid, "sink worker running at " . ($fraction * 100) . '%');
	next unless defined $pid;
	kill 'KILL', $pid;
	$kills++;
	cmp_ok($p, '<', 2 * $N, "SIGKILL $kills while consuming ($p of " . 2 * $N . ' messages)');
	my $s = worker_back($pid);
	ok(defined $s, sprintf('sink worker back %.1f s after SIGKILL %d', $s // -1, $kills));
}

{
	my $p = reach(0.7);
	my $postmaster = $node->{_pid};
	$node->kill9;
	$kills++;
	cmp_ok($p, '<', 2 * $N, "postmaster SIGKILLed while the sink consumes ($p of " . 2 * $N . ')');
	for (1 .. 100)
	{
		last unless kill 0, $postmaster;
		usleep(100_000);
	}
	my $started = 0;
	for (1 .. 50)
	{
		last if $started = $node->start(fail_ok => 1);
		$node->{_pid} = undef;
		usleep(200_000);
	}
	ok($started, 'postmaster restarted after SIGKILL');
	ok(defined worker_back(undef), 'sink worker back after the postmaster restart');
}
is($kills, 4, 'four kills: three of the sink worker, one of the postmaster');

ok(wait_applied($node, 'crash', 2 * $N, 300), 'the sink accounted for every message');
my $c = sink_counts($node, 'crash');
is($c->{applied},    $N, 'each event applied exactly once across the crashes');
is($c->{duplicates}, $N, 'each copy skipped exactly once');
is($c->{positions},  2 * $N, 'the positions are the ends of the partitions');
exact_check($node, $expected, 'the read model is exact after the crashes');

$node->stop;
done_testing();
