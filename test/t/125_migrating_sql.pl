# The migration guides cannot drift from the code: every ```sql block of
# docs/migrating.md runs, in the guide's order, with psql and ON_ERROR_STOP,
# against the real extension on a scenario shaped like the guide's (a Spring
# service's outbox_event table with published and unpublished rows, a
# Debezium-layout outboxevent table with its replication slot and
# publication, a read service's role, event ids exported from Redis), as the
# role the block's first line names ("-- as <role>"), else as a superuser.
# A block fails on any ERROR or WARNING.  Then the state the guide promises
# is checked, and docs/migrating.ko.md must hold the same SQL.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use DocSql;
use Encode ();
use PostgreSQL::Test::Utils;
use Test::More;

sub u8 { return Encode::encode('UTF-8', join('', @_)) }

my $repo = $ENV{CQRS_REPO} // "$FindBin::RealBin/../..";
my %text;
my %blocks;
for my $file ('docs/migrating.md', 'docs/migrating.ko.md')
{
	ok(-f "$repo/$file", "$file exists") or next;
	$text{$file} = slurp_file_utf8("$repo/$file");
	(undef, $blocks{$file}) = parse_markdown($text{$file});
}

my $node = new_node('migrating', 'wal_level' => 'logical', 'cqrs_sync.relay_enabled' => 'off');

# ---- the scenario ------------------------------------------------------------
my @redis_ids = ('11111111-1111-4111-8111-111111111111', '22222222-2222-4222-8222-222222222222');
my $ids_file = PostgreSQL::Test::Utils::tempdir() . '/processed_ids.txt';
PostgreSQL::Test::Utils::append_to_file($ids_file, join("\n", @redis_ids) . "\n");
chmod 0644, $ids_file;

$node->safe_psql('postgres', q{
CREATE ROLE order_service LOGIN IN ROLE cqrs_sync_writer;
CREATE ROLE board_view LOGIN;
-- the Spring service's table (Hibernate's names), two rows published, two not
CREATE TABLE outbox_event (
    id             uuid PRIMARY KEY,
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    event_type     varchar(255) NOT NULL,
    payload        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz);
ALTER TABLE outbox_event OWNER TO order_service;
INSERT INTO outbox_event VALUES
 ('a0000000-0000-4000-8000-000000000001', 'board', '42', 'BoardCreated', '{"v": 1}', now() - interval '3 min', now()),
 ('a0000000-0000-4000-8000-000000000002', 'board', '42', 'BoardRenamed', '{"v": 2}', now() - interval '2 min', now()),
 ('a0000000-0000-4000-8000-000000000003', 'board', '42', 'BoardArchived', '{"v": 3}', now() - interval '1 min', NULL),
 ('a0000000-0000-4000-8000-000000000004', 'board', '43', 'BoardCreated', '{"v": 1}', now(), NULL);
-- Debezium's layout, its slot and publication
CREATE TABLE outboxevent (
    id            uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb);
ALTER TABLE outboxevent OWNER TO order_service;
CREATE PUBLICATION dbz_publication FOR TABLE outboxevent;
SELECT pg_create_logical_replication_slot('debezium', 'pgoutput');
});

my %vars = (ids_file => $ids_file, slot => 'debezium', attach_lsn => undef, ids => undef);

sub run_block
{
	my ($sql, %v) = @_;
	my ($role) = $sql =~ /\A\s*--\s*as\s+(\w+)/;
	my @params = defined $role ? ('-U', $role) : ();
	for my $name (sort keys %v)
	{
		push @params, '-v', "$name=$v{$name}" if defined $v{$name};
	}
	my ($out, $err) = ('', '');
	my $ret = $node->psql('postgres', Encode::encode('UTF-8', $sql),
		extra_params => \@params, stdout => \$out, stderr => \$err, timeout => 60);
	my $ok = defined $ret && $ret == 0 && $err !~ /\b(ERROR|WARNING|FATAL|PANIC):/;
	return ($ok, Encode::decode('UTF-8', $out), Encode::decode('UTF-8', $err));
}

