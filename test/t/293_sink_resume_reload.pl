# A resume that a worker reads together with a change of the sink's
# definition is acted on.  A reload that changes cqrs_sync.max_retries
# changes the definition of every sink without its own max_retries; when the
# worker read that change and a resume in the same catalog read (both came
# while it was busy with another sink's batch), it took the new definition,
# with the sink's new paused flag, but never resumed the sink's partitions in
# librdkafka: the sink said it was running and fetched nothing.  A rewind
# read together with such a change was likewise not acted on.
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
	'sink_resume',
	'cqrs_sync.relay_enabled' => 'off',
	'cqrs_sync.sink_workers'  => '1');
my $busy_topic = unique_topic('sink-busy');
my $topic      = unique_topic('sink-resume');
create_topic($busy_topic, 1);
create_topic($topic,      1);

$node->safe_psql('postgres', qq{
CREATE TABLE seen (sink text, event_id text);
CREATE FUNCTION slow_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    PERFORM pg_sleep(coalesce((e.payload->>'sleep')::float8, 0));
    INSERT INTO seen VALUES ('busy', e.event_id);
END
\$\$;
CREATE FUNCTION plain_apply(e cqrs_event) RETURNS void LANGUAGE sql AS
    \$\$ INSERT INTO seen VALUES ('s', e.event_id) \$\$;
SELECT cqrs_sink_create('busy', ARRAY['$busy_topic'], 'slow_apply(cqrs_event)');
SELECT cqrs_sink_create('s', ARRAY['$topic'], 'plain_apply(cqrs_event)');
});

kafka_produce_events($topic, [ [ 'k', 's-1', '{}' ] ]);
ok(wait_applied($node, 's', 1, 60), 'the sink applies its first event');
$node->safe_psql('postgres', "SELECT cqrs_sink_pause('s')");
ok( wait_for($node,
		"SELECT paused FROM cqrs_sink WHERE name = 's'", 't', 10),
	'it is paused');
my $paused;
for (1 .. 100)
{
	$paused = $node->log_contains(qr/cqrs_sync sink "s" paused/);
	last if $paused;
	usleep(100_000);
}
ok($paused, 'the worker paused it');

# the one worker busy in the other sink's handler for 4 s
kafka_produce_events($busy_topic, [ [ 'b', 'b-1', '{"sleep": 4}' ] ]);
ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink' AND wait_event = 'PgSleep'",
		'1', 60),
	'the worker is busy in the other sink\'s handler');
# meanwhile: a resume, and a reload that changes every sink's definition
$node->safe_psql('postgres', "SELECT cqrs_sink_resume('s')");
$node->safe_psql('postgres', 'ALTER SYSTEM SET cqrs_sync.max_retries = 7');
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
kafka_produce_events($topic, [ [ 'k', 's-2', '{}' ], [ 'k', 's-3', '{}' ] ]);

ok(wait_applied($node, 'busy', 1, 60), 'the busy sink finishes its event');
ok(wait_applied($node, 's', 3, 30), 'the resumed sink applies the events that came while it was paused')
  or diag($node->safe_psql('postgres', "SELECT string_agg(sink || ':' || event_id, ',') FROM seen"));
ok($node->log_contains(qr/cqrs_sync sink "s" resumed/), 'the worker says it resumed the sink');

$node->stop;
done_testing();
