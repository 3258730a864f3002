# Smoke test: the relay starts, and ten enqueued events reach Kafka, each
# marked SENT and carrying its event_id header; message values are
# payload::text byte for byte.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

ok(kafka_ping(10), 'Kafka broker answers at ' . kafka_brokers())
  or BAIL_OUT('no Kafka broker at ' . kafka_brokers());

my $node = new_node('smoke');

my $relay_up = wait_for($node,
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'",
	'1', 30);
ok($relay_up, 'one cqrs_sync relay worker runs');
if (!$relay_up)
{
	# Nothing below can pass without a relay; say why and stop early.
	my @log = split /^/m, slurp_file($node->logfile);
	diag("last lines of the server log:\n", @log[ ($#log > 30 ? $#log - 30 : 0) .. $#log ]);
	$node->stop('immediate');
	done_testing();
	exit 1;
}

my $topic = unique_topic('smoke');
my $ids = $node->safe_psql('postgres',
	"SELECT string_agg(id::text, ',') FROM (SELECT cqrs_enqueue('$topic', 'k' || g, jsonb_build_object('n', g)) AS id FROM generate_series(1, 10) g) s"
);
my @ids = split /,/, $ids;
is(scalar @ids, 10, 'cqrs_enqueue returned 10 outbox ids');

ok( wait_for(
		$node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '10',
		60),
	'all 10 outbox rows became SENT');

my @msgs = kafka_consume($topic, 10, 60);
is(scalar @msgs, 10, "10 messages in topic $topic");

my @event_ids = sort grep { defined && /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/ }
  map { $_->{headers}{event_id} } @msgs;
is(scalar @event_ids, 10, 'every message has a uuid event_id header');

my $outbox_ids = $node->safe_psql('postgres',
	"SELECT string_agg(event_id::text, ',' ORDER BY event_id::text) FROM cqrs_outbox WHERE topic = '$topic'"
);
is(join(',', @event_ids), $outbox_ids, 'the event_id headers are the outbox event ids');

is_deeply(
	[ sort map { $_->{key} . '=' . ($_->{json} ? $_->{json}{n} // '?' : 'not json') } @msgs ],
	[ sort map { "k$_=$_" } 1 .. 10 ],
	'keys and JSON values as enqueued');

# The message value is payload::text byte for byte (src/jsonb_text.c writes
# it without jsonb's output function): every escape, number and nesting form.
my $vtopic   = unique_topic('smoke_values');
my @payloads = (
	q{'{"s": "plain", "n": 1}'},
	q{'{"q": "a\"b\\\\c/d", "ctl": "\b\f\n\r\t\u0001\u001f\u007f", "u": "é日本🙂"}'},
	q{'[1, -0, 1.50, 1e100, 0.000001, -12345678901234567890.123, 2.5e-7]'},
	q{'"a raw string"'}, q{'42'}, q{'null'}, q{'true'}, q{'false'},
	q{'{}'}, q{'[]'}, q{'[[]]'},
	q{'{"a": {}, "b": [], "c": [[], [{}], [1, [2, [3]]]], "d": {"e": {"f": null}}}'},
	q{'{"k\"ey\n": {"x": [1, "two", null, true, {"y": false}]}, "": ""}'},
	q{to_jsonb(E'\n' || repeat('x', 300) || E'\t')},
	q{(SELECT to_jsonb(string_agg(chr(i), '')) FROM generate_series(1, 40) i)},
	q{(SELECT jsonb_agg(repeat('\\', i) || '"') FROM generate_series(0, 3) i)});
for my $i (0 .. $#payloads)
{
	$node->safe_psql('postgres',
		"SELECT cqrs_enqueue('$vtopic', 'p$i', $payloads[$i])");
}
ok( wait_for(
		$node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$vtopic' AND status = 'SENT'",
		scalar(@payloads), 60),
	'the payload forms became SENT');
my %want = map { split /\|/, $_, 2 } split /\n/,
  $node->safe_psql('postgres',
	"SELECT key, payload::text FROM cqrs_outbox WHERE topic = '$vtopic'");
my %got = map { $_->{key} => $_->{value} }
  kafka_consume($vtopic, scalar(@payloads), 60, json => 0);
is(scalar(keys %got), scalar(@payloads), 'every payload form is in Kafka');
for my $k (sort keys %want)
{
	is($got{$k}, $want{$k}, "message $k is its payload::text");
}

$node->stop;
done_testing();
