# Failures handled, not hidden (against the real broker):
#  - one oversized message among 10,000: exactly one DEAD_LETTERED row and
#    one DLT record with the contract headers, 9,999 SENT, no stall; later
#    rows of its key reach Kafka only after it was dead-lettered;
#  - the dead letter shows in cqrs_dlt_depth at once: the relay wakes the
#    monitor worker, whose own poll (cqrs_sync.dlt_depth_interval) is 10 min
#    here;
#  - a message the DLT refuses too: DLT_FAILED with dlt_retry_count 1, its
#    counters frozen afterwards, a NOTIFY and a WARNING with SQLSTATE CQ001,
#    the failed dead-letter publish and its error in the audit, other rows
#    flowing; an operator's retry while the cause remains fails again and
#    counts: dlt_retry_count 2 (not reset), a second audited attempt;
#    cqrs_retry sends it once the cause is removed;
#  - a failed row put back by hand that fails again needs a new purge
#    approval: the relay's failure clears the old one.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = new_node(
	'failures',
	'cqrs_sync.max_retries'   => '2',
	'cqrs_sync.retry_backoff' => '100ms',
	# the relay wakes the monitor when it dead-letters: no poll needed
	'cqrs_sync.dlt_depth_interval' => '10min',
	'log_line_prefix'         => '%m [%p] %e ');

# timestamps (ms) of a topic's messages: [key, timestamp, value]
sub kafka_timestamps
{
	my ($topic) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'kcat', '-C', '-b', kafka_brokers(), '-t', $topic, '-o', 'beginning', '-e', '-q',
			'-f', '%k\t%T\t%s\n' ], '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(60));
	return map { [ split /\t/, $_, 3 ] } split /\n/, $out;
}

# ---- one oversized message among 10,000 ----------------------------------

my $topic = create_topic(unique_topic('big'), 4, 'max.message.bytes=200000');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'key-' || (g % 100),
	        CASE WHEN g = 5007 THEN jsonb_build_object('n', g, 'big', repeat('x', 300000))
	             ELSE jsonb_build_object('n', g) END))
	   FROM generate_series(1, 10000) g");
my ($big_id, $big_eid) = split /\|/,
  $node->safe_psql('postgres',
	"SELECT id, event_id FROM cqrs_outbox WHERE topic = '$topic' AND payload ? 'big'");

ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status = 'PENDING'", '0', 60),
	'no stall: nothing PENDING after the oversized message');
is( $node->safe_psql('postgres',
		"SELECT status || ' ' || count(*) FROM cqrs_outbox WHERE topic = '$topic' GROUP BY status ORDER BY 1"),
	"DEAD_LETTERED 1\nSENT 9999",
	'exactly one DEAD_LETTERED row, 9,999 SENT');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE id = $big_id"),
	'DEAD_LETTERED', 'the oversized row is the dead-lettered one');

my @dlt = kafka_consume("$topic.DLT", 1, 30);
is(scalar @dlt, 1, 'one record in the dead-letter topic');
my $h = $dlt[0]{headers} // {};
is($h->{'x-original-topic'}, $topic,         'x-original-topic');
is($h->{'x-failure-source'}, 'OUTBOX_RELAY', 'x-failure-source');
is($h->{'x-retry-count'},    '3',            'x-retry-count: the first attempt and 2 retries');
like($h->{'x-last-error'}, qr/MSG_SIZE_TOO_LARGE/, 'x-last-error says why');
is($h->{event_id},  $big_eid, 'event_id header');
is($dlt[0]{key},    'key-7',  'same key');
is(length($dlt[0]{value}) > 300000 ? 'big' : 'small', 'big', 'same value');

my @main = kafka_consume($topic, 9999, 60);
is(scalar @main, 9999, '9,999 messages in the topic');
my %n;
$n{ $_->{json}{n} }++ for @main;
is(scalar(grep { $n{$_} != 1 } keys %n), 0, 'each exactly once');
ok(!exists $n{5007}, 'the oversized one is not among them');

