# Two sink workers retry a held event once per due time.  Every worker
# retries every sink's held events; both found an event due at the same
# moment, the second waited for the first's lock on the partition's position
# and, once it had it, retried the event again at once: with its retry budget
# spent by the first, it dead-lettered it a second time (two copies in the
# dead-letter topic, one of them recorded nowhere), and with budget left it
# ran the handler twice without the backoff between.  Now an event is retried
# only while it is still due when its row is locked.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node(
	'sink_race',
	'cqrs_sync.relay_enabled' => 'off',
	'cqrs_sync.sink_workers'  => '2');
my $topic = unique_topic('sink-race');
my $dlt   = "$topic.DLT";
create_topic($topic, 1);
create_topic($dlt,   1);

# each call takes 0.6 s: a retry pass over 10 events holds the partition's
# position for 6 s, longer than a worker's poll for due events (5 s), so the
# other worker finds them due while it does
$node->safe_psql('postgres', qq{
CREATE FUNCTION race_fail(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    PERFORM pg_sleep(0.6);
    RAISE EXCEPTION 'cannot apply %', e.event_id;
END
\$\$;
SELECT cqrs_sink_create('race', ARRAY['$topic'], 'race_fail(cqrs_event)',
                        '{"max_retries": 1, "retry_backoff": "2s", "dlt_topic": "$dlt"}');
});
ok(wait_for($node, "SELECT count(*) FROM cqrs_stats_sink_workers", '2', 30), 'two sink workers run');

kafka_produce_events($topic, [ map { [ "k$_", "e-$_", '{}' ] } 1 .. 10 ]);
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_sink_held WHERE sink = 'race' AND status = 'DEAD_LETTERED'", '10', 180),
	'the ten events are dead-lettered after their retry');
my @dl = kafka_consume($dlt, 11, 15, json => 0);
is(scalar(@dl), 10, 'each is in the dead-letter topic once');
is( $node->safe_psql('postgres',
		"SELECT min(attempts) || '/' || max(attempts) FROM cqrs_sink_held WHERE sink = 'race'"),
	'2/2', 'each was tried twice: once consumed, once retried');
is( $node->safe_psql('postgres', "SELECT dead_lettered FROM cqrs_sink_offset WHERE sink = 'race'"),
	'10', 'the position counts ten dead letters');

$node->stop;
done_testing();
