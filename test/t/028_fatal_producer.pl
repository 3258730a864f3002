# A fatal producer error is noticed whenever it comes (issue 12, item 3),
# also between polls, when every delivery report of the batch is already in:
# the relay re-creates the producer and the rows are sent, instead of failing
# locally with _FATAL for ever while the state says running.
#
# Against the librdkafka mock cluster (precise fault injection; the delivery
# guarantees themselves are shown against real Kafka in the other tests):
# with the relay idle, one Produce OUT_OF_ORDER_SEQUENCE_NUMBER is pushed;
# the next batch's request gets it and the producer becomes fatal
# (test/t/006_mock_cluster.pl checks that recipe).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('fatal');
my $mock  = mock_cluster_start(1, "$topic:1");

my $node = new_node(
	'fatal',
	'cqrs_sync.brokers'       => $mock->bootstrap,
	'cqrs_sync.retry_backoff' => '100ms',
	'log_line_prefix'         => '%m [%p] %e ');

first_row_sent($node, $topic);
is($node->safe_psql('postgres', 'SELECT producer_restarts FROM cqrs_stats_relay'), '0',
	'no producer restart so far');
sleep 1;    # the relay is idle: nothing in flight

$mock->cmd('errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('n', g))) FROM generate_series(1, 10) g");

ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '11', 60),
	'the rows are sent after the fatal error');
is($node->safe_psql('postgres', 'SELECT producer_restarts FROM cqrs_stats_relay'), '1',
	'the producer was re-created once');
ok($node->wait_for_log(qr/WARNING:  cqrs_sync relay: fatal Kafka producer error: .*OUT_OF_ORDER_SEQUENCE_NUMBER/),
	'the fatal error is in the log');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE retry_count > 0"),
	'0', 'no retry budget was spent on it');
is($node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_relay'), 'running', 'the relay runs');

$node->stop;
$mock->stop;
done_testing();
