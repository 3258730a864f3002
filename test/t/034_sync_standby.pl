# Only durable commits are published, synchronous standbys included (issue
# 12, item 8).  Where synchronous standbys are configured, a transaction that
# commits with synchronous_commit = local is visible before any standby has
# its commit; a failover could take it back.  The relay waits for the
# standbys, as a commit with synchronous_commit = on does, before it produces
# such rows, and says so in its state.  The relay's own setting is off (its
# recordings are not waited for), so its wait must not depend on it.
#
# The standby named in synchronous_standby_names never connects: the relay
# must wait, not give up on a cancel request, stop promptly when told to, wait again after a restart (it cannot
# know which commits were waited for before it), and publish once the
# standbys are no longer required.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# synchronous replication needs WAL senders (the test cluster has none)
my $node = new_node('syncstandby', 'wal_level' => 'replica', 'max_wal_senders' => '2');
my $topic = unique_topic('standby');

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'warm-up event sent');

# a synchronous standby that is not there; writers do not wait for it
$node->append_conf('postgresql.conf',
	"synchronous_standby_names = 'absent'\nsynchronous_commit = local\n");
$node->reload;
ok(wait_for($node, 'SHOW synchronous_standby_names', 'absent', 10), 'configuration reloaded');

my $id = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'A', '{\"n\": 1}')");
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'waiting for standby', 30),
	'the relay waits for the synchronous standby');
is($node->safe_psql('postgres',
		"SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'"),
	'SyncRep', 'its wait shows in pg_stat_activity');

sub published
{
	return scalar grep { $_->{key} eq 'A' } kafka_consume($topic, 2, 3, json => 0);
}
is(published(), 0, 'the event is not published while no standby confirmed its commit');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE id = $id"),
	'PENDING', 'the row stays PENDING');

# a cancel request does not end the wait (SyncRepWaitForLSN() returns on one
# as if the standbys had confirmed)
$node->safe_psql('postgres',
	"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
ok($node->wait_for_log(qr/a cancel request does not end the wait for the synchronous standbys/),
	'the relay says a cancel does not end its wait');
sleep 2;
is(published(), 0, 'after a cancel request the event is still not published');
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'waiting for standby', 30),
	'the relay waits for the standby again');

# a fast shutdown ends the wait
my $t0 = time;
$node->restart;
ok(time - $t0 < 20, 'a fast restart while the relay waits takes under 20 s');

ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'waiting for standby', 30),
	'after the restart the relay waits again');
is(published(), 0, 'still not published');

# the standbys are no longer required
$node->append_conf('postgresql.conf', "synchronous_standby_names = ''\n");
$node->reload;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'SENT', 30),
	'once no standby is required the row is sent');
is(published(), 1, 'and published once');
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'running', 10),
	'the relay is running again');

$node->stop;
done_testing();
