# The relay's mark (cqrs_relay_mark) and the HOT-friendly outbox: the update
# to SENT adds no index entry; the scan starts at the mark after a restart,
# not at id 1; rows made PENDING again below the mark are sent, also across a
# restart; an operator's open transaction never makes the relay wait.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node  = new_node('relay_mark');
my $topic = unique_topic('mark');
my $fill  = unique_topic('markfill');

# $sql returns t within $tries * 0.3 s (default 100: 30 s) while single
# events (to another topic) keep the relay recording: the mark moves, and the
# statistics are reported, at most once a second and only while outcomes are
# recorded
sub while_recording
{
	my ($sql, $tries) = @_;
	for (1 .. ($tries // 100))
	{
		return 1 if $node->safe_psql('postgres', $sql) eq 't';
		$node->safe_psql('postgres', "SELECT cqrs_enqueue('$fill', 'f', '{}')");
		usleep(300_000);
	}
	return 0;
}

sub mark_past
{
	my ($id, $tries) = @_;
	return while_recording("SELECT scan_from > $id FROM cqrs_relay_mark", $tries);
}

sub enqueue
{
	my ($n, $from) = @_;
	$node->safe_psql('postgres',
		"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 20), jsonb_build_object('n', g)))"
		  . " FROM generate_series($from, $from + $n - 1) g");
}

# ---- the update to SENT is a HOT update --------------------------------------------
enqueue(3000, 1);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '3000', 60),
	'3,000 rows sent');
ok( while_recording(
		"SELECT n_tup_upd >= 3000 AND n_tup_hot_upd >= 0.9 * n_tup_upd"
		  . " FROM pg_stat_user_tables WHERE relid = 'cqrs_outbox'::regclass"),
	'at least 90% of the updates to SENT were HOT (no index entry)')
  or diag($node->safe_psql('postgres',
	"SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'cqrs_outbox'::regclass"));

# ---- the mark follows the relay ------------------------------------------------------
ok(mark_past(3000), 'the mark moved past the rows sent');
is($node->safe_psql('postgres', "SELECT pending FROM cqrs_outbox_stats()"), '0',
	'the stats count no PENDING row');

# ---- a restart scans from the mark, not from id 1 -------------------------------------
$node->safe_psql('postgres',
	"ALTER SYSTEM SET log_min_messages = debug1; SELECT pg_reload_conf()");
my $mark = $node->safe_psql('postgres', "SELECT scan_from FROM cqrs_relay_mark");
my $log_at = -s $node->logfile;
ok(restart_relay($node), 'the relay was restarted');
enqueue(5, 3001);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'", '0', 30),
	'the rows enqueued after the restart are sent');
my $new = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
my $log = slurp_file($node->logfile, $log_at);
my ($first) = $log =~ /\[$new\].*claim of ids (\d+) to/;
ok(defined $first && $first >= $mark,
	"the restarted relay's first claim starts at the mark ($mark), not at id 1")
  or diag('first claim from ' . ($first // 'none'));
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET log_min_messages; SELECT pg_reload_conf()");

# ---- a row made PENDING again below the mark, then a restart ---------------------------
# (a dead-lettered row, made by hand: the relay's own dead-lettering is tested elsewhere)
$node->safe_psql('postgres',
	"UPDATE cqrs_outbox SET status = 'DEAD_LETTERED', last_error = 'test' WHERE id = 100");
ok(mark_past(100), 'the mark is above the failed row');
my $relay = freeze_relay($node);
$node->safe_psql('postgres', "SELECT cqrs_retry(100)");
is($node->safe_psql('postgres', "SELECT scan_from FROM cqrs_relay_mark"), '100',
	'cqrs_retry() lowered the mark to the row, in its transaction');
# the frozen relay never saw the wake-up: ended, it starts again from the mark
ok(restart_relay($node), 'the relay was restarted');
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = 100", 'SENT', 30),
	'the row made PENDING below the old mark was sent');
my @msgs = kafka_consume($topic, 3006, 60);
is(scalar(grep { $_->{value} =~ /"n": 100\b/ } @msgs), 2,
	'and reached Kafka again (its first copy, then the retry)');

# ---- an operator's open transaction never makes the relay wait ----------------------
$node->safe_psql('postgres',
	"UPDATE cqrs_outbox SET status = 'DEAD_LETTERED', last_error = 'test' WHERE id = 200");
my $operator = $node->background_psql('postgres');
$operator->query_safe('BEGIN');
$operator->query_safe('SELECT cqrs_retry(200)');
enqueue(2000, 3006);
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status = 'SENT'"
		  . " AND (payload->>'n')::int > 3005", '2000', 60),
	'rows are sent and recorded while an operator holds the mark');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE id = 200"),
	'DEAD_LETTERED', 'the operator has not committed yet');
$operator->query_safe('COMMIT');
$operator->quit;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = 200", 'SENT', 30),
	'once committed, the retried row is sent');
my $top = $node->safe_psql('postgres', "SELECT max(id) FROM cqrs_outbox");
ok(mark_past($top), 'and the mark moves up again');

# ---- a transaction still open holds the mark, across a restart ------------------------
# (its row gets an id below the rows sent after it; the relay restarted before
# it commits must still send it)
my $open = $node->background_psql('postgres');
$open->query_safe('BEGIN');
my $open_id = $open->query_safe("SELECT cqrs_enqueue('$topic', 'open', '{\"n\": -1}')");
chomp $open_id;
enqueue(1000, 6001);
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status = 'SENT'"
		  . " AND (payload->>'n')::int > 6000", '1000', 60),
	'the rows after the open transaction are sent');
ok(!mark_past($open_id, 15), "the mark does not move past the open transaction's row")
  or diag($node->safe_psql('postgres', "SELECT scan_from FROM cqrs_relay_mark") . " > $open_id");
ok(restart_relay($node), 'the relay was restarted');
$open->query_safe('COMMIT');
$open->quit;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $open_id", 'SENT', 30),
	'the row committed after the restart is sent');

# ---- cqrs_wake_relay(): from the start, durably -----------------------------------------
$node->safe_psql('postgres', "SELECT cqrs_wake_relay()");
is($node->safe_psql('postgres', "SELECT pending FROM cqrs_outbox_stats()"), '0',
	'cqrs_wake_relay(): still nothing PENDING');
is($node->safe_psql('postgres', "SELECT scan_from FROM cqrs_relay_mark"), '1',
	'cqrs_wake_relay() moved the mark to the start');
ok(mark_past($top), 'the walk from the start ends, and the mark moves up again');

# ---- the id sequence goes back ----------------------------------------------------------
# TRUNCATE ... RESTART IDENTITY: new rows take ids far below the relay's
# cursor and the mark.  They are found (the relay notices the sequence went
# back and scans again from the start) and counted (the mark goes to 1).
$node->safe_psql('postgres', 'TRUNCATE cqrs_outbox RESTART IDENTITY');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'again' || g, '{}')) FROM generate_series(1, 3) g");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT' AND key LIKE 'again%'", '3', 30),
	'after TRUNCATE ... RESTART IDENTITY, the new rows (ids 1 to 3) are sent');
ok($node->log_contains(qr/WARNING:  cqrs_sync relay: the outbox's id sequence went back from \d+ to \d+/),
	'the relay said the sequence went back');
ok(restart_relay($node), 'the relay was restarted');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'after-restart', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'after-restart'", 'SENT', 30),
	'after a restart, the next row is sent too (the mark went back)');

$node->stop;
done_testing();
