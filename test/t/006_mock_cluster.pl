# The librdkafka mock cluster the relay's fault-injection tests rely on
# (test/kafka/mock_cluster.c, CqrsTest::mock_cluster_start), checked with an
# idempotent librdkafka producer (test/kafka/probe_producer.c, the relay's
# settings) instead of the relay:
# - the fatal-error recipe: one Produce OUT_OF_ORDER_SEQUENCE_NUMBER makes an
#   idle idempotent producer fatal on its next produce; a new producer works;
#   UNKNOWN_PRODUCER_ID, the error one might try instead, is not fatal;
# - InitProducerId CLUSTER_AUTHORIZATION_FAILED makes a new producer fatal;
# - DescribeConfigs fails (times out) on the mock cluster, and the mock
#   refuses to pretend it can inject errors into it;
# - broker down/up, leader moves, per-broker errors with a round-trip time.
# No PostgreSQL and no real broker: it takes a few seconds.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use Test::More;
use Time::HiRes qw(time);

my $mock = mock_cluster_start(3, 'orders:4');
my @addrs = split /,/, $mock->bootstrap;
is(scalar(@addrs), 3, 'three brokers in the bootstrap list');
like($_, qr/^127\.0\.0\.1:\d+$/, "broker $_ listens on loopback TCP") for @addrs;
is($mock->cmd('bootstrap'), $mock->bootstrap, 'bootstrap command');
like($mock->try_cmd('no-such-command'), qr/^error: unknown command/, 'unknown command refused');
like($mock->try_cmd('errors Produce NO_SUCH_ERROR'), qr/^error: unknown error/,
	'unknown error name refused');
$mock->cmd('topic events 2');
# partition 0 of both topics led by broker 1, for the per-broker checks
$mock->cmd('leader orders 0 1');
$mock->cmd('leader events 0 1');

# ---- the fatal-error recipe ---------------------------------------------------
my $p = probe_producer_start($mock->bootstrap);
$p->cmd('produce orders 0 k0');
is($p->cmd('wait 1 10000'), '1 0 0', 'a message is delivered before any fault');
is($p->cmd('fatal'), 'NO_ERROR', 'the producer is not fatal');
$p->cmd('poll 300');    # idle: nothing in flight when the fault is pushed

$mock->cmd('errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER');
is($p->cmd('fatal'), 'NO_ERROR', 'an idle producer is not fatal before it produces');
$p->cmd('produce orders 1 k1');
is($p->cmd('wait 2 10000'), '1 1 0', 'the next message gets a failed delivery report');
is($p->cmd('report k1'), 'failed OUT_OF_ORDER_SEQUENCE_NUMBER POSSIBLY_PERSISTED',
	'it failed with OUT_OF_ORDER_SEQUENCE_NUMBER, possibly persisted');
like($p->cmd('fatal'), qr/^OUT_OF_ORDER_SEQUENCE_NUMBER /,
	'rd_kafka_fatal_error() says OUT_OF_ORDER_SEQUENCE_NUMBER');
like($p->try_cmd('produce orders 2 k2'), qr/^error: _FATAL:/,
	'the fatal producer refuses new messages with _FATAL');
$p->stop;

$p = probe_producer_start($mock->bootstrap);
$p->cmd('produce orders 2 k3');
is($p->cmd('wait 1 10000'), '1 0 0', 'a new producer on the same cluster delivers');
is($p->cmd('fatal'), 'NO_ERROR', 'and is not fatal');

# the control: an error that sounds fatal but is not, in 2.0.2
$p->cmd('poll 300');
$mock->cmd('errors Produce UNKNOWN_PRODUCER_ID');
$p->cmd('produce orders 3 k4');
is($p->cmd('wait 2 10000'), '2 0 0', 'after UNKNOWN_PRODUCER_ID the message is still delivered');
is($p->cmd('fatal'), 'NO_ERROR', 'UNKNOWN_PRODUCER_ID alone does not make the producer fatal');
$p->stop;

# a producer fatal from its start
$mock->cmd('errors InitProducerId CLUSTER_AUTHORIZATION_FAILED');
$p = probe_producer_start($mock->bootstrap);
$p->cmd('poll 1000');    # the producer asks for its id at once
like($p->cmd('fatal'), qr/^CLUSTER_AUTHORIZATION_FAILED /,
	'InitProducerId CLUSTER_AUTHORIZATION_FAILED makes a new producer fatal');
like($p->try_cmd('produce orders 0 k5'), qr/^error: _FATAL:/, 'it refuses messages');
$p->stop;

# ---- DescribeConfigs ------------------------------------------------------------
like(
	$mock->try_cmd('errors DescribeConfigs TOPIC_AUTHORIZATION_FAILED'),
	qr/^error: .*does not implement DescribeConfigs/,
	'no pretending: DescribeConfigs errors cannot be injected');
$p = probe_producer_start($mock->bootstrap);
my $t0     = time;
my $answer = $p->try_cmd('describe-config orders max.message.bytes 1500');
my $took   = time - $t0;
like($answer, qr/^error: _TIMED_OUT:/, 'DescribeConfigs fails on the mock cluster (timed out)');
ok($took >= 1.4 && $took < 5, sprintf('after the request timeout asked for (%.1f s)', $took));

# ---- brokers down and up, leaders, per-broker errors with a delay ----------------
$p->cmd('produce orders 0 k6');
is($p->cmd('wait 1 10000'), '1 0 0', 'delivered before the outage');
$mock->cmd('down -1');
$p->cmd('produce orders 0 k7');
is($p->cmd('wait 2 2000'), '1 0 1', 'all brokers down: the message waits');
$mock->cmd('up -1');
is($p->cmd('wait 2 15000'), '2 0 0', 'brokers up: it is delivered');

$mock->cmd('leader orders 0 2');
$p->cmd('produce orders 0 k8');
is($p->cmd('wait 3 15000'), '3 0 0', 'delivered after a leader move');
like($p->cmd('report k8'), qr/^delivered 0 \d+$/, 'to the partition asked for');

# per-broker stack: 2 retriable errors, each answered after 400 ms, on the
# leader of events/0 (broker 1); the producer retries them itself
$mock->cmd('broker-errors 1 Produce NOT_ENOUGH_REPLICAS@400 NOT_ENOUGH_REPLICAS@400');
is($mock->cmd('pending 1 Produce'), '2', 'two errors waiting on broker 1');
$t0 = time;
$p->cmd('produce events 0 k9');
is($p->cmd('wait 4 15000'), '4 0 0', 'delivered after the injected retriable errors');
$took = time - $t0;
ok($took >= 0.8, sprintf('the injected round-trip times were served (%.1f s)', $took));
is($mock->cmd('pending 1 Produce'), '0', 'both injected errors consumed');
$p->stop;

$mock->stop;
done_testing();
