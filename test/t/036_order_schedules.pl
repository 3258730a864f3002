# Per-key order under schedules Kafka cannot be made to produce on purpose:
# a delivery report that comes after a retry's time, after a dead letter was
# recorded, or a claim that fails after its scan took a hold.  The test module
# test/order/order_schedule.c drives the relay's order (src/relay_order.c, in
# cqrs_sync.so) the way relay_pipeline.c does, step by step, with the real
# in-flight registry, and prints its verdicts and what the partition holds.
# Each schedule below is one that a review of the relay found broken:
#
# - a REDO row (acknowledged behind an earlier failure of its key) must keep
#   later rows of its key back until it is recorded and sent again, even when
#   a rescan for the failed row comes in between (26ea3cf);
# - a row in flight behind a row that is then dead-lettered is in order
#   without it: it must not become REDO and go again after rows that the dead
#   letter's recording released (5332874);
# - a claim that fails after its scan held a row for a transaction whose ids
#   are above the cursor must not leave that hold behind: the transaction's
#   end brings no revisit, and a later row of the key stays PENDING (c5dc927);
# - rows held behind a later row of their key that is in flight must be seen
#   again when that row fails, not only when it is acknowledged.
#
#
# One more shows that a revisit waiting for the rescan budget (relay_order.c)
# keeps its key held: the rows of the key above the cursor must not go before
# the row whose retry came.
#
# The order, crash and outage suites show the relay keeps order against a
# real broker; this one shows these interleavings, exactly.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

# the relay does not run: the module's backend is the only user of the order
my $node = new_node('orderschedules', 'cqrs_sync.relay_enabled' => 'off');

my $so = order_schedule_module();
$node->safe_psql('postgres',
	"CREATE FUNCTION cqrs_test_order_schedule(text) RETURNS SETOF text AS '$so' LANGUAGE C STRICT");

sub run_schedule
{
	my ($script) = @_;
	return $node->safe_psql('postgres',
		"SELECT * FROM cqrs_test_order_schedule(\$schedule\$$script\$schedule\$)");
}

sub last_copies_in_order
{
	my ($out) = @_;
	my ($kafka) = $out =~ /^(kafka:.*)$/m;
	return defined $kafka && $kafka =~ /\(last copies in id order\)$/;
}

# ---- a REDO row, a rescan before it is recorded ----------------------------
# E (1) fails and waits for its retry; R (2), in flight behind it, is
# acknowledged after E's retry time came: REDO.  A claim for new commits
# comes before R's outcome is recorded: it may send E again, but not S (3),
# which would then overtake R's second copy.
my $first_ack;
my $out = run_schedule(<<'EOS');
row 1 k
row 2 k
claim
produce
fail 1 retry 10000
record
row 3 k
time 20000
claim
ack 2
claim
produce
ack 1
record
claim
produce
ack 2
ack 3
record
kafka
EOS
note $out;
($first_ack) = $out =~ /^(ack 2: .*)$/m;
is($first_ack, 'ack 2: REDO', 'R, acknowledged behind E\'s failure, is REDO');
like($out, qr/^claim above 0: 1 go 2 skip 3 hold$/m,
	'the rescan for E sends E and holds S behind the REDO row not yet recorded');
like($out, qr/^kafka: 2 1 2 3 /m, 'the partition holds R, E, R, S');
ok(last_copies_in_order($out), 'the last copy of each row is in id order');

