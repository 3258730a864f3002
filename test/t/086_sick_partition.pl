# One sick partition stops nothing else (issue 12, item 7).  Two real
# brokers; a topic with partition 0 on broker 1 and partition 1 on broker 2
# only.  Broker 2 is frozen (SIGSTOP): partition 1 acknowledges nothing (its
# leader is unreachable), partition 0 keeps working.  The rows of partition
# 0's keys must keep flowing, also those enqueued after the stall; the
# relay's state and an alert must name the stalled partition; partition 1's
# keys wait and follow, in order per key, once broker 2 is back.  A topic
# with a smaller limit that comes in meanwhile lowers the relay's batch.size:
# re-creating its producer must not wait for the sick partition either.
#
# (A partition below min.insync.replicas whose leader is reachable is a
# different case: the leader holds the produce request until it times out,
# and Kafka answers a connection's requests in order, so every partition led
# by that broker waits with it; see docs/failures.md.)
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my ($b1, $b2) = kafka_cluster_start(2);
local $ENV{KAFKA_BROKERS} = $b1->bootstrap;
my $topic = create_topic_assigned(unique_topic('sick'), '1,2');

my $node = new_node('sick', 'cqrs_sync.brokers' => $b1->bootstrap,
	'log_line_prefix' => '%m [%p] %e ');

# which keys go to which partition, as the relay sends them
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('seq', 0))) FROM generate_series(1, 40) g");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '40', 60),
	'warm-up rows sent to both partitions');
my %part = map { $_->{key} => $_->{partition} } kafka_consume($topic, 40, 30);
my @p0 = grep { $part{$_} == 0 } sort keys %part;
my @p1 = grep { $part{$_} == 1 } sort keys %part;
ok(@p0 >= 5 && @p1 >= 5, scalar(@p0) . ' keys on partition 0, ' . scalar(@p1) . ' on partition 1');

# a healthy topic whose limit is below the relay's batch.size, used only
# once the partition is sick (created now: topics are created while both
# brokers answer)
my $small = create_topic_assigned(unique_topic('smallbatch'), '1', 'max.message.bytes=200000');
# a topic with a long name and 7 partitions on broker 2: the names of its
# stalled partitions do not fit the state's text, their count must still be
# right.  (It is sent to once before the freeze: librdkafka may ask the frozen
# broker for a new topic's metadata, and then waits for the socket timeout.)
my $wide = create_topic_assigned(unique_topic('wide' . ('w' x 190)), '1,2,2,2,2,2,2,2');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$wide', 'w' || g, '{}')) FROM generate_series(1, 200) g");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$wide' AND status = 'SENT'", '200', 60),
	'warm-up rows sent to the topic with the long name');

# a topic for rows without a key, partition 1 on broker 2 too
my $kl = create_topic_assigned(unique_topic('keyless'), '1,2');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$kl', NULL, '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$kl' AND status = 'SENT'", '1', 60),
	'warm-up row sent to the topic for rows without a key');

# a topic of 32 partitions, the last one on broker 2 only, and which of its
# 3,200 keys go to that one
my $many = create_topic_assigned(unique_topic('many'), join(',', ('1') x 31, '2'));
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$many', 'm' || g, jsonb_build_object('seq', 0))) FROM generate_series(0, 3199) g");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$many' AND status = 'SENT'", '3200', 60),
	'warm-up rows sent to the topic of 32 partitions');
my @warm = kafka_consume($many, 3200, 60, json => 0);
is(scalar(@warm), 3200, 'the 3,200 keys are read back with their partitions');
my @sick_keys = map { $_->{key} } grep { $_->{partition} == 31 } @warm;
ok(@sick_keys > 20, scalar(@sick_keys) . ' of its keys on partition 31');

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cqrs_sync_alert');

$b2->freeze;
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('seq', s))) FROM generate_series(1, 40) g, generate_series(1, 10) s"
);
my $in = sub { join(',', map { "'$_'" } @_) };
my $p0_list = $in->(@p0);
my $p1_list = $in->(@p1);
my $p0_rows = 10 * @p0 + @p0;
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key IN ($p0_list) AND status = 'SENT'", $p0_rows, 60),
	"the rows of partition 0's keys are sent while partition 1 is sick");
stall_reported($node, "$topic\[1]");
like($listener->query('SELECT 1'), qr/partition_stalled.*\Q$topic\E\[1\]/s,
	'and a NOTIFY alert');
$listener->quit;

# 7 more stalled partitions, whose names fill more than the text holds
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$wide', 'w' || g, '{}')) FROM generate_series(1, 200) g");
ok(wait_for($node, 'SELECT stalled_partition_count FROM cqrs_stats_relay', '8', 60),
	'stalled_partition_count counts every stalled partition, also those the text has no room for')
  or diag($node->safe_psql('postgres', 'SELECT stalled_partitions FROM cqrs_stats_relay'));
