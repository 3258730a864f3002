# Only durable commits are published (issue 12, item 8).  A transaction that
# enqueues with synchronous_commit = off is visible before its commit record
# is flushed; if the relay published it and the server then crashed, Kafka
# would hold an event for data that never existed.  The relay flushes the WAL
# up to the rows' commits before producing them.
#
# To make the window wide: the WAL writer is frozen (SIGSTOP), and a session
# holds a lock on the row so that the relay's own recording (which would
# flush the WAL too) waits.  Once the message is in Kafka, every process of
# the cluster is killed; after the restart the row must exist.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = new_node('asynccommit', 'wal_writer_delay' => '10s');
my $topic = unique_topic('async');

sub pid_of
{
	my ($type) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = '$type'");
}

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'warm-up event sent');

# Writers that commit synchronously need no flush: their commits were on
# disk before anyone could see them.  The relay's own recordings commit
# asynchronously and share the commit log's LSN groups (32 transactions)
# with the writers', so a relay that took a row's group LSN for its commit's
# flushed the WAL (its own recordings) before nearly every produce.
my $flush = "SELECT flush_seconds FROM cqrs_relay_state()";
my $flush0 = $node->safe_psql('postgres', $flush);
my $script = join('', map { "SELECT cqrs_enqueue('$topic', 's$_', '{}');\nSELECT pg_sleep(0.003);\n" } 1 .. 300);
$node->safe_psql('postgres', $script);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '301', 30),
	'300 events committed synchronously, one per transaction, were sent');
is($node->safe_psql('postgres', "SELECT ($flush) - $flush0"), '0',
	'the relay flushed no WAL before producing them');

my $relay     = pid_of('cqrs_sync relay');
my $walwriter = pid_of('walwriter');
ok($relay =~ /^\d+$/ && $walwriter =~ /^\d+$/, 'relay and WAL writer found');

$walwriter = freeze_waiting($node, 'walwriter', 'WalWriterMain');
$relay     = freeze_relay($node);
my $id = $node->safe_psql('postgres',
	"SET synchronous_commit = off; SELECT cqrs_enqueue('$topic', 'A', '{\"n\": 1}')");
my $event_id = $node->safe_psql('postgres', "SELECT event_id FROM cqrs_outbox WHERE id = $id");
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe("SELECT id FROM cqrs_outbox WHERE id = $id FOR UPDATE");
kill 'CONT', $relay;

# the message reaches Kafka
my @msgs;
my $deadline = time + 30;
while (time < $deadline)
{
	@msgs = grep { $_->{key} eq 'A' } kafka_consume($topic, 2, 5, json => 0);
	last if @msgs;
	usleep(100_000);
}
is(scalar @msgs, 1, 'the event was published');

# crash: every process of the cluster, the frozen WAL writer too
crash_cluster($node);
$locker->{run}->kill_kill if $locker->{run};
$node->start;

is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE event_id = '$event_id'"),
	'1', 'after the crash the outbox still holds the published event: its commit was flushed first');

# ---- a relay that starts right after a WAL segment switch ---------------------
# A relay that starts flushes the WAL written so far before its first
# produce.  Right after a segment switch, the position where the next record
# would go lies past the new segment's header, which no flush can reach until
# a record is written there: asking for it failed ("xlog flush request ... is
# not satisfied") until some other session wrote WAL.
my $sw_topic = unique_topic('switch');
ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'",
		'1', 30),
	'the relay runs again');
$relay = freeze_relay($node);
my $sid = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$sw_topic', 'S', '{\"n\": 2}')");
my $log_at = -s $node->logfile;
$node->safe_psql('postgres', 'SELECT pg_switch_wal()');
# it ends before it claims (the stop comes with the wake-up), and starts again
$node->safe_psql('postgres', "SELECT pg_terminate_backend($relay)");
kill 'CONT', $relay;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $sid", 'SENT', 60),
	'the relay that started after the switch sends the row');
unlike(slurp_file($node->logfile, $log_at), qr/xlog flush request \S+ is not satisfied/,
	'without asking to flush WAL that was never written');

$node->stop;
done_testing();
