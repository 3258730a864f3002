# A claim that fails keeps the rescan it was to do.  A row waiting for its
# retry is found again only by the rescan its retry time starts: the claim
# that carries it must not lose it when it fails (here: a lock on the outbox
# held beyond the relay's lock_timeout of 5 s).  Otherwise the row stays
# PENDING for good: the relay's scan is past it, and so is its durable mark.
#
# The retry comes from a message too large for its topic; while the outbox
# is locked, the operator raises the topic's limit, so that the row's next
# attempt succeeds once the lock is gone.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = new_node(
	'claimabort',
	'cqrs_sync.max_retries'   => '1000',
	'cqrs_sync.retry_backoff' => '5s',
	# no claim for a poll in between: the first claim under the lock is the
	# retry's
	'cqrs_sync.poll_interval' => '60s');

my $topic = create_topic(unique_topic('claimabort'), 1, 'max.message.bytes=200000');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'warm-up row sent');

my $id = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'big', jsonb_build_object('big', repeat('x', 300000)))");
# later rows of other keys move the relay's scan past the big row
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || g, '{}')) FROM generate_series(1, 10) g");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '11', 30),
	'the rows after the big one are sent');

# right after a retry of the big row was recorded (it waits 5 s), a row of
# another key is claimed and sent (the relay's last claim before the lock
# starts above the big row), then the outbox is locked for longer than the
# relay's lock_timeout: the claim that comes for the retry fails
ok( wait_for($node,
		"SELECT next_attempt_at > now() + interval '3.5 s' FROM cqrs_outbox WHERE id = $id",
		't', 60),
	'the big row waits for a retry');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'after', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '12', 10),
	'a later row is sent meanwhile');
# the lock is taken less than a second before the retry is due
my $due;
for (1 .. 200)
{
	$due = $node->safe_psql('postgres',
		"SELECT extract(epoch FROM next_attempt_at - now()) FROM cqrs_outbox WHERE id = $id");
	last if $due < 1.0;
	usleep(50_000);
}
cmp_ok($due, '>', 0.3, 'the big row still waits for its retry');
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE cqrs_outbox IN ACCESS EXCLUSIVE MODE');
my $t0 = time;
alter_topic_config($topic, 'max.message.bytes=1000000');
my $left = 14 - (time - $t0);
usleep(int($left * 1e6)) if $left > 0;
$locker->query_safe('COMMIT');
$locker->quit;
ok($node->log_contains(qr/canceling statement due to lock timeout|lock timeout/),
	'a relay transaction failed on the lock meanwhile');

ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'SENT', 60),
	'after the lock, the big row is retried and sent (its rescan was not lost)');

$node->stop;
done_testing();
