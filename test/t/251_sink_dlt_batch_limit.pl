# The sink's dead letters are never refused for their record batch's size
# (DESIGN.md section 5), as the relay's are not (076_dlt_batch_limit): a
# retry pass dead-letters the due held events together, and librdkafka puts
# them in one record batch up to its batch.size (1,000,000 bytes by
# default).  A dead-letter topic whose max.message.bytes is smaller refuses
# the whole batch, every dead letter in it with MSG_SIZE_TOO_LARGE, although
# each would fit alone.
#
# Before, the sink's producer of dead letters had no batch cap and recorded
# every such refusal as the dead letter's: here 20 dead letters of about
# 30 KB went together in batches of up to 600 KB to a topic that accepts
# 200,000 bytes, and most of them (all but those that happened to leave
# alone, at least 7) became DLT_FAILED, counted in dlt_failed, missing from
# the dead-letter topic.  Now the sink learns the dead-letter topic's limit
# and keeps batch.size within it, and a dead letter refused for its batch
# goes again in a smaller one, spending nothing: all 20 are DEAD_LETTERED.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node  = new_node('sink_dltbatch', 'cqrs_sync.relay_enabled' => 'off');
my $topic = create_topic(unique_topic('sink-dltbatch'), 1);
my $dlt   = create_topic(unique_topic('sink-dltbatch-dlt'), 1, 'max.message.bytes=200000');

# 20 keys (a retry pass takes the first held event of each key), all in
# the topic before the sink starts from its beginning: one fetch, one batch,
# one retry pass, their dead letters produced together
my $pad = 'x' x 30000;
kafka_produce_events($topic,
	[ map { [ "k$_", "big-$_", qq({"n":$_,"pad":"$pad"}) ] } 1 .. 20 ]);

failing_sink($node, 'dltbatch', $topic, qq({"max_retries": 0, "dlt_topic": "$dlt"}));

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_sink_held WHERE sink = 'dltbatch' AND status IN ('DEAD_LETTERED', 'DLT_FAILED')",
		'20', 120),
	'the 20 events reach a final status');
is( $node->safe_psql('postgres',
		"SELECT status || '|' || count(*) FROM cqrs_sink_held WHERE sink = 'dltbatch' GROUP BY status"),
	'DEAD_LETTERED|20', 'all 20 are DEAD_LETTERED, none DLT_FAILED');
is($node->safe_psql('postgres',
	"SELECT max(attempts) FROM cqrs_sink_held WHERE sink = 'dltbatch'"),
	'1', 'each spent its one attempt, nothing for a batch');
my $c = sink_counts($node, 'dltbatch');
is("$c->{dead_lettered}/$c->{dlt_failed}", '20/0', 'counted: 20 dead_lettered, 0 dlt_failed');
ok($node->log_contains(qr/cqrs_sync sink: producer of dead letters: batch\.size lowered from \d+ to \d+ bytes/),
	'the producer of dead letters lowered its batch.size');

my @dl = kafka_consume($dlt, 20, 60, json => 0);
is(scalar(@dl), 20, 'the dead-letter topic holds 20 dead letters');
my %ids = map { (($_->{headers} // {})->{event_id} // '') => 1 } @dl;
is(scalar(grep { /^big-\d+$/ } keys %ids), 20, 'one of each event');

$node->stop;
done_testing();
