# A declarative route follows its target table's columns (docs/sink.md,
# "Declarative routes"): after ALTER TABLE ... ADD COLUMN, the next event's
# member of that name is written to it; after DROP COLUMN, events go on
# without it.  Before, the route read the columns once, when the sink was
# resolved: a column added later was never written (the events were applied
# without it and their positions moved on, so the data was lost for good), and
# a dropped one made every event fail until the worker restarted.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_route_columns', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-route-cols');
create_topic($topic, 1);

$node->safe_psql('postgres', qq{
CREATE TABLE route_card (id bigint PRIMARY KEY, title text, note text, version bigint);
SELECT cqrs_sink_create('cards', ARRAY['$topic'], NULL,
       '{"route": {"target": "route_card", "version": "v"}, "max_retries": 0}');
});
kafka_produce_events($topic,
	[ [ '1', 'c1', '{"id":1,"title":"one","note":"n","color":"red","v":1}' ] ]);
ok(wait_applied($node, 'cards', 1, 60), 'the first event is applied');
is($node->safe_psql('postgres', "SELECT concat_ws('|', id, title, note, version) FROM route_card"),
	'1|one|n|1', 'with the columns the table has');

# a column the events already carry is added, another is dropped
$node->safe_psql('postgres', 'ALTER TABLE route_card ADD COLUMN color text');
$node->safe_psql('postgres', 'ALTER TABLE route_card DROP COLUMN note');
kafka_produce_events($topic,
	[ [ '2', 'c2', '{"id":2,"title":"two","note":"n","color":"blue","v":1}' ],
	  [ '1', 'c3', '{"id":1,"title":"uno","color":"green","v":2}' ] ]);
ok(wait_applied($node, 'cards', 3, 60), 'the events after the change are applied')
  or diag($node->safe_psql('postgres',
	"SELECT string_agg(state || ' ' || coalesce(last_error, ''), '; ') FROM cqrs_stats_sink_workers"));
is($node->safe_psql('postgres',
	"SELECT string_agg(concat_ws('|', id, title, coalesce(color, '-'), version), ',' ORDER BY id) FROM route_card"),
	'1|uno|green|2,2|two|blue|1', 'the added column is written, the dropped one is not asked for');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'cards'"),
	'0', 'nothing is held');

$node->stop;
done_testing();
