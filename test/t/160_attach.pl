# An application's own outbox table, attached (issue 15), against the real
# broker:
#  - Debezium's outbox layout with the EventRouter's defaults: 10,000 rows
#    inserted by plain INSERTs in 8 concurrent sessions (pgbench) reach
#    Kafka on topic outbox.event.<aggregatetype>, with key = aggregateid,
#    headers id and type (and event_id = id), value = payload, each once, and
#    per key in the order of their outbox ids;
#  - order per key across out-of-order commits: a row of a key inserted by a
#    transaction still open holds the later rows of that key;
#  - a poison row (too large for its topic) among them ends DEAD_LETTERED in
#    the dead-letter topic, like any outbox row; later rows of its key follow;
#  - statistics count the rows and the cleanup removes them;
#  - a layout named by its columns (a JPA entity's);
#  - detaching stops the flow.
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
	'attach',
	'cqrs_sync.max_retries'   => '1',
	'cqrs_sync.retry_backoff' => '100ms',
	'max_connections'         => '40');

# the aggregate type routes to the topic: a fresh one per run
my $agg   = 'att' . time . $$;
my $topic = create_topic("outbox.event.$agg", 4, 'max.message.bytes=200000');
# (the out-of-order commits below go to a topic of their own)
my $agg_k   = "${agg}k";
my $topic_k = create_topic("outbox.event.$agg_k", 2);

$node->safe_psql(
	'postgres', q{
CREATE TABLE outboxevent (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb
);
SELECT cqrs_attach_outbox('outboxevent');
});
is( $node->safe_psql('postgres', 'SELECT outbox, enabled FROM cqrs_attached_outboxes'),
	'outboxevent|t', 'the table is attached');

# ---- order per key across out-of-order commits --------------------------------
my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
$a->query_safe("INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload)
                VALUES ('$agg_k', 'K', 'First', '{\"seq\": 1}')");
$node->safe_psql('postgres',
	"INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload)
	 VALUES ('$agg_k', 'K', 'Second', '{\"seq\": 2}'), ('$agg_k', 'other', 'Other', '{\"seq\": 1}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'other'", 'SENT', 30),
	'a row of another key is sent while the first row of K is uncommitted');
usleep(1_500_000);
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE key = 'K'"),
	'PENDING', 'the committed later row of K waits for the uncommitted earlier one');
$a->query_safe('COMMIT');
$a->quit;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'", '2', 30),
	'both rows of K are sent once the first committed');
my @k = grep { $_->{key} eq 'K' } kafka_consume($topic_k, 3, 30);
is(join(',', map { $_->{headers}{type} } @k), 'First,Second', 'K reached Kafka in insert order');
$node->safe_psql('postgres', "DELETE FROM outboxevent; DELETE FROM cqrs_outbox");

# ---- 10,000 rows from 8 concurrent sessions, and a poison row ------------------
# Each transaction inserts 2 rows of one key and 3 of another, with a pause
# between, so that transactions interleave and commit out of id order.
my $script = PostgreSQL::Test::Utils::tempdir() . '/attach.pgbench';
PostgreSQL::Test::Utils::append_to_file(
	$script, qq{\\set k1 random(1, 100)
\\set k2 random(1, 100)
BEGIN;
INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload)
  SELECT '$agg', 'key-' || :k1, 'Ev' || g, jsonb_build_object('client', :client_id, 'g', g)
    FROM generate_series(1, 2) g;
\\sleep 1 ms
INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload)
  SELECT '$agg', 'key-' || :k2, 'Ev' || g, jsonb_build_object('client', :client_id, 'g', g)
    FROM generate_series(3, 5) g;
COMMIT;
});
my ($pb_out, $pb_err) = ('', '');
my $pgbench = IPC::Run::start(
	[
		'pgbench', '-n', '-c', '8', '-j', '2', '-t', '250', '-f', $script,
		'-h', $node->host, '-p', $node->port, 'postgres'
	],
	'<', \undef, '>', \$pb_out, '2>', \$pb_err);
