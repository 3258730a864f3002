# A partition paused while the sink waited, given back to the same worker by
# a rebalance (issue 14).  A sink that waits for the database pauses its
# partitions in librdkafka (rd_kafka_pause_partitions()); librdkafka keeps
# that pause flag on a partition when the partition is revoked and assigned
# again (librdkafka 2.0.2).  Worker 0 consumes both partitions of a
# topic and waits, its read model locked for longer than its 5 s lock
# timeout, so both are paused; a second worker then joins the sink's
# consumer group (cqrs_sync.sink_workers raised to 2) and leaves it (lowered
# to 1), as in 230_sink_rebalance.pl: worker 0 keeps one of its paused
# partitions, and is given the other back.  Once the lock is gone, the
# events published to both partitions must all be applied, exactly once.
#
# It failed when a new assignment was taken for unpaused (kafka_paused is
# cleared on revocation) while librdkafka still had its partitions paused:
# nothing was fetched from them again, so no batch waited any more, nothing
# resumed them (kafka_pause(false) saw "not paused"), and the events stayed
# unapplied for good.
#
# The read model's table is locked, not the inbox as in 260_sink_read_only.pl
# nor the whole database made read-only: the joining worker must read its
# positions (an INSERT and a SELECT FOR UPDATE) and prepare its plans (which
# name the inbox) to take its partition while the sink waits.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_rebalance_paused',
	'cqrs_sync.relay_enabled' => 'off',
	'cqrs_sync.sink_workers'  => '1');
my $topic = unique_topic('sink-rebalance-paused');
create_topic($topic, 2);

# 200 keys each time: both partitions get events (murmur2 of the key)
my ($first,  $exp1) = exact_events(200, 10, 2, 1);
my ($second, $exp2) = exact_events(200, 10, 2, 201);
my ($third,  $exp3) = exact_events(200, 10, 2, 401);
my %expected = (%$exp1, %$exp2, %$exp3);
my $all      = @$first + @$second + @$third;

# who owns the sink's partitions: "workers owning some/partitions owned"
my $owners = "SELECT count(DISTINCT worker_pid) || '/' || count(*) FROM cqrs_sink_stats"
  . " WHERE sink = 'rbp' AND worker_pid IS NOT NULL";

sub owned_by
{
	my ($pid) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_sink_stats WHERE sink = 'rbp' AND worker_pid = $pid");
}

exact_setup($node, 'rbp', $topic, max_retries => 0);
kafka_produce_events($topic, $first);
ok(wait_applied($node, 'rbp', scalar @$first, 60), 'the first events are applied');
ok(wait_for($node, $owners, '1/2', 30), 'one worker owns both partitions');
my $pid0 = $node->safe_psql('postgres',
	"SELECT DISTINCT worker_pid FROM cqrs_sink_stats WHERE sink = 'rbp' AND worker_pid IS NOT NULL");
my $before = sink_counts($node, 'rbp');

# ---- the sink waits: its partitions paused in librdkafka -------------------------

my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE exact_model IN ACCESS EXCLUSIVE MODE');
kafka_produce_events($topic, $second);
ok(wait_for($node, "SELECT last_error ~ 'lock timeout' FROM cqrs_stats_sink_workers WHERE worker = 0", 't', 30),
	'with its read model locked the sink waits (its partitions paused)');

# ---- a worker joins the group and leaves it while the sink waits -----------------

$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.sink_workers = 2");
$node->reload;
ok(wait_for($node, $owners, '2/2', 60), 'a second worker joined the group: each worker owns one partition');
is(owned_by($pid0), '1', 'the waiting worker kept one of the partitions it had paused');

$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.sink_workers = 1");
$node->reload;
ok(wait_for($node, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink'", '1', 30),
	'the second worker left');
ok(wait_for($node, $owners, '1/2', 60), 'the group rebalanced: one worker owns both partitions');
is(owned_by($pid0), '2', 'the waiting worker was given back the other partition it had paused');
is(sink_counts($node, 'rbp')->{positions}, $before->{positions},
	'nothing applied while the read model was locked');

# ---- the wait ends: every event of both partitions is applied -----------------------

$locker->query_safe('COMMIT');
$locker->quit;
kafka_produce_events($topic, $third);
ok(wait_applied($node, 'rbp', $all, 90), 'unlocked, every message of both partitions is accounted for')
  or diag($node->safe_psql('postgres',
	"SELECT string_agg(\"partition\" || ': position ' || coalesce(\"position\", -1)"
	  . " || ', accounted for ' || (applied + duplicates), '; ' ORDER BY \"partition\")"
	  . " FROM cqrs_sink_stats WHERE sink = 'rbp'"));
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_offset WHERE sink = 'rbp' AND applied > 0"),
	'2', 'both partitions had events');
my $c = sink_counts($node, 'rbp');
is($c->{applied},    $all / 2, 'each event applied exactly once');
is($c->{duplicates}, $all / 2, 'each copy skipped once');
is($c->{retried} + $c->{dead_lettered} + $c->{dlt_failed}, 0, 'no retry budget spent, nothing dead-lettered');
exact_check($node, \%expected, 'the read model is exact');

$node->stop;
done_testing();
