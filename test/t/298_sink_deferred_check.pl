# A target with a DEFERRABLE INITIALLY DEFERRED foreign key (docs/sink.md,
# "Failures").  A handler runs as a security-restricted operation, in which
# PostgreSQL refuses to queue a deferred trigger: before, every event failed
# with "cannot fire deferred trigger within security-restricted operation"
# (42501, taken as a permission to fix), and the sink waited for good.  The
# sink now checks deferrable constraints at once: events that keep the
# constraint are applied, one that breaks it is its own failure, retried and
# dead-lettered, in a batch and when it is tried again.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_deferred', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-deferred');
create_topic($topic, 1);
create_topic("$topic.deferred.DLT", 1);
$node->safe_psql('postgres', qq{
CREATE TABLE board (id bigint PRIMARY KEY);
INSERT INTO board VALUES (1);
CREATE TABLE card (id bigint PRIMARY KEY, board_id bigint, title text,
    CONSTRAINT card_board_fk FOREIGN KEY (board_id) REFERENCES board
        DEFERRABLE INITIALLY DEFERRED);
CREATE FUNCTION card_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    IF e.payload ? 'new_board' THEN
        INSERT INTO board VALUES ((e.payload->>'new_board')::bigint);
        INSERT INTO card VALUES ((e.payload->>'id')::bigint, (e.payload->>'new_board')::bigint, 'x');
    ELSE
        INSERT INTO card VALUES ((e.payload->>'id')::bigint, (e.payload->>'board')::bigint, 'x');
    END IF;
END
\$\$;
SELECT cqrs_sink_create('deferred', ARRAY['$topic'], 'card_apply(cqrs_event)',
                        '{"max_retries": 1, "retry_backoff": "100ms"}');
});

kafka_produce_events($topic, [
	[ 'a', 'e-1', '{"id":1,"board":1}' ],
	[ 'b', 'e-2', '{"id":2,"board":99}' ],
	[ 'c', 'e-3', '{"id":3,"new_board":2}' ],
	[ 'b', 'e-4', '{"id":4,"board":1}' ],
	[ 'd', 'e-5', '{"id":5,"board":2}' ] ]);

ok(wait_for($node, "SELECT string_agg(id::text, ',' ORDER BY id) FROM card", '1,3,4,5', 60),
	'the events around the failing one are applied, its key after it');
ok( wait_for($node,
		"SELECT status || ' ' || attempts FROM cqrs_sink_held WHERE event_id = 'e-2'",
		'DEAD_LETTERED 2', 60),
	'the event that breaks the constraint is retried, then dead-lettered');
like($node->safe_psql('postgres', "SELECT last_error FROM cqrs_sink_held WHERE event_id = 'e-2'"),
	qr/violates foreign key constraint "card_board_fk"/, 'with the constraint\'s error');
is($node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0'),
	'running', 'the sink does not wait for the database');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM card WHERE board_id NOT IN (SELECT id FROM board)"),
	'0', 'no card without its board');

$node->stop;
done_testing();