my @names = split(/, /, $node->safe_psql('postgres', 'SELECT stalled_partitions FROM cqrs_stats_relay'));
is($names[-1], '...', 'the text says that it is cut short');
is(scalar(grep { !/^cqrs-[a-z0-9-]+\[\d\]$/ } @names[0 .. $#names - 1]), 0,
	'and names only whole partitions')
  or diag(join("\n", @names));

# later rows keep flowing for the healthy partition
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', k, jsonb_build_object('seq', 11))) FROM unnest(ARRAY[$p0_list]) k");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key IN ($p0_list) AND status = 'SENT'",
		$p0_rows + @p0, 30),
	'rows enqueued after the stall flow too');
cmp_ok($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE key IN ($p1_list) AND status = 'PENDING'"),
	'>', 0, "partition 1's rows wait");

# a topic that takes smaller record batches than the relay's batch.size: the
# relay lowers batch.size, from the limit DescribeConfigs tells or from a
# batch the broker refused (the request may go to the frozen broker and never
# be answered).  That re-creates its producer, which must not wait for the
# sick partition's rows in flight: claims stop meanwhile, for every key.
# (When the limit comes from a refused batch, librdkafka reported the refusal
# only once the frozen broker's request had timed out, after socket.timeout.ms,
# 60 s, in one run; hence the long wait for the log line.)
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$small', 's' || (g % 10), jsonb_build_object('seq', g, 'body', repeat('x', 250)))) FROM generate_series(1, 2000) g"
);
ok($node->wait_for_log(qr/producer batch\.size lowered from 1000000 to \d+ bytes/),
	'the relay lowers its batch.size while the partition is stalled');
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$small' AND status = 'SENT'", '2000', 60),
	'the rows of the topic with the smaller limit are sent')
  or diag($node->safe_psql('postgres', 'SELECT row_to_json(s) FROM cqrs_stats_relay s'));
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', k, jsonb_build_object('seq', 12))) FROM unnest(ARRAY[$p0_list]) k");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key IN ($p0_list) AND status = 'SENT'",
		$p0_rows + 2 * @p0, 30),
	'and later rows of the healthy partition too');
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'partition stalled', 60),
	'the relay still says which partition is stalled');

# rows without a key: the partitioner sends them to any partition, and each
# one sent to the stalled partition waits there, keeping the memory of its
# whole claim; once 131,072 rows are kept so, claims stop for every topic.
# While a partition of their topic stalls, they go to the others.  First a
# few, until the relay finds that partition 1 of their topic stalls too.
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$kl', NULL, jsonb_build_object('n', g))) FROM generate_series(1, 100) g");
ok($node->wait_for_log(qr/CQ003 WARNING:  cqrs_sync relay: Kafka partition \Q$kl\E\[1\]/),
	'partition 1 of the topic for rows without a key is found stalled');
my $flood = 140_000;
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$kl', NULL, jsonb_build_object('n', g))) FROM generate_series(101, 100 + $flood) g");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$kl' AND (payload->>'n')::int > 100 AND status = 'SENT'",
		$flood, 300),
	"the $flood rows without a key enqueued since all go to the healthy partition");
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', k, jsonb_build_object('seq', 13))) FROM unnest(ARRAY[$p0_list]) k");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key IN ($p0_list) AND status = 'SENT'",
		$p0_rows + 3 * @p0, 30),
	'and the keys of the healthy partition of the other topic still flow');

# keyed rows of the topic of 32 partitions, at full speed: until its
# partition 31 is found stalled (5 s), each claim sends a 32nd of its rows
# there, where they wait, and before, each such row kept its whole claim's
# memory.  Once 131,072 rows were kept so, claims stopped for every topic
# until the partition was back.  Found stalled, such a row gets memory of
# its own, and its claim goes when its other rows are recorded.
my $flood_many = 200_000;
my $sick_list = $in->(@sick_keys);
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$many', 'm' || (g % 3200), jsonb_build_object('seq', g))) FROM generate_series(1, $flood_many) g"
);
my $sick_rows = $node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_outbox WHERE topic = '$many' AND (payload->>'seq')::int > 0 AND key IN ($sick_list)");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$many' AND (payload->>'seq')::int > 0 AND key NOT IN ($sick_list) AND status = 'SENT'",
		$flood_many - $sick_rows, 300),
	"the rows of the 31 healthy partitions' keys of $flood_many are all sent while partition 31 stalls")
  or diag($node->safe_psql('postgres', 'SELECT row_to_json(s) FROM cqrs_stats_relay s'));
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', k, jsonb_build_object('seq', 14))) FROM unnest(ARRAY[$p0_list]) k");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key IN ($p0_list) AND status = 'SENT'",
		$p0_rows + 4 * @p0, 30),
	'and the keys of the healthy partition of the first topic still flow');

$b2->thaw;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 120),
	'after the thaw everything is sent');
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'running', 30), 'the relay runs normally again');

my @msgs = kafka_consume($topic, 40 + 400 + 4 * @p0, 60);
my (%seen, %last, $disorder);
for my $m (@msgs)
{
	my $eid = $m->{headers}{event_id} // '';
	next if $seen{$eid}++;
	my $seq = $m->{json}{seq};
	$disorder++ if defined $last{ $m->{key} } && $seq < $last{ $m->{key} };
	$last{ $m->{key} } = $seq;
}
is(scalar(keys %seen), 40 + 400 + 4 * @p0, 'every event is in Kafka');
is($disorder // 0, 0, 'per key in order');

$node->stop;
done_testing();
