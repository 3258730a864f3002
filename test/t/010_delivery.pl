# Delivery against the real broker, no faults: 100,000 events over 1,000
# keys arrive exactly once, in outbox order per key, each with its event_id
# header; events of a rolled-back transaction never appear.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $N    = 100_000;
my $KEYS = 1_000;

my $node  = new_node('delivery');
my $topic = unique_topic('delivery');

# 20 transactions of 5,000 events; one more that rolls back in the middle.
for my $t (0 .. 19)
{
	my $from = $t * 5000 + 1;
	my $to   = $from + 4999;
	$node->safe_psql('postgres',
		"SELECT count(cqrs_enqueue('$topic', 'key-' || (g % $KEYS), jsonb_build_object('n', g, 'body', repeat('x', 200)))) FROM generate_series($from, $to) g"
	);
	if ($t == 10)
	{
		$node->safe_psql('postgres',
			"BEGIN; SELECT cqrs_enqueue('$topic', 'key-' || g, jsonb_build_object('rolled_back', true)) FROM generate_series(1, 100) g; ROLLBACK;"
		);
	}
}

is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic'"),
	$N, "$N events committed");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 120),
	'every row became SENT');

my @msgs = kafka_consume($topic, $N, 120);
is(scalar @msgs, $N, "$N messages in Kafka");

# exactly once: one message per outbox event id, and no other
my %outbox;    # event_id => [id, key, n]
for my $line (split /\n/,
	$node->safe_psql('postgres',
		"SELECT event_id, id, key, payload->>'n' FROM cqrs_outbox WHERE topic = '$topic'"))
{
	my ($eid, $id, $key, $n) = split /\|/, $line;
	$outbox{$eid} = [ $id, $key, $n ];
}
my (%seen, $dups, $unknown, $mismatch);
for my $m (@msgs)
{
	my $eid = $m->{headers}{event_id} // '';
	$dups++ if $seen{$eid}++;
	my $row = $outbox{$eid};
	if (!$row) { $unknown++; next; }
	$mismatch++
	  unless $m->{key} eq $row->[1] && defined $m->{json} && ($m->{json}{n} // '') eq $row->[2];
}
is($dups // 0,     0, 'no duplicates');
is($unknown // 0,  0, 'every message carries the event_id of an outbox row');
is(scalar(keys %seen), $N, 'every outbox row is in Kafka');
is($mismatch // 0, 0, 'key and value of each message are those of its row');
is(scalar(grep { defined $_->{json} && $_->{json}{rolled_back} } @msgs),
	0, 'no event of the rolled-back transaction');

# order per key: within a key (one partition), offsets follow outbox ids
my (%last_id, $disorder);
for my $m (@msgs)    # sorted by partition, offset
{
	my $row = $outbox{ $m->{headers}{event_id} // '' } or next;
	my $k = $m->{key};
	$disorder++ if defined $last_id{$k} && $row->[0] < $last_id{$k};
	$last_id{$k} = $row->[0];
}
is($disorder // 0, 0, 'messages of each key are in outbox id order');
is(scalar(keys %last_id), $KEYS, "all $KEYS keys seen");

$node->stop;
done_testing();