ok( wait_for($node,
		"SELECT coalesce(sum(messages), 0) FROM cqrs_dlt_depth WHERE topic = '$topic.DLT'", '1', 30),
	'cqrs_dlt_depth shows the one message in the dead-letter topic');
is($node->safe_psql('postgres', "SELECT rows FROM cqrs_stats_outbox WHERE status = 'DEAD_LETTERED'"),
	'1', 'cqrs_stats_outbox counts it');
is($node->safe_psql('postgres', 'SELECT dead_lettered FROM cqrs_stats_relay'),
	'1', 'cqrs_stats_relay counts it');

# per-key hold: later rows of key-7 were produced after the DLT record
my ($dlt_ts) = map { $_->[1] } kafka_timestamps("$topic.DLT");
my @later = grep { $_->[0] eq 'key-7' && $_->[2] =~ /"n": (\d+)/ && $1 > 5007 } kafka_timestamps($topic);
ok(@later > 0, 'later rows of the key were sent');
is(scalar(grep { $_->[1] < $dlt_ts } @later), 0,
	'no later row of the key reached Kafka before the failing row was resolved');

# ---- a message the dead-letter topic refuses too --------------------------

my $t2 = create_topic(unique_topic('refused'), 4, 'max.message.bytes=200000');
create_topic("$t2.DLT", 1, 'max.message.bytes=200000');
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cqrs_sync_alert');

my $log_offset = -s $node->logfile;
my $bad = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$t2', 'x', jsonb_build_object('big', repeat('y', 300000)))");
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$t2', CASE WHEN g <= 5 THEN 'x' ELSE 'other-' || g END, jsonb_build_object('n', g)) FROM generate_series(1, 100) g"
);
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $bad", 'DLT_FAILED', 60),
	'the row ends DLT_FAILED');
my $counters = $node->safe_psql('postgres',
	"SELECT retry_count || '/' || dlt_retry_count FROM cqrs_outbox WHERE id = $bad");
my ($rc, $drc) = split m{/}, $counters;
is($drc, 1, "dlt_retry_count is 1: one failed dead-letter publish ($counters)");
like($node->safe_psql('postgres', "SELECT last_error FROM cqrs_outbox WHERE id = $bad"),
	qr/dead-letter topic "\Q$t2\E\.DLT"/, 'last_error says the dead-letter publish failed');
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$t2' AND status = 'SENT'", '100', 30),
	'the other rows flowed, later rows of its key too');

usleep(2_000_000);
is($node->safe_psql('postgres',
		"SELECT retry_count || '/' || dlt_retry_count || '/' || status FROM cqrs_outbox WHERE id = $bad"),
	"$counters/DLT_FAILED", 'its counters do not move afterwards: it is not scanned again');

ok($node->wait_for_log(qr/CQ001 WARNING:  cqrs_sync relay: outbox row $bad could not be dead-lettered/, $log_offset),
	'a WARNING with SQLSTATE CQ001 an alert can match');
# psql prints a notification after the next command it runs
like($listener->query('SELECT 1'),
	qr/Asynchronous notification "cqrs_sync_alert" with payload ".*dlt_failed.*outbox_id.*\b$bad\b/s,
	'a NOTIFY on cqrs_sync_alert with the outbox id');
$listener->quit;
is($node->safe_psql('postgres', 'SELECT dlt_failed FROM cqrs_stats_relay'), '1',
	'the relay counts it');
is($node->safe_psql('postgres', "SELECT rows FROM cqrs_stats_outbox WHERE status = 'DLT_FAILED'"),
	'1', 'cqrs_stats_outbox shows the DLT_FAILED row');

my $superuser = $node->safe_psql('postgres', 'SELECT current_user');
is( $node->safe_psql('postgres',
		"SELECT action || ' ' || status || ' ' || actor FROM cqrs_outbox_audit WHERE outbox_id = $bad ORDER BY audit_id"),
	"DLT_PUBLISH_FAILED DLT_FAILED $superuser",
	'the failed dead-letter publish is in the audit');
like( $node->safe_psql('postgres',
		"SELECT reason FROM cqrs_outbox_audit WHERE outbox_id = $bad AND action = 'DLT_PUBLISH_FAILED'"),
	qr/dead-letter topic "\Q$t2\E\.DLT": .*(MSG_SIZE_TOO_LARGE|too large)/i,
	'with its error');

