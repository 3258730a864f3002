# Order per key across a pass of many batches (issue 12, item 1).
#
# Transaction A holds an early id of key K and stays open; a backlog of
# 30,000 rows of other keys follows, then a later row of K (committed).  The
# relay walks the backlog 100 rows at a time, past A's invisible row; A
# commits while the walk is under way.  A's row must still reach Kafka before
# the later row of K, which sits at the end of the same walk.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node  = new_node('multibatch', 'cqrs_sync.batch_size' => '100');
my $topic = unique_topic('multibatch');

my $relay = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
ok($relay =~ /^\d+$/, 'the relay runs');

# a first event, so the topic exists and the relay is warm
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{\"seq\": 0}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'warm-up event sent');

# freeze the relay while the backlog is written
$relay = freeze_relay($node);

my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
my $early = $a->query_safe("SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 1}')");

$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'other-' || (g % 500), jsonb_build_object('n', g))) FROM generate_series(1, 30000) g"
);
my $late = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 2}')");
cmp_ok($late, '>', $early + 30000, "the later row of K ($late) comes after the backlog");

kill 'CONT', $relay;

# A commits once the walk has got past its row, well before it reaches the end
my $deadline = time + 60;
my $sent = 0;
while (time < $deadline)
{
	$sent = $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT' AND key LIKE 'other-%'");
	last if $sent >= 1000;
	usleep(20_000);
}
cmp_ok($sent, '>=', 1000, "the walk is under way ($sent rows of the backlog sent)");
cmp_ok($sent, '<', 30000, 'and not finished when A commits');
$a->query_safe('COMMIT');
$a->quit;

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status <> 'SENT'", '0', 120),
	'everything is sent');

my @k = grep { $_->{key} eq 'K' } kafka_consume($topic, 30003, 120, json => 0);
is(join(',', map { ($_->{value} =~ /"seq": (\d+)/)[0] } @k), '1,2',
	'K reached Kafka in id order: the row committed late first');

$node->stop;
done_testing();
