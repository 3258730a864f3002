# A discarded event is never delivered (issue 13, item 10).  While the relay
# sends 20,000 events, another session discards PENDING rows as fast as it
# can.  cqrs_discard() either succeeds, and then the event must never reach
# Kafka, or refuses with object_in_use (55006) because the relay has the row
# in flight, and then the row must be sent.  Afterwards: every row audited
# DISCARD is absent from Kafka, every other row is there.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node  = new_node('discard', 'cqrs_sync.batch_size' => '200');
my $topic = unique_topic('discard');

my $writer = $node->background_psql('postgres');
my $op     = $node->background_psql('postgres', on_error_stop => 0);

my ($discarded, $refused, $other) = (0, 0, 0);
for my $round (1 .. 40)
{
	$writer->query_safe(
		"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 20), jsonb_build_object('n', g))) FROM generate_series(1, 500) g"
	);
	# discard a few of the newest PENDING rows, racing the relay
	my $ids = $node->safe_psql('postgres',
		"SELECT string_agg(id::text, ' ') FROM (SELECT id FROM cqrs_outbox WHERE status = 'PENDING' ORDER BY id DESC LIMIT 10) s"
	);
	for my $id (split ' ', ($ids // ''))
	{
		my $out = $op->query("SELECT cqrs_discard($id, 'race test')");
		my $err = $op->{stderr} // '';
		if ($err =~ /is being sent right now/)
		{
			$refused++;
		}
		elsif ($err =~ /does not exist|already sent/)
		{
			$other++;
		}
		elsif ($err eq '')
		{
			$discarded++;
		}
		else
		{
			diag("unexpected: $err");
			$other++;
		}
		$op->{stderr} = '';
	}
}
$writer->quit;
$op->quit;
note("discarded $discarded, refused while in flight $refused, too late $other");
cmp_ok($discarded, '>', 0, 'some rows were discarded');

ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status <> 'SENT'", '0', 120),
	'every remaining row is sent');
my %discard = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
	"SELECT event_id FROM cqrs_outbox_audit WHERE action = 'DISCARD' AND topic = '$topic'");
is(scalar(keys %discard), $discarded, 'each discard is audited');
my %kept = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
	"SELECT event_id FROM cqrs_outbox WHERE topic = '$topic'");

my @msgs = kafka_consume($topic, scalar(keys %kept), 120, json => 0);
my %seen = map { ($_->{headers}{event_id} // '') => 1 } @msgs;
my @leaked = grep { $seen{$_} } keys %discard;
is(scalar @leaked, 0, 'no discarded event reached Kafka');
is(scalar(grep { !$seen{$_} } keys %kept), 0, 'every kept event reached Kafka');

$node->stop;
done_testing();
