# An event that exceeds one of PostgreSQL's program limits (SQLSTATE class
# 54) in its handler is the event's own failure (docs/sink.md, "Failures"):
# it spends its retry budget and is dead-lettered, while the events around
# it are applied.  Here, a title too long for its B-tree index (54000).
# Before, class 54 counted as transient: the sink rolled the whole batch
# back and tried it again for ever, "waiting for database", with nothing
# held that an operator could discard.  The same held for an event_id
# header too long for the inbox's index, which failed before the handler
# ran; an event_id over 1,024 bytes is now the event's error.  A Kafka key
# too long for a B-tree entry is held all the same (the held table's key
# index holds a hash of it): before, holding such an event failed, and the
# sink waited for good.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_limits', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-limits');
create_topic($topic, 1);
create_topic("$topic.limits.DLT", 1);
$node->safe_psql('postgres', qq{
CREATE TABLE limits_model (id bigint PRIMARY KEY, title text, version bigint);
CREATE INDEX ON limits_model (title);
CREATE FUNCTION limits_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
DECLARE
    ok boolean;
BEGIN
    ok := cqrs_upsert('limits_model', jsonb_build_object('id', e.payload->'id', 'title', e.payload->'title'), 1);
END
\$\$;
SELECT cqrs_sink_create('limits', ARRAY['$topic'], 'limits_apply(cqrs_event)', '{"max_retries": 0}');
});

# 6,000 random letters and digits: pglz cannot shrink them below the
# B-tree's limit of 2,704 bytes per entry
my @chars = ('a' .. 'z', 'A' .. 'Z', '0' .. '9');
my $long = join '', map { $chars[ int(rand(@chars)) ] } 1 .. 6000;
my $longkey = join '', map { $chars[ int(rand(@chars)) ] } 1 .. 6000;
kafka_produce_events($topic, [
	[ 'a', 'g-1', '{"id":1,"title":"one"}' ],
	[ 'b', 'p-1', qq({"id":2,"title":"$long"}) ],
	[ 'c', 'g-2', '{"id":3,"title":"three"}' ],
	[ 'd', $long, '{"id":4,"title":"four"}' ],
	[ 'e', 'g-3', '{"id":5,"title":"five"}' ],
	[ $longkey, 'p-2', qq({"id":6,"title":"$long"}) ],
	[ $longkey, 'g-4', '{"id":7,"title":"seven"}' ],
	[ 'f', 'g-5', '{"id":8,"title":"eight"}' ] ]);

ok(wait_for($node, "SELECT string_agg(id::text, ',' ORDER BY id) FROM limits_model", '1,3,5,7,8', 60),
	'the events around them are applied');
ok(wait_for($node, "SELECT status FROM cqrs_sink_held WHERE event_id = 'p-1'", 'DEAD_LETTERED', 60),
	'the event too long for the index is dead-lettered');
like($node->safe_psql('postgres', "SELECT last_error FROM cqrs_sink_held WHERE event_id = 'p-1'"),
	qr/index row size \d+ exceeds/, 'with its error');
ok( wait_for($node,
		"SELECT status || ' ' || (last_error LIKE '%event_id header%is 6000 bytes long, more than 1024') FROM cqrs_sink_held WHERE length(event_id) = 6000",
		'DEAD_LETTERED true', 60),
	'so is the event whose event_id is too long for the inbox, with its error');
ok( wait_for($node,
		"SELECT status || ' ' || length(key) FROM cqrs_sink_held WHERE event_id = 'p-2'",
		'DEAD_LETTERED 6000', 60),
	'an event whose key is too long for a B-tree entry is held and dead-lettered');
is($node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0'),
	'running', 'the sink does not wait for the database');

$node->stop;
done_testing();
