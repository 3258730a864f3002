# Upgrades keep every row and end in exactly the schema of a fresh install:
# version 0.1.0 is installed and filled (outbox rows in every status, audit,
# inbox, tombstones), then ALTER EXTENSION cqrs_sync UPDATE.  A second
# database gets a fresh CREATE EXTENSION.  Both are compared with
# pg_dump --schema-only after every member object was detached from the
# extension in a scratch copy (pg_dump does not print extension members), so
# tables, columns, defaults, constraints, indexes, functions, views, grants
# and comments all take part.  Also: the C library serves the 0.1.0 SQL
# definitions until the update (versioned entry points).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('upgrade', _create_extension => 0, 'cqrs_sync.relay_enabled' => 'off');

my $default = $node->safe_psql('postgres',
	"SELECT default_version FROM pg_available_extensions WHERE name = 'cqrs_sync'");
my @versions = split /\n/, $node->safe_psql('postgres',
	"SELECT version FROM pg_available_extension_versions WHERE name = 'cqrs_sync' ORDER BY version");
ok((grep { $_ eq '0.1.0' } @versions), "0.1.0 is still installable (versions: @versions)");
isnt($default, '0.1.0', "the default version ($default) is newer than 0.1.0");

# ---- 0.1.0, with data ------------------------------------------------------
$node->safe_psql('postgres', 'CREATE DATABASE old');
$node->safe_psql('old', "CREATE EXTENSION cqrs_sync VERSION '0.1.0'");
$node->safe_psql('old', q{
	SELECT cqrs_enqueue('orders', 'k' || g, jsonb_build_object('n', g)) FROM generate_series(1, 10) g;
	UPDATE cqrs_outbox SET status = 'SENT', sent_at = now() WHERE id <= 4;
	UPDATE cqrs_outbox SET status = 'DEAD_LETTERED', last_error = 'too large' WHERE id = 5;
	UPDATE cqrs_outbox SET status = 'DLT_FAILED', last_error = 'dlt refused', dlt_retry_count = 1 WHERE id = 6;
	SELECT cqrs_discard(7, 'test data');
	SELECT cqrs_retry(6);
	UPDATE cqrs_outbox SET status = 'DLT_FAILED' WHERE id = 6;
	SELECT cqrs_approve_purge(ARRAY[5]);
	CREATE TABLE board (id bigint PRIMARY KEY, title text, likes bigint NOT NULL DEFAULT 0, version bigint);
	SELECT cqrs_mark_processed('board-view', 'e' || g) FROM generate_series(1, 5) g;
	SELECT cqrs_upsert('board', '{"id": 1, "title": "a"}', 3);
	SELECT cqrs_upsert('board', '{"id": 2, "title": "b"}', 3);
	SELECT cqrs_delete('board', '{"id": 2}', 4);
	SELECT cqrs_apply_delta('board', '{"id": 1}', '{"likes": 2}', 'board-view', 'd1');
});
is($node->safe_psql('old', "SELECT (cqrs_outbox_stats()).pending"), '3',
	'0.1.0 stats work with the new library (its own entry points)');
is($node->safe_psql('old', "SELECT complete FROM cqrs_cleanup()"), 't',
	'0.1.0 cqrs_cleanup() works with the new library');
is($node->safe_psql('old', "SELECT count(*) FROM cqrs_dlt_depth"), '0',
	'0.1.0 cqrs_dlt_depth works with the new library');
ok(defined $node->safe_psql('old', "SELECT state FROM cqrs_stats_relay"),
	'0.1.0 relay view works with the new library');

my $snapshot = q{
	SELECT 'outbox', count(*), string_agg(id || ':' || status || ':' || event_id, ',' ORDER BY id) FROM cqrs_outbox
	UNION ALL SELECT 'audit', count(*), string_agg(action || ':' || outbox_id, ',' ORDER BY audit_id) FROM cqrs_outbox_audit
	UNION ALL SELECT 'inbox', count(*), string_agg(consumer || ':' || event_id, ',' ORDER BY consumer, event_id) FROM cqrs_inbox
	UNION ALL SELECT 'tombstone', count(*), string_agg(key::text || ':' || version, ',') FROM cqrs_tombstone
	UNION ALL SELECT 'board', count(*), string_agg(id || ':' || title || ':' || likes || ':' || version, ',' ORDER BY id) FROM board
	UNION ALL SELECT 'seq', 1, (SELECT last_value::text FROM cqrs_outbox_id_seq)
};
my $before = $node->safe_psql('old', $snapshot);

