# The idempotency store down (issue 14): the read database is made
# read-only for 30 s (ALTER SYSTEM SET default_transaction_read_only, a
# reload), then its inbox is locked for 8 s (longer than the sink's 5 s lock
# timeout), while events keep arriving.  The sink waits and alerts (state
# "waiting for database", a WARNING with SQLSTATE CQ011, a notification on
# cqrs_sync_alert, lag_seconds growing); nothing is skipped, doubled, held or
# dead-lettered, and no retry budget is spent.  Once the database accepts
# writes again every event is applied exactly once.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $READ_ONLY = 30;

my $node = new_node('sink_read_only',
	'cqrs_sync.relay_enabled' => 'off',
	'log_line_prefix'         => '%m [%p] %e ');
my $topic = unique_topic('sink-ro');
create_topic($topic, 4);

my ($first,  $exp1) = exact_events(300, 20, 2, 1);
my ($second, $exp2) = exact_events(300, 20, 2, 301);
my ($third,  $exp3) = exact_events(300, 20, 2, 601);
my %expected = (%$exp1, %$exp2, %$exp3);

exact_setup($node, 'ro', $topic, max_retries => 0);
kafka_produce_events($topic, $first);
ok(wait_applied($node, 'ro', scalar @$first, 60), 'the first events are applied');
my $before = sink_counts($node, 'ro');

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cqrs_sync_alert');
my $log_offset = -s $node->logfile;

# ---- read-only ------------------------------------------------------------------

$node->safe_psql('postgres', 'ALTER SYSTEM SET default_transaction_read_only = on');
$node->reload;
my $t0 = time;
kafka_produce_events($topic, $second);
ok(wait_for($node, "SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0", 'waiting for database', 30),
	'the sink waits for the database');
like($node->safe_psql('postgres', "SELECT last_error FROM cqrs_stats_sink_workers WHERE worker = 0"),
	qr/read-only transaction/, 'and says why');
ok($node->wait_for_log(qr/CQ011 WARNING:  cqrs_sync sink "ro" cannot apply its events and waits/, $log_offset),
	'a WARNING with SQLSTATE CQ011');
like($listener->query('SELECT 1'),
	qr/Asynchronous notification "cqrs_sync_alert" with payload ".*sink_waiting.*ro.*read-only/s,
	'a notification on cqrs_sync_alert');
ok(wait_for($node, "SELECT sum(lag) > 0 AND max(lag_seconds) > 5 FROM cqrs_sink_stats WHERE sink = 'ro'", 't', 30),
	'cqrs_sink_stats shows the lag in messages and seconds growing');
ok(wait_for($node, "SELECT waiting_seconds > 5 FROM cqrs_stats_sink_workers WHERE worker = 0", 't', 30),
	'cqrs_stats_sink_workers says for how long it waits');
usleep(int(($READ_ONLY - (time - $t0)) * 1_000_000)) if time - $t0 < $READ_ONLY;
my $during = sink_counts($node, 'ro');
is($during->{positions}, $before->{positions},
	sprintf('after %.0f s read-only no position moved: nothing applied or skipped', time - $t0));
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held"), '0', 'nothing held or dead-lettered');

$node->safe_psql('postgres', 'ALTER SYSTEM RESET default_transaction_read_only');
$node->reload;
ok(wait_applied($node, 'ro', @$first + @$second, 60), 'writable again, the sink applies what waited');
ok(wait_for($node, "SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0", 'running', 30),
	'and says it runs');

# ---- the inbox locked longer than the sink's lock timeout -------------------------

my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE cqrs_inbox IN ACCESS EXCLUSIVE MODE');
$t0 = time;
kafka_produce_events($topic, $third);
ok(wait_for($node, "SELECT last_error ~ 'lock timeout' FROM cqrs_stats_sink_workers WHERE worker = 0", 't', 30),
	'with its inbox locked the sink waits too (lock timeout)');
usleep(int((8 - (time - $t0)) * 1_000_000)) if time - $t0 < 8;
$locker->query_safe('COMMIT');
$locker->quit;
$listener->quit;

ok(wait_applied($node, 'ro', @$first + @$second + @$third, 60), 'unlocked, every message is accounted for');
my $c = sink_counts($node, 'ro');
my $n = (@$first + @$second + @$third) / 2;
is($c->{applied},    $n, 'each event applied exactly once');
is($c->{duplicates}, $n, 'each copy skipped once');
is($c->{retried} + $c->{dead_lettered} + $c->{dlt_failed}, 0, 'no retry budget spent, nothing dead-lettered');
exact_check($node, \%expected, 'the read model is exact');

# ---- a sink starting at the latest offset, whose first batch must wait -------------
# Its positions are created by its first batch: that transaction rolls back
# while the database is read-only, and the sink must create them again, not
# take them for deleted (it then sought to the end: the waiting events were
# skipped, and the consumer stalled).

$node->safe_psql('postgres', "SELECT cqrs_sink_drop('ro')");
my $late_topic = unique_topic('sink-ro-late');
create_topic($late_topic, 4);
my ($late, $exp_late) = exact_events(100, 10, 1, 1001);
exact_setup($node, 'late', $late_topic, start => 'latest', max_retries => 0);
ok(wait_for($node, "SELECT count(*) FROM cqrs_sink_partitions() WHERE sink = 'late'", '4', 60),
	'a sink starting at the latest offset is assigned its partitions');
$node->safe_psql('postgres', 'ALTER SYSTEM SET default_transaction_read_only = on');
$node->reload;
kafka_produce_events($late_topic, $late);
ok(wait_for($node, "SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0", 'waiting for database', 30),
	'its first batch waits for the database');
sleep 3;
$node->safe_psql('postgres', 'ALTER SYSTEM RESET default_transaction_read_only');
$node->reload;
ok(wait_applied($node, 'late', scalar @$late, 60), 'writable again, it applies every waiting event');
my ($later, $exp_later) = exact_events(100, 10, 1, 1101);
kafka_produce_events($late_topic, $later);
ok(wait_applied($node, 'late', @$late + @$later, 60), 'and goes on consuming');
exact_check($node, { %$exp_late, %$exp_later }, 'its read model is exact', 1001, 1200);

# ---- a rewind while the sink waits ---------------------------------------------------
# The rewind drops the batch the sink waits with; the sink must fetch again
# (it kept its partitions paused, waiting for a batch it no longer had).

$locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE cqrs_inbox IN ACCESS EXCLUSIVE MODE');
my ($last, $exp_last) = exact_events(100, 10, 1, 1201);
kafka_produce_events($late_topic, $last);
ok(wait_for($node, "SELECT last_error ~ 'lock timeout' FROM cqrs_stats_sink_workers WHERE worker = 0", 't', 30),
	'with its inbox locked the sink waits');
# to its own position: only the epoch moves, nothing is read twice
$node->safe_psql('postgres', "SELECT cqrs_sink_rewind('late', '$late_topic', 0,"
	  . " (SELECT next_offset FROM cqrs_sink_offset WHERE sink = 'late' AND \"partition\" = 0))");
$locker->query_safe('COMMIT');
$locker->quit;
ok(wait_applied($node, 'late', @$late + @$later + @$last, 60), 'rewound while it waited, it applies every event');
exact_check($node, { %$exp_late, %$exp_later, %$exp_last }, 'its read model is exact', 1001, 1300);

$node->stop;
done_testing();
