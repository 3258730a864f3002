# The relay's memory stays flat while rows keep failing.
#
# Delivery reports and local failures are handled outside any transaction.
# Texts built there (a row's error, the log lines about it) once went to
# TopMemoryContext and were never freed: a topic that kept refusing its rows
# leaked with every attempt of every row.  Here 100 rows, each too large for
# their topic, keep being retried for 20 s (hundreds of charged
# attempts), and the relay's memory is measured before and after: the total
# of its memory contexts (pg_log_backend_memory_contexts()) and its private
# resident memory (RssAnon).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node(
	'memory',
	'cqrs_sync.max_retries'   => '1000',
	'cqrs_sync.retry_backoff' => '100ms');

my $topic = create_topic(unique_topic('memory'), 1, 'max.message.bytes=200000');
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");

# what the relay has allocated, and its private resident memory (kB)
sub relay_memory
{
	my $at = -s $node->logfile;
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	my $total;
	for (1 .. 100)
	{
		($total) = slurp_file($node->logfile, $at) =~ /\[$pid\] LOG:  Grand total: (\d+) bytes/;
		last if defined $total;
		select(undef, undef, undef, 0.1);
	}
	my ($rss) = slurp_file("/proc/$pid/status") =~ /^RssAnon:\s+(\d+) kB/m;
	return ($total, $rss);
}

sub attempts
{
	return $node->safe_psql('postgres',
		"SELECT sum(retry_count) FROM cqrs_outbox WHERE topic = '$topic'");
}

$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('big', repeat('x', 210000)))) FROM generate_series(1, 100) g"
);
ok(wait_for($node, "SELECT min(retry_count) >= 5 FROM cqrs_outbox WHERE topic = '$topic'", 't', 60),
	'every row failed and was retried a few times (warm-up)');

my ($total0, $rss0) = relay_memory();
my $attempts0 = attempts();
ok(defined $total0 && defined $rss0, "measured before: $total0 bytes allocated, RssAnon $rss0 kB");
sleep 20;
my ($total1, $rss1) = relay_memory();
my $attempts1 = attempts();
cmp_ok($attempts1 - $attempts0, '>=', 200, 'hundreds of attempts failed meanwhile');
note("after: $total1 bytes allocated, RssAnon $rss1 kB; attempts $attempts0 -> $attempts1");

# each attempt of each row leaked a few hundred bytes of context memory, and
# far more resident memory (copies of the error texts); a few kilobytes of
# slack for caches that may still settle
cmp_ok($total1 - $total0, '<', 16384, 'the memory the relay allocated did not grow');
cmp_ok($rss1 - $rss0, '<', 4096, 'its private resident memory did not grow by 4 MB or more');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status <> 'PENDING'"),
	'0', 'the rows are still PENDING (none dead-lettered while retries remain)');

$node->stop;
done_testing();