my ($rc, $out, $err) = $node->psql('old', 'ALTER EXTENSION cqrs_sync UPDATE');
is($rc, 0, 'ALTER EXTENSION cqrs_sync UPDATE succeeds') or diag($err);
is($node->safe_psql('old', "SELECT extversion FROM pg_extension WHERE extname = 'cqrs_sync'"),
	$default, "updated to $default");
# 0.2.0 keeps the memory of cqrs_apply_delta() in cqrs_delta_inbox (0.1.0:
# in the inbox, as consumer "<consumer>/delta/<target oid>" and event id
# "<event_id> <key>"): shown as 0.1.0 showed it, the rows are the same.
(my $snapshot_after = $snapshot) =~ s{FROM cqrs_inbox}{FROM (SELECT consumer, event_id FROM cqrs_inbox
	UNION ALL SELECT consumer || '/delta/' || target::oid, event_id || ' ' || key FROM cqrs_delta_inbox) i};
is($node->safe_psql('old', $snapshot_after), $before, 'no row lost or changed by the update');
is($node->safe_psql('old', "SELECT count(*) FROM cqrs_delta_inbox"), '1',
	'the memory of cqrs_apply_delta() moved to cqrs_delta_inbox');
is($node->safe_psql('old', "SELECT count(*) FROM cqrs_tombstone WHERE key_hash = 0"), '0',
	'every tombstone has its key hash');
is($node->safe_psql('old', q{SELECT cqrs_apply_delta('board', '{"id": 1}', '{"likes": 2}', 'board-view', 'd1')}),
	'f', 'a delta applied before the update is still remembered');
is($node->safe_psql('old', q{SELECT cqrs_upsert('board', '{"id": 2, "title": "b"}', 4)}),
	'f', 'a delete before the update still stops an older upsert');
is($node->safe_psql('old', "SELECT cqrs_enqueue('orders', 'k', '{}') > 10"), 't',
	'the id sequence continues after the update');
# 0.2.0's new functions work on the updated database: an attached table
$node->safe_psql('old', q{
	CREATE TABLE app_outbox (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb);
	SELECT cqrs_attach_outbox('app_outbox');
	INSERT INTO app_outbox VALUES ('7f1c0e4a-9d55-4c1b-8c43-2f1e51a0b7d2', 'order', 'o-1', 'OrderCreated', '{}');
});
is( $node->safe_psql('old',
		"SELECT topic || ' ' || key FROM cqrs_outbox WHERE event_id = '7f1c0e4a-9d55-4c1b-8c43-2f1e51a0b7d2'"),
	'outbox.event.order o-1', 'a table attached after the update publishes its rows');
$node->safe_psql('old', "SELECT cqrs_detach_outbox('app_outbox'); DROP TABLE app_outbox");

# Every C entry point that returns a row checks the row type it was given
# (pg_stat_statements does the same): an SQL definition of another layout
# gets an error, never a row read with the wrong layout.
my @record_fns = split /\n/, $node->safe_psql('old', q{
	SELECT p.prosrc || '|' || p.proretset || '|' || (SELECT count(*) FROM unnest(p.proargmodes) m WHERE m IN ('o', 't', 'b'))
	  FROM pg_proc p
	 WHERE p.probin LIKE '%cqrs_sync' AND p.prorettype = 'record'::regtype
	 ORDER BY 1});
cmp_ok(scalar @record_fns, '>=', 3, 'the library has entry points returning rows (' . join(', ', @record_fns) . ')');
for my $f (@record_fns, 'cqrs_relay_state|false|13')   # and 0.1.0's layout
{
	my ($symbol, $set, $ncols) = split /\|/, $f;
	for my $cols ($ncols - 1, $ncols + 1)
	{
		my $outs = join(', ', map { "OUT c$_ text" } 1 .. $cols);
		my ($rc, $out, $err) = $node->psql('old', qq{
			CREATE FUNCTION pg_temp.wrong_layout($outs) RETURNS } . ($set eq 'true' ? 'SETOF record' : 'record') . qq{
			    AS '\$libdir/cqrs_sync', '$symbol' LANGUAGE C;
			SELECT * FROM pg_temp.wrong_layout();});
		like($err, qr/ERROR:  .*returns $cols columns, the library expected/,
			"$symbol refuses a definition of $cols columns");
	}
}
is($node->safe_psql('old', 'SELECT 1'), '1', 'the server survived every wrong definition');