# the runner catches what the guide could get wrong
for my $bad ('SELECT cqrs_attach_outbox(\'no_such_table\');',
	"-- as board_view\nSELECT count(*) FROM cqrs_outbox;",
	'\copy no_such_table FROM :\'ids_file\'')
{
	my ($ok) = run_block($bad, %vars);
	ok(!$ok, "the runner rejects: $bad");
}

# ---- the English guide's SQL, in order ---------------------------------------
my $en = $blocks{'docs/migrating.md'} // [];
cmp_ok(scalar @$en, '>=', 12, 'docs/migrating.md has SQL blocks');
my $doc_vars = documented_variables($text{'docs/migrating.md'} // '');
is_deeply([ sort keys %$doc_vars ], [ sort keys %vars ], 'the guide documents exactly the variables its blocks use');
for my $b (@$en)
{
	my $name = "docs/migrating.md: $b->{section}: block $b->{n}";
	my @undoc = grep { !$doc_vars->{$_} } used_variables($b->{sql});
	ok(!@undoc, u8("$name uses documented variables only")) or diag("undocumented: @undoc");
	my ($ok, $out, $err) = run_block($b->{sql}, %vars);
	ok($ok, u8($name)) or diag(u8("SQL:\n$b->{sql}\nstderr:\n$err\nstdout:\n$out"));
	note(u8($out)) if $out ne '';
	# the guide prints the LSN to note: the later blocks use it
	$vars{attach_lsn} = $1 if $b->{sql} =~ /AS attach_lsn/ && $out =~ /^(\S+\/\S+)\s*$/m;
}
ok(defined $vars{attach_lsn}, 'the attach printed its LSN (' . ($vars{attach_lsn} // 'none') . ')');

# ---- what the guide promises ---------------------------------------------------
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_inbox WHERE consumer = 'board-view' AND event_id IN ('"
		  . join("', '", @redis_ids) . "')"),
	scalar @redis_ids, 'the event ids from Redis are in the inbox');
is( $node->safe_psql('postgres', "SELECT cqrs_mark_processed('board-view', '$redis_ids[0]')"),
	'f', 'an event Redis had seen is not applied again');
is( $node->safe_psql('postgres',
		"SELECT string_agg(e.event_type, ',' ORDER BY o.id) FROM cqrs_outbox o JOIN outbox_event e ON e.id = o.event_id"),
	'BoardArchived,BoardCreated',
	'the Spring table: the two unpublished rows were backfilled, in the order written, the published ones not');
is( $node->safe_psql('postgres',
		"SELECT topic || ' ' || key || ' ' || (headers->>'eventType') FROM cqrs_outbox ORDER BY id LIMIT 1"),
	'community.board.events 42 BoardArchived', 'with the processor\'s topic, key and headers');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox_event WHERE published_at IS NULL"),
	'0', 'going back marked what cqrs_sync had taken as published');
is($node->safe_psql('postgres', "SELECT string_agg(outbox::text, ',') FROM cqrs_attached_outboxes"),
	'outboxevent', 'the Debezium table is attached (the Spring one detached when going back)');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_replication_slots"), '0',
	'the Debezium slot is dropped');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_publication"), '0',
	'and its publication');
$node->safe_psql('postgres',
	"INSERT INTO outboxevent VALUES ('b0000000-0000-4000-8000-000000000001', 'order', 'o-1', 'OrderCreated', '{}')");
is($node->safe_psql('postgres', "SELECT topic || ' ' || key FROM cqrs_outbox WHERE event_id = 'b0000000-0000-4000-8000-000000000001'"),
	'outbox.event.order o-1', 'an insert into the Debezium table is an event of cqrs_sync');

# ---- the Korean guide holds the same SQL ---------------------------------------
my $ko = $blocks{'docs/migrating.ko.md'} // [];
is(scalar @$ko, scalar @$en, 'both guides have the same number of SQL blocks');
for my $i (0 .. $#$en)
{
	next if defined $ko->[$i] && normalized_sql($ko->[$i]{sql}) eq normalized_sql($en->[$i]{sql});
	fail('SQL block ' . ($i + 1) . " differs between the guides ($en->[$i]{section})");
	last;
}
is_deeply([ sort keys %{ documented_variables($text{'docs/migrating.ko.md'} // '') } ],
	[ sort keys %vars ], 'the Korean guide documents the same variables');

$node->stop;
done_testing();
