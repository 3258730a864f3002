# Without shared_preload_libraries (a read database): the extension installs,
# the read-side helpers and their settings work, cqrs_enqueue still writes
# the outbox (no relay sends it), and the stats say there is no relay.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('no_preload');
$node->init;
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION cqrs_sync');

is($node->safe_psql('postgres', "SHOW shared_preload_libraries"), '', 'cqrs_sync is not preloaded');

$node->safe_psql('postgres', 'CREATE TABLE board (id bigint PRIMARY KEY, title text, rev bigint NOT NULL DEFAULT 0)');
is( $node->safe_psql('postgres', q{
		SET cqrs_sync.version_column = 'rev';
		SELECT cqrs_upsert('board', '{"id": 1, "title": "a"}', 2),
		       cqrs_upsert('board', '{"id": 1, "title": "old"}', 1),
		       cqrs_mark_processed('c', 'e1'), cqrs_mark_processed('c', 'e1');
		SELECT title || ' ' || rev FROM board;}),
	"t|f|t|f\na 2",
	'read-side helpers and cqrs_sync.version_column work without preload');

is($node->safe_psql('postgres', "SELECT cqrs_enqueue('t', 'k', '{}') > 0"), 't',
	'cqrs_enqueue writes the outbox');
is($node->safe_psql('postgres', "SET synchronous_commit = off; SELECT cqrs_enqueue('t', 'k', '{}') > 0"),
	't', 'also in a transaction that commits without waiting for its flush');
is( $node->safe_psql('postgres',
		'SELECT pending, relay_pid IS NULL, relay_events_sent IS NULL FROM cqrs_outbox_stats()'),
	'2|t|t',
	'the stats show the PENDING row and no relay');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'cqrs_sync%'"),
	'0', 'no cqrs_sync worker runs');
$node->stop;
done_testing();