# ---- an update while a consumer applies a delta ------------------------------------
# The update moves the memory of cqrs_apply_delta() out of the inbox.  A
# consumer's transaction that wrote such memory before the update and
# commits while it runs must not leave it behind, where 0.2.0 never looks
# (a redelivered delta would be added again): the update waits for it.
$node->safe_psql('postgres', 'CREATE DATABASE race');
$node->safe_psql('race', "CREATE EXTENSION cqrs_sync VERSION '0.1.0'");
$node->safe_psql('race',
	'CREATE TABLE board (id bigint PRIMARY KEY, likes bigint NOT NULL DEFAULT 0, version bigint)');
my $consumer = $node->background_psql('race');
$consumer->query_safe(
	q{BEGIN; SELECT cqrs_apply_delta('board', '{"id": 1}', '{"likes": 1}', 'board-view', 'e-42')});
my $updater = $node->background_psql('race', on_error_stop => 0);
$updater->query_until(qr/started/, "\\echo started\nALTER EXTENSION cqrs_sync UPDATE;\n");
# the update is done, or waits for a lock (the consumer's)
ok(wait_for($node, q{SELECT count(*) FROM pg_stat_activity
	WHERE datname = 'race' AND (wait_event_type = 'Lock' OR (state = 'idle' AND query LIKE 'ALTER EXTENSION%'))},
	'1', 60), 'the update ran as far as it could');
$consumer->query_safe('COMMIT');
$updater->query('SELECT 1');
is($updater->{stderr}, '', 'the update succeeds') or diag($updater->{stderr});
$consumer->quit;
$updater->quit;
is($node->safe_psql('race', "SELECT count(*) FROM cqrs_inbox WHERE consumer LIKE '%/delta/%'"), '0',
	'no memory of a delta is left in the inbox');
is($node->safe_psql('race',
		q{SELECT cqrs_apply_delta('board', '{"id": 1}', '{"likes": 1}', 'board-view', 'e-42')}),
	'f', 'the delta committed during the update is remembered');
is($node->safe_psql('race', 'SELECT likes FROM board'), '1', 'and counted once');

# ---- keys written with other settings -------------------------------------------
# 0.1.0 wrote the texts of a key with the writing session's settings; 0.2.0
# spells them with fixed ones (UTC, ISO) and compares the memory of deltas by
# its text.  The update spells them again, parsed with its session's
# settings.  (The rows are written as the 0.1.0 library wrote them: this
# library's 0.1.0 entry points spell keys as 0.2.0 does already.)
$node->safe_psql('postgres', 'CREATE DATABASE spell');
$node->safe_psql('spell', "CREATE EXTENSION cqrs_sync VERSION '0.1.0'");
$node->safe_psql('spell', q{
	CREATE TABLE hourly (bucket timestamptz PRIMARY KEY, likes bigint NOT NULL DEFAULT 0, version bigint);
	CREATE TABLE daily (day date PRIMARY KEY, title text, version bigint);
	INSERT INTO hourly VALUES ('2026-11-30 00:00:00+00', 1, NULL);
	INSERT INTO cqrs_inbox (consumer, event_id)
	VALUES ('board-view/delta/' || 'hourly'::regclass::oid, 'e9 {"bucket": "2026-11-30 09:00:00+09"}');
	INSERT INTO cqrs_tombstone (target, key, version) VALUES ('daily', '{"day": "30/11/2026"}', 5);
	-- a table whose version column is not the update session's
	-- cqrs_sync.version_column, and one keyed by jsonb
	CREATE TABLE daily_rev (day date PRIMARY KEY, title text, rev bigint);
	INSERT INTO cqrs_tombstone (target, key, version) VALUES ('daily_rev', '{"day": "30/11/2026"}', 5);
	CREATE TABLE tagged (tag jsonb PRIMARY KEY, title text, version bigint);
	-- 0.2.0 fits a key to its column's type modifier (1.04 is 1.0 here)
	CREATE TABLE ledger (id numeric(6,1) PRIMARY KEY, amount bigint NOT NULL DEFAULT 0, version bigint);
	INSERT INTO ledger VALUES (1.0, 1, NULL);
	INSERT INTO cqrs_inbox (consumer, event_id)
	VALUES ('board-view/delta/' || 'ledger'::regclass::oid, 'e7 {"id": "1.04"}');
	INSERT INTO cqrs_tombstone (target, key, version) VALUES ('tagged', '{"tag": "{\\"a\\": 1}"}', 5);
});
($rc, $out, $err) = $node->psql('spell',
	"SET TimeZone = 'Asia/Seoul'; SET DateStyle = 'SQL, DMY'; ALTER EXTENSION cqrs_sync UPDATE");
