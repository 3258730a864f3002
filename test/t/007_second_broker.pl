# A sick partition on a real Kafka cluster, for the relay's "one sick
# partition holds only its own keys" tests (DESIGN.md sections 4 and 6):
# a broker of this test's own (node 1, broker+controller), a second,
# broker-only node joining its quorum (CqrsTest::kafka_cluster_start), and
# topics placed with a replica assignment:
#   $topic  '1,2'                           partition 0 on broker 1, 1 on broker 2
#   $isr    '1:2', min.insync.replicas=2    one partition on both brokers
# With broker 2 frozen (SIGSTOP), an idempotent acks=all producer
# (test/kafka/probe_producer.c, the relay's settings) gets its messages to
# $topic/0 acknowledged, while those to $topic/1 and $isr/0 stay
# unacknowledged, also once the controller has fenced broker 2; after the
# thaw they are delivered, once each.  $isr/0 gets a producer of its own: a
# produce waiting for broker 2 on broker 1 holds up that client's later
# produces to broker 1 until it times out (the report explains why).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $t_start = time;
my ($b1, $b2) = kafka_cluster_start(2);
is($b2->node_id, 2, 'the second broker is node 2');
note(sprintf('brokers up after %.1f s', time - $t_start));
local $ENV{KAFKA_BROKERS} = $b1->bootstrap;

my $topic = create_topic_assigned(unique_topic('sick'), '1,2');
my $isr   = create_topic_assigned(unique_topic('minisr'), '1:2', 'min.insync.replicas=2');
is_deeply(kafka_partition_leaders($topic), { 0 => 1, 1 => 2 },
	"$topic: partition 0 led by broker 1, partition 1 by broker 2");
is_deeply(kafka_partition_leaders($isr), { 0 => 1 }, "$isr: partition 0 led by broker 1");

my $p = probe_producer_start($b1->bootstrap);
my $q = probe_producer_start($b1->bootstrap);
$p->cmd("produce $topic 0 warm0");
$p->cmd("produce $topic 1 warm1");
$q->cmd("produce $isr 0 warm2");
is($p->cmd('wait 2 30000'), '2 0 0', 'both partitions of the topic take messages');
is($q->cmd('wait 1 30000'), '1 0 0', 'so does the min.insync.replicas=2 partition');

# ---- broker 2 frozen --------------------------------------------------------------
$b2->freeze;
my $frozen_at = time;
like($b2->status, qr/^frozen/, 'broker 2 is frozen');
$p->cmd("produce $topic 1 sick1");
$q->cmd("produce $isr 0 sick2");

# healthy messages, one at a time, until the controller has fenced broker 2
my ($healthy, $slow, $fenced) = (0, 0, 0);
while (time - $frozen_at < 30)
{
	my $key = "healthy$healthy";
	$p->cmd("produce $topic 0 $key");
	my $t0 = time;
	$p->cmd("wait " . ($healthy + 3) . " 5000");
	$slow++ if $p->cmd("report $key") !~ /^delivered 0 / || time - $t0 > 2;
	$healthy++;
	if (!$fenced && (kafka_partition_leaders($topic)->{1} // '') eq '-1')
	{
		$fenced = time - $frozen_at;
		note(sprintf('broker 2 fenced after %.1f s', $fenced));
	}
	last if $fenced && time - $frozen_at > $fenced + 1;
	usleep(300_000);
}
ok($fenced, 'the controller fenced broker 2: partition 1 lost its leader');
is($slow, 0, "all $healthy messages to partition 0 acknowledged within 2 s each");
is($p->cmd('report sick1'), 'pending', 'the message to the sick partition is unacknowledged');
is($q->cmd('report sick2'), 'pending',
	'the message to the min.insync.replicas=2 partition is unacknowledged');
my @read = kafka_consume($topic, $healthy + 1, 20, partition => 0, json => 0);
is(scalar(@read), $healthy + 1, 'consumers read partition 0 while broker 2 is frozen');

# ---- thawed -------------------------------------------------------------------------
$b2->thaw;
my $thawed_at = time;
is($p->cmd('wait ' . ($healthy + 3) . ' 60000'), ($healthy + 3) . ' 0 0',
	'after the thaw the sick partition\'s message is delivered');
is($q->cmd('wait 2 60000'), '2 0 0', 'and so is the min.insync.replicas=2 one');
note(sprintf('delivered %.1f s after the thaw (frozen for %.1f s)',
		time - $thawed_at, $thawed_at - $frozen_at));
like($p->cmd('report sick1'), qr/^delivered 1 \d+$/, 'to partition 1');

my @sick = kafka_consume($topic, 2, 30, partition => 1, json => 0);
is(join(',', map { $_->{key} } @sick), 'warm1,sick1', 'partition 1 holds it once');
my @isr = kafka_consume($isr, 2, 30, json => 0);
is(join(',', map { $_->{key} } @isr), 'warm2,sick2', "$isr holds it once");
is_deeply(kafka_partition_leaders($topic), { 0 => 1, 1 => 2 }, 'broker 2 leads partition 1 again');

$p->stop;
$q->stop;
my $t_stop = time;
$b2->stop;
$b1->stop;
note(sprintf('brokers stopped in %.1f s; whole test: %.1f s', time - $t_stop, time - $t_start));
done_testing();
