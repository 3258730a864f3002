# 037_dlt_interrupted.pl on a real Kafka cluster: a dead letter that the
# relay's own stop interrupts is not a failure of the dead-letter topic
# (docs/failures.md).  It must not raise dlt_retry_count nor leave a
# DLT_PUBLISH_FAILED row in the audit trail; the row is PENDING again, and
# is dead-lettered once more after the start.
#
# Two real brokers (CqrsTest::kafka_cluster_start): the row's topic on broker
# 1, compacted, so that it refuses a message without a key (INVALID_RECORD)
# and, with cqrs_sync.max_retries = 0, the row goes to its dead-letter topic
# at once; the dead-letter topic on broker 2 only, which is frozen (SIGSTOP),
# so that the dead letter stays in flight until the relay is stopped.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my ($b1, $b2) = kafka_cluster_start(2);
local $ENV{KAFKA_BROKERS} = $b1->bootstrap;
my $topic = create_topic_assigned(unique_topic('dltstopk'), '1', 'cleanup.policy=compact');
create_topic_assigned("$topic.DLT", '2');

my $node = new_node('dltstopk',
	'cqrs_sync.brokers'     => $b1->bootstrap,
	'cqrs_sync.max_retries' => '0');

# both paths work: a keyed row is sent, then a row without a key is
# dead-lettered (one after the other: Kafka refuses a record batch whole)
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox", 'SENT', 60), 'a keyed row is sent');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', NULL, '{}')");
ok( wait_for($node,
		"SELECT string_agg(status::text, ',' ORDER BY id) FROM cqrs_outbox",
		'SENT,DEAD_LETTERED', 60),
	'a row without a key is dead-lettered to broker 2');

$b2->freeze;
my $id = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', NULL, '{}')");
# the row is refused at once; its dead letter waits for broker 2
stop_during_dead_letter($node, $id);

# broker 2 back: the row goes again, is refused again, and is dead-lettered
$b2->thaw;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'DEAD_LETTERED', 90),
	'after the thaw, the row is dead-lettered');
is( $node->safe_psql('postgres',
		"SELECT dlt_retry_count FROM cqrs_outbox WHERE id = $id"),
	'0', 'its dlt_retry_count is still 0');
# broker 2 may still write the interrupted request it had received before
# the stop: a dead letter can be there twice (consumers deduplicate by
# event_id), never missing
my @dlt = kafka_consume("$topic.DLT", 2, 30);
my $eid = $node->safe_psql('postgres', "SELECT event_id FROM cqrs_outbox WHERE id = $id");
my $copies = grep { $_->{headers_raw} =~ /\Q$eid\E/ } @dlt;
note("copies of its dead letter: $copies");
ok($copies >= 1, 'the dead-letter topic holds its dead letter');

$node->stop;
done_testing();
