# Order per key across out-of-order commits (DESIGN.md section 4): session A
# takes a lower id for key K and commits last; session B's later row of K
# must wait for it, while other keys keep flowing.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node  = new_node('inflight');
my $topic = unique_topic('inflight');

sub status_of
{
	my ($id) = @_;
	return $node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE id = $id");
}

# A: takes id1 for key K and stays open.
my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
my $id1 = $a->query_safe("SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 1}')");

# B: commits a later row of K, and rows of 100 other keys.
my $id2 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 2}')");
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'other-' || g, jsonb_build_object('seq', g)) FROM generate_series(1, 100) g"
);
ok($id2 > $id1, "the later row of K has the higher id ($id2 > $id1)");

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND key LIKE 'other-%' AND status = 'SENT'",
		'100', 30),
	'rows of other keys are sent while A is open');

# The relay ran several times since (poll interval 200 ms, woken by B's
# commits); K's committed row must still wait for A's uncommitted one.
usleep(1_500_000);
is(status_of($id2), 'PENDING', 'the later row of K waits for the uncommitted earlier one');
my @before = grep { $_->{key} eq 'K' } kafka_consume($topic, 100, 30);
is(scalar @before, 0, 'no message of K reached Kafka before A committed');

$a->query_safe('COMMIT');
$a->quit;

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'", '2', 30),
	'both rows of K are sent after A commits');
my @k = grep { $_->{key} eq 'K' } kafka_consume($topic, 102, 30);
is(join(',', map { $_->{json}{seq} } @k), '1,2', 'K reached Kafka in id order: 1, 2');

# An aborted in-flight transaction releases its key too.
$a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
$a->query_safe("SELECT cqrs_enqueue('$topic', 'R', '{\"seq\": 1}')");
my $id4 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'R', '{\"seq\": 2}')");
usleep(1_000_000);
is(status_of($id4), 'PENDING', 'a row waits for an open transaction of its key');
$a->query_safe('ROLLBACK');
$a->quit;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id4", 'SENT', 30),
	'and goes once that transaction rolled back');
my @r = grep { $_->{key} eq 'R' } kafka_consume($topic, 103, 30);
is(join(',', map { $_->{json}{seq} } @r), '2', 'only the committed row of R is in Kafka');

$node->stop;
done_testing();
