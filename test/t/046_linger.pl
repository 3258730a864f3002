# cqrs_sync.linger: while commits keep waking the relay, it claims at most
# once per linger, so the events of many commits go out in a few claims; a
# commit after a quiet spell is claimed at once.  Counted, not timed: the
# relay's transactions (claims and recordings) for a burst of commits.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# a long linger, and no fallback scan to claim in between
my $node = new_node('linger',
	'cqrs_sync.linger'        => '1s',
	'cqrs_sync.poll_interval' => '1h');
my $topic = unique_topic('linger');
create_topic($topic, 2);

ok(wait_for($node, "SELECT state FROM cqrs_stats_relay", 'running'), 'the relay runs');

# a commit after a quiet spell goes at once, not a linger later
usleep(1_500_000);
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'quiet', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'quiet'", 'SENT'),
	'the quiet commit is sent');
is( $node->safe_psql('postgres',
		"SELECT sent_at - created_at < interval '500 ms' FROM cqrs_outbox WHERE key = 'quiet'"),
	't',
	'a commit after a quiet spell is claimed at once (sent well within the linger)');

# a burst of single-event commits 10 ms apart (far slower than the relay
# claims them): a few claims, not one per commit
my $n      = 30;
my $before = $node->safe_psql('postgres', "SELECT transactions FROM cqrs_stats_relay");
$node->safe_psql('postgres',
	join('',
		map { "SELECT cqrs_enqueue('$topic', 'k' || ($_ % 3), jsonb_build_object('n', $_));\nSELECT pg_sleep(0.01);\n" }
		  1 .. $n));
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key <> 'quiet' AND status = 'SENT'", $n, 60),
	'every commit of the burst is sent');
usleep(200_000);
my $after = $node->safe_psql('postgres', "SELECT transactions FROM cqrs_stats_relay");
my $span_ms = $node->safe_psql('postgres',
	"SELECT ceil(extract(epoch FROM max(created_at) - min(created_at)) * 1000)::int
	   FROM cqrs_outbox WHERE key <> 'quiet'");

# claims: one per started second of the burst, one at its start, one after
# it; each followed by at most two recordings
my $claims = int($span_ms / 1000) + 2;
my $bound  = 3 * $claims;
cmp_ok($after - $before, '<=', $bound,
	"$n commits in $span_ms ms took " . ($after - $before) . " relay transactions (at most $bound)");

my @msgs = kafka_consume($topic, $n + 1, 60);
is(scalar(@msgs), $n + 1, 'Kafka has every event once');
for my $k (0 .. 2)
{
	my @seq = map { $_->{json}{n} } grep { $_->{key} eq "k$k" } @msgs;
	is(join(',', @seq), join(',', grep { $_ % 3 == $k } 1 .. $n), "key k$k in commit order");
}

# 0 turns it off: the relay claims at each commit (a burst is no longer
# gathered by the linger; the relay may still gather commits it is slower than)
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.linger = 0; SELECT pg_reload_conf()");
usleep(500_000);
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'off', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'off'", 'SENT'),
	'with linger 0, a commit is sent');

$node->stop;
done_testing();
