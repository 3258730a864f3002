# A long or wide transaction delays its own keys only (issue 12, item 5).
#
# Transaction A enqueues 10,000 distinct keys and stays open.  Meanwhile
# 10,000 rows of 10,000 other keys are committed: at least 99% of them must
# be sent while A is open (the registry keeps a transaction's keys exactly,
# or, beyond 16 keys, in a filter sized for < 1% false holds at 10,000
# keys).  Later rows of A's own keys wait for A, and follow its rows once it
# commits.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node  = new_node('wide');
my $topic = unique_topic('wide');

my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
$a->query_safe(
	"SELECT count(cqrs_enqueue('$topic', 'a-' || g, jsonb_build_object('seq', 1))) FROM generate_series(1, 10000) g"
);

# 100 later rows of A's keys, and 10,000 rows of other keys
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'a-' || g, jsonb_build_object('seq', 2))) FROM generate_series(1, 100) g");
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'b-' || g, jsonb_build_object('seq', 1))) FROM generate_series(1, 10000) g"
);

# wait until the relay has done what it can while A is open
my $sent = 0;
for (1 .. 300)
{
	my $now = $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE key LIKE 'b-%' AND status = 'SENT'");
	last if $now == 10000;
	if ($now == $sent && $now > 0)
	{
		# no progress for a while: the rest is held
		sleep 2;
		last if $node->safe_psql('postgres',
			"SELECT count(*) FROM cqrs_outbox WHERE key LIKE 'b-%' AND status = 'SENT'") == $now;
	}
	$sent = $now;
	select(undef, undef, undef, 0.2);
}
$sent = $node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_outbox WHERE key LIKE 'b-%' AND status = 'SENT'");
cmp_ok($sent, '>=', 9900, "while A is open, $sent of 10,000 rows of other keys are sent (>= 99%)");
note(sprintf('false holds: %d of 10,000 (%.2f%%)', 10000 - $sent, (10000 - $sent) / 100));
is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE key LIKE 'a-%' AND status = 'SENT'"),
	'0', "the later rows of A's keys wait for A");

$a->query_safe('COMMIT');
$a->quit;
ok( wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status <> 'SENT'",
		'0', 120),
	'everything is sent once A commits');

my @msgs = grep { $_->{key} =~ /^a-([0-9]+)$/ && $1 <= 100 }
  kafka_consume($topic, 20100, 120);
my %seq;
push @{ $seq{ $_->{key} } }, $_->{json}{seq} for @msgs;
my $bad = grep { join(',', @{ $seq{$_} }) ne '1,2' } keys %seq;
is(scalar(keys %seq), 100, 'the 100 keys with two rows are in Kafka');
is($bad, 0, "each of them in id order: A's row first");

$node->stop;
done_testing();
