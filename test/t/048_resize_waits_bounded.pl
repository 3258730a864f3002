# A smaller batch.size waits at most 10 s for what is in flight (issue 12,
# item 7: one sick partition stops nothing else).  Claims stop while the
# producer is to be re-created with a smaller batch.size, and it is re-created
# once nothing is in flight, or only rows of partitions known to be stalled.
# A dead letter is never marked stalled, nor a row no later acknowledgement
# shows stuck: one such row in flight to a sick partition used to stop the
# relay for every topic for as long as the partition stayed sick.
#
# Against the librdkafka mock cluster (2 brokers): topic T and topic U are
# led by broker 1, T's dead-letter topic by broker 2, which is taken down.
# A row of T refused as invalid (max_retries 0) is dead-lettered: the dead
# letter waits for broker 2.  Then a batch of U is refused as too large, so
# batch.size is to be halved: U's rows must be sent once the wait is over;
# the purged dead letter's row goes again with the new producer.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $t    = unique_topic('resizet');
my $u    = unique_topic('resizeu');
my $mock = mock_cluster_start(2, "$t:1", "$t.DLT:1", "$u:1", "$u.DLT:1");
$mock->cmd("leader $t 0 1");
$mock->cmd("leader $u 0 1");
$mock->cmd("leader $t.DLT 0 2");

my $node = new_node(
	'resize',
	'cqrs_sync.brokers'       => $mock->bootstrap,
	'cqrs_sync.max_retries'   => '0',
	'cqrs_sync.retry_backoff' => '100ms',
	'log_line_prefix'         => '%m [%p] %e ');

$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$t', 'warm', '{}'), cqrs_enqueue('$u', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '2', 60),
	'both topics take rows');
sleep 1;    # nothing in flight

# a dead letter stuck in flight
$mock->cmd('down 2');
$mock->cmd('broker-errors 1 Produce INVALID_RECORD');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$t', 'bad', '{}')");
sleep 2;    # the row failed; its dead letter waits for broker 2
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE key = 'bad'"),
	'PENDING', 'the refused row is PENDING, its dead letter in flight');

# an operator's retry of it meanwhile is refused: the dead letter's outcome
# would overwrite the new budget (it became DEAD_LETTERED with the old one)
my ($ret, $out, $err) = $node->psql('postgres',
	"SELECT cqrs_retry(id) FROM cqrs_outbox WHERE key = 'bad'",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/55006.*outbox row \d+ is being sent right now/s,
	'cqrs_retry() of a row in flight is refused (55006)');

# a batch of U refused as too large: batch.size is to be halved
$mock->cmd('broker-errors 1 Produce MSG_SIZE_TOO_LARGE');
my $t0 = time;
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$u', 'u1', '{}')");
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$u', 'u2', '{}')");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$u' AND key IN ('u1', 'u2') AND status = 'SENT'",
		'2', 40),
	'the other topic\'s rows are sent while the dead letter is stuck');
note(sprintf('sent after %.1f s', time - $t0));
like(slurp_file($node->logfile), qr/batch\.size lowered from 1000000 to 500000 bytes/,
	'with the smaller batch.size');
is($node->safe_psql('postgres', "SELECT retry_count FROM cqrs_outbox WHERE key = 'u1'"),
	'0', 'the batch refused for its size spent no retry budget');

# the purged dead letter is no verdict of the dead-letter topic: its row goes
# again from the start (docs/failures.md), and topic T takes it this time
$mock->cmd('up 2');
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'bad'", 'SENT', 60),
	'the row whose dead letter was purged goes again');
is($node->safe_psql('postgres', "SELECT retry_count || '/' || dlt_retry_count FROM cqrs_outbox WHERE key = 'bad'"),
	'0/0', 'the purge of its dead letter counts as no failed publish (docs/failures.md)');
is($node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_relay'), 'running', 'the relay runs');

$node->stop;
$mock->stop;
done_testing();
