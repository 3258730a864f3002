# A sink's stored position outside its partition's offsets (docs/sink.md,
# "Failures").  Beyond the end: the topic was deleted and created again, or truncated by an
# unclean leader election, so the offsets there now belong to messages the
# sink has not applied.  The sink goes back to the earliest offset, with a
# WARNING, and applies what is there; events it applied already are
# skipped as duplicates by their event_id.  Before, it sought to the
# beginning but kept its stored position, so every message below that
# position was dropped as "applied already": lost, silently.
#
# Before the start: retention removed messages the sink had not applied yet.
# The sink says so and goes on from the earliest offset.  Before, it asked
# librdkafka to seek to the beginning, which librdkafka refuses for a
# partition it stopped (auto.offset.reset=error): the partition was never
# fetched again.
#
# The stored position is put beyond the end with cqrs_sink_rewind(), which
# leaves the partition as a re-created topic would: its messages have
# offsets below the sink's position.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

# Does the server log say $re after byte $offset, within 30 s?
sub log_says
{
	my ($node, $re, $offset) = @_;
	for (1 .. 150)
	{
		return 1 if substr(slurp_file($node->logfile), $offset) =~ $re;
		select(undef, undef, undef, 0.2);
	}
	return 0;
}

my $node = new_node('sink_beyond_end',
	'cqrs_sync.relay_enabled' => 'off',
	'log_line_prefix'         => '%m [%p] %e ');
my $topic = unique_topic('sink-beyond');
create_topic($topic, 1);
$node->safe_psql('postgres', qq{
CREATE TABLE beyond_seen (event_id text);
CREATE FUNCTION beyond_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    INSERT INTO beyond_seen VALUES (e.event_id);
END
\$\$;
SELECT cqrs_sink_create('beyond', ARRAY['$topic'], 'beyond_apply(cqrs_event)');
});

kafka_produce_events($topic, [ map { [ 'k', "e-$_", '{}' ] } 1 .. 3 ]);
ok(wait_applied($node, 'beyond', 3, 60), 'three events are applied');

my $offset = -s $node->logfile;
$node->safe_psql('postgres', "SELECT cqrs_sink_rewind('beyond', '$topic', 0, 1000)");
kafka_produce_events($topic, [ map { [ 'k', "e-$_", '{}' ] } 4 .. 5 ]);
ok( log_says($node,
		qr/CQ011 WARNING:  cqrs_sync sink "beyond": position 1000 of \Q$topic\E\[0\] is beyond the partition's end 5; continuing from its earliest offset 0/,
		$offset),
	'a WARNING says the position is beyond the end, and where the sink goes on');
ok(wait_for($node, "SELECT string_agg(event_id, ',' ORDER BY event_id) FROM beyond_seen",
		'e-1,e-2,e-3,e-4,e-5', 60),
	'the messages there are applied, each once')
  or diag($node->safe_psql('postgres',
	"SELECT concat_ws(' ', next_offset, epoch, applied, duplicates) FROM cqrs_sink_offset WHERE sink = 'beyond'"));
ok(wait_for($node,
		"SELECT next_offset || '/' || duplicates FROM cqrs_sink_offset WHERE sink = 'beyond'",
		'5/3', 30),
	'the position is at the end again; the three applied before were duplicates');


# ---- before the start ----------------------------------------------------------------

$node->safe_psql('postgres', "SELECT cqrs_sink_pause('beyond')");
kafka_produce_events($topic, [ map { [ 'k', "e-$_", '{}' ] } 6 .. 9 ]);
# offsets 5 to 8; retention takes 5 and 6
CqrsTest::_kafka_script({}, 'topic.sh', 'delete-records', $topic, 0, 7);
$offset = -s $node->logfile;
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('beyond')");
ok( log_says($node,
		qr/CQ011 WARNING:  cqrs_sync sink "beyond": position 5 of \Q$topic\E\[0\] is no longer in Kafka; continuing from its earliest offset 7/,
		$offset),
	'retention took messages the sink had not applied: a WARNING says so');
ok(wait_for($node, "SELECT string_agg(event_id, ',' ORDER BY event_id) FROM beyond_seen WHERE event_id > 'e-5'",
		'e-8,e-9', 60),
	'the sink goes on from the earliest offset');
is($node->safe_psql('postgres', "SELECT next_offset FROM cqrs_sink_offset WHERE sink = 'beyond'"),
	'9', 'and its position follows');

$node->stop;
done_testing();
