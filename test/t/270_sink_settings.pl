# The sink's session settings around a handler (docs/sink.md, "Calls the
# handler"): each call runs with the sink's search_path, and a handler's own
# SET clause (ALTER FUNCTION ... SET) applies to it; what a handler sets with
# a plain SET or set_config(..., false) ends with the call.  Before this was
# so, a handler's SET stayed in the worker's session: every later
# transaction of the worker, for every sink, ran with it (a handler that set
# default_transaction_read_only stopped all sinks for good), and the sink's
# search_path option and a handler's SET clause were ignored, because the
# worker's pinned settings outranked them.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_settings', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-settings');
create_topic($topic, 1);

# the handler finds its table through the sink's search_path ("app" first),
# notes the settings it runs with, and on a "leak" event sets some for good
$node->safe_psql('postgres', q{
CREATE ROLE sink_owner LOGIN;
CREATE SCHEMA app AUTHORIZATION sink_owner;
CREATE TABLE app.seen (n serial, event_id text, search_path text, jit text, work_mem text,
                       application_name text, read_only text);
ALTER TABLE app.seen OWNER TO sink_owner;
CREATE FUNCTION public.settings_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen (event_id, search_path, jit, work_mem, application_name, read_only)
    VALUES (e.event_id, current_setting('search_path'), current_setting('jit'), current_setting('work_mem'),
            current_setting('application_name'), current_setting('transaction_read_only'));
    IF e.payload->>'leak' = 'yes' THEN
        PERFORM set_config('application_name', 'leaked', false);
        PERFORM set_config('default_transaction_read_only', 'on', false);
        PERFORM set_config('search_path', 'pg_temp, public', false);
        SET work_mem = '1234kB';
    END IF;
END
$$;
ALTER FUNCTION public.settings_apply(cqrs_event) OWNER TO sink_owner;
ALTER FUNCTION public.settings_apply(cqrs_event) SET jit = on;
SELECT cqrs_sink_create('settings', ARRAY['} . $topic . q{'], 'public.settings_apply(cqrs_event)',
                        '{"run_as": "sink_owner", "search_path": "app, public", "max_retries": 0}');
});

kafka_produce_events($topic,
	[ [ 'k', 'e-1', '{"leak":"yes"}' ], [ 'k', 'e-2', '{}' ], [ 'k', 'e-3', '{}' ] ]);
ok(wait_applied($node, 'settings', 3, 60), 'all three events are applied')
  or diag($node->safe_psql('postgres',
	"SELECT string_agg(status || ' ' || coalesce(last_error, ''), '; ') FROM cqrs_sink_held"));

my $seen = $node->safe_psql('postgres',
	"SELECT string_agg(concat_ws('|', event_id, search_path, jit, work_mem, read_only), ',' ORDER BY n) FROM app.seen");
is($seen, 'e-1|app, public|on|4MB|off,e-2|app, public|on|4MB|off,e-3|app, public|on|4MB|off',
	"each call runs with the sink's search_path and the handler's SET clause (jit, which the "
	  . "worker pins), whatever an earlier call set");
unlike($node->safe_psql('postgres', 'SELECT string_agg(application_name, \',\') FROM app.seen'),
	qr/leaked/, 'a setting a handler made does not outlive its call');
unlike($node->safe_psql('postgres',
	"SELECT application_name FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink'"),
	qr/leaked/, "nor stays in the worker's session");

# a later batch of the same worker still writes (its positions, the inbox)
kafka_produce_events($topic, [ [ 'k', 'e-4', '{}' ] ]);
ok(wait_applied($node, 'settings', 4, 60), 'a later batch is applied and its position stored');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'settings'"),
	'0', 'nothing is held');

$node->stop;
done_testing();
