# The runbooks cannot drift from the code:
#  - every alert of docs/monitoring/alerts.yml has a section in docs/runbook.md
#    and docs/runbook.ko.md whose heading is the alert name (GitHub anchor =
#    the alert name in lower case, which is what each runbook_url points to);
#  - every ```sql block of both runbooks runs, with psql and ON_ERROR_STOP,
#    against the real extension, on a scenario with rows in every status:
#    as the operator role the runbook describes (a member of
#    cqrs_sync_operator and pg_monitor), or as a superuser for blocks whose
#    first line is "-- superuser".  A block fails on any ERROR or WARNING, so
#    a function, column or view that does not exist fails the test;
#  - the psql variables the blocks use are the ones documented at the top of
#    each runbook, and both runbooks hold the same SQL.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use DocSql;
use PostgreSQL::Test::Utils;
use Test::More;
use Encode ();

# Test names and diagnostics carry the runbooks' (Korean) text; the TAP log
# (PostgreSQL::Test::SimpleTee) takes bytes.
sub u8 { return Encode::encode('UTF-8', join('', @_)) }

my $repo = $ENV{CQRS_REPO} // "$FindBin::RealBin/../..";
my @runbooks = ('docs/runbook.md', 'docs/runbook.ko.md');

# ---- alerts.yml ------------------------------------------------------------

my $alerts_yml = slurp_file_utf8("$repo/docs/monitoring/alerts.yml");
my @alerts     = $alerts_yml =~ /^\s*-\s*alert:\s*(\S+)\s*$/mg;
cmp_ok(scalar @alerts, '>=', 6, 'alerts.yml names its alerts (' . join(', ', @alerts) . ')');
my @anchors = $alerts_yml =~ m{runbook_url:\s*"[^"]*docs/runbook\.md#([^"]+)"}g;
is(scalar @anchors, scalar @alerts, 'every alert has a runbook_url into docs/runbook.md');

