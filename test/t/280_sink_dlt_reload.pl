# A sink's dead letter interrupted by a reload is tried again (docs/sink.md,
# "Failures"): when the Kafka settings change, the sink worker re-creates
# its consumers and its dead-letter producer, and the dead letters still in
# flight are produced again when next due.  Before, the worker forgot them
# but kept their events marked as in flight: they were skipped when due, and
# the event and every later event of its key stayed held until a restart.
#
# Two real brokers: the sink's topic on broker 1, its dead-letter topic on
# broker 2, which is frozen (SIGSTOP) so that the dead letter stays in
# flight while cqrs_sync.brokers changes.  The dead letter's guard (it is not
# tried again for 10 minutes while in flight) is moved to now by hand.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my ($b1, $b2) = kafka_cluster_start(2);
local $ENV{KAFKA_BROKERS} = $b1->bootstrap;
my $topic = create_topic_assigned(unique_topic('sink-dlreload'), '1');
create_topic_assigned("$topic.reload.DLT", '2');

my $node = new_node('sink_dlt_reload',
	'cqrs_sync.relay_enabled' => 'off',
	'cqrs_sync.brokers'       => $b1->bootstrap);
$node->safe_psql('postgres', qq{
CREATE TABLE reload_seen (event_id text);
CREATE FUNCTION reload_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    IF e.payload->>'bad' = 'yes' THEN
        RAISE EXCEPTION 'cannot apply %', e.event_id;
    END IF;
    INSERT INTO reload_seen VALUES (e.event_id);
END
\$\$;
SELECT cqrs_sink_create('reload', ARRAY['$topic'], 'reload_apply(cqrs_event)', '{"max_retries": 0}');
});

# the dead-letter path works while broker 2 answers
kafka_produce_events($topic, [ [ 'a', 'a-1', '{"bad":"yes"}' ] ]);
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'a-1'", 'DEAD_LETTERED', 60),
	'a failing event is dead-lettered to broker 2');

# broker 2 frozen: the next dead letter stays in flight
$b2->freeze;
kafka_produce_events($topic, [ [ 'b', 'b-1', '{"bad":"yes"}' ], [ 'b', 'b-2', '{}' ] ]);
ok( wait_for($node,
		"SELECT next_attempt_at > now() + interval '5 minutes' FROM cqrs_sink_held WHERE event_id = 'b-1'",
		't', 60),
	'the next failing event goes to its dead-letter topic (guarded while in flight)');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_sink_held WHERE event_id = 'b-2'"),
	'BLOCKED', 'the later event of its key waits behind it');

# the Kafka settings change while it is in flight
my $offset = -s $node->logfile;
$node->append_conf('postgresql.conf',
	"cqrs_sync.brokers = '" . $b1->bootstrap . ',' . $b2->bootstrap . "'");
$node->reload;
ok($node->wait_for_log(qr/Kafka settings changed, re-creating the consumers/, $offset),
	'the sink worker re-creates its consumers and its producer');

# the old producer waits 1 s for the dead letter, then goes without it
sleep 3;
is($node->safe_psql('postgres', "SELECT status FROM cqrs_sink_held WHERE event_id = 'b-1'"),
	'RETRY', 'the interrupted dead letter is not recorded');

# broker 2 back, and the guard's time has come
$b2->thaw;
$node->safe_psql('postgres',
	"UPDATE cqrs_sink_held SET next_attempt_at = now() WHERE event_id = 'b-1'");
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'b-1'", 'DEAD_LETTERED', 60),
	'the interrupted dead letter is produced again and recorded');
ok(wait_for($node, "SELECT count(*) FROM reload_seen WHERE event_id = 'b-2'", '1', 60),
	'and the later event of its key is applied');

$node->stop;
done_testing();
