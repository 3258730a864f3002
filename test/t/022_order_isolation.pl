# Order per key when the database's default isolation is REPEATABLE READ
# (issue 12, item 4).  The relay must read the high-water mark and the
# in-flight registry before the snapshot its scan uses; a transaction that
# commits in between must be either visible to the scan or held by the
# registry.
#
# The window is made wide on purpose: a session queues for an exclusive lock
# on the outbox's id sequence, so the relay stops at its high-water-mark
# read.  Meanwhile transaction A, holding the earlier row of key K, commits;
# then the lock is released.  The later row of K (committed before) must not reach Kafka
# before A's row.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node  = new_node('isolation');
my $topic = unique_topic('isolation');

$node->safe_psql('postgres', q{
	ALTER DATABASE postgres SET default_transaction_isolation = 'repeatable read';
	ALTER ROLE postgres SET default_transaction_isolation = 'repeatable read';
});
ok(restart_relay($node), 'the relay runs with a REPEATABLE READ default');
my $relay = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{\"seq\": 0}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'warm-up event sent');

# A: the earlier row of K, open; B: the later row of K, committed
my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
$a->query_safe("SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 1}')");
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 2}')");
usleep(500_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'"),
	'0', 'the later row of K waits for A');

# L asks for an exclusive lock on the sequence; it queues behind A (which
# holds a lock on it since its nextval), and the relay's high-water mark read
# queues behind L: the relay stops there, its transaction started.
my ($l_out, $l_err) = ('', '');
my $l = IPC::Run::start(
	[
		'psql', '-X', '-d', $node->connstr('postgres'), '-c',
		'BEGIN; ALTER SEQUENCE cqrs_outbox_id_seq RENAME TO cqrs_outbox_id_seq_locked; SELECT pg_sleep(2); ROLLBACK;'
	],
	'<', \undef, '>', \$l_out, '2>', \$l_err);
ok( wait_for($node,
		"SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'cqrs_outbox_id_seq' AND l.mode = 'AccessExclusiveLock' AND NOT l.granted",
		'1', 30),
	'L waits for the sequence lock behind A');
$node->safe_psql('postgres', 'SELECT cqrs_wake_relay()');
ok( wait_for($node,
		"SELECT count(*) FROM pg_locks WHERE pid = $relay AND NOT granted", '1', 30),
	'the relay waits behind L, its transaction started');

# A commits while the relay waits; L gets the lock, then lets it go
$a->query_safe('COMMIT');
$a->quit;
$l->finish;

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'", '2', 30),
	'both rows of K are sent');
my @k = grep { $_->{key} eq 'K' } kafka_consume($topic, 3, 30);
is(join(',', map { $_->{json}{seq} } @k), '1,2', 'K reached Kafka in id order');

$node->safe_psql('postgres', q{
	ALTER DATABASE postgres RESET ALL;
	ALTER ROLE postgres RESET ALL;
});
$node->stop;
done_testing();
