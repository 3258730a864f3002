# The sink's life cycle and SQL surface against a real broker (issue 14):
# a sink declared in SQL is picked up without a restart (backend_type
# "cqrs_sync sink"); the handler runs as the sink's role, and a permission
# it lacks makes the sink wait, not dead-letter; a declarative route
# upserts and deletes without a function; a paused sink applies nothing
# until resumed; positions are also committed to Kafka (its lag tools see
# them); a rewind reads events again and the inbox skips them; a rebuild
# (pause, empty the model, forget, rewind, resume) recreates the read model
# exactly; a dropped sink leaves its group; cqrs_sink_stats and its
# companions show positions, watermarks and counters to pg_monitor, never
# an event's key or value.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = new_node('sink', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink');
create_topic($topic, 3);

is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink'"),
	'1', 'one sink worker runs (cqrs_sync.sink_workers = 1) before any sink exists');
is($node->safe_psql('postgres', "SELECT state FROM cqrs_stats_sink_workers"), 'idle', 'and idles');

# ---- a handler, as a role of its own ----------------------------------------

$node->safe_psql('postgres', q{
CREATE ROLE board_view NOLOGIN IN ROLE cqrs_sync_reader;
CREATE ROLE ops LOGIN IN ROLE cqrs_sync_operator, pg_monitor, board_view;
CREATE TABLE board (id bigint PRIMARY KEY, title text, likes bigint NOT NULL DEFAULT 0,
                    version bigint NOT NULL DEFAULT 0, applied_by text);
GRANT SELECT, INSERT, DELETE ON board TO board_view;   -- no UPDATE yet
CREATE FUNCTION board_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF e.payload ? 'like' THEN
        PERFORM cqrs_apply_delta('board', jsonb_build_object('id', e.payload->'id'), '{"likes": 1}',
                                 'board-view', e.event_id);
    ELSE
        PERFORM cqrs_upsert('board', jsonb_build_object('id', e.payload->'id', 'title', e.payload->'title',
                                                        'applied_by', current_user), (e.payload->>'v')::bigint);
    END IF;
END
$$;
});
$node->safe_psql('postgres',
	"SET ROLE ops; SELECT cqrs_sink_create('board-view', ARRAY['$topic'], 'board_apply(cqrs_event)', '{\"run_as\": \"board_view\"}')",
	extra_params => [ '-U', 'ops' ]);
is($node->safe_psql('postgres', "SELECT run_as || '/' || consumer || '/' || group_id FROM cqrs_sink"),
	'board_view/board-view/cqrs_sync.postgres.board-view', 'the sink: its role, consumer and consumer group');
is($node->safe_psql('postgres', "SELECT owner FROM cqrs_consumer WHERE consumer = 'board-view'"), 'board_view',
	'its consumer belongs to its role');
is($node->safe_psql('postgres', "SELECT action || '/' || actor || '/' || session_user_name FROM cqrs_sink_audit"),
	'CREATE/ops/ops', 'its creation is audited');

kafka_produce_events($topic, [
	[ 'b1', 'e1', '{"id":1,"title":"one","v":1}' ],
	[ 'b1', 'e2', '{"id":1,"like":true}' ],
	[ 'b2', 'e3', '{"id":2,"title":"two","v":1}' ] ]);
ok(wait_for($node, "SELECT sinks || '/' || partitions FROM cqrs_stats_sink_workers", '1/3', 30),
	'picked up without a restart: the worker consumes the sink\'s 3 partitions');
ok(wait_for($node, "SELECT state ~ 'waiting for database' AND last_error ~ 'permission denied' FROM cqrs_stats_sink_workers",
	't', 30), 'an UPDATE the role may not do (a delta) makes the sink wait, with the error');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held"), '0', 'nothing held or dead-lettered for it');
$node->safe_psql('postgres', 'GRANT UPDATE ON board TO board_view');
ok(wait_for($node, "SELECT count(*) || '/' || sum(likes) FROM board", '2/1', 30), 'granted, the sink goes on by itself');
is($node->safe_psql('postgres', "SELECT string_agg(DISTINCT applied_by, ',') FROM board"), 'board_view',
	'the handler ran as the sink\'s role');

# ---- pause and resume ------------------------------------------------------------

