# A handler that raises (issue 14): the event spends its retry budget, is
# held meanwhile with the later events of its key behind it (other keys
# flow), then goes to the sink's dead-letter topic with headers naming the
# original topic, partition and offset, the failure source, the retry count
# and the last error; every other event is applied, the later events of its
# key too, in order.  After the handler is fixed an operator replays it, from
# the table and from the dead-letter topic.  When the dead-letter topic
# refuses the event too, it is kept as DLT_FAILED, counted, logged with
# SQLSTATE CQ010 and notified on cqrs_sync_alert.  Operator functions are
# audited and not executable by PUBLIC.  A paused sink does not try its held
# events again until it is resumed.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = new_node('sink_failures',
	'cqrs_sync.relay_enabled' => 'off',
	'log_line_prefix'         => '%m [%p] %e ');
my $topic = unique_topic('sink-fail');
create_topic($topic, 4);
my $dlt = "$topic.fail.DLT";
create_topic($dlt, 2);

# fail_apply(): deltas and upserts; with $poison_raises, events marked
# "poison" raise (a handler that cannot cope with them yet)
sub define_handler
{
	my ($poison_raises) = @_;
	poison_handler($node, 'fail_apply', q{
    INSERT INTO fail_order (id, event_id) VALUES ((e.payload->>'id')::bigint, e.event_id);
    IF e.payload ? 'd' THEN
        PERFORM cqrs_apply_delta('fail_model', jsonb_build_object('id', e.payload->'id'),
                                 jsonb_build_object('likes', e.payload->'d'), 'fail', e.event_id);
    ELSE
        PERFORM cqrs_upsert('fail_model', jsonb_build_object('id', e.payload->'id', 'title', e.payload->'title'),
                            (e.payload->>'v')::bigint);
    END IF;}, $poison_raises);
	return;
}

$node->safe_psql('postgres', q{
CREATE TABLE fail_model (id bigint PRIMARY KEY, title text, likes bigint NOT NULL DEFAULT 0,
                         version bigint NOT NULL DEFAULT 0);
CREATE TABLE fail_order (n serial, id bigint, event_id text);
});
define_handler(1);
$node->safe_psql('postgres', qq{
SELECT cqrs_sink_create('fail', ARRAY['$topic'], 'fail_apply(cqrs_event)',
                        '{"max_retries": 2, "retry_backoff": "1s"}');
});

# key k1: an upsert, the poisoned like (+100), two later events; other keys flow
my @events = (
	[ 'k1', 'e-1', '{"id":1,"title":"one","v":1}' ],
	[ 'k1', 'e-poison', '{"id":1,"d":100,"poison":true}' ],
	[ 'k1', 'e-3', '{"id":1,"title":"uno","v":3}' ],
	[ 'k1', 'e-4', '{"id":1,"d":1}' ],
	map { [ "k$_", "o-$_", qq({"id":$_,"title":"t$_","v":1}) ] } 2 .. 201);
kafka_produce_events($topic, \@events);

ok(wait_for($node,
	"SELECT string_agg(status || ':' || attempts, ',' ORDER BY \"offset\") FROM cqrs_sink_held WHERE sink = 'fail'",
	'RETRY:1,BLOCKED:0,BLOCKED:0', 30),
	'the failing event is held for a retry, the later events of its key behind it');
ok(wait_for($node, "SELECT count(*) FROM fail_model WHERE id > 1", '200', 30),
	'the other keys were applied meanwhile');
is($node->safe_psql('postgres', "SELECT title || '/' || version FROM fail_model WHERE id = 1"), 'one/1',
	'the later events of the key wait');

ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE sink = 'fail' AND event_id = 'e-poison'",
	'DEAD_LETTERED', 60), 'after its retries the event is dead-lettered');
ok(wait_for($node, "SELECT title || '/' || version || '/' || likes FROM fail_model WHERE id = 1", 'uno/3/1', 30),
	'then the later events of its key are applied');
is($node->safe_psql('postgres', "SELECT string_agg(event_id, ',' ORDER BY n) FROM fail_order WHERE id = 1"),
	'e-1,e-3,e-4', 'in their order');

