# A trickle of failing events must not make the relay read the outbox behind
# its cursor again and again.  Each failed row waits for its retry with its
# key held; when the time comes, the scan goes back to it and reads every row
# from there to the cursor again, most of them long sent.  Rows that failed in
# different turns come due at different times: before the fix each of them
# sent the relay back separately, dozens of times a second, each time over
# the whole backlog sent since (relay_order.c: the rescan budget).
#
# Real Kafka.  30 rows too large for their topic fail one by one, 50 ms
# apart; then 20,000 rows are sent, so that each rescan for a retry reads
# those again.  Over a window of 8 s the relay's own log (DEBUG1, one line
# per claim) says how many rows its claims read at or below their cursor:
# they must stay within the budget (a burst of 50,000, then 10,000 a
# second).  Every row still ends as it must: the 30 dead-lettered after five
# retries, the 20,000 in their topic.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $ok_topic = create_topic(unique_topic('budget'), 2);
my $bad_topic = create_topic(unique_topic('budget-big'), 1, 'max.message.bytes=1000');
create_topic("$bad_topic.DLT", 1);

my $node = new_node('budget',
	'cqrs_sync.retry_backoff' => '500ms',
	'log_min_messages' => 'debug1');

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$ok_topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 60),
	'the relay sends');

# 30 rows too large for their topic, each in its own turn
for my $i (1 .. 30)
{
	$node->safe_psql('postgres',
		"SELECT cqrs_enqueue('$bad_topic', 'big$i', jsonb_build_object('pad', repeat('x', 3000)))");
	usleep(50_000);
}
# a backlog behind them, which every rescan for them reads
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$ok_topic', 'k' || (g % 1000), jsonb_build_object('n', g))) FROM generate_series(1, 20000) g"
);
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$ok_topic' AND status = 'SENT'",
		'20001', 120),
	'the backlog is sent while the large rows wait for their retries');
my $cursor_rows = $node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_outbox WHERE topic = '$bad_topic' AND status = 'PENDING'");
cmp_ok($cursor_rows, '>', 0, 'some large rows still wait for a retry');

# the window: what the claims read at or below their cursor
my $log = $node->logfile;
my $from = -s $log;
my $t0 = time;
sleep(8);
my $elapsed = time - $t0;
my $text = slurp_file($log, $from);
my ($claims, $rescans, $reread) = (0, 0, 0);
for my $line (split /\n/, $text)
{
	next unless $line =~
	  /claim of ids (\d+) to (\d+) \(cursor (\d+)\): (\d+) rows walked/;
	my ($first, $cursor, $walked) = ($1, $3, $4);
	$claims++;
	next if $first > $cursor;
	$rescans++;
	my $below = $cursor - $first + 1;
	$reread += $walked < $below ? $walked : $below;
}
note(sprintf('%.1f s: %d claims, %d went back, %d rows read again', $elapsed, $claims,
		$rescans, $reread));
cmp_ok($claims, '>', 0, 'the relay logged its claims');
my $bound = int(50_000 + 10_000 * ($elapsed + 1));
cmp_ok($reread, '<=', $bound,
	"rows read again behind the cursor stay within the budget ($bound)");

ok( wait_for($node,
		"SELECT status || ' ' || min(retry_count) || ' ' || count(*) FROM cqrs_outbox WHERE topic = '$bad_topic' GROUP BY status",
		'DEAD_LETTERED 6 30', 90),
	'each large row was retried five times, then dead-lettered');
my @dlt = kafka_consume("$bad_topic.DLT", 30, 30);
is(scalar(@dlt), 30, 'the dead-letter topic holds the 30');
my @ok = kafka_consume($ok_topic, 20001, 60);
is(scalar(@ok), 20001, 'the topic holds the 20,001 others');

$node->stop;
done_testing();
