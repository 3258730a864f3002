# What the relay learned of a topic (its max.message.bytes, whether it is
# compacted) counts only while Kafka confirms it (issue 12, item 6: a message
# spends retry budget for its size only when it alone exceeds a known limit;
# limits are learned again).  A row larger than the limit last known is
# refused once, free, and the limit is asked again.  When that question
# fails (here: the relay's principal lost its DescribeConfigs permission),
# the old limit is not known any more and the row goes to Kafka, which
# decides.  Before, a failed answer counted as a new one: the row was charged
# for the old limit and dead-lettered, although an operator had raised it.
#
# Against a real broker with SASL/PLAIN and Kafka's StandardAuthorizer: the
# relay connects as User:relay, with only the permissions its ACLs give.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $password = 'relay-' . join('', map { int(rand(10)) } 1 .. 12);
my $port     = CqrsTest::_free_port(1);
my $sasl     = CqrsTest::_free_port(0, $port, $port + 1);
my $broker   = kafka_broker_start(
	port => $port,
	env  => { KAFKA_SASL_PORT => $sasl, KAFKA_SASL_PASSWORD => $password });
# the test's own tools use the PLAINTEXT listener (a super user)
local $ENV{KAFKA_BROKERS} = $broker->bootstrap;

my $topic = create_topic(unique_topic('facts'), 1, 'max.message.bytes=200000');
create_topic("$topic.DLT", 1);
kafka_acl('add', 'User:relay', 'IdempotentWrite', 'cluster');
kafka_acl('add', 'User:relay', 'Write,Describe,DescribeConfigs', $topic);
kafka_acl('add', 'User:relay', 'Write,Describe,DescribeConfigs', "$topic.DLT");

my $dir   = PostgreSQL::Test::Utils::tempdir('facts');
my $props = "$dir/relay.properties";
open my $fh, '>', $props or die "$props: $!";
print $fh "security.protocol = SASL_PLAINTEXT\nsasl.mechanism = PLAIN\n"
  . "sasl.username = relay\nsasl.password = $password\n";
close $fh;
chmod 0600, $props;

my $node = new_node(
	'facts',
	'cqrs_sync.brokers'           => "127.0.0.1:$sasl",
	'cqrs_sync.kafka_config_file' => $props,
	'cqrs_sync.max_retries'       => '0',
	'cqrs_sync.retry_backoff'     => '100ms',
	'log_line_prefix'             => '%m [%p] %e ');

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'small', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'small'", 'SENT', 60),
	'the relay sends as User:relay');

# the limit is known: a message larger than it fails for its own size
my $big = "jsonb_build_object('big', repeat('x', 300000))";
my $id1 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'big1', $big)");
ok(wait_for($node, "SELECT status <> 'PENDING' FROM cqrs_outbox WHERE id = $id1", 't', 60),
	'a message larger than the known limit reaches a final status');
like( $node->safe_psql('postgres', "SELECT status || ': ' || last_error FROM cqrs_outbox WHERE id = $id1"),
	qr/^(DEAD_LETTERED|DLT_FAILED): .*exceeds max\.message\.bytes 200000/,
	'it is dead-lettered for the limit Kafka told (200000)');

# a compacted topic (below) while the relay may ask
my $ctopic = create_topic(unique_topic('factsc'), 1, 'cleanup.policy=compact');
create_topic("$ctopic.DLT", 1);
kafka_acl('add', 'User:relay', 'Write,Describe,DescribeConfigs', $ctopic);
kafka_acl('add', 'User:relay', 'Write,Describe,DescribeConfigs', "$ctopic.DLT");
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$ctopic', 'keyed', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'keyed'", 'SENT', 60),
	'a keyed row to the compacted topic is sent');
my $id3 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$ctopic', NULL, '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id3", 'DEAD_LETTERED', 60),
	'a row without a key to it is dead-lettered');
# the permission goes on that topic first: Kafka applies ACL changes in
# order, so the checks below that show the second one applied show it too
kafka_acl('remove', 'User:relay', 'DescribeConfigs', $ctopic);

# the relay may not ask any more: a message larger than the old limit is
# refused once, free, the question fails, and it goes to Kafka, which refuses
# it (the limit is still 200000): it fails for Kafka's verdict, not for the
# limit last known
kafka_acl('remove', 'User:relay', 'DescribeConfigs', $topic);
sleep 2;    # (AclCommand returns once the controller has it; the broker applies it after)
my $id1b = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'big1b', $big)");
ok(wait_for($node, "SELECT status <> 'PENDING' FROM cqrs_outbox WHERE id = $id1b", 't', 60),
	'without DescribeConfigs, a message larger than the old limit reaches a final status');
my $err1b = $node->safe_psql('postgres', "SELECT status || ': ' || last_error FROM cqrs_outbox WHERE id = $id1b");
like($err1b, qr/^(DEAD_LETTERED|DLT_FAILED): .*(too large|TOO_LARGE)/i, 'it failed for its size');
unlike($err1b, qr/exceeds (the )?max\.message\.bytes 200000/,
	'as Kafka refused it, not for the limit the failed question could not confirm');

# an operator raises the limit
alter_topic_config($topic, 'max.message.bytes=1000000');

my $id2 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'big2', $big)");
ok(wait_for($node, "SELECT status <> 'PENDING' FROM cqrs_outbox WHERE id = $id2", 't', 60),
	'a message larger than the old limit reaches a final status');
is($node->safe_psql('postgres', "SELECT status || ' ' || retry_count FROM cqrs_outbox WHERE id = $id2"),
	'SENT 0',
	'it is SENT without spending its retry budget: a limit Kafka no longer confirms is not used');
my @got = grep { $_->{key} eq 'big2' } kafka_consume($topic, 2, 30, json => 0);
is(scalar(@got), 1, 'Kafka holds it');

# A compacted topic refuses a message without a key.  The relay refuses such
# a row itself, the first time free, and asks the policy again; when that
# question fails, the policy Kafka last told decides (for 10 minutes after
# its answer): the row spends its budget and is dead-lettered.  Before, only
# an answer charged it, and it was refused free at every backoff for those
# 10 minutes (e2e 043 saw it when the question went to a frozen broker).
# (its DescribeConfigs permission went first, above)
my $id4 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$ctopic', NULL, '{}')");
ok(wait_for($node, "SELECT status <> 'PENDING' FROM cqrs_outbox WHERE id = $id4", 't', 30),
	'without DescribeConfigs, a row without a key reaches a final status at once');
like( $node->safe_psql('postgres', "SELECT status || ': ' || last_error FROM cqrs_outbox WHERE id = $id4"),
	qr/^DEAD_LETTERED: .*INVALID_RECORD: the topic is compacted/,
	'it is dead-lettered for the policy Kafka last told');

unlike(slurp_file($node->logfile), qr/\Q$password\E/, 'the password is in no log line');

$node->stop;
done_testing();
