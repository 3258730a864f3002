# A reader with no privilege on a table may not make the read-side helpers
# queue a lock on it: cqrs_upsert() locked its target first and checked the
# caller's privileges after, so any member of cqrs_sync_reader could wait in
# the lock queue of any table (holding up every later lock, DDL's and
# readers' alike) and have it described.  LOCK TABLE refuses first; so do
# the helpers now.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('apply_lock', 'cqrs_sync.relay_enabled' => 'off');
$node->safe_psql('postgres', q{
	CREATE ROLE nosy IN ROLE cqrs_sync_reader;
	CREATE TABLE payroll (id int PRIMARY KEY, amount int, version bigint);
	CREATE TABLE board (id int PRIMARY KEY, title text, version bigint);
	GRANT SELECT, INSERT (id, title, version), UPDATE (title, version) ON board TO nosy;
});

my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK TABLE payroll IN ACCESS EXCLUSIVE MODE');

my ($rc, $out, $err) = $node->psql('postgres', q{
	SET ROLE nosy;
	SET lock_timeout = '3s';
	SELECT cqrs_upsert('payroll', '{"id": 1, "amount": 1}', 1);});
like($err, qr/ERROR:  permission denied for table payroll/,
	'a table the caller has no privilege on is refused at once, not waited for');
unlike($err, qr/lock timeout/, 'no wait in its lock queue');

($rc, $out, $err) = $node->psql('postgres', q{
	SET ROLE nosy;
	SELECT cqrs_upsert('board', '{"id": 1, "title": "a"}', 1);});
is($err, '', 'a reader with privileges on the table is not refused: the upsert runs') or diag($err);
$locker->quit;

$node->stop;
done_testing();