$node->safe_psql('postgres', "SELECT cqrs_sink_pause('board-view')", extra_params => [ '-U', 'ops' ]);
kafka_produce_events($topic, [ [ 'b3', 'e4', '{"id":3,"title":"three","v":1}' ] ]);
usleep(3_000_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM board WHERE id = 3"), '0', 'a paused sink applies nothing');
ok(wait_for($node, "SELECT sum(lag) FROM cqrs_sink_stats WHERE sink = 'board-view'", '1', 30),
	'cqrs_sink_stats shows the message waiting');
# long after the pause, nothing is fetched: the worker asks Kafka for the
# high watermarks
kafka_produce_events($topic, [ [ 'b3', 'e4b', '{"id":3,"title":"three","v":2}' ] ]);
ok(wait_for($node, "SELECT sum(lag) FROM cqrs_sink_stats WHERE sink = 'board-view'", '2', 30),
	'and the next one, arrived while paused');
is($node->safe_psql('postgres', "SELECT paused FROM cqrs_stats_sink"), 't', 'cqrs_stats_sink says paused');
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('board-view')", extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT count(*) FROM board WHERE id = 3", '1', 30), 'resumed, it applies again');

# ---- positions: in the database, and committed to Kafka afterwards ------------

ok(wait_for($node,
	"SELECT bool_and(position = high_watermark AND lag = 0) FROM cqrs_sink_stats WHERE sink = 'board-view'",
	't', 30), 'stored positions at the high watermarks');
my $positions = $node->safe_psql('postgres',
	"SELECT sum(next_offset) FROM cqrs_sink_offset WHERE sink = 'board-view'");
is($positions, '5', 'five messages, five positions');

# ---- a declarative route ----------------------------------------------------------

my $t2 = unique_topic('sink-route');
create_topic($t2, 2);
$node->safe_psql('postgres', qq{
CREATE TABLE route_board (board_id bigint PRIMARY KEY, title text, body text, version bigint);
SELECT cqrs_sink_create('route', ARRAY['$t2'], NULL,
       '{"route": {"target": "route_board", "version": "rev", "delete": {"type": "BoardDeleted"}}}');
});
kafka_produce_events($t2, [
	[ '1', 'r1', '{"type":"BoardCreated","board_id":1,"title":"a","body":"x","rev":1,"extra":"not a column"}' ],
	[ '1', 'r2', '{"type":"BoardUpdated","board_id":1,"title":"b","rev":2}' ],
	[ '2', 'r3', '{"type":"BoardCreated","board_id":2,"title":"c","rev":1}' ],
	[ '2', 'r4', '{"type":"BoardDeleted","board_id":2,"rev":2}' ],
	[ '2', 'r5', '{"type":"BoardCreated","board_id":2,"title":"late","rev":1}' ],
	[ '1', 'r1', '{"type":"BoardCreated","board_id":1,"title":"a","body":"x","rev":1,"extra":"not a column"}' ] ]);
ok(wait_applied($node, 'route', 6, 30), 'the route accounted for every message');
is($node->safe_psql('postgres', "SELECT string_agg(board_id || ':' || title || ':' || coalesce(body, '') || ':' || version, ',' ORDER BY board_id) FROM route_board"),
	'1:b:x:2', 'the route upserts the payload\'s columns by version and deletes (a late create stays deleted)');
is($node->safe_psql('postgres', "SELECT version FROM cqrs_tombstone WHERE target = 'route_board'::regclass"),
	'2', 'with a tombstone');
is($node->safe_psql('postgres', "SELECT sum(applied) || '/' || sum(duplicates) FROM cqrs_sink_offset WHERE sink = 'route'"),
	'5/1', 'the copy was skipped as a duplicate');

# ---- a route deleting by a field: its errors, and its role's right to the helpers ----
# The route calls cqrs_upsert() and cqrs_delete() as the sink's role, which
# needs EXECUTE on them (cqrs_sync_reader): without it the sink waits.

my $t3 = unique_topic('sink-route2');
create_topic($t3, 1);
$node->safe_psql('postgres', qq{
CREATE TABLE route_item (id bigint PRIMARY KEY, title text, version bigint);
CREATE ROLE route_role NOLOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON route_item TO route_role;
SELECT cqrs_sink_create('route2', ARRAY['$t3'], NULL,
       '{"route": {"target": "route_item", "version": "v", "delete": "deleted"},
         "run_as": "route_role", "max_retries": 0}');
});
kafka_produce_events($t3, [
	[ 'i1', 'q1', '{"id":1,"title":"a","v":1}' ],
	[ 'i1', 'q2', '{"id":1,"deleted":true,"v":2}' ],
	[ 'i2', 'q3', '{"id":2,"title":"b","v":"3"}' ],
	[ 'i3', 'q4', '[3, "not an object"]' ],
	[ 'i4', 'q5', '{"id":4,"title":"no version"}' ],
	[ 'i5', 'q6', '{"id":5,"title":"y","v":1.5}' ],
	[ 'i6', 'q7', '{"id":6,"title":"z","v":1,"deleted":false,"other":1}' ] ]);