# the poison row, while they run: too large for the topic, on a busy key
usleep(300_000);
my $poison = $node->safe_psql('postgres',
	"INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload)
	 VALUES ('$agg', 'key-7', 'Poison', jsonb_build_object('big', repeat('x', 300000)))
	 RETURNING id");
$pgbench->finish;
like($pb_out, qr/number of transactions actually processed: 2000\/2000/,
	'pgbench committed 2,000 transactions of 5 rows') or diag($pb_out . $pb_err);
is($node->safe_psql('postgres', "SELECT count(*) FROM outboxevent WHERE type <> 'Poison'"),
	'10000', '10,000 rows in the application\'s table');

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'", '0', 120),
	'nothing left PENDING')
  or diag(
	$node->safe_psql('postgres',
		"SELECT key, count(*), min(id), max(id), max(retry_count), max(next_attempt_at)
		   FROM cqrs_outbox WHERE status = 'PENDING' GROUP BY key ORDER BY 3 LIMIT 20")
	  . "\n"
	  . $node->safe_psql('postgres',
		'SELECT state, stalled_partitions, "window", paused_topic, last_error FROM cqrs_stats_relay')
	  . "\n"
	  . $node->safe_psql('postgres',
		"SELECT pid, state, backend_type, left(query, 60) FROM pg_stat_activity WHERE backend_type <> 'walsender'"));
is( $node->safe_psql('postgres',
		"SELECT status || ' ' || count(*) FROM cqrs_outbox GROUP BY status ORDER BY 1"),
	"DEAD_LETTERED 1\nSENT 10000",
	'10,000 rows SENT, one DEAD_LETTERED');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE event_id = '$poison'"),
	'DEAD_LETTERED', 'the poison row is the dead-lettered one');

