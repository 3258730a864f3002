# A topic paused after a configuration or permission error (here
# TOPIC_AUTHORIZATION_FAILED) waits at most a minute before it is tried
# again (docs/failures.md), also when cqrs_sync.retry_backoff, the first
# pause, is longer: it was paused for the whole retry_backoff (up to an hour)
# the first time, and only later pauses were held to a minute.
#
# Against the librdkafka mock cluster (precise fault injection).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('pausecap');
my $mock  = mock_cluster_start(1, "$topic:1", "$topic.DLT:1");

my $node = new_node(
	'pausecap',
	'cqrs_sync.brokers'       => $mock->bootstrap,
	'cqrs_sync.retry_backoff' => '10min',
	'log_line_prefix'         => '%m [%p] %e ');

first_row_sent($node, $topic);
sleep 1;

$mock->cmd('errors Produce TOPIC_AUTHORIZATION_FAILED');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k1', '{}')");
ok( wait_for($node,
		"SELECT last_error IS NOT NULL FROM cqrs_outbox WHERE key = 'k1'", 't', 30),
	'the row failed with the permission error');
like($node->safe_psql('postgres', "SELECT last_error FROM cqrs_outbox WHERE key = 'k1'"),
	qr/TOPIC_AUTHORIZATION_FAILED/, 'TOPIC_AUTHORIZATION_FAILED');
my $wait = $node->safe_psql('postgres',
	"SELECT round(extract(epoch FROM next_attempt_at - now())) FROM cqrs_outbox WHERE key = 'k1'");
cmp_ok($wait, '<=', 60, "the topic is tried again within a minute ($wait s), not after retry_backoff (10 min)");
is($node->safe_psql('postgres', "SELECT state FROM cqrs_stats_relay"), 'paused', 'the relay says the topic is paused');

$node->stop;
$mock->stop;
done_testing();
