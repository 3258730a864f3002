# A message without a key, to a compacted topic, spends only its own retry
# budget.  Kafka refuses it (INVALID_RECORD), and with it every other message
# of its record batch, with the same error: librdkafka cannot tell which
# message was at fault (checked against this broker with librdkafka 2.0.2).
# Before, every row of the batch was charged, failed again together after
# the same backoff, and valid events of other keys ended DEAD_LETTERED.  The
# relay reads each topic's cleanup.policy with its max.message.bytes and
# fails such a row itself, before it can spoil a batch.
#
# What the relay knows of a topic can be stale: an operator who changes the
# policy to delete makes keyless events valid.  The relay's first refusal of
# such a row is free and asks Kafka again; only a refusal after an answer
# that still says compact is charged.  (Before, the stale policy was trusted
# for up to 10 minutes, and the event was dead-lettered.)
#
# Against the real broker.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node(
	'compacted',
	'cqrs_sync.max_retries'   => '1',
	'cqrs_sync.retry_backoff' => '100ms',
	'log_line_prefix'         => '%m [%p] %e ');

my $topic = create_topic(unique_topic('compact'), 1, 'cleanup.policy=compact');

# one transaction: keyed events around one without a key
$node->safe_psql('postgres', qq{
BEGIN;
SELECT count(cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('n', g))) FROM generate_series(1, 5) g;
SELECT cqrs_enqueue('$topic', NULL, '{"n": "nokey"}');
SELECT count(cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('n', g))) FROM generate_series(6, 10) g;
COMMIT;
});

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status <> 'PENDING'", '11', 60),
	'every row reaches a final status');
is( $node->safe_psql('postgres',
		"SELECT status || ' ' || count(*) || ' ' || max(retry_count) FROM cqrs_outbox WHERE topic = '$topic' AND key IS NOT NULL GROUP BY status"),
	'SENT 10 0', 'the ten keyed events are SENT, no retry budget spent');
is( $node->safe_psql('postgres',
		"SELECT status || ' ' || retry_count FROM cqrs_outbox WHERE topic = '$topic' AND key IS NULL"),
	'DEAD_LETTERED 2', 'the event without a key is dead-lettered after its own budget');
like( $node->safe_psql('postgres',
		"SELECT last_error FROM cqrs_outbox WHERE topic = '$topic' AND key IS NULL"),
	qr/topic "\Q$topic\E": INVALID_RECORD: the topic is compacted/, 'and its error says why');

my @got = kafka_consume($topic, 10, 30);
is(scalar(@got), 10, 'Kafka holds the ten keyed events');
is(join(',', sort { $a <=> $b } map { $_->{key} =~ s/^k//r } @got), join(',', 1 .. 10),
	'each once');

# ---- the policy changed: a keyless event is valid now ------------------------------
alter_topic_config($topic, 'cleanup.policy=delete');
my $id = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', NULL, '{\"n\": \"nokey-after\"}')");
ok( wait_for($node,
		"SELECT status <> 'PENDING' FROM cqrs_outbox WHERE id = $id", 't', 60),
	'a keyless event after the policy changed to delete reaches a final status');
is( $node->safe_psql('postgres', "SELECT status || ' ' || retry_count FROM cqrs_outbox WHERE id = $id"),
	'SENT 0', 'it is SENT, no retry budget spent: the stale policy was asked again');

$node->stop;
done_testing();
