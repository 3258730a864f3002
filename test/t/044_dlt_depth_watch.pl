# What the monitor worker's dead-letter depth watches, and when its figures
# must go stale rather than look like "no messages" (src/dlt_depth.c):
#
# - A dead-letter topic whose rows an operator discarded still holds its
#   messages: it stays watched after a restart (the audit names it), so
#   CqrsSyncDltMessages keeps firing until the records are deleted.  Before,
#   the watch list lived in the worker's memory only: after a restart the
#   topic was not measured, and the alert resolved by itself.
# - A watched topic Kafka does not show (a typo in
#   cqrs_sync.read_side_dlt_topics, a missing Describe ACL) is named in the
#   error, and the round does not count as answered: the figures age and
#   CqrsSyncDltDepthStale fires.  Before, the topic was left out silently.
# - More partitions than the 256 kept: the same.  Before, the rest were left
#   out silently (against the librdkafka mock cluster, which makes a
#   300-partition topic cheaply).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $topic = unique_topic('dltwatch');
create_topic("$topic.DLT", 1);
kafka_produce_events("$topic.DLT", [ [ 'k', 'd-1', '{"dead":true}' ] ]);

my $node = new_node('dltwatch',
	'cqrs_sync.relay_enabled'      => 'off',
	'cqrs_sync.dlt_depth_interval' => '1s');

# a row the relay dead-lettered to it (as the relay leaves one)
my $id = $node->safe_psql('postgres', qq{
INSERT INTO cqrs_outbox (topic, key, payload, status, retry_count, last_error)
VALUES ('$topic', 'k', '{}', 'DEAD_LETTERED', 1, 'refused') RETURNING id});
ok(wait_for($node, "SELECT messages FROM cqrs_dlt_depth WHERE topic = '$topic.DLT'", '1', 60),
	'the monitor measures the dead-letter topic of a DEAD_LETTERED row');
$node->safe_psql('postgres', "SELECT cqrs_discard($id, 'handled by hand')");
$node->restart;
ok(wait_for($node, "SELECT messages FROM cqrs_dlt_depth WHERE topic = '$topic.DLT'", '1', 60),
	'after the row was discarded and the server restarted, the topic is still measured');
is($node->safe_psql('postgres', 'SELECT last_error IS NULL FROM cqrs_stats_dlt_depth'), 't',
	'without an error');

# a listed topic Kafka does not have
$node->append_conf('postgresql.conf', "cqrs_sync.read_side_dlt_topics = '$topic.nosuch.DLT'");
$node->reload;
ok( wait_for($node,
		"SELECT last_error FROM cqrs_stats_dlt_depth",
		qq{dead-letter topic "$topic.nosuch.DLT" is not in Kafka's metadata: it does not exist, or the monitor may not describe it},
		60),
	'a listed topic Kafka does not show is named in the error');
ok(wait_for($node, 'SELECT age_seconds > 10 FROM cqrs_stats_dlt_depth', 't', 60),
	'and the figures go stale (past CqrsSyncDltDepthStale\'s 10 s)');
is($node->safe_psql('postgres', "SELECT messages FROM cqrs_dlt_depth WHERE topic = '$topic.DLT'"), '1',
	'the other topics are still measured');
$node->stop;

# more partitions than are kept
my $big  = unique_topic('dltbig');
my $mock = mock_cluster_start(1, "$big.DLT:300");
my $cap  = new_node('dltcap',
	'cqrs_sync.brokers'              => $mock->bootstrap,
	'cqrs_sync.relay_enabled'        => 'off',
	'cqrs_sync.dlt_depth_interval'   => '1s',
	'cqrs_sync.read_side_dlt_topics' => "$big.DLT");
ok( wait_for($cap,
		'SELECT partitions || \' \' || last_error FROM cqrs_stats_dlt_depth',
		qq{256 the dead-letter topics have more than 256 partitions: from "$big.DLT" on they are not measured},
		60),
	'a topic past the 256 partitions kept is named in the error');
ok(wait_for($cap, 'SELECT age_seconds > 10 FROM cqrs_stats_dlt_depth', 't', 60),
	'and the figures go stale');
$cap->stop;

done_testing();