# What Kafka holds, against the application's table and the outbox order.
my %row = map { my ($id, $key, $type, $payload, $oid) = split /\|/, $_, 5;
	$id => { key => $key, type => $type, payload => $payload, outbox_id => $oid } }
  split /\n/, $node->safe_psql('postgres',
	"SELECT e.id, e.aggregateid, e.type, e.payload::text, o.id
	   FROM outboxevent e JOIN cqrs_outbox o ON o.event_id = e.id
	  WHERE e.type <> 'Poison'");
is(scalar keys %row, 10000, 'every row of the table has its outbox row');

my @msgs = kafka_consume($topic, 10000, 120, json => 0);
is(scalar @msgs, 10000, "10,000 messages on $topic");
my (%seen, $bad_key, $bad_headers, $bad_value, $unknown, $out_of_order);
my %last;    # key -> [partition, outbox id] of its last message
for my $m (@msgs)
{
	my $id = $m->{headers}{id} // '';
	my $r  = $row{$id};
	if (!$r) { $unknown++; next; }
	$seen{$id}++;
	$bad_key++ if $m->{key} ne $r->{key};
	$bad_headers++
	  if ($m->{headers}{type} // '') ne $r->{type}
	  || ($m->{headers}{event_id} // '') ne $id
	  || scalar(keys %{ $m->{headers} }) != 3;
	$bad_value++ if $m->{value} ne $r->{payload};
	my $l = $last{ $m->{key} };
	$out_of_order++ if $l && ($l->[0] != $m->{partition} || $l->[1] > $r->{outbox_id});
	$last{ $m->{key} } = [ $m->{partition}, $r->{outbox_id} ];
}
ok(!$unknown, 'every message is a row of the table (header id)') or diag("$unknown unknown");
is(scalar keys %seen, 10000, 'every row reached Kafka');
is(scalar(grep { $seen{$_} != 1 } keys %seen), 0, 'each exactly once');
ok(!$bad_key, 'key = aggregateid') or diag("$bad_key wrong keys");
ok(!$bad_headers, 'headers id, type and event_id (= id), nothing else')
  or diag("$bad_headers wrong headers, e.g. $msgs[0]{headers_raw}");
ok(!$bad_value, 'value = payload') or diag("$bad_value wrong values");
ok(!$out_of_order, 'per key, one partition and the outbox id order')
  or diag("$out_of_order out of order");
is(scalar keys %last, 100, 'all 100 keys');

# the poison row, dead-lettered like any outbox row
my @dlt = kafka_consume("$topic.DLT", 1, 30);
is(scalar @dlt, 1, 'one record in the dead-letter topic');
is($dlt[0]{headers}{'x-original-topic'}, $topic, 'x-original-topic');
is($dlt[0]{headers}{event_id}, $poison, 'event_id: the row\'s id');
is($dlt[0]{headers}{type}, 'Poison', 'its own headers kept');
is($dlt[0]{key}, 'key-7', 'its key');
is( $node->safe_psql('postgres',
		"SELECT count(*) > 0 FROM cqrs_outbox o
		  WHERE key = 'key-7' AND o.id > (SELECT id FROM cqrs_outbox WHERE event_id = '$poison')"),
	't', 'later rows of its key were there, and were delivered (above)');

# statistics and cleanup treat these rows as any
is( $node->safe_psql('postgres', 'SELECT pending, sent, dead_lettered FROM cqrs_outbox_stats()'),
	'0|10000|1', 'cqrs_outbox_stats() counts them');
is( $node->safe_psql('postgres',
		"SET cqrs_sync.sent_retention = 0; SELECT sent FROM cqrs_cleanup()"),
	'10000', 'the cleanup deletes them once sent');

# ---- a layout named by its columns (a JPA entity of a Spring service) --------
my $fixed = unique_topic('attach-jpa');
$node->safe_psql(
	'postgres', qq{
CREATE TABLE outbox_event (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    event_type     varchar(255) NOT NULL,
    payload        text NOT NULL,
    created_at     timestamp NOT NULL DEFAULT now(),
    processed      boolean NOT NULL DEFAULT false);
INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, processed)
VALUES ('board', '42', 'BoardCreated', '{"v": 1}', true),
       ('board', '42', 'BoardRenamed', '{"v": 2}', false);
SELECT cqrs_attach_outbox('outbox_event', '{
    "topic": "$fixed", "key": "aggregate_id", "payload": "payload", "event_id": "event_id",
    "headers": {"eventType": "event_type", "aggregateType": "aggregate_type"},
    "backfill": "NOT processed", "backfill_order": "created_at, id"}');
INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
VALUES ('board', '42', 'BoardArchived', '{"v": 3}');
});
my @jpa = kafka_consume($fixed, 2, 30);
is(join(',', map { "$_->{key}:$_->{headers}{eventType}:$_->{headers}{aggregateType}:$_->{value}" } @jpa),
	'42:BoardRenamed:board:{"v": 2},42:BoardArchived:board:{"v": 3}',
	'named columns: the unprocessed row (backfilled) then the new one, with their headers');

# ---- detaching stops the flow ------------------------------------------------
$node->safe_psql('postgres', "SELECT cqrs_detach_outbox('outboxevent')");
$node->safe_psql('postgres',
	"INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload)
	 SELECT '$agg', 'after-detach', 'Late', '{}' FROM generate_series(1, 5)");
usleep(1_500_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE key = 'after-detach'"),
	'0', 'after detaching, inserts are not published');
is(scalar(kafka_consume($topic, 10001, 5, json => 0)), 10000, 'nothing more reached Kafka');
is($node->safe_psql('postgres', "SELECT count(*) FROM outboxevent WHERE aggregateid = 'after-detach'"),
	'5', 'the application\'s rows are kept');
is($node->safe_psql('postgres', 'SELECT count(*) FROM cqrs_attached_outboxes'),
	'1', 'only the other table is still attached');

$node->stop;
done_testing();
