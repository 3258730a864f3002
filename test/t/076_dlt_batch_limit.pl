# Dead letters are never refused for their record batch's size (DESIGN.md
# section 5): a dead-letter topic whose max.message.bytes is smaller than the
# batches the relay builds refuses a batch of several dead letters as too
# large, although each would fit alone.  Those rows must end DEAD_LETTERED,
# not DLT_FAILED: the relay learns the dead-letter topic's limit, lowers
# batch.size, and tries again without charging the rows.
#
# Real Kafka: the rows' topic is compacted, so it refuses every message
# without a key (INVALID_RECORD); with cqrs_sync.max_retries = 0 each goes to
# the dead-letter topic at once.  That topic accepts 4,000 bytes; each dead
# letter is about 2,800 bytes, so any two in one batch are too many.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = create_topic(unique_topic('dltbatch'), 1, 'cleanup.policy=compact');
create_topic("$topic.DLT", 1, 'max.message.bytes=4000');

my $node = new_node('dltbatch', 'cqrs_sync.max_retries' => '0');

# a keyed row goes through: the topic works
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 60),
	'a row with a key is sent to the compacted topic');

# six rows without a key, in one transaction: their dead letters travel together
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', NULL, jsonb_build_object('n', g, 'pad', repeat('x', 2500)))) FROM generate_series(1, 6) g"
);
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key IS NULL AND status <> 'PENDING'", '6', 90),
	'the six rows reach a final status');
is( $node->safe_psql('postgres',
		"SELECT status, count(*) FROM cqrs_outbox WHERE key IS NULL GROUP BY status"),
	'DEAD_LETTERED|6', 'all six are DEAD_LETTERED, none DLT_FAILED');
is( $node->safe_psql('postgres',
		"SELECT max(retry_count) || ' ' || max(dlt_retry_count) FROM cqrs_outbox WHERE key IS NULL"),
	'1 0', 'each was charged once (its own refusal), never for a batch');
my @dlt = kafka_consume("$topic.DLT", 6, 30);
is(scalar(@dlt), 6, 'the dead-letter topic holds the six dead letters');

$node->stop;
done_testing();
