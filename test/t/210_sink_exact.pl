# Exactness of the sink (issue 14): 100,000 events over 1,000 keys, a mix
# of versioned upserts, deletes and counter deltas, each published twice
# (the copy later in its key's stream, sometimes right after it), go through
# a real broker into a sink; the read model must equal the one computed from
# the events, every event must be applied exactly once (applied = 100,000)
# and every copy skipped as a duplicate (duplicates = 100,000), and the
# stored positions must be the ends of the partitions.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $KEYS    = 1_000;
my $PER_KEY = 100;
my $N       = $KEYS * $PER_KEY;

my $node  = new_node('sink_exact', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-exact');
create_topic($topic, 8);

my ($events, $expected) = exact_events($KEYS, $PER_KEY, 2);
is(scalar @$events, 2 * $N, "$N events, each published twice");
is(kafka_produce_events($topic, $events), 2 * $N, 'all of them acknowledged by Kafka');

exact_setup($node, 'exact', $topic);
ok(wait_applied($node, 'exact', 2 * $N, 300), 'the sink accounted for every message');

my $c = sink_counts($node, 'exact');
is($c->{applied},    $N, 'each event applied once');
is($c->{duplicates}, $N, 'each copy skipped as a duplicate');
is($c->{positions},  2 * $N, 'the positions are the ends of the partitions');
is($c->{dead_lettered} + $c->{dlt_failed} + $c->{retried}, 0, 'nothing retried or dead-lettered');
exact_check($node, $expected, 'the read model equals the one computed from the events');

# what the view says once it caught up
ok(wait_for($node,
	"SELECT count(*) FROM cqrs_sink_stats WHERE sink = 'exact' AND lag = 0 AND position = high_watermark AND lag_seconds = 0",
	'8', 30), 'cqrs_sink_stats: every partition at its high watermark, no lag');
is($node->safe_psql('postgres',
	"SELECT sum(applied) || '/' || sum(duplicates) FROM cqrs_sink_stats WHERE sink = 'exact'"),
	"$N/$N", 'cqrs_sink_stats shows the counters');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_inbox WHERE consumer = 'exact'"),
	$N, 'one inbox entry per event under the sink\'s consumer');

# the same stream once more, from the start: nothing changes
$node->safe_psql('postgres', "SELECT * FROM cqrs_sink_rewind('exact', '-infinity')");
ok(wait_applied($node, 'exact', 4 * $N, 300), 'the rewound sink read everything again');
$c = sink_counts($node, 'exact');
is($c->{applied}, $N, 'nothing applied twice after a rewind');
exact_check($node, $expected, 'the read model is unchanged after reading the stream again');

$node->stop;
done_testing();
