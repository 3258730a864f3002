# A sick partition of a dead-letter topic stops nothing else either (issue
# 12, item 7).  Two real brokers; the dead-letter topic has partition 0 on
# broker 1 and partition 1 on broker 2 only, and broker 2 is frozen.  Dead
# letters whose key maps to partition 1 wait there.  Before, the relay never
# counted such a partition as stalled: its dead letters kept their places in
# the window (here cqrs_sync.batch_size = 20), and once they filled it, no
# row of any topic was claimed until the partition was back (failed on
# 23cc6bc: "waiting for broker", the healthy rows not all sent in 60 s).  Now the
# partition is found stalled as any other, its dead letters wait outside the
# window, and the state and an alert name it.  A stall is seen through
# another partition's acknowledgement: when the whole window waits, the
# relay sends a row past it every 5 s, at most 4 while nothing is
# acknowledged (the last part: the whole cluster frozen).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my ($b1, $b2) = kafka_cluster_start(2);
local $ENV{KAFKA_BROKERS} = $b1->bootstrap;
my $main = create_topic_assigned(unique_topic('dltsick'), '1', 'max.message.bytes=200000');
my $dlt  = create_topic_assigned("$main.DLT", '1,2');
my $ok   = create_topic_assigned(unique_topic('healthy'), '1');

my $node = new_node(
	'dltsick',
	'cqrs_sync.brokers'       => $b1->bootstrap,
	'cqrs_sync.batch_size'    => '20',
	'cqrs_sync.max_retries'   => '0',
	'cqrs_sync.retry_backoff' => '100ms',
	'log_line_prefix'         => '%m [%p] %e ');

# which keys go to which partition of the dead-letter topic (rows sent to it
# as a topic of its own), and every topic known before the freeze
$node->safe_psql('postgres', qq{
SELECT count(cqrs_enqueue('$dlt', 'd' || g, '{}')) FROM generate_series(1, 80) g;
SELECT cqrs_enqueue('$main', 'warm', '{}');
SELECT cqrs_enqueue('$ok', 'warm', '{}');
});
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '82', 60),
	'warm-up rows sent');
my @p1 = map { $_->{key} } grep { $_->{partition} == 1 } kafka_consume($dlt, 80, 30, json => 0);
ok(@p1 >= 26, scalar(@p1) . ' keys on partition 1 of the dead-letter topic');
my $late = $p1[25];
@p1 = @p1[0 .. 24];

$b2->freeze;

# 25 rows too large for their topic (not for its dead-letter topic), each of
# a key whose dead letter goes to the sick partition, one every half second
# among rows of a healthy topic: their dead letters would fill the window.
# Each big row is refused free once and the topic's limit asked again; when
# that question goes to the frozen broker it is not answered, and the limit
# last told is kept (078).  On 5459545 it was forgotten instead, in
# about half of the runs: the rows went to Kafka, whose refusals made
# librdkafka wait for the requests in flight to broker 2, and every
# partition, of every topic, waited about 60 s (the healthy rows were then
# not all sent in 60 s).  (With nothing else acknowledged the relay cannot
# tell a sick partition from a cluster that does not answer: it says
# "waiting for broker".)
my $list = join(',', map { "'$_'" } @p1);
for my $i (0 .. 24)
{
	$node->safe_psql('postgres', qq{
SELECT cqrs_enqueue('$main', '$p1[$i]', jsonb_build_object('big', repeat('x', 300000)));
SELECT count(cqrs_enqueue('$ok', 'h' || g, jsonb_build_object('n', g))) FROM generate_series(2 * $i + 1, 2 * $i + 2) g;
});
	usleep(500_000);
}
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$ok', 'h' || g, jsonb_build_object('n', g))) FROM generate_series(51, 100) g");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$ok' AND key <> 'warm' AND status = 'SENT'", '100', 60),
	'the rows of a healthy topic are sent while more dead letters than the window holds wait on the sick partition')
  or diag($node->safe_psql('postgres', 'SELECT row_to_json(s) FROM cqrs_stats_relay s'));
# the partition of the dead-letter topic
stall_reported($node, "$dlt\[1]");

# once it is known stalled, a dead letter for it is not sent: its row waits,
# PENDING, its budget untouched
my $lid = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$main', '$late', jsonb_build_object('big', repeat('x', 300000)))");
ok( wait_for($node,
		"SELECT status || ' ' || retry_count || ' ' || (last_error LIKE '%dead-letter topic \"$dlt\": partition 1 is stalled%') FROM cqrs_outbox WHERE id = $lid",
		'PENDING 0 true', 30),
	'a row whose dead letter would go to it waits, PENDING, its budget untouched');
# and while it waits so, its next attempt is at most 5 s away (so it goes
# within 5 s of the stall's end), also when its backoff is longer: here 10 s
# (before, it waited its whole backoff: 32 s with the defaults).  Each of
# its attempts is first refused free for its size (asking Kafka the limit,
# a backoff), then charged, and then waits for the partition: the longest
# wait seen in that last state over 40 s.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET cqrs_sync.retry_backoff = '10s'; SELECT pg_reload_conf()");
my ($seen, $longest) = (0, 0);
my $until = time + 40;
while (time < $until)
{
	my $wait = $node->safe_psql('postgres',
		"SELECT extract(epoch FROM next_attempt_at - clock_timestamp()) FROM cqrs_outbox WHERE id = $lid AND last_error LIKE '%partition 1 is stalled%'");
	if ($wait ne '')
	{
		$seen++;
		$longest = $wait if $wait > $longest;
	}
	usleep(100_000);
}
note("seen waiting for it $seen times, its next attempt at most $longest s away");
ok($seen > 0, 'it waits for the stalled partition again');
cmp_ok($longest, '<=', 5, 'its next attempt then is at most 5 s away, not its backoff of 10 s');
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET cqrs_sync.retry_backoff; SELECT pg_reload_conf()");

$b2->thaw;
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$main' AND key IN ($list, '$late') AND status = 'DEAD_LETTERED'",
		'26', 120),
	'after the thaw the 26 dead letters are acknowledged');
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'running', 30), 'the relay runs normally again');
my @dl = grep { $_->{partition} == 1 && $_->{headers_raw} =~ /x-original-topic/ }
  kafka_consume($dlt, 80 + 26, 60, json => 0);
is(scalar(@dl), 26, 'the dead-letter topic holds them');

# A cluster that answers nothing: the relay sends a row past its full
# window every 5 s, to find a stall, but no more than 4 until Kafka
# acknowledges something.
$b1->freeze;
$b2->freeze;
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$ok', 'o' || g, '{}')) FROM generate_series(1, 40) g");
ok(wait_for($node, 'SELECT "window" FROM cqrs_stats_relay', '20', 30), 'the window fills');
sleep 30;
is($node->safe_psql('postgres', 'SELECT "window" || \' \' || state FROM cqrs_stats_relay'),
	'24 waiting for broker', 'four rows past it, one every 5 s, then none while nothing is acknowledged');
$b1->thaw;
$b2->thaw;
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$ok' AND key LIKE 'o%' AND status = 'SENT'",
		'40', 60),
	'after the thaw they are all sent');

$node->stop;
done_testing();
