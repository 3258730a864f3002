# A lock held on the outbox does not hold the monitor worker.
#
# Each dead-letter depth round reads the outbox's dead-letter topics.  While
# an operator's transaction holds an ACCESS EXCLUSIVE lock on the outbox
# (ALTER TABLE, VACUUM FULL, LOCK TABLE), that read waited for it: no round,
# and a stop (SIGTERM, as in a fast shutdown) went unnoticed for as long as
# the lock was held.  Now the read gives up after the monitor's lock_timeout
# (1 s) with a WARNING, and the round watches the topics it knew of.
# A monitor started while the lock is held knows none of the outbox's
# dead-letter topics yet: its round fails, and keeps the figures there are,
# instead of publishing those topics as gone (an empty cqrs_dlt_depth would
# resolve the dead-letter alerts while the messages are still there).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $topic = create_topic(unique_topic('monlock'), 1);
my $small = create_topic(unique_topic('monsmall'), 1, 'max.message.bytes=200000');
my $node  = new_node(
	'monlock',
	'cqrs_sync.read_side_dlt_topics' => $topic,
	'cqrs_sync.dlt_depth_interval'   => '500ms',
	'cqrs_sync.max_retries'          => '0');

ok(wait_for($node, "SELECT count(*) FROM cqrs_dlt_depth WHERE topic = '$topic'", '1', 60),
	'the monitor reads the depth of the watched topic');
# a row dead-lettered to $small.DLT: the outbox's own dead-letter topic
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$small', 'k', jsonb_build_object('big', repeat('x', 300000)))");
ok( wait_for($node,
		"SELECT coalesce(sum(messages), 0) FROM cqrs_dlt_depth WHERE topic = '$small.DLT'", '1', 60),
	'the monitor reads the depth of the outbox\'s dead-letter topic');
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync monitor'");
like($pid, qr/^\d+$/, 'the monitor runs');

my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE cqrs_outbox IN ACCESS EXCLUSIVE MODE');
my $warned;
for (1 .. 150)
{
	$warned = $node->log_contains(
		qr/WARNING:  cqrs_sync monitor: could not list the outbox's dead-letter topics: canceling statement due to lock timeout/
	);
	last if $warned;
	usleep(200_000);
}
ok($warned, 'the monitor gives up waiting for the lock within 30 s, with a WARNING');
my $checked = $node->safe_psql('postgres',
	"SELECT checked_at FROM cqrs_dlt_depth WHERE topic = '$topic'");
ok( wait_for($node,
		"SELECT checked_at > '$checked' FROM cqrs_dlt_depth WHERE topic = '$topic'", 't', 30),
	'and its rounds go on while the outbox is locked');

my $took = terminate_backend($node, $pid, 60);
ok(defined $took, 'the monitor ended');
note(sprintf('the monitor ended %.1f s after SIGTERM', $took // 60));
cmp_ok($took // 60, '<', 10, 'within 10 s of SIGTERM, while the outbox is still locked');

# the monitor started again (5 s later), the outbox still locked
ok( wait_for($node,
		"SELECT last_error LIKE 'could not list the outbox''s dead-letter topics: %lock timeout%'"
		  . " FROM cqrs_stats_dlt_depth WHERE monitor_pid <> $pid", 't', 60),
	'a monitor started while the outbox is locked fails its round, and says why');
usleep(2_000_000);
is( $node->safe_psql('postgres',
		"SELECT coalesce(sum(messages), 0) FROM cqrs_dlt_depth WHERE topic = '$small.DLT'"),
	'1', '... and keeps the depth of the dead-letter topic it could not list');

$locker->query_safe('COMMIT');
ok( wait_for($node,
		"SELECT last_error IS NULL FROM cqrs_stats_dlt_depth", 't', 30),
	'once the lock is gone, its rounds answer again');
is( $node->safe_psql('postgres',
		"SELECT coalesce(sum(messages), 0) FROM cqrs_dlt_depth WHERE topic = '$small.DLT'"),
	'1', '... with the dead-letter topic');
$locker->quit;
$node->stop;
done_testing();