# ---- a dead letter recorded before the row behind it is acknowledged --------
# E (1) fails for good and goes to its dead-letter topic while R (2) is in
# flight; S (3) waits for E's failure.  The dead letter is recorded (S goes),
# then R is acknowledged: it is in order without E, and must not go again.
$out = run_schedule(<<'EOS');
row 1 k
row 2 k
claim
produce
fail 1 dlt
row 3 k
claim
dltack 1
record
claim
produce
ack 2
ack 3
record
claim
produce
ack 2
kafka
EOS
note $out;
like($out, qr/^claim above 2: 3 hold$/m, 'S waits while E\'s failure is not recorded');
($first_ack) = $out =~ /^(ack 2: .*)$/m;
is($first_ack, 'ack 2: SENT', 'R, acknowledged after E was dead-lettered, is SENT, not REDO');
like($out, qr/^kafka: 2 3 \(/m, 'the partition holds R, S: R once');
ok(last_copies_in_order($out), 'the last copy of each row is in id order');

# ---- a row held behind a later row in flight, which then fails ------------
# E (1) fails and waits for its retry; R (2) is acknowledged behind it (REDO)
# and recorded; L (3) is still in flight.  E's retry time comes: the rescan
# holds E and R behind L.  Then L fails too: nothing of the key is in flight
# any more, so E and R must be seen again, not stay PENDING behind a hold
# nobody ends (found by the third review).
$out = run_schedule(<<'EOS');
row 1 k
row 2 k
row 3 k
claim
produce
fail 1 retry 10000
ack 2
record
time 20000
claim
fail 3 retry 10000
claim
produce
ack 1
ack 2
record
time 20000
claim
produce
ack 3
record
kafka
EOS
note $out;
like($out, qr/^claim above 0: 1 hold 2 hold 3 skip$/m, 'the rescan for E holds E and R behind L, in flight');
like($out, qr/^claim above 0: 1 go 2 go 3 skip$/m, 'once L failed, E and R go again');
like($out, qr/^kafka: 2 1 2 3 /m, 'the partition holds R, E, R, L');
ok(last_copies_in_order($out), 'the last copy of each row is in id order');

# ---- a claim that fails after it held a row for a transaction --------------
# Transaction T has enqueued (id 1, key k) and is open.  S (2) and S2 (3) of
# key k are committed by others; the claim holds them for T, then fails.  T
# commits: its lowest id is above the cursor, so its end asks for no revisit.
# The next claim must see S2 as free: a hold left by the failed claim would
# keep it back, with the cursor past it, until some other rescan.
my $t = $node->background_psql('postgres');
$t->query_safe('BEGIN');
my $tid = $t->query_safe("SELECT cqrs_enqueue('t', 'k', '{}')");
is($tid, '1', "T's row is id 1");
my $sched = $node->background_psql('postgres');
# one backend for the whole schedule: the order's state lives in it, and the
# schedule waits for T's commit in the middle
$out = $sched->query_safe(q{SELECT * FROM cqrs_test_order_schedule($$
row 2 k
row 3 k
claim
abort
$$)});
note $out;
like($out, qr/^claim above 0: 2 hold 3 hold$/m, "S and S2 are held for T, which is open");
$t->query_safe('COMMIT');
$t->quit;
$out = $sched->query_safe(q{SELECT * FROM cqrs_test_order_schedule($$
continue
row 1 k
claim
produce
ack 1
ack 2
ack 3
record
claim
kafka
$$)});
note $out;
like($out, qr/^claim above 0: 1 go 2 go 3 go$/m,
	"after T's commit, T's row, S and S2 go, in id order");
like($out, qr/^kafka: 1 2 3 /m, 'the partition holds 1, 2, 3');
$sched->quit;

# ---- a revisit that waits for the budget -----------------------------------
# A (1) and B (2) fail; 100,000 (another key) moves the cursor far ahead, so
# that going back costs the whole burst.  A's retry comes first and spends it.
# B's comes 1 s later, when the budget has 10,000 rows: its revisit waits,
# and B2 (100,001), a later row of B's key, must wait with it.  4 s later the
# budget allows it: B, then B2.  (Retry times count from the moment of the
# recording, a few milliseconds after the schedule's start: hence 1,100.)
$out = run_schedule(<<'EOS');
row 1 a
row 2 b
row 100000 c
claim
produce
fail 1 retry 1000
fail 2 retry 2000
ack 100000
record
time 1100
claim
produce
ack 1
record
row 100001 b
time 1000
claim
time 4000
claim
produce
ack 2
ack 100001
record
kafka
EOS
note $out;
like($out, qr/^claim above 0: 1 go 2 hold$/m, "A's retry goes back at once: the budget is full");
like($out, qr/^claim above 100000: 100001 hold$/m,
	"B's revisit waits for the budget, and B2 waits with it");
like($out, qr/^claim above 1: 2 go 100001 go$/m, 'once the budget allows, B goes, then B2');
like($out, qr/^kafka: 100000 1 2 100001 /m, 'the partition holds B before B2');
ok(last_copies_in_order($out), 'the last copies of each key are in id order');

$node->stop;
done_testing();
