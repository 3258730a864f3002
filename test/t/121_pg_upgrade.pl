# A cluster with cqrs_sync goes through pg_upgrade and keeps every row: the
# outbox, the relay's mark, a sink with its handler and its positions.  The
# sink's handler was a regprocedure column, a reg* type that pg_upgrade
# refuses in user tables (function OIDs are not kept), so every cluster with
# the extension failed pg_upgrade's checks, sinks or not.  Both clusters are
# PostgreSQL 15 (the one installed here): pg_upgrade runs its checks and
# its dump and restore of the schema all the same.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;

my %conf = ('cqrs_sync.relay_enabled' => 'off', 'cqrs_sync.sink_workers' => '1');
my $old = new_node('pgup_old', %conf);
my $topic = unique_topic('pg-upgrade');
create_topic($topic, 1);

$old->safe_psql('postgres', qq{
CREATE SCHEMA app;
CREATE TABLE app.seen (event_id text);
CREATE FUNCTION app.apply(e cqrs_event) RETURNS void LANGUAGE sql AS
    \$\$ INSERT INTO app.seen VALUES (e.event_id) \$\$;
SELECT cqrs_sink_create('up', ARRAY['$topic'], 'app.apply(cqrs_event)');
SELECT cqrs_enqueue('orders', 'k' || g, jsonb_build_object('n', g)) FROM generate_series(1, 5) g;
});
kafka_produce_events($topic, [ map { [ "k$_", "before-$_", '{}' ] } 1 .. 5 ]);
ok(wait_applied($old, 'up', 5, 60), 'before the upgrade, the sink applies 5 events');

my $snapshot = q{
	SELECT (SELECT string_agg(id || ':' || status || ':' || event_id, ',' ORDER BY id) FROM cqrs_outbox),
	       (SELECT scan_from FROM cqrs_relay_mark),
	       (SELECT string_agg(topic || ':' || "partition" || ':' || next_offset, ',') FROM cqrs_sink_offset),
	       (SELECT count(*) FROM app.seen)};
my $before = $old->safe_psql('postgres', $snapshot);
$old->stop;

my $new = new_node('pgup_new', %conf, _start => 0);
my $bindir = $old->config_data('--bindir');
my $work = PostgreSQL::Test::Utils::tempdir;
chdir $work or die "chdir $work: $!";
my ($stdout, $stderr) = ('', '');
my $ok = IPC::Run::run(
	[ "$bindir/pg_upgrade", '--no-sync',
	  '-b', $bindir, '-B', $bindir,
	  '-d', $old->data_dir, '-D', $new->data_dir,
	  '-p', $old->port, '-P', $new->port, '-s', $new->host ],
	'<', \undef, '>', \$stdout, '2>', \$stderr);
ok($ok, 'pg_upgrade succeeds') or diag("pg_upgrade:\n$stdout$stderr");

SKIP:
{
	skip 'pg_upgrade failed', 6 unless $ok;
	$new->start;
	is($new->safe_psql('postgres', $snapshot), $before,
		'after it, the outbox, the mark, the positions and the read model are the same');
	is($new->safe_psql('postgres', 'SELECT handler::regprocedure::text FROM cqrs_sink'),
		'app.apply(cqrs_event)', 'the sink names its handler, resolved in the new cluster');
	kafka_produce_events($topic, [ map { [ "k$_", "after-$_", '{}' ] } 1 .. 3 ]);
	ok(wait_applied($new, 'up', 8, 60), 'the sink goes on from its position: 3 more events');
	is($new->safe_psql('postgres', "SELECT count(*), count(*) FILTER (WHERE event_id LIKE 'after-%') FROM app.seen"),
		'8|3', 'each event applied once');

	# the sink keeps its handler by name: dropped, the sink says so and
	# waits; created again (another OID), the sink finds it
	$new->safe_psql('postgres', 'DROP FUNCTION app.apply(cqrs_event)');
	kafka_produce_events($topic, [ [ 'k1', 'gone-1', '{}' ] ]);
	ok(wait_for($new, "SELECT last_error FROM cqrs_sink_workers()",
			'sink "up": the handler app.apply(public.cqrs_event) of sink "up" does not exist', 60),
		'without its handler, the sink waits and says which function is missing');
	$new->safe_psql('postgres', q{CREATE FUNCTION app.apply(e cqrs_event) RETURNS void LANGUAGE sql AS
		$$ INSERT INTO app.seen VALUES (e.event_id) $$});
	ok(wait_applied($new, 'up', 9, 60), 'created again, the handler applies the waiting event');
	$new->stop;
}
done_testing();
