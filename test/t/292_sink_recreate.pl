# A sink dropped and created again under its name, in one transaction (the
# way to change its options), is a new sink: with "start": "latest" it
# starts at the end of its topics.  The worker compared sinks by name only:
# it kept the old sink's partitions, known to it, while their positions had
# gone with the drop, and started them at offset 0, so the new sink applied
# the topic's whole history.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = new_node(
	'sink_recreate',
	'cqrs_sync.relay_enabled' => 'off',
	'cqrs_sync.sink_workers'  => '1');
my $topic = unique_topic('sink-recreate');
create_topic($topic, 1);

# history from before the sink
kafka_produce_events($topic, [ map { [ "k$_", "old-$_", '{}' ] } 1 .. 100 ]);

my $create = qq{SELECT cqrs_sink_create('x', ARRAY['$topic'], 'recreate_apply(cqrs_event)', '{"start": "latest"}')};
$node->safe_psql('postgres', qq{
CREATE TABLE seen (event_id text);
CREATE FUNCTION recreate_apply(e cqrs_event) RETURNS void LANGUAGE sql AS
    \$\$ INSERT INTO seen VALUES (e.event_id) \$\$;
$create;
});
ok(wait_for($node, "SELECT count(*) FROM cqrs_sink_offset WHERE sink = 'x'", '1', 60),
	'the sink has its position, at the end of the topic');
kafka_produce_events($topic, [ map { [ "k$_", "a-$_", '{}' ] } 1 .. 10 ]);
ok(wait_applied($node, 'x', 10, 60), 'it applies the 10 events that came after it');

$node->safe_psql('postgres', "BEGIN; SELECT cqrs_sink_drop('x'); $create; COMMIT;");
ok(wait_for($node, "SELECT count(*) FROM cqrs_sink_offset WHERE sink = 'x'", '1', 60),
	'created again, it has a position again');
kafka_produce_events($topic, [ map { [ "k$_", "b-$_", '{}' ] } 1 .. 5 ]);
ok(wait_applied($node, 'x', 5, 60), 'the new sink applies the 5 events that came after it');
usleep(2_000_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM seen WHERE event_id LIKE 'old-%'"),
	'0', 'and none of the history');
is($node->safe_psql('postgres', "SELECT count(*) FROM seen"), '15', '15 events applied in all');

$node->stop;
done_testing();