is($rc, 0, 'the update with the consumers\' settings succeeds') or diag($err);
is($node->safe_psql('spell',
		q{SELECT cqrs_apply_delta('hourly', '{"bucket": "2026-11-30T00:00:00Z"}', '{"likes": 1}', 'board-view', 'e9')}),
	'f', 'a delta remembered with a key written in another time zone is not applied again');
is($node->safe_psql('spell', 'SELECT likes FROM hourly'), '1', 'and not counted twice');
is($node->safe_psql('spell', q{SELECT cqrs_upsert('daily', '{"day": "2026-11-30", "title": "old"}', 4)}),
	'f', 'a tombstone of a date written day first still stops an older upsert');
is($node->safe_psql('spell', q{SET cqrs_sync.version_column = 'rev';
		SELECT cqrs_upsert('daily_rev', '{"day": "2026-11-30", "title": "old"}', 4)}),
	'f', 'so does one of a table whose version column has another name');
is($node->safe_psql('spell', q{SELECT key->>'tag' FROM cqrs_tombstone WHERE target = 'tagged'::regclass}),
	'{"a": 1}', 'a jsonb key keeps its value');
is($node->safe_psql('spell', q{SELECT cqrs_upsert('tagged', '{"tag": {"a": 1}, "title": "old"}', 4)}),
	'f', 'and its tombstone still stops an older upsert');
is($node->safe_psql('spell',
		q{SELECT cqrs_apply_delta('ledger', '{"id": 1.04}', '{"amount": 1}', 'board-view', 'e7')}),
	'f', 'a delta remembered with a key 0.2.0 fits to numeric(6,1) is not applied again');
is($node->safe_psql('spell', 'SELECT count(*) FROM cqrs_tombstone WHERE key_hash = 0'), '0',
	'every tombstone has its key hash');

# ---- a fresh install ------------------------------------------------------------
$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION cqrs_sync');
$node->safe_psql('fresh',
	'CREATE TABLE board (id bigint PRIMARY KEY, title text, likes bigint NOT NULL DEFAULT 0, version bigint)');

# ---- compare the schemas ------------------------------------------------------------
# A scratch copy of each database in which every member object is detached
# from the extension, so that pg_dump --schema-only prints it.
sub schema_of
{
	my ($db) = @_;
	my $copy = "${db}_schema";
	$node->safe_psql('postgres', "CREATE DATABASE $copy TEMPLATE $db");
	my $detach = $node->safe_psql($copy, q{
		SELECT string_agg(format('ALTER EXTENSION cqrs_sync DROP %s %s;', o.type, o.identity), E'\n'
		                  ORDER BY o.type, o.identity)
		  FROM pg_depend d
		  CROSS JOIN LATERAL pg_identify_object(d.classid, d.objid, d.objsubid) o
		 WHERE d.refclassid = 'pg_extension'::regclass
		   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cqrs_sync')
		   AND d.deptype = 'e'});
	$node->safe_psql($copy, $detach);
	my ($dump, $stderr) = ('', '');
	IPC::Run::run([ 'pg_dump', '--schema-only', '--no-owner', '-d', $node->connstr($copy) ],
		'<', \undef, '>', \$dump, '2>', \$stderr)
	  or die "pg_dump $copy failed: $stderr";
	$node->safe_psql('postgres', "DROP DATABASE $copy");
	# the extension's recorded version and the test's own data differ by design
	$dump =~ s/^(--|\\restrict |\\unrestrict ).*\n//mg;
	$dump =~ s/\n{2,}/\n\n/g;
	return $dump;
}

my $old_schema   = schema_of('old');
my $fresh_schema = schema_of('fresh');
cmp_ok(length($fresh_schema), '>', 10_000, 'the dump holds the extension\'s objects');
like($fresh_schema, qr/CREATE TABLE public\.cqrs_outbox /, 'the outbox table is in the dump');
like($fresh_schema, qr/GRANT .* ON FUNCTION public\.cqrs_enqueue/, 'grants are in the dump');

if ($old_schema eq $fresh_schema)
{
	pass('the updated schema equals a fresh install');
}
else
{
	fail('the updated schema equals a fresh install');
	my $dir = PostgreSQL::Test::Utils::tempdir('schemas');
	PostgreSQL::Test::Utils::append_to_file("$dir/updated.sql", $old_schema);
	PostgreSQL::Test::Utils::append_to_file("$dir/fresh.sql",   $fresh_schema);
	my ($d) = ('');
	IPC::Run::run([ 'diff', '-u', "$dir/updated.sql", "$dir/fresh.sql" ], '>', \$d);
	diag($d);
}

$node->stop;
done_testing();
