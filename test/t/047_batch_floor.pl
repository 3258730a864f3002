# A message Kafka keeps refusing as too large, though it is smaller than the
# producer's batch.size, while the topic's limit is unknown (DescribeConfigs
# not allowed): batch.size halves down to its floor of 1,024 bytes, each
# time without spending the row's retry budget (DESIGN.md section 5); at the
# floor the batch cannot get smaller, the message itself is at fault, and
# it spends its budget like any refused message: dead-lettered in the end,
# not produced again for ever at no cost (issue 12, item 6).
#
# Against the librdkafka mock cluster (precise fault injection: real Kafka
# refuses by size only; test/t/075_batch_limits.pl and 076 show batch.size
# lowering against it).  The mock cluster cannot tell a topic's limit:
# DescribeConfigs fails there, as without the ACL.  1,000,000 bytes halve to
# the floor in 10 refusals; 3 more spend the budget (max_retries 2); the dead
# letter, refused too, ends DLT_FAILED: 14 of the 40 refusals injected.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('floor');
my $mock  = mock_cluster_start(1, "$topic:1", "$topic.DLT:1");

my $node = new_node(
	'floor',
	'cqrs_sync.brokers'       => $mock->bootstrap,
	'cqrs_sync.max_retries'   => '2',
	'cqrs_sync.retry_backoff' => '100ms',
	'log_line_prefix'         => '%m [%p] %e ');

first_row_sent($node, $topic);
sleep 1;    # the relay is idle: nothing in flight

$mock->cmd('broker-errors 1 Produce ' . join(' ', ('MSG_SIZE_TOO_LARGE') x 40));
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k1', '{\"n\": 1}')");

ok( wait_for($node,
		"SELECT status FROM cqrs_outbox WHERE key = 'k1' AND status <> 'PENDING'",
		'DLT_FAILED', 90),
	'the message the topic keeps refusing ends DLT_FAILED');
is($node->safe_psql('postgres', "SELECT retry_count FROM cqrs_outbox WHERE key = 'k1'"),
	'3', 'it spent its retry budget (max_retries 2: three failed attempts) once batch.size was at its floor');
my ($left) = $mock->cmd('pending 1 Produce') =~ /(\d+)/;
cmp_ok($left, '>', 0, "and was not produced again and again ($left refusals left)");
my @lowered = slurp_file($node->logfile) =~ /batch\.size lowered from \d+ to (\d+) bytes/g;
is(scalar(@lowered), 10, 'batch.size was lowered 10 times');
is($lowered[-1], '1024', 'down to its floor of 1,024 bytes');

$node->stop;
$mock->stop;
done_testing();
