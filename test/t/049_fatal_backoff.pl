# A fatal producer error that comes back with every new producer (an
# InitProducerId refused for good: CLUSTER_AUTHORIZATION_FAILED without the
# IdempotentWrite ACL on old brokers) re-creates the producer with a growing
# pause, not twice a second for ever, and the relay's state says so (no
# producer, with the error) instead of "running".  A single fatal error
# still re-creates the producer at once (test/t/028_fatal_producer.pl).
#
# Against the librdkafka mock cluster (precise fault injection).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('fatalloop');
my $mock  = mock_cluster_start(1, "$topic:1", "$topic.DLT:1");

my $node = new_node(
	'fatalloop',
	'cqrs_sync.brokers'       => $mock->bootstrap,
	'cqrs_sync.retry_backoff' => '100ms',
	'log_line_prefix'         => '%m [%p] %e ');

first_row_sent($node, $topic);
sleep 1;

# every InitProducerId refused from now on, then a fatal error to start
$mock->cmd('errors InitProducerId ' . join(' ', ('CLUSTER_AUTHORIZATION_FAILED') x 60));
$mock->cmd('errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k1', '{}')");

ok(wait_for($node, 'SELECT producer_restarts > 0 FROM cqrs_stats_relay', 't', 30),
	'the producer became fatal and was re-created');
sleep 15;
my $restarts = $node->safe_psql('postgres', 'SELECT producer_restarts FROM cqrs_stats_relay');
cmp_ok($restarts, '<=', 6, "in 15 s of refusals, re-created $restarts times, with growing pauses");
my @warnings = slurp_file($node->logfile) =~ /WARNING:  cqrs_sync relay: fatal Kafka producer error/g;
cmp_ok(scalar(@warnings), '<=', 6, 'as many WARNINGs (' . scalar(@warnings) . ')');
ok( wait_for($node,
		"SELECT state || ': ' || paused_reason ~ '^no producer: fatal Kafka producer error \\d+ times in a row: .*CLUSTER_AUTHORIZATION_FAILED' FROM cqrs_stats_relay",
		't', 10),
	'the state says there is no producer, and why');
is($node->safe_psql('postgres', "SELECT status || '/' || retry_count FROM cqrs_outbox WHERE key = 'k1'"),
	'PENDING/0', 'the row waits, its retry budget unspent');

# the refusals over: the row is sent by the next producer
$mock->cmd('clear InitProducerId');
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'k1'", 'SENT', 90),
	'the row is sent once a producer gets its id');
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'running', 30), 'the relay runs');

$node->stop;
$mock->stop;
done_testing();
