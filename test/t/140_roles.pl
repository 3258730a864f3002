# The extension's roles (issue 13, item 4): cqrs_sync_operator,
# cqrs_sync_writer and cqrs_sync_reader are cluster-wide.  CREATE EXTENSION
# creates them if they do not exist and works with existing ones (a second
# database); they outlive DROP EXTENSION (other databases still use them)
# and are not in a database's pg_dump; once the extension is gone from
# every database nothing holds on to them, and DROP ROLE works.  A dump
# restores into a cluster that never had them.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;

my @roles = qw(cqrs_sync_operator cqrs_sync_reader cqrs_sync_writer);
my $roles_sql = q{SELECT string_agg(rolname || ':' || CASE WHEN rolcanlogin THEN 'login' ELSE 'nologin' END, ',' ORDER BY rolname)
                    FROM pg_roles WHERE rolname LIKE 'cqrs\_sync\_%'};

my $node = new_node('roles', _create_extension => 0, 'cqrs_sync.relay_enabled' => 'off');
is($node->safe_psql('postgres', $roles_sql), '', 'no cqrs_sync role before CREATE EXTENSION');

$node->safe_psql('postgres', 'CREATE DATABASE a');
$node->safe_psql('postgres', 'CREATE DATABASE b');
$node->safe_psql('postgres', 'CREATE DATABASE c');

# Two databases create the extension at the same time (a provisioning
# script, a test harness): the second waits for the first one's roles and
# then uses them.
my $sa = $node->background_psql('a');
my $sc = $node->background_psql('c', on_error_stop => 0);
$sa->query_safe('BEGIN; CREATE EXTENSION cqrs_sync');
$sc->query_until(qr/started/, "\\echo started\nCREATE EXTENSION cqrs_sync;\n");
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = 'c' AND wait_event_type = 'Lock'"),
	'the second CREATE EXTENSION waits for the first');
is($node->safe_psql('a', $roles_sql), '', '(the first has not committed its roles yet)');
$sa->query_safe('COMMIT');
$sc->query('SELECT 1');
is($sc->{stderr}, '', 'the second CREATE EXTENSION succeeds once the first committed')
  or diag($sc->{stderr});
is($node->safe_psql('c', "SELECT count(*) FROM pg_extension WHERE extname = 'cqrs_sync'"), '1',
	'... and the extension exists in both databases');
$sa->quit;
$sc->quit;
is($node->safe_psql('a', $roles_sql), join(',', map { "$_:nologin" } @roles),
	'CREATE EXTENSION creates the three roles, NOLOGIN');

my ($rc, $out, $err) = $node->psql('b', 'CREATE EXTENSION cqrs_sync');
is($rc, 0, 'CREATE EXTENSION in a third database works with the existing roles') or diag($err);
is($err, '', '... without a warning or notice');

# a read service and a write service in database b
my $setup = q{
	CREATE TABLE board (id bigint PRIMARY KEY, likes bigint NOT NULL DEFAULT 0, version bigint);
	GRANT SELECT, INSERT, UPDATE, DELETE ON board TO board_view;
};
$node->safe_psql('postgres', 'CREATE ROLE board_view LOGIN IN ROLE cqrs_sync_reader');
$node->safe_psql('postgres', 'CREATE ROLE board_service LOGIN IN ROLE cqrs_sync_writer');
$node->safe_psql($_, $setup) for qw(a b);
my $read  = q{SET ROLE board_view; SELECT cqrs_apply_delta('board', '1', '{"likes": 1}', 'board-view', 'e-' || random())};
my $write = q{SET ROLE board_service; SELECT cqrs_enqueue('orders', 'k', '{}') > 0};
is($node->safe_psql('b', $read), 't', 'database b: the read service works');
is($node->safe_psql('b', $write), 't', 'database b: the write service works');

# pg_dump of a database has no roles and no grants to them
my ($dump, $stderr) = ('', '');
IPC::Run::run([ 'pg_dump', '-d', $node->connstr('a') ], '<', \undef, '>', \$dump, '2>', \$stderr)
  or die "pg_dump failed: $stderr";
unlike($dump, qr/CREATE ROLE/, 'pg_dump does not dump the roles');
unlike($dump, qr/(GRANT|REVOKE) .*cqrs_sync_(operator|reader|writer)/,
	'... nor the extension\'s grants to them (CREATE EXTENSION makes those)');

# DROP EXTENSION in a: the roles stay, b is unaffected
$node->safe_psql('a', 'DROP EXTENSION cqrs_sync');
is($node->safe_psql('a', $roles_sql), join(',', map { "$_:nologin" } @roles), 'the roles outlive DROP EXTENSION');
is($node->safe_psql('b', $read), 't', 'database b: the read service still works');
($rc, $out, $err) = $node->psql('postgres', 'DROP ROLE cqrs_sync_reader');
isnt($rc, 0, 'DROP ROLE fails while another database still uses the role');
like($err, qr/cannot be dropped because some objects depend on it/, '... saying why');

# and again in a
($rc, $out, $err) = $node->psql('a', 'CREATE EXTENSION cqrs_sync');
is($rc, 0, 'CREATE EXTENSION again in a works') or diag($err);
is($node->safe_psql('a', $read), 't', 'database a: the read service works again');

# restore a's dump into a cluster that never had the roles
my $fresh = new_node('fresh', _create_extension => 0, 'cqrs_sync.relay_enabled' => 'off');
IPC::Run::run([ 'pg_dump', '-Fc', '-f', "$PostgreSQL::Test::Utils::tmp_check/a.dump", '-d', $node->connstr('a') ],
	'<', \undef, '>', \$out, '2>', \$stderr)
  or die "pg_dump failed: $stderr";
$fresh->safe_psql('postgres', 'CREATE ROLE board_view LOGIN');
$fresh->safe_psql('postgres', 'CREATE DATABASE a');
($out, $stderr) = ('', '');
IPC::Run::run([ 'pg_restore', '-d', $fresh->connstr('a'), "$PostgreSQL::Test::Utils::tmp_check/a.dump" ],
	'<', \undef, '>', \$out, '2>', \$stderr);
is($stderr, '', 'the dump restores into a cluster without the roles, without an error');
is($fresh->safe_psql('a', $roles_sql), join(',', map { "$_:nologin" } @roles),
	'the restore created the roles (CREATE EXTENSION did)');
$fresh->safe_psql('postgres', 'GRANT cqrs_sync_reader TO board_view');
is($fresh->safe_psql('a', "SET ROLE board_view; SELECT cqrs_apply_delta('board', '1', '{\"likes\": 1}', 'board-view', 'e-restored')"),
	't', 'the read service works there');
$fresh->stop;

# gone from every database: nothing holds on to the roles
$node->safe_psql($_, 'DROP EXTENSION cqrs_sync') for qw(a b c);
$node->safe_psql('postgres', 'DROP DATABASE a');
$node->safe_psql('b', 'REVOKE ALL ON board FROM board_view');
($rc, $out, $err) = $node->psql('postgres', 'DROP ROLE cqrs_sync_operator, cqrs_sync_reader, cqrs_sync_writer');
is($rc, 0, 'after DROP EXTENSION everywhere, DROP ROLE of the three roles works') or diag($err);
($rc, $out, $err) = $node->psql('b', 'CREATE EXTENSION cqrs_sync');
is($rc, 0, 'and CREATE EXTENSION creates them again') or diag($err);
is($node->safe_psql('b', $roles_sql), join(',', map { "$_:nologin" } @roles), '... all three');

$node->stop;
done_testing();
