# The monitor worker's dead-letter depth round asks for each dead-letter
# partition's watermarks, waiting up to a second per query.  With many
# partitions led by a broker that does not answer, a round lasts minutes: a
# stop (SIGTERM, as in a fast shutdown) must end it between two queries, not
# after it.
#
# Against the librdkafka mock cluster: the dead-letter topic has 40
# partitions led by broker 2, whose ListOffsets answers are delayed by 3 s
# (metadata, from either broker, is answered at once): a round takes about
# two minutes.  The build before the fix (3fe4764) ended 119 s after SIGTERM,
# this one 3 s after.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('monstop');
my $mock  = mock_cluster_start(2, "$topic:1", "$topic.DLT:40");
$mock->cmd("leader $topic 0 1");
$mock->cmd("leader $topic.DLT $_ 2") for 0 .. 39;

my $node = new_node(
	'monstop',
	'cqrs_sync.brokers'            => $mock->bootstrap,
	'cqrs_sync.max_retries'        => '0',
	'cqrs_sync.dlt_depth_interval' => '1s');

# a dead-lettered row: the monitor watches its dead-letter topic
first_row_sent($node, $topic);
dead_letter_one($node, $mock, $topic);
ok(wait_for($node, "SELECT count(*) FROM cqrs_dlt_depth WHERE topic = '$topic.DLT'", '40', 60),
	'the monitor reads the depth of the 40 dead-letter partitions');

# from now on broker 2 answers ListOffsets 3 s late
# (at most 60 answers per command; two per partition and query)
$mock->cmd('broker-errors 2 ListOffsets ' . join(' ', ('NO_ERROR@3000') x 50)) for 1 .. 4;
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync monitor'");
like($pid, qr/^\d+$/, 'the monitor runs');
# a round starts within a second; let it get a few queries into the round
ok( wait_for($node,
		"SELECT query LIKE '%asking Kafka for dead-letter topic depth%' FROM pg_stat_activity WHERE pid = $pid",
		't', 30),
	'the monitor is in a round');
sleep 4;
is($node->safe_psql('postgres', "SELECT query LIKE '%asking Kafka%' FROM pg_stat_activity WHERE pid = $pid"),
	't', 'the round is still going');

my $took = terminate_backend($node, $pid, 120);
ok(defined $took, 'the monitor ended');
note(sprintf('the monitor ended %.1f s after SIGTERM', $took // 120));
cmp_ok($took // 120, '<', 10, 'within 10 s of SIGTERM (a whole round takes minutes)');

$node->stop('fast');
$mock->stop;
done_testing();