my ($dl) = kafka_consume($dlt, 1, 30);
ok($dl, 'the dead-letter topic holds the event');
my %h = %{ $dl->{headers} // {} };
is($dl->{key}, 'k1', 'same key');
is($dl->{value}, '{"id":1,"d":100,"poison":true}', 'same value');
is($h{event_id}, 'e-poison', 'header event_id');
is($h{'x-original-topic'}, $topic, 'header x-original-topic');
my $held = $node->safe_psql('postgres',
	"SELECT \"partition\" || '/' || \"offset\" || '/' || dlt_partition || '/' || dlt_offset || '/' || id FROM cqrs_sink_held WHERE event_id = 'e-poison'");
my ($p, $o, $dp, $do, $held_id) = split m{/}, $held;
is($h{'x-original-partition'}, $p, 'header x-original-partition');
is($h{'x-original-offset'},    $o, 'header x-original-offset (1, after e-1)');
is($o, '1', 'the poisoned event was at offset 1 of its partition');
is($h{'x-failure-source'}, 'SINK_HANDLER', 'header x-failure-source');
is($h{'x-retry-count'},    '3', 'header x-retry-count: the failed attempts');
like($h{'x-last-error'}, qr/cannot apply poisoned event e-poison/, 'header x-last-error');
is($h{'x-sink'}, 'fail', 'header x-sink');
is("$dl->{partition}/$dl->{offset}", "$dp/$do", 'the held row says where the dead letter is');

is($node->safe_psql('postgres',
	"SELECT sum(applied) || '/' || sum(retried) || '/' || sum(dead_lettered) || '/' || sum(in_dlt) || '/' || sum(failed) || '/' || sum(held) FROM cqrs_sink_stats WHERE sink = 'fail'"),
	'203/2/1/1/0/0', 'cqrs_sink_stats: applied, retried, dead_lettered, in_dlt, failed, held');

# ---- the handler is fixed; an operator replays the event -------------------

define_handler(0);
$node->safe_psql('postgres', q{
CREATE ROLE ops LOGIN IN ROLE cqrs_sync_operator;
CREATE ROLE nobody LOGIN;
});
my ($ret, $out, $err) = $node->psql('postgres', "SELECT cqrs_sink_replay($held_id)",
	extra_params => [ '-U', 'nobody' ]);
like($err, qr/permission denied for function cqrs_sink_replay/, 'PUBLIC may not replay');
$node->safe_psql('postgres', "SELECT cqrs_sink_replay($held_id)", extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT likes FROM fail_model WHERE id = 1", '101', 30),
	'the replayed event is applied (its delta counted once)');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'fail'"), '0',
	'its held row is gone');
is($node->safe_psql('postgres',
	"SELECT action || '/' || actor || '/' || held_id FROM cqrs_sink_audit WHERE action = 'REPLAY'"),
	"REPLAY/ops/$held_id", 'the replay is audited, with who did it');

# the same dead letter once more, read from the dead-letter topic: the inbox
# knows the event, so nothing changes
my $rid = $node->safe_psql('postgres', "SELECT cqrs_sink_replay('fail', '$dlt', $dp, $do)",
	extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT count(*) FROM cqrs_sink_held WHERE id = $rid", '0', 30),
	'a replay read from the dead-letter topic is applied');
is($node->safe_psql('postgres', "SELECT likes || '/' || (SELECT sum(duplicates) FROM cqrs_sink_offset WHERE sink = 'fail') FROM fail_model WHERE id = 1"),
	'101/1', 'and skipped as a duplicate: applying a replayed event twice changes nothing');

# a second poisoned event, replayed from the dead-letter topic only
define_handler(1);
kafka_produce_events($topic, [ [ 'k2', 'e-poison-2', '{"id":2,"d":7,"poison":true}' ] ]);
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'e-poison-2'", 'DEAD_LETTERED', 60),
	'a second poisoned event is dead-lettered');
my ($dp2, $do2, $id2) = split /\|/, $node->safe_psql('postgres',
	"SELECT dlt_partition, dlt_offset, id FROM cqrs_sink_held WHERE event_id = 'e-poison-2'");
define_handler(0);
$rid = $node->safe_psql('postgres', "SELECT cqrs_sink_replay('fail', '$dlt', $dp2, $do2)",
	extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT likes FROM fail_model WHERE id = 2", '7', 30),
	'the event read back from the dead-letter topic is applied');
($ret, $out, $err) = $node->psql('postgres', "SELECT cqrs_sink_discard($id2, '')",
	extra_params => [ '-U', 'ops' ]);
like($err, qr/a reason is required/, 'a discard needs a reason');
$node->safe_psql('postgres', "SELECT cqrs_sink_discard($id2, 'replayed from the DLT, ticket OPS-1')",
	extra_params => [ '-U', 'ops' ]);
is($node->safe_psql('postgres',
	"SELECT detail->>'reason' || '/' || (detail->>'status') || '/' || actor FROM cqrs_sink_audit WHERE action = 'DISCARD'"),
	'replayed from the DLT, ticket OPS-1/DEAD_LETTERED/ops', 'the discard is audited with the event');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'fail'"), '0',
	'nothing held any more');

# a message in the sink's dead-letter topic that names a topic the sink does
# not consume is not applied as if it were one of its events
kafka_produce_events($dlt, [ [ 'k9', 'e-forged', '{"id":9999,"d":1}',
	'x-original-topic=not-a-sink-topic,x-original-partition=0,x-original-offset=0' ] ]);
