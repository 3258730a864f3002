# A sink's dead letter without a key, to a compacted dead-letter topic,
# fails alone, as the relay's does (071_compacted_null_key): Kafka refuses
# it (INVALID_RECORD), and with it every other dead letter of its record
# batch, with the same error.  Before, a retry pass that dead-lettered events
# of a topic with keyless messages among them sent them in one batch, and
# every one of them ended DLT_FAILED, missing from the dead-letter topic.
# Now the sink's producer of dead letters knows the topic is compacted
# (cleanup.policy, read with max.message.bytes) and fails the keyless one
# itself, before it can spoil a batch.
#
# Against the real broker.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node  = new_node('sink_dltcompact', 'cqrs_sync.relay_enabled' => 'off');
my $topic = create_topic(unique_topic('sink-dltcompact'), 1);
my $dlt   = create_topic(unique_topic('sink-dltcompact-dlt'), 1, 'cleanup.policy=compact');

# ten keyed events around one without a key, all in the topic before the
# sink starts from its beginning: one fetch, one retry pass, their dead
# letters produced together
kafka_produce_events($topic,
	[
		(map { [ "k$_", "ev-$_", qq({"n":$_}) ] } 1 .. 5),
		[ undef, 'ev-nokey', '{"n":"nokey"}' ],
		(map { [ "k$_", "ev-$_", qq({"n":$_}) ] } 6 .. 10)
	]);

failing_sink($node, 'dltcompact', $topic, qq({"max_retries": 0, "dlt_topic": "$dlt"}));

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_sink_held WHERE sink = 'dltcompact' AND status IN ('DEAD_LETTERED', 'DLT_FAILED')",
		'11', 120),
	'the 11 events reach a final status');
is( $node->safe_psql('postgres',
		"SELECT status || ' ' || count(*) FROM cqrs_sink_held WHERE sink = 'dltcompact' AND key IS NOT NULL GROUP BY status"),
	'DEAD_LETTERED 10', 'the ten keyed events are DEAD_LETTERED');
is( $node->safe_psql('postgres',
		"SELECT status FROM cqrs_sink_held WHERE sink = 'dltcompact' AND key IS NULL"),
	'DLT_FAILED', 'the event without a key is DLT_FAILED');
like( $node->safe_psql('postgres',
		"SELECT last_error FROM cqrs_sink_held WHERE sink = 'dltcompact' AND key IS NULL"),
	qr/; dead-letter topic "\Q$dlt\E": INVALID_RECORD: the topic is compacted \(cleanup\.policy\) and refuses a message without a key$/,
	'and its error says why');
my $c = sink_counts($node, 'dltcompact');
is("$c->{dead_lettered}/$c->{dlt_failed}", '10/1', 'counted: 10 dead_lettered, 1 dlt_failed');

my @dl = kafka_consume($dlt, 10, 60, json => 0);
is(scalar(@dl), 10, 'the dead-letter topic holds 10 dead letters');
is( join(',', sort map { ($_->{headers} // {})->{event_id} // '' } @dl),
	join(',', sort map { "ev-$_" } 1 .. 10),
	'one of each keyed event');

$node->stop;
done_testing();