my (%text, %headings, %blocks);
for my $file (@runbooks)
{
	ok(-f "$repo/$file", "$file exists") or next;
	$text{$file} = slurp_file_utf8("$repo/$file");
	($headings{$file}, $blocks{$file}) = parse_markdown($text{$file});
	my %anchor = map { github_anchor($_->{text}) => 1 } @{ $headings{$file} };
	for my $alert (@alerts)
	{
		ok((grep { $_->{level} == 2 && $_->{text} eq $alert } @{ $headings{$file} })
			  && $anchor{ lc $alert },
			"$file: section $alert (anchor " . lc($alert) . ')');
	}
	if ($file eq 'docs/runbook.md')
	{
		ok($anchor{$_}, "$file: the runbook_url anchor $_ exists") for @anchors;
	}
	# links within the file land on a heading
	for my $link ($text{$file} =~ /\]\(#([^)]+)\)/g)
	{
		ok($anchor{$link}, u8("$file: the in-page link to $link has a heading"));
	}
}

# ---- the scenario ------------------------------------------------------------

my $node  = new_node('runbook', 'log_line_prefix' => '%m [%p] %e ');
my $topic = unique_topic('runbook');
my $uuid  = '7f1c0e4a-9d55-4c1b-8c43-2f1e51a0b7d2';

$node->safe_psql(
	'postgres', qq{
CREATE ROLE ops LOGIN IN ROLE cqrs_sync_operator, pg_monitor;
CREATE ROLE app_writer LOGIN IN ROLE cqrs_sync_writer;
CREATE ROLE board_view LOGIN IN ROLE cqrs_sync_reader;
CREATE TABLE board_detail (
    board_id bigint PRIMARY KEY,
    title    text,
    likes    bigint NOT NULL DEFAULT 0,
    version  bigint NOT NULL DEFAULT 0);
GRANT SELECT, INSERT, UPDATE, DELETE ON board_detail TO board_view;
});
# the read side as a read service leaves it: an upsert, a delta, a delete
$node->safe_psql(
	'postgres', qq{
SET ROLE board_view;
SELECT cqrs_mark_processed('board-view', '$uuid');
SELECT cqrs_upsert('board_detail', '{"board_id": 42, "title": "Roadmap"}', 3);
SELECT cqrs_apply_delta('board_detail', '{"board_id": 42}', '{"likes": 1}', 'board-view', '$uuid');
SELECT cqrs_delete('board_detail', '{"board_id": 43}', 5);
});

# The sink's sections (issue 14): a paused sink "board-view" on a topic of
# its own, and held events in every status, as its workers would have left
# them (reset with the outbox rows below).
my $sink_topic = unique_topic('runbook-sink');
$node->safe_psql(
	'postgres', qq{
CREATE FUNCTION runbook_apply(e cqrs_event) RETURNS void LANGUAGE sql AS \$\$ SELECT \$\$;
GRANT EXECUTE ON FUNCTION runbook_apply(cqrs_event) TO board_view;
SELECT cqrs_sink_create('board-view', ARRAY['$sink_topic'], 'runbook_apply(cqrs_event)',
                        '{"run_as": "board_view"}');
SELECT cqrs_sink_pause('board-view');
});
my $sink_reset_sql = qq{
UPDATE cqrs_sink SET paused = true WHERE name = 'board-view' AND NOT paused;
DELETE FROM cqrs_sink_held WHERE sink = 'board-view';
INSERT INTO cqrs_sink_offset (sink, topic, "partition", next_offset, applied, dead_lettered, dlt_failed)
VALUES ('board-view', '$sink_topic', 0, 40, 30, 1, 1)
ON CONFLICT DO NOTHING;
INSERT INTO cqrs_sink_held (sink, topic, "partition", "offset", key, value, headers, event_id, status,
                            attempts, next_attempt_at, last_error, dlt_topic, dlt_partition, dlt_offset,
                            dead_lettered_at)
VALUES ('board-view', '$sink_topic', 0, 31, 'board-7', '{"n": 31}', '{"event_id": "e31"}', 'e31', 'RETRY',
        2, now() + interval '1 hour', 'column "titel" does not exist', NULL, NULL, NULL, NULL),
       ('board-view', '$sink_topic', 0, 33, 'board-7', '{"n": 33}', '{"event_id": "e33"}', 'e33', 'BLOCKED',
        0, NULL, NULL, NULL, NULL, NULL, NULL),
       ('board-view', '$sink_topic', 0, 12, 'board-3', '{"n": 12}', '{"event_id": "e12"}', 'e12', 'DEAD_LETTERED',
        6, NULL, 'division by zero', '$sink_topic.board-view.DLT', 0, 0, now() - interval '5 minutes'),
       ('board-view', '$sink_topic', 0, 20, 'board-4', '{"n": 20}', '{"event_id": "e20"}', 'e20', 'DLT_FAILED',
        6, NULL, 'division by zero; dead-letter topic "$sink_topic.board-view.DLT": MSG_SIZE_TOO_LARGE: Broker: Message size too large',
        NULL, NULL, NULL, NULL);
SELECT 'held:' || status, min(id) FROM cqrs_sink_held WHERE sink = 'board-view' GROUP BY status;
};

# Rows in every status, inserted as the relay would have left them.  PENDING
# rows wait for a retry an hour away, so the relay leaves them alone.
my $too_large = qq{MSG_SIZE_TOO_LARGE: message of 300042 bytes exceeds max.message.bytes 200000 of topic "$topic"};
my $reset_sql = qq{
DELETE FROM cqrs_outbox;
DELETE FROM cqrs_outbox_audit;
INSERT INTO cqrs_inbox (consumer, event_id) VALUES ('board-view', '$uuid') ON CONFLICT DO NOTHING;
INSERT INTO cqrs_outbox (event_id, topic, key, payload, headers, status, retry_count, dlt_retry_count,
                         next_attempt_at, last_error, created_at, sent_at)
VALUES ('$uuid', '$topic', 'board-1', '{"n": 1}', '{"source": "runbook-test"}', 'SENT', 0, 0,
        NULL, NULL, now() - interval '2 days', now() - interval '2 days'),
       (gen_random_uuid(), '$topic', 'board-2', '{"n": 2}', NULL, 'PENDING', 3, 0,
        now() + interval '1 hour', '$too_large', now() - interval '10 minutes', NULL),
       (gen_random_uuid(), '$topic', 'board-3', '{"n": 3}', NULL, 'DEAD_LETTERED', 6, 0,
        NULL, '$too_large', now() - interval '1 hour', NULL),
       (gen_random_uuid(), '$topic', 'board-4', '{"n": 4}', NULL, 'DLT_FAILED', 6, 1,
        NULL, '$too_large; dead-letter topic "$topic.DLT": UNKNOWN_TOPIC_OR_PART: Broker: Unknown topic or partition',
        now() - interval '30 minutes', NULL),
       (gen_random_uuid(), '$topic', 'board-4', '{"n": 5}', NULL, 'SENT', 0, 0,
        NULL, NULL, now() - interval '29 minutes', now() - interval '29 minutes'),
       (gen_random_uuid(), '$topic', 'board-5', '{"n": 6}', NULL, 'DLT_FAILED', 6, 1,
        NULL, '$too_large; dead-letter topic "$topic.DLT": TOPIC_AUTHORIZATION_FAILED: Broker: Topic authorization failed',
        now() - interval '8 days', NULL);
-- a failed row an operator already approved for purging
UPDATE cqrs_outbox SET purge_approved_by = 'ops', purge_approved_at = now()
 WHERE key = 'board-5';
SELECT status, min(id) FROM cqrs_outbox GROUP BY status ORDER BY status;
};

# Which row :id names: the kind of row the section is about.
my %id_status = (
	CqrsSyncDltMessages => 'DEAD_LETTERED',
	CqrsSyncOutboxStuck => 'PENDING');
# Which held event :held_id names (default: a DEAD_LETTERED one).
my %held_status = (CqrsSyncSinkFailed => 'DLT_FAILED');

sub reset_scenario
{
	my %ids = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres', $reset_sql . $sink_reset_sql);
	return \%ids;
}

my %vars = (
	id        => undef,    # per block, from the scenario
	topic     => $topic,
	dlt_topic => "$topic.DLT",
	reason    => 'runbook test: an event created by mistake',
	operator  => 'ops',
	pid       => undef,    # per block, a session holding an open transaction
	consumer  => 'board-view',
	event_id  => $uuid,
	target    => 'board_detail',
	reader    => 'board_view',
	sink      => 'board-view',
	held_id   => undef,    # per block, from the scenario
);

# Run one block; returns (ok, stdout, stderr).
sub run_block
{
	my ($sql, %v) = @_;
	my $super = ($sql =~ /\A\s*--\s*superuser\b/);
	my @params = $super ? () : ('-U', 'ops');
	for my $name (sort keys %v)
	{
		push @params, '-v', "$name=$v{$name}" if defined $v{$name};
	}
	my ($out, $err) = ('', '');
	my $ret = $node->psql(
		'postgres', Encode::encode('UTF-8', $sql),
		extra_params => \@params,
		stdout       => \$out,
		stderr       => \$err,
		timeout      => 60);
	$out = Encode::decode('UTF-8', $out);
	$err = Encode::decode('UTF-8', $err);
	my $ok = defined $ret && $ret == 0 && $err !~ /\b(ERROR|WARNING|FATAL|PANIC):/;
	return ($ok, $out, $err);
}

# The runner must catch what the docs could get wrong.
{
	my %v = (%vars, id => 1, pid => 1);
	my @bad = (
		'SELECT no_such_column FROM cqrs_outbox;',
		'SELECT * FROM cqrs_no_such_view;',
		'SELECT cqrs_no_such_function(:id);',
		'SELECT :undocumented_variable;',
		"SELECT cqrs_retry(id) FROM cqrs_outbox WHERE status = 'NO_SUCH_STATUS';",
		'DELETE FROM cqrs_outbox;',    # an operator may not
		'VACUUM cqrs_outbox;',         # WARNING only, for a non-owner
	);
	for my $sql (@bad)
	{
		my ($ok) = run_block($sql, %v);
		ok(!$ok, "the runner rejects: $sql");
	}
}

# ---- the SQL of both runbooks ------------------------------------------------

for my $file (@runbooks)
{
	next unless $blocks{$file};
	my $doc = documented_variables($text{$file});
	is_deeply([ sort keys %$doc ], [ sort keys %vars ],
		"$file documents exactly the variables the blocks may use");
	cmp_ok(scalar @{ $blocks{$file} }, '>=', 30, "$file has SQL blocks");

	for my $b (@{ $blocks{$file} })
	{
		my $name = "$file: $b->{section}: block $b->{n}";
		my @undoc = grep { !$doc->{$_} } used_variables($b->{sql});
		ok(!@undoc, u8("$name uses documented variables only"))
		  or diag("undocumented: @undoc");

		my $ids = reset_scenario();
		my %v   = %vars;
		$v{id} = $ids->{ $id_status{ $b->{h2} } // 'DLT_FAILED' };
		$v{held_id} = $ids->{ 'held:' . ($held_status{ $b->{h2} } // 'DEAD_LETTERED') };

		my $session;
		if ($b->{sql} =~ /:pid\b/)
		{
			# a write transaction that enqueued and did not commit
			$session = $node->background_psql('postgres', extra_params => [ '-U', 'app_writer' ]);
			$session->query_safe("BEGIN; SELECT cqrs_enqueue('$topic', 'board-9', '{\"n\": 9}')");
			$v{pid} = $session->query_safe('SELECT pg_backend_pid()');
			$v{pid} =~ s/\s+//g;
		}

		my ($ok, $out, $err) = run_block($b->{sql}, %v);
		ok($ok, u8($name)) or diag(u8("SQL:\n$b->{sql}\nstderr:\n$err\nstdout:\n$out"));
		# what it printed, for the log (regress_log_110_runbook_sql)
		my @lines = split /\n/, $out . $err;
		note(u8(join("\n", @lines[ 0 .. ($#lines < 11 ? $#lines : 11) ]))) if @lines;
		eval { $session->quit } if $session;
	}
}

# the Korean runbook holds the same statements as the English one
if ($blocks{'docs/runbook.md'} && $blocks{'docs/runbook.ko.md'})
{
	my @en = map { normalized_sql($_->{sql}) } @{ $blocks{'docs/runbook.md'} };
	my @ko = map { normalized_sql($_->{sql}) } @{ $blocks{'docs/runbook.ko.md'} };
	is(scalar @ko, scalar @en, 'both runbooks have the same number of SQL blocks');
	for my $i (0 .. $#en)
	{
		next if defined $ko[$i] && $ko[$i] eq $en[$i];
		fail("SQL block " . ($i + 1) . " differs between the runbooks ("
			  . $blocks{'docs/runbook.md'}[$i]{section} . ')');
		diag(u8("en: $en[$i]\nko: " . ($ko[$i] // '(none)')));
		last;
	}
	my %en_sections = map { $_->{h2} => 1 } @{ $blocks{'docs/runbook.md'} };
	for my $alert (@alerts)
	{
		my $n_en = grep { $_->{h2} eq $alert } @{ $blocks{'docs/runbook.md'} };
		my $n_ko = grep { $_->{h2} eq $alert } @{ $blocks{'docs/runbook.ko.md'} };
		ok($n_en > 0 && $n_en == $n_ko, "$alert: SQL in both runbooks ($n_en / $n_ko blocks)");
	}
}

# the server survived all of it
is($node->safe_psql('postgres', 'SELECT relay_up FROM cqrs_stats_relay'), '1',
	'the relay still runs after every runbook statement');

$node->stop;
done_testing();