my ($fl) = grep { ($_->{key} // '') eq 'k9' } kafka_consume($dlt, 3, 30);
ok(defined $fl, 'a forged message is in the dead-letter topic');
$rid = $node->safe_psql('postgres',
	"SELECT cqrs_sink_replay('fail', '$dlt', $fl->{partition}, $fl->{offset})",
	extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT last_error IS NOT NULL FROM cqrs_sink_held WHERE id = $rid", 't', 30),
	'the replay of the forged message is read');
like($node->safe_psql('postgres', "SELECT status || ': ' || last_error FROM cqrs_sink_held WHERE id = $rid"),
	qr/^FETCH: .*names topic "not-a-sink-topic" in x-original-topic, which sink "fail" does not consume/,
	'... and refused: the sink does not consume the topic it names');
is($node->safe_psql('postgres', "SELECT count(*) FROM fail_model WHERE id = 9999"), '0', 'nothing applied');
$node->safe_psql('postgres', "SELECT cqrs_sink_discard($rid, 'forged message')",
	extra_params => [ '-U', 'ops' ]);

# ---- a paused sink does not try its held events again -----------------------

define_handler(1);
kafka_produce_events($topic, [ [ 'k3', 'e-poison-3', '{"id":3,"d":5,"poison":true}' ] ]);
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'e-poison-3'", 'RETRY', 30),
	'a third poisoned event is held for a retry');
$node->safe_psql('postgres', "SELECT cqrs_sink_pause('fail')", extra_params => [ '-U', 'ops' ]);
my $before = $node->safe_psql('postgres',
	"SELECT status || '/' || attempts FROM cqrs_sink_held WHERE event_id = 'e-poison-3'");
like($before, qr{^RETRY/[12]$}, 'still within its budget when the sink is paused');
define_handler(0);
usleep(5_000_000);	# more than its next backoff (2 s at most here)
is($node->safe_psql('postgres',
	"SELECT status || '/' || attempts || '/' || (SELECT likes FROM fail_model WHERE id = 3) FROM cqrs_sink_held WHERE event_id = 'e-poison-3'"),
	"$before/0", 'while the sink is paused its held event is not tried again, though due');
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('fail')", extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT likes FROM fail_model WHERE id = 3", '5', 30),
	'resumed, the sink applies it');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'fail'"), '0',
	'and releases it');

# ---- the dead-letter topic refuses the event too ------------------------------

my $t2 = create_topic(unique_topic('sink-refused'), 2);
my $small_dlt = create_topic(unique_topic('sink-refused-dlt'), 1, 'max.message.bytes=2000');
$node->safe_psql('postgres', qq{
CREATE FUNCTION refuse_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    RAISE EXCEPTION 'cannot apply this one';
END
\$\$;
SELECT cqrs_sink_create('refused', ARRAY['$t2'], 'refuse_apply(cqrs_event)',
                        '{"max_retries": 0, "dlt_topic": "$small_dlt"}');
});
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cqrs_sync_alert');
my $log_offset = -s $node->logfile;
kafka_produce_events($t2, [ [ 'big', 'e-big', '{"blob":"' . ('x' x 5000) . '"}' ] ]);
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'e-big'", 'DLT_FAILED', 60),
	'refused by its dead-letter topic, the event is kept as DLT_FAILED');
like($node->safe_psql('postgres', "SELECT last_error FROM cqrs_sink_held WHERE event_id = 'e-big'"),
	qr/cannot apply this one; dead-letter topic "\Q$small_dlt\E": MSG_SIZE_TOO_LARGE/,
	'its last_error says both errors');
is($node->safe_psql('postgres',
	"SELECT sum(failed) || '/' || sum(dlt_failed) FROM cqrs_sink_stats WHERE sink = 'refused'"), '1/1',
	'cqrs_sink_stats counts it (failed, dlt_failed)');
is($node->safe_psql('postgres', "SELECT failed FROM cqrs_stats_sink WHERE sink = 'refused'"), '1',
	'cqrs_stats_sink too');
ok($node->wait_for_log(qr/CQ010 WARNING:  cqrs_sync sink "refused": the dead-letter topic "\Q$small_dlt\E" refused/, $log_offset),
	'a WARNING with SQLSTATE CQ010');
like($listener->query('SELECT 1'),
	qr/Asynchronous notification "cqrs_sync_alert" with payload ".*sink_dlt_failed.*refused/s,
	'a NOTIFY on cqrs_sync_alert');
$listener->quit;
usleep(1_500_000);
is($node->safe_psql('postgres', "SELECT status || '/' || attempts FROM cqrs_sink_held WHERE event_id = 'e-big'"),
	'DLT_FAILED/1', 'it is not tried again by itself');

# nobody but operators may act on sinks
for my $f ("cqrs_sink_pause('fail')", "cqrs_sink_resume('fail')", "cqrs_sink_drop('fail')",
	"cqrs_sink_rewind('fail', now())", "cqrs_sink_rewind('fail', '$topic', 0, 0)",
	"cqrs_sink_forget_applied('fail')", "cqrs_sink_discard(1, 'x')",
	"cqrs_sink_create('x', ARRAY['x'], NULL, '{}')")
{
	($ret, $out, $err) = $node->psql('postgres', "SELECT $f", extra_params => [ '-U', 'nobody' ]);
	like($err, qr/permission denied for function/, "PUBLIC may not call $f");
}

$node->stop;
done_testing();
