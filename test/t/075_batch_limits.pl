# Small messages are never dead-lettered for the size of their record batch
# (issue 12, item 6).  This test runs its own broker, whose message.max.bytes
# is 200,000 and which creates topics on first use: when the first batch of a
# new topic goes out, DescribeConfigs has nothing to tell (the topic does not
# exist yet), so the producer's batches are librdkafka's 1 MB and the broker
# refuses them whole.  Even with cqrs_sync.max_retries = 0, every small
# message must be delivered, none dead-lettered, none charged a retry.  Then
# a limit raised by an operator is learned again: a message that was too
# large for the old limit goes through after cqrs_retry().
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = kafka_broker_start(
	env => { KAFKA_MESSAGE_MAX_BYTES => '200000', KAFKA_AUTO_CREATE => 'true' });
my $brokers = $broker->bootstrap;
local $ENV{KAFKA_BROKERS} = $brokers;

my $node = new_node(
	'limits',
	'cqrs_sync.brokers'       => $brokers,
	'cqrs_sync.max_retries'   => '0',
	'cqrs_sync.retry_backoff' => '100ms',
	'cqrs_sync.batch_size'    => '10000',
	'log_line_prefix'         => '%m [%p] %e ');

my $topic = unique_topic('limits');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 100), jsonb_build_object('n', g, 'body', repeat('x', 250)))) FROM generate_series(1, 20000) g"
);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 120),
	'all 20,000 small messages are sent');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') OR retry_count > 0"),
	'0', 'none dead-lettered, none charged a retry, with max_retries = 0');
my @msgs = kafka_consume($topic, 20000, 120, json => 0);
my %seen = map { ($_->{headers}{event_id} // '') => 1 } @msgs;
is(scalar(keys %seen), 20000, 'every event is in Kafka');
my $log = slurp_file($node->logfile);
like($log, qr/batch\.size lowered/, 'the producer\'s batch.size was lowered');

# ---- a limit raised by an operator is learned again --------------------------------
my $big = unique_topic('raised');
create_topic($big, 1, 'max.message.bytes=200000');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$big', 'small', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$big' AND status = 'SENT'", '1', 60),
	'the topic works');
my $id = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$big', 'big', jsonb_build_object('big', repeat('x', 300000)))");
ok( wait_for($node,
		"SELECT status IN ('DEAD_LETTERED', 'DLT_FAILED') FROM cqrs_outbox WHERE id = $id", 't', 60),
	'a message larger than the topic allows fails for its own size');
alter_topic_config($big, 'max.message.bytes=1000000');
$node->safe_psql('postgres', "SELECT cqrs_retry($id)");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'SENT', 60),
	'after the operator raised the limit, cqrs_retry() sends it');

$node->stop;
done_testing();
