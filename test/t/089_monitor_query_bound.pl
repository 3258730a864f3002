# A watermark query of the monitor's dead-letter depth round waits at most a
# few seconds for a broker that does not answer.  librdkafka 2.0.2's
# rd_kafka_query_watermark_offsets() honours its own timeout only while it
# looks for the partition's leader, then waits for the answers as long as
# socket.timeout.ms (a minute by default), and sends a timed-out request
# twice more: a stop of the monitor (SIGTERM, as in a fast shutdown) waited
# that long.  The monitor's client now has a socket.timeout.ms of 2 s at
# most.  (038_monitor_stop: a stop ends a round
# between two queries.)
#
# Against the librdkafka mock cluster: the dead-letter topic is led by
# broker 2, whose ListOffsets answers are delayed by 40 s.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('monbound');
my $mock  = mock_cluster_start(2, "$topic:1", "$topic.DLT:1");
$mock->cmd("leader $topic 0 1");
$mock->cmd("leader $topic.DLT 0 2");

my $node = new_node(
	'monbound',
	'cqrs_sync.brokers'            => $mock->bootstrap,
	'cqrs_sync.max_retries'        => '0',
	'cqrs_sync.dlt_depth_interval' => '1s');

first_row_sent($node, $topic);
dead_letter_one($node, $mock, $topic);
ok(wait_for($node, "SELECT count(*) FROM cqrs_dlt_depth WHERE topic = '$topic.DLT'", '1', 60),
	'the monitor reads the depth of the dead-letter partition');

# from now on broker 2 answers ListOffsets 40 s late
$mock->cmd('broker-errors 2 ListOffsets ' . join(' ', ('NO_ERROR@40000') x 10));
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync monitor'");
ok( wait_for($node,
		"SELECT query LIKE '%asking Kafka for dead-letter topic depth%' FROM pg_stat_activity WHERE pid = $pid",
		't', 30),
	'the monitor is in a round');
sleep 2;    # in its query

my $took = terminate_backend($node, $pid, 120);
ok(defined $took, 'the monitor ended');
note(sprintf('the monitor ended %.1f s after SIGTERM', $took // 120));
cmp_ok($took // 120, '<', 20, 'within 20 s of SIGTERM (the broker answers 40 s late)');

$node->stop('fast');
$mock->stop;
done_testing();
