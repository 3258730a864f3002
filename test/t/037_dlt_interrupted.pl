# A dead letter that the relay's own side interrupts is not a failure of the
# dead-letter topic (docs/failures.md): a stop while it is in flight must not
# raise dlt_retry_count nor leave a DLT_PUBLISH_FAILED row in the audit trail.
# The row is PENDING again and goes once more after the start.
#
# Against the librdkafka mock cluster: the row's topic is led by broker 1, its
# dead-letter topic by broker 2, which is down, so that the dead letter stays
# in flight; one Produce INVALID_RECORD makes the row's first attempt fail
# for good (cqrs_sync.max_retries = 0: dead-lettered at once).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('dltstop');
my $mock  = mock_cluster_start(2, "$topic:1", "$topic.DLT:1");
$mock->cmd("leader $topic 0 1");
$mock->cmd("leader $topic.DLT 0 2");

my $node = new_node(
	'dltstop',
	'cqrs_sync.brokers'     => $mock->bootstrap,
	'cqrs_sync.max_retries' => '0');

first_row_sent($node, $topic);

$mock->cmd('down 2');
$mock->cmd('errors Produce INVALID_RECORD');
my $id = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'doomed', '{}')");
# the row's request fails at once; its dead letter is produced and waits for
# broker 2
stop_during_dead_letter($node, $id);

# after the start the row goes again: the fault was for one request only
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'SENT', 60),
	'after the start, the row is sent');
is( $node->safe_psql('postgres',
		"SELECT dlt_retry_count FROM cqrs_outbox WHERE id = $id"),
	'0', 'its dlt_retry_count is still 0');

$mock->cmd('up 2');
$node->stop;
$mock->stop;
done_testing();