# an operator retries while the cause remains: it fails again, and counts
$node->safe_psql('postgres', 'CREATE ROLE ops LOGIN IN ROLE cqrs_sync_operator');
is($node->safe_psql('postgres', "SET ROLE ops; SELECT cqrs_retry($bad)"), 't', 'cqrs_retry as an operator, cause not removed');
ok( wait_for($node, "SELECT status || '/' || dlt_retry_count FROM cqrs_outbox WHERE id = $bad AND retry_count > 0",
		'DLT_FAILED/2', 60),
	'it fails again: DLT_FAILED, dlt_retry_count 2 (the retry did not reset it)');
is( $node->safe_psql('postgres',
		"SELECT string_agg(action || ' ' || status || ' ' || actor, ', ' ORDER BY audit_id) FROM cqrs_outbox_audit WHERE outbox_id = $bad"),
	"DLT_PUBLISH_FAILED DLT_FAILED $superuser, RETRY DLT_FAILED ops, DLT_PUBLISH_FAILED DLT_FAILED $superuser",
	'the audit shows each attempt: failed publish, retry, failed publish');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox_audit WHERE outbox_id = $bad AND action = 'DLT_PUBLISH_FAILED' AND reason LIKE '%dead-letter topic \"$t2.DLT\"%'"),
	'2', 'each with its error');

# remove the cause, then retry as an operator
alter_topic_config($t2, 'max.message.bytes=1000000');
is($node->safe_psql('postgres', "SET ROLE ops; SELECT cqrs_retry($bad)"), 't', 'cqrs_retry as an operator');
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $bad", 'SENT', 30),
	'once the cause is removed the retried row is sent');
my @t2msgs = kafka_consume($t2, 101, 30);
is(scalar(grep { $_->{value} =~ /"big"/ } @t2msgs), 1, 'the message is in its topic once');
is( $node->safe_psql('postgres',
		"SELECT action || ' ' || status || ' ' || actor FROM cqrs_outbox_audit WHERE outbox_id = $bad AND action = 'RETRY' ORDER BY audit_id DESC LIMIT 1"),
	'RETRY DLT_FAILED ops', 'the retry is audited with who did it');
is($node->safe_psql('postgres', "SELECT dlt_retry_count FROM cqrs_outbox WHERE id = $bad"),
	'2', 'the sent row keeps its count of failed dead-letter publishes');

# ---- an approval is for one failure ------------------------------------------
# A failed row a superuser puts back by hand (docs: cqrs_wake_relay()) keeps
# its purge approval while PENDING; when it fails again, the relay's failure
# clears it: the next cleanup pass may not purge the row on the old approval.
my $t3 = create_topic(unique_topic('again'), 1, 'max.message.bytes=200000');
my $again = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$t3', 'k', jsonb_build_object('big', repeat('x', 300000)))");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $again", 'DEAD_LETTERED', 60),
	'an oversized row is dead-lettered');
is($node->safe_psql('postgres', "SELECT cqrs_approve_purge(ARRAY[$again])"), '1', 'its purge is approved');
$node->safe_psql('postgres', qq{
	BEGIN;
	UPDATE cqrs_outbox SET created_at = created_at - interval '30 days',
	       purge_approved_at = purge_approved_at - interval '30 days',
	       status = 'PENDING', last_error = NULL, retry_count = 0 WHERE id = $again;
	SELECT cqrs_wake_relay();
	COMMIT;});
ok( wait_for($node,
		"SELECT status || '/' || coalesce(purge_approved_at::text, 'no approval') FROM cqrs_outbox WHERE id = $again AND retry_count > 0",
		'DEAD_LETTERED/no approval', 60),
	'put back by hand, it fails again, and its old approval is gone');
is($node->safe_psql('postgres', "SELECT dead_lettered FROM cqrs_cleanup()"), '0',
	'the cleanup does not purge it on the approval of its earlier failure');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE id = $again"), '1', 'the row is kept');

$node->stop;
done_testing();
