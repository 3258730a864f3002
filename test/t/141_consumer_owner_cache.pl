# A session keeps the owners of consumer names it looked up, until
# cqrs_consumer changes, a role changes or a transaction rolls back.  Two
# ways it kept a stale owner, and let a role record events under a consumer
# name another role owns (whose events it would then skip):
#  - a claim in a prepared transaction, rolled back later (ROLLBACK PREPARED,
#    from another session);
#  - the extension dropped and created again in the same schema: the
#    session watched the old cqrs_consumer for changes, never the new one.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('owner_cache', 'cqrs_sync.relay_enabled' => 'off',
	'max_prepared_transactions' => '2');
$node->safe_psql('postgres', q{
	CREATE ROLE svc_a IN ROLE cqrs_sync_reader;
	CREATE ROLE svc_b IN ROLE cqrs_sync_reader;
});

# ---- a claim in a prepared transaction ---------------------------------------
my $a = $node->background_psql('postgres', on_error_stop => 0);
$a->query_safe('SET ROLE svc_a');
$a->query_safe(q{BEGIN; SELECT cqrs_mark_processed('board-view', 'e1'); PREPARE TRANSACTION 'claim'});
$node->safe_psql('postgres', "ROLLBACK PREPARED 'claim'");
$node->safe_psql('postgres', q{SET ROLE svc_b; SELECT cqrs_mark_processed('board-view', 'e2')});
is($node->safe_psql('postgres', q{SELECT owner FROM cqrs_consumer WHERE consumer = 'board-view'}),
	'svc_b', 'the claim was rolled back, and svc_b claimed the name');
$a->query(q{SELECT cqrs_mark_processed('board-view', 'e3')});
like($a->{stderr}, qr/ERROR:  .*board-view/,
	'the session of svc_a, whose claim was prepared and rolled back, may not use the name');
$a->{stderr} = '';

# ---- the extension dropped and created again ---------------------------------
$a->query_safe(q{SELECT cqrs_mark_processed('list-view', 'e1')});
$node->safe_psql('postgres', 'DROP EXTENSION cqrs_sync; CREATE EXTENSION cqrs_sync');
$node->safe_psql('postgres', q{SET ROLE svc_a; SELECT cqrs_mark_processed('list-view', 'e1')});
$a->query_safe(q{SELECT cqrs_mark_processed('list-view', 'e2')});
is($a->{stderr}, '', 'after DROP and CREATE EXTENSION, svc_a uses its name in the new tables');
$node->safe_psql('postgres', q{SELECT cqrs_set_consumer_owner('list-view', 'svc_b')});
$a->query(q{SELECT cqrs_mark_processed('list-view', 'e3')});
like($a->{stderr}, qr/ERROR:  .*list-view/,
	'once the name is given to svc_b, the session of svc_a may not use it');
is($node->safe_psql('postgres', q{SELECT count(*) FROM cqrs_inbox WHERE consumer = 'list-view'}), '2',
	'and recorded nothing under it');
$a->quit;

$node->stop;
done_testing();