ok(wait_for($node,
	"SELECT state ~ 'waiting for database' AND last_error ~ 'permission denied for function cqrs_upsert' FROM cqrs_stats_sink_workers",
	't', 30), 'a route whose role may not execute cqrs_upsert() waits, with the error');
is($node->safe_psql('postgres', "SELECT count(*) FROM route_item") . '/'
	. $node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'route2'"),
	'0/0', 'nothing applied, held or dead-lettered meanwhile');
$node->safe_psql('postgres', 'GRANT cqrs_sync_reader TO route_role');
ok(wait_for($node, "SELECT coalesce(sum(applied + dead_lettered), 0) FROM cqrs_sink_stats WHERE sink = 'route2'",
	'7', 60), 'granted, the route goes on by itself');
is($node->safe_psql('postgres', "SELECT string_agg(id || ':' || title || ':' || version, ',' ORDER BY id) FROM route_item"),
	'2:b:3,6:z:1', 'a true field deletes, a false one does not; a version given as a string counts');
is($node->safe_psql('postgres', "SELECT version FROM cqrs_tombstone WHERE target = 'route_item'::regclass"),
	'2', 'the delete left a tombstone');
is($node->safe_psql('postgres',
	"SELECT string_agg(event_id || ': ' || last_error, E'\\n' ORDER BY event_id) FROM cqrs_sink_held WHERE sink = 'route2' AND status = 'DEAD_LETTERED'"),
	join("\n",
		'q4: the route of sink "route2" needs a JSON object, not a JSON array',
		'q5: version must not be null',
		'q6: invalid input syntax for type bigint: "1.5"'),
	'messages the route cannot use are dead-lettered, each with its error');

# the route's target dropped: the sink waits; created again, it goes on
$node->safe_psql('postgres', 'DROP TABLE route_item');
kafka_produce_events($t3, [ [ 'i7', 'q8', '{"id":7,"title":"after","v":1}' ] ]);
ok(wait_for($node, "SELECT state ~ 'waiting for database' AND last_error ~ 'route_item' FROM cqrs_stats_sink_workers",
	't', 30), 'a dropped route target makes the sink wait');
$node->safe_psql('postgres', q{
CREATE TABLE route_item (id bigint PRIMARY KEY, title text, version bigint);
GRANT SELECT, INSERT, UPDATE, DELETE ON route_item TO route_role;
});
ok(wait_for($node, "SELECT string_agg(id || ':' || title, ',') FROM route_item", '7:after', 30),
	'created again, the route finds the new table');

# ---- rewind: events read again, the inbox skips them ----------------------------

my $before = $node->safe_psql('postgres', "SELECT string_agg(id || ':' || likes || ':' || version, ',' ORDER BY id) FROM board");
my $moves = $node->safe_psql('postgres',
	"SELECT string_agg(next_offset || '>0', ',' ORDER BY partition) FROM cqrs_sink_offset WHERE sink = 'board-view'");
is($node->safe_psql('postgres',
	"SELECT string_agg(old_position || '>' || new_position, ',' ORDER BY partition) FROM cqrs_sink_rewind('board-view', '-infinity')",
	extra_params => [ '-U', 'ops' ]), $moves, 'cqrs_sink_rewind() to -infinity: every partition back to 0');
ok(wait_applied($node, 'board-view', 10, 30), 'the messages are read again');
is($node->safe_psql('postgres', "SELECT sum(duplicates) FROM cqrs_sink_offset WHERE sink = 'board-view'"), '5',
	'and skipped as duplicates');
is($node->safe_psql('postgres', "SELECT string_agg(id || ':' || likes || ':' || version, ',' ORDER BY id) FROM board"),
	$before, 'the read model is unchanged');
my $p = $node->safe_psql('postgres', "SELECT \"partition\" FROM cqrs_sink_offset WHERE sink = 'board-view' AND next_offset > 0 ORDER BY 1 LIMIT 1");
is($node->safe_psql('postgres', "SELECT cqrs_sink_rewind('board-view', '$topic', $p, 0)", extra_params => [ '-U', 'ops' ]) > 0,
	1, 'cqrs_sink_rewind() to an offset returns the position before');
my $t_future = $node->safe_psql('postgres',
	"SELECT sum(new_position) FROM cqrs_sink_rewind('board-view', now() + interval '1 day')", extra_params => [ '-U', 'ops' ]);
