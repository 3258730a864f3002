# A wait for the database does not change a sink's batch size for good.
# While a sink waits (here: the database read-only), the messages that keep
# arriving are kept with the batch it waits with.  To make room, the worker
# doubled the batch's capacity, which was also the size at which a batch is
# full: after each wait, every later batch was twice as large, beyond
# cqrs_sync.sink_batch_size (longer transactions, more locks held).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = new_node(
	'sink_batch',
	'cqrs_sync.relay_enabled'   => 'off',
	'cqrs_sync.sink_workers'    => '1',
	'cqrs_sync.sink_batch_size' => '10');
my $topic = unique_topic('sink-batch');
create_topic($topic, 1);

$node->safe_psql('postgres', qq{
CREATE TABLE seen (event_id text, xid xid8);
CREATE FUNCTION batch_apply(e cqrs_event) RETURNS void LANGUAGE sql AS
    \$\$ INSERT INTO seen VALUES (e.event_id, pg_current_xact_id()) \$\$;
SELECT cqrs_sink_create('b', ARRAY['$topic'], 'batch_apply(cqrs_event)');
});
kafka_produce_events($topic, [ [ 'k', 'first', '{}' ] ]);
ok(wait_applied($node, 'b', 1, 60), 'the sink applies its first event');

# the database read-only while 300 events arrive
$node->safe_psql('postgres', 'ALTER SYSTEM SET default_transaction_read_only = on');
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
kafka_produce_events($topic, [ map { [ "k$_", "wait-$_", '{}' ] } 1 .. 300 ]);
ok( wait_for($node, "SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0",
		'waiting for database', 60),
	'the sink waits for the database');
usleep(3_000_000);
$node->safe_psql('postgres', 'ALTER SYSTEM RESET default_transaction_read_only');
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
ok(wait_applied($node, 'b', 301, 120), 'writable again, it applies them all');

# a backlog after the wait: batches of 10 again
kafka_produce_events($topic, [ map { [ "k$_", "late-$_", '{}' ] } 1 .. 200 ]);
ok(wait_applied($node, 'b', 501, 120), 'it applies a later backlog');
my ($batches, $largest) = split /\|/, $node->safe_psql('postgres',
	"SELECT count(*) || '|' || max(n) FROM (SELECT count(*) AS n FROM seen WHERE event_id LIKE 'late-%' GROUP BY xid) b");
note("the later backlog took $batches transactions, the largest $largest events");
cmp_ok($largest, '<=', 10, 'no batch after the wait is larger than cqrs_sync.sink_batch_size');

$node->stop;
done_testing();
