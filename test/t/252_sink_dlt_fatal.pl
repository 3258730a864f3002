# A fatal error of the sink's producer of dead letters is noticed, and the
# producer re-created, as the relay's is (028_fatal_producer): its dead
# letters are produced again by the new producer, not recorded DLT_FAILED.
#
# Before, the producer was never re-created: the batch that met the fatal
# error came back (OUT_OF_ORDER_SEQUENCE_NUMBER, the rest _PURGE_QUEUE) and
# was produced again on the same producer, which refused it locally with
# _FATAL: every dead letter, this one and every later one, became
# DLT_FAILED for ever while the worker said running.
#
# Against the librdkafka mock cluster, with the recipe 006_mock_cluster
# checks: one Produce OUT_OF_ORDER_SEQUENCE_NUMBER, pushed while the
# producer is idle, makes it fatal on its next produce.  The sink is paused
# while its events are published (the publisher's own Produce requests must
# not take the error), then resumed: only the producer of dead letters
# produces after the push.  A fatal error that every new producer meets
# re-creates it with growing pauses, not at every turn (61 WARNINGs in 15 s
# before, 5 now).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('sink-dltfatal');
my $dlt   = "$topic.DLT";
my $mock  = mock_cluster_start(1, "$topic:1", "$dlt:1");

my $node = new_node(
	'sink_dltfatal',
	'cqrs_sync.brokers'       => $mock->bootstrap,
	'cqrs_sync.relay_enabled' => 'off',
	'log_line_prefix'         => '%m [%p] %e ');
failing_sink($node, 'fatal', $topic, qq({"max_retries": 0, "dlt_topic": "$dlt"}));

# a first dead letter: the producer exists and works
kafka_produce_events($topic, [ [ 'warm', 'w-0', '{"n":0}' ] ], $mock->bootstrap);
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'w-0'", 'DEAD_LETTERED', 90),
	'a first dead letter goes through the mock cluster');

$node->safe_psql('postgres', "SELECT cqrs_sink_pause('fatal')");
kafka_produce_events($topic,
	[ map { [ "k$_", "e-$_", qq({"n":$_}) ] } 1 .. 5 ], $mock->bootstrap);
sleep 1;    # the producer of dead letters is idle: nothing in flight
my $log_offset = -s $node->logfile;
$mock->cmd('errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER');
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('fatal')");

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_sink_held WHERE event_id LIKE 'e-%' AND status IN ('DEAD_LETTERED', 'DLT_FAILED')",
		'5', 90),
	'the five events reach a final status');
is( $node->safe_psql('postgres',
		"SELECT status || '|' || count(*) FROM cqrs_sink_held WHERE event_id LIKE 'e-%' GROUP BY status"),
	'DEAD_LETTERED|5', 'all five are DEAD_LETTERED, none DLT_FAILED');
ok( $node->wait_for_log(
		qr/08006 WARNING:  cqrs_sync sink: fatal Kafka producer error: .*OUT_OF_ORDER_SEQUENCE_NUMBER/,
		$log_offset),
	'the fatal error is logged (SQLSTATE 08006)');
is($node->safe_psql('postgres', "SELECT max(attempts) FROM cqrs_sink_held WHERE event_id LIKE 'e-%'"),
	'1', 'no attempt was spent on it');

# later dead letters go through the new producer too
kafka_produce_events($topic, [ [ 'k6', 'e-6', '{"n":6}' ] ], $mock->bootstrap);
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'e-6'", 'DEAD_LETTERED', 60),
	'a later event is dead-lettered');
my $c = sink_counts($node, 'fatal');
is("$c->{dead_lettered}/$c->{dlt_failed}", '7/0', 'counted: 7 dead_lettered, 0 dlt_failed');
is( $node->safe_psql('postgres',
		"SELECT count(DISTINCT dlt_offset) FROM cqrs_sink_held WHERE sink = 'fatal' AND dlt_offset IS NOT NULL"),
	'7', 'each where the mock cluster wrote it');

# a fatal error that every new producer meets (InitProducerId refused for
# good): the producer is re-created with growing pauses (1 s, 2 s, ... up to
# a minute), not at each turn for ever
$node->safe_psql('postgres', "SELECT cqrs_sink_pause('fatal')");
kafka_produce_events($topic, [ [ 'k8', 'e-8', '{"n":8}' ] ], $mock->bootstrap);
sleep 1;
$log_offset = -s $node->logfile;
$mock->cmd('errors InitProducerId ' . join(' ', ('CLUSTER_AUTHORIZATION_FAILED') x 60));
$mock->cmd('errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER');
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('fatal')");
sleep 15;
my @fatal = substr(slurp_file($node->logfile), $log_offset) =~ /WARNING:  cqrs_sync sink: fatal Kafka producer error/g;
cmp_ok(scalar(@fatal), '>=', 2, 'the producer of dead letters met the fatal error again and again');
cmp_ok(scalar(@fatal), '<=', 6, 'and was re-created with growing pauses (' . scalar(@fatal) . ' in 15 s)');
is( $node->safe_psql('postgres',
		"SELECT status IN ('DEAD_LETTERED', 'DLT_FAILED') FROM cqrs_sink_held WHERE event_id = 'e-8'"),
	'f', 'its dead letter waits, not DLT_FAILED');
$mock->cmd('clear InitProducerId');
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'e-8'", 'DEAD_LETTERED', 90),
	'and is delivered once a producer gets its id');

# a batch that cannot get smaller: a dead letter refused as too large again
# and again, though smaller than the batch, ends DLT_FAILED once batch.size
# is at its floor (1,024 bytes; the mock cluster cannot tell the topic's
# limit, DescribeConfigs fails there), instead of going again for ever
$node->safe_psql('postgres', "SELECT cqrs_sink_pause('fatal')");
kafka_produce_events($topic, [ [ 'k7', 'e-7', '{"n":7}' ] ], $mock->bootstrap);
sleep 1;
$mock->cmd('broker-errors 1 Produce ' . join(' ', ('MSG_SIZE_TOO_LARGE') x 40));
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('fatal')");
ok( wait_for($node,
		"SELECT status FROM cqrs_sink_held WHERE event_id = 'e-7' AND status IN ('DEAD_LETTERED', 'DLT_FAILED')",
		'DLT_FAILED', 90),
	'a dead letter the topic keeps refusing as too large ends DLT_FAILED');
my ($left) = $mock->cmd('pending 1 Produce') =~ /(\d+)/;
cmp_ok($left, '>', 0, "and is not produced again and again ($left refusals left)");

$node->stop;
$mock->stop;
done_testing();