is($t_future, '5', 'a rewind to a time after the last message moves to the ends');

# offsets of a topic that does not exist: an error, and the topic is not
# created (the broker auto-creates topics a client asks for by name)
my $nosuch = unique_topic('nosuch');
my ($ret, $out, $err) = $node->psql('postgres',
	"SELECT * FROM cqrs_sink_kafka_offsets(ARRAY['$nosuch'], now())");
isnt($ret, 0, 'offsets of a topic that does not exist: an error');
like($err, qr/could not read the partitions of topic "\Q$nosuch\E"/, 'naming the topic');
# (the broker creates it a moment later, if at all)
my $listing = '';
for (1 .. 6)
{
	sleep 1;
	$listing = '';
	IPC::Run::run([ 'kcat', '-L', '-b', kafka_brokers() ], '<', \undef, '>', \$listing, '2>', \my $kerr,
		IPC::Run::timeout(30));
	last if $listing =~ /"\Q$nosuch\E"/;
}
unlike($listing, qr/"\Q$nosuch\E"/, 'and the topic was not created');

# ---- rebuild: an emptied read model, made again from the topic --------------------

$node->safe_psql('postgres', "SELECT cqrs_sink_pause('board-view')", extra_params => [ '-U', 'ops' ]);
my ($ret, $out, $err) = $node->psql('postgres', "SELECT cqrs_sink_forget_applied('route')",
	extra_params => [ '-U', 'ops' ]);
like($err, qr/must be paused/, 'only a paused sink forgets what it applied');
$node->safe_psql('postgres', 'TRUNCATE board');
$node->safe_psql('postgres', q{
SELECT cqrs_sink_forget_applied('board-view');
SELECT count(*) FROM cqrs_sink_rewind('board-view', '-infinity');
SELECT cqrs_sink_resume('board-view');
}, extra_params => [ '-U', 'ops' ]);
ok(wait_for($node, "SELECT string_agg(id || ':' || likes || ':' || version, ',' ORDER BY id) FROM board", $before, 30),
	'the rebuilt read model equals the one before');
is($node->safe_psql('postgres', "SELECT string_agg(action, ',' ORDER BY audit_id) FROM cqrs_sink_audit WHERE sink = 'board-view'"),
	'CREATE,PAUSE,RESUME,REWIND,REWIND,REWIND,PAUSE,FORGET,REWIND,RESUME', 'every operator action audited');

# ---- monitoring -------------------------------------------------------------------

$node->safe_psql('postgres', 'CREATE ROLE watcher LOGIN IN ROLE pg_monitor');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_sink_stats WHERE sink = 'board-view' AND position IS NOT NULL AND high_watermark IS NOT NULL",
	extra_params => [ '-U', 'watcher' ]), '3', 'pg_monitor reads cqrs_sink_stats');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_stats_sink", extra_params => [ '-U', 'watcher' ]), '3',
	'and cqrs_stats_sink');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_stats_sink_workers WHERE pid IS NOT NULL",
	extra_params => [ '-U', 'watcher' ]), '1', 'and cqrs_stats_sink_workers');
($ret, $out, $err) = $node->psql('postgres', "SELECT value FROM cqrs_sink_held", extra_params => [ '-U', 'watcher' ]);
like($err, qr/permission denied/, 'but no event value');

# ---- drop: the worker leaves the group; Kafka holds the committed offsets -----------

$node->safe_psql('postgres', "SELECT cqrs_sink_drop('board-view')", extra_params => [ '-U', 'ops' ]);
ok($node->wait_for_log(qr/cqrs_sync sink "board-view" dropped/), 'the worker drops the sink');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_offset WHERE sink = 'board-view'"), '0',
	'its positions go with it');
# a consumer of the same group starts at the committed offsets: the end
kafka_produce_events($topic, [ [ 'b9', 'e9', '{"id":9,"title":"after","v":1}' ] ]);
my ($kout, $kerr) = ('', '');
IPC::Run::run([ 'kcat', '-b', kafka_brokers(), '-G', 'cqrs_sync.postgres.board-view', '-e', '-q',
		'-f', '%o %s\n', $topic ], '<', \undef, '>', \$kout, '2>', \$kerr, IPC::Run::timeout(60));
like($kout, qr/^\d+ \{"id":9,"title":"after","v":1\}\n\z/,
	'a consumer of the sink\'s group starts at the offsets the sink committed to Kafka: only the new message')
  or diag("kcat: $kout$kerr");

$node->stop;
done_testing();
