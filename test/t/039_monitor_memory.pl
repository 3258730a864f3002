# The monitor worker's memory stays flat round after round.
#
# Each dead-letter depth round reads the outbox's dead-letter topics in a
# transaction; its commit leaves TopMemoryContext current, and what the round
# built after it (the list of topics to ask for, the error texts) was never
# freed: a few hundred bytes per round, for as long as the server runs.  Here
# the monitor watches one read-side dead-letter topic every 200 ms, and the
# bytes its memory contexts use are compared across about 100 rounds.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = create_topic(unique_topic('monmem'), 2);
my $node  = new_node(
	'monmem',
	'cqrs_sync.read_side_dlt_topics' => $topic,
	'cqrs_sync.dlt_depth_interval'   => '200ms');

my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync monitor'");
like($pid, qr/^\d+$/, 'the monitor runs');
ok(wait_for($node, "SELECT count(*) FROM cqrs_dlt_depth WHERE topic = '$topic'", '2', 60),
	'it reads the depth of the topic\'s two partitions');

# the bytes the monitor's memory contexts use
sub monitor_used
{
	my $at = -s $node->logfile;
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	for (1 .. 100)
	{
		my ($used) = slurp_file($node->logfile, $at) =~
		  /\[$pid\] LOG:  Grand total: \d+ bytes in \d+ blocks; \d+ free \(\d+ chunks\); (\d+) used/;
		return $used if defined $used;
		select(undef, undef, undef, 0.1);
	}
	return undef;
}

sleep 3;    # warm-up: caches filled
my $used0 = monitor_used();
ok(defined $used0, "measured before: $used0 bytes used");
sleep 20;
my $used1 = monitor_used();
ok(defined $used1, "measured after about 100 rounds: $used1 bytes used");
cmp_ok($used1 - $used0, '<', 1024, 'the monitor\'s memory did not grow (less than 1 KB)');

$node->stop;
done_testing();
