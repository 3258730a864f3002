# Recordings commit asynchronously (issue 12, performance): the relay does not
# wait for their flush.  Their rows still count in the window until the WAL
# holding them is on disk, so a crash re-sends at most one window
# (cqrs_sync.batch_size) of messages, as documented.
#
# The WAL writer is frozen, so nothing but the relay itself flushes the
# relay's recordings; 40 rows are drained through a window of 5; then every
# process of the cluster is killed.  After the restart the relay sends again
# what it had not durably recorded: at most 5 messages twice.  (Were the
# recordings left to the WAL writer, all 40 would be sent twice.)
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $batch = 5;
my $rows  = 40;
my $node  = new_node(
	'windowdurable',
	'wal_writer_delay'      => '10s',
	'cqrs_sync.batch_size'  => $batch);
my $topic = unique_topic('durable');

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'warm-up event sent');

my $walwriter = freeze_waiting($node, 'walwriter', 'WalWriterMain');
my $relay     = freeze_relay($node);
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'k' || (i % 7), jsonb_build_object('n', i)) FROM generate_series(1, $rows) i"
);
kill 'CONT', $relay;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", $rows + 1, 60),
	"the $rows rows were sent and recorded through a window of $batch");
my $unflushed = $node->safe_psql('postgres',
	'SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()) > 0');
note("WAL not yet flushed at the crash: $unflushed");

# crash: every process of the cluster, the frozen WAL writer too
crash_cluster($node);
$node->start;

ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 60),
	'after the restart every row is SENT again');
my @msgs = grep { $_->{key} ne 'warm' } kafka_consume($topic, $rows + 1, 30, json => 1);
my %seen;
$seen{ $_->{json}{n} }++ for @msgs;
is(scalar(keys %seen), $rows, 'every event is in Kafka');
my $dups = scalar(@msgs) - scalar(keys %seen);
cmp_ok($dups, '<=', $batch, "duplicates ($dups) at most one window ($batch)");

$node->stop;
done_testing();
