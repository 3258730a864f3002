# A sink's dead letter carries the event's key and headers byte for byte
# (docs/sink.md, "Failures"): a key that is not text, more than 8 headers,
# a header with a null value, one with binary bytes and a name given twice,
# in their order.  Before, the held table kept the key as text only (the
# dead letter's key was "\x" and hex digits), and the dead letter got the
# first 8 of the event's string headers, each name once.  A replay from the
# dead-letter topic reads the same bytes back.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_dl_bytes', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-dlbytes');
my $dlt   = "$topic.bytes.DLT";
create_topic($topic, 1);
create_topic($dlt,   1);
failing_sink($node, 'bytes', $topic, '{"max_retries": 0}');

# event_id first (the tool adds it), then 10 text headers, a null one, a
# binary one and a name given twice
my @text = map { [ "h$_", "v$_" ] } 1 .. 10;
my @headers = ([ 'event_id', 'b-1' ], @text, [ 'nil', undef ],
	[ 'bin', "\x00\xff\x10" ], [ 'dup', 'one' ], [ 'dup', 'two' ]);
my $spec = join ',',
  (map { "$_->[0]=$_->[1]" } @text), 'nil', 'bin=\x00ff10', 'dup=one', 'dup=two';
kafka_produce_events($topic, [ [ '\xdeadbeef00ff', 'b-1', '{"id":1}', $spec ] ]);

ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'b-1'", 'DEAD_LETTERED', 60),
	'the event is dead-lettered');

my ($dl) = kafka_consume($dlt, 1, 30, json => 0);
ok($dl, 'the dead-letter topic holds the event');
is(unpack('H*', $dl->{key}), 'deadbeef00ff', 'the dead letter\'s key is the event\'s bytes');
# (kcat shows a null value as NULL, and a value up to its first zero byte)
like($dl->{headers_raw}, qr/^event_id=b-1,h1=v1,h2=v2,.*,h10=v10,nil=NULL,bin=,dup=one,dup=two,x-original-topic=/,
	'its headers are the event\'s, all of them, in order, then the dead-letter headers');

# what the held row keeps: [name, value] in hex, in order
my $expected = join ',',
  map { unpack('H*', $_->[0]) . '=' . (defined $_->[1] ? unpack('H*', $_->[1]) : 'null') } @headers;
my $held_sql = sub {
	my ($where) = @_;
	return $node->safe_psql('postgres', qq{
SELECT encode(raw_key, 'hex') || ' ' || key || ' ' ||
       (SELECT string_agg(encode(decode(p->>0, 'base64'), 'hex') || '=' ||
                          coalesce(encode(decode(p->>1, 'base64'), 'hex'), 'null'), ',' ORDER BY n)
          FROM jsonb_array_elements(raw_headers) WITH ORDINALITY AS x(p, n))
  FROM cqrs_sink_held WHERE $where});
};
is($held_sql->("event_id = 'b-1' AND dlt_offset = 0"),
	"deadbeef00ff \\xdeadbeef00ff $expected",
	'the held row keeps the key\'s bytes and every header, in order');

# a replay reads the dead letter back: the same bytes
$node->safe_psql('postgres', "SELECT cqrs_sink_replay('bytes', '$dlt', 0, 0)");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_sink_held WHERE event_id = 'b-1' AND status = 'DEAD_LETTERED' AND dlt_offset = 1",
		'1', 60),
	'the replayed event fails again and is dead-lettered again');
is($held_sql->("event_id = 'b-1' AND dlt_offset = 1"),
	"deadbeef00ff \\xdeadbeef00ff $expected",
	'read back from the dead-letter topic, the key and the headers are the same bytes');

$node->stop;
done_testing();
