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
# - A partition never measured, and a topic Kafka shows with an error: the
#   same (below).
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
$mock->stop;

# a partition whose watermarks were never read (leaderless since before the
# first round, e.g. a broker away at a restart): the round is incomplete,
# and the figures go stale.  Before, the round counted as answered, without
# that partition: its messages were nowhere, and nothing went stale.
my $sick  = unique_topic('dltsick');
my $mock2 = mock_cluster_start(2, "$sick.DLT:2");
$mock2->cmd("leader $sick.DLT 1 -1");
my $part = new_node('dltpart',
	'cqrs_sync.brokers'              => $mock2->bootstrap,
	'cqrs_sync.relay_enabled'        => 'off',
	'cqrs_sync.dlt_depth_interval'   => '1s',
	'cqrs_sync.read_side_dlt_topics' => "$sick.DLT");
ok( wait_for($part,
		"SELECT last_error LIKE 'Kafka did not answer for the watermarks of $sick.DLT[1]:%' FROM cqrs_stats_dlt_depth",
		't', 60),
	'a partition without a leader is named in the error');
ok(wait_for($part, 'SELECT age_seconds > 10 FROM cqrs_stats_dlt_depth', 't', 60),
	'and, never measured, the figures go stale');

# the partition has its leader again, is measured; then Kafka's metadata
# shows the topic with an error: its figures stay (and age), as for a topic
# that is listed.  Before, an error was taken for a deleted topic when the
# topic was watched only because it had been seen: its rows went, and the
# alert on its messages resolved.
$mock2->cmd("leader $sick.DLT 1 1");
ok(wait_for($part, 'SELECT age_seconds < 5 AND last_error IS NULL FROM cqrs_stats_dlt_depth', 't', 60),
	'with a leader again, the partition is measured');
$part->append_conf('postgresql.conf', "cqrs_sync.read_side_dlt_topics = ''");
$part->safe_psql('postgres', qq{
INSERT INTO cqrs_outbox (topic, key, payload, status, retry_count, last_error)
VALUES ('$sick', 'k', '{}', 'DEAD_LETTERED', 1, 'refused')});
$part->reload;
$part->safe_psql('postgres', "SELECT cqrs_discard(id, 'by hand') FROM cqrs_outbox WHERE topic = '$sick'");
ok(wait_for($part, 'SELECT age_seconds < 5 AND last_error IS NULL FROM cqrs_stats_dlt_depth', 't', 60),
	'watched from the audit only, the topic is measured');
$mock2->cmd("topic-error $sick.DLT LEADER_NOT_AVAILABLE");
ok( wait_for($part,
		"SELECT last_error LIKE 'Kafka reports an error for dead-letter topic \"$sick.DLT\"%' FROM cqrs_stats_dlt_depth",
		't', 60),
	'Kafka reports an error for the topic');
is($part->safe_psql('postgres', "SELECT count(*) FROM cqrs_dlt_depth WHERE topic = '$sick.DLT'"), '2',
	'its partitions keep their figures');
ok(wait_for($part, 'SELECT age_seconds > 10 FROM cqrs_stats_dlt_depth', 't', 60),
	'which go stale');
$part->stop;
$mock2->stop;

done_testing();
