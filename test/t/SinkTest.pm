=pod

=head1 NAME

SinkTest - helpers for the end-to-end tests of the sink (issue 14)

=head1 SYNOPSIS

  use CqrsTest;
  use SinkTest;

  my $node  = new_node('sink');
  my $topic = unique_topic('exact');
  create_topic($topic, 8);
  exact_setup($node, 'exact', $topic);            # table, handler, sink
  my ($events, $expected) = exact_events(1000, 100, 2);
  kafka_produce_events($topic, $events);
  ok(wait_applied($node, 'exact', scalar @$events, 120), 'all consumed');
  exact_check($node, $expected, 'the read model is exact');

=head1 FUNCTIONS

=over

=cut

package SinkTest;

use strict;
use warnings;

use Exporter 'import';
use File::Temp ();
use IPC::Run ();
use List::Util qw(shuffle);
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use CqrsTest;

our @EXPORT = qw(kafka_produce_events exact_setup exact_events exact_check
  wait_applied sink_counts sink_worker_pids poison_handler failing_sink);

=pod

=item poison_handler($node, $function, $body, $poison_raises)

Creates (or replaces) the sink handler C<$function(e cqrs_event)> in
database postgres: PL/pgSQL running C<$body>; with $poison_raises, an event
whose payload has C<"poison": true> raises first (a handler that cannot cope
with it yet), so that it is held, retried and dead-lettered.

=cut

sub poison_handler
{
	my ($node, $function, $body, $poison_raises) = @_;
	my $check = $poison_raises
	  ? "IF (e.payload->>'poison')::boolean THEN RAISE EXCEPTION 'cannot apply poisoned event %', e.event_id; END IF;"
	  : '';
	$node->safe_psql('postgres', qq{
CREATE OR REPLACE FUNCTION $function(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    $check
    $body
END
\$\$;
});
	return;
}

=pod

=item failing_sink($node, $sink, $topic, $options)

Creates, in database postgres, the sink $sink on $topic with the options
$options (a JSON object's text, e.g. '{"max_retries": 0, "dlt_topic": "D"}')
and a handler, C<${sink}_fail(cqrs_event)>, that raises "cannot apply
<event_id>" for every event: each event it consumes is held, retried and
dead-lettered.

=cut

sub failing_sink
{
	my ($node, $sink, $topic, $options) = @_;
	$node->safe_psql('postgres', qq{
CREATE FUNCTION ${sink}_fail(e cqrs_event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    RAISE EXCEPTION 'cannot apply %', e.event_id;
END
\$\$;
SELECT cqrs_sink_create('$sink', ARRAY['$topic'], '${sink}_fail(cqrs_event)', '$options');
});
	return;
}

=pod

=item kafka_produce_events($topic, \@events, [$bootstrap])

Publishes events with test/kafka/event_producer (built by ctool.sh): each
event is [key, event_id, value, headers]; undef key or event_id: none; the
value as text; headers (optional) "name=value,name" (name alone: a null
value), after event_id.  A key, header name or value written "\x" and hex
digits is those bytes.  The producer is idempotent and partitions by the key's murmur2 hash,
so a key's events are in one partition in list order.  Returns the number
delivered; dies if any failed.

=cut

my $producer;

sub kafka_produce_events
{
	my ($topic, $events, $bootstrap) = @_;
	$producer //= do
	{
		my $p = CqrsTest::_kafka_script({}, 'ctool.sh', 'event_producer',
			"$PostgreSQL::Test::Utils::tmp_check/bin");
		chomp $p;
		$p;
	};
	my $fh = File::Temp->new(DIR => $PostgreSQL::Test::Utils::tmp_check);
	binmode $fh, ':utf8';
	for my $e (@$events)
	{
		my ($k, $id, $v, $h) = @$e;
		print $fh join("\t", $k // '-', $id // '-', $v // '-', defined $h ? ($h) : ()), "\n";
	}
	close $fh;
	my ($out, $err) = ('', '');
	IPC::Run::run([ $producer, '-b', $bootstrap // kafka_brokers(), '-t', $topic, '-f', $fh->filename ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(300));
	die "event_producer: $out$err" unless $out =~ /^ok (\d+)$/m;
	return $1;
}

=pod

=item exact_setup($node, $sink, \@topics or $topic, %options)

The read model of the exactness tests in database postgres: table
C<exact_model> (id, title, likes, version), handler C<exact_apply(cqrs_event)>
(versioned upserts, deletes, and likes through cqrs_apply_delta() under the
consumer $sink), and the sink $sink on the topics.  %options are the sink's
options (JSON object members, values as Perl scalars: numbers or strings),
but C<_sleep =E<gt> $seconds>: the handler sleeps that long per event (a
slow read model, to keep a stream going while a test acts on it).

=cut

sub exact_setup
{
	my ($node, $sink, $topics, %options) = @_;
	my $sleep = delete $options{_sleep} // 0;
	$topics = [$topics] unless ref $topics;
	my $opts = '{' . join(', ',
		map { my $v = $options{$_}; "\"$_\": " . ($v =~ /^-?\d+$/ ? $v : "\"$v\"") }
		  sort keys %options) . '}';
	$node->safe_psql('postgres', q{
CREATE TABLE IF NOT EXISTS exact_sleep (seconds float8 NOT NULL);
CREATE TABLE IF NOT EXISTS exact_model (
    id      bigint PRIMARY KEY,
    title   text,
    likes   bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 80);
CREATE OR REPLACE FUNCTION exact_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(seconds) FROM exact_sleep;
    CASE e.payload->>'t'
    WHEN 'up' THEN
        PERFORM cqrs_upsert('exact_model',
                            jsonb_build_object('id', e.payload->'id', 'title', e.payload->'title'),
                            (e.payload->>'v')::bigint);
    WHEN 'del' THEN
        PERFORM cqrs_delete('exact_model', jsonb_build_object('id', e.payload->'id'),
                            (e.payload->>'v')::bigint);
    WHEN 'like' THEN
        PERFORM cqrs_apply_delta('exact_model', jsonb_build_object('id', e.payload->'id'),
                                 jsonb_build_object('likes', e.payload->'d'), e.topic, e.event_id);
    END CASE;
END
$$;
});
	$node->safe_psql('postgres', "INSERT INTO exact_sleep VALUES ($sleep)") if $sleep;
	my $arr = 'ARRAY[' . join(', ', map { "'$_'" } @$topics) . ']';
	$node->safe_psql('postgres',
		"SELECT cqrs_sink_create('$sink', $arr, 'exact_apply(cqrs_event)', '$opts')");
	return;
}

=pod

=item exact_events($keys, $per_key, $copies, [$first_id])

Events for the exactness tests: $per_key events for each of $keys keys
(ids from $first_id, default 1), each key a random mix of versioned
upserts (55%), deletes (10%) and like deltas of 1 to 5 (35%), versions
increasing per key.  Every event is published $copies times (the copies
later in the stream of its key, some right after it, some up to 20 events
later); keys are interleaved at random, each key's events in order.
Returns (\@events as for kafka_produce_events, \%expected) where
%expected maps id to "title|likes|version" for each row the read model must
hold, computed here from the events by the helpers' documented rules.

=cut

my $event_seq = 0;

sub exact_events
{
	my ($keys, $per_key, $copies, $first_id) = @_;
	$copies   //= 2;
	$first_id //= 1;
	my (%expected, @streams);
	for my $k (0 .. $keys - 1)
	{
		my $id = $first_id + $k;
		my ($row, $tomb);    # row: [title, likes, version]
		my $v = 0;
		my @stream;          # [position, line]
		for my $i (1 .. $per_key)
		{
			my $r = rand();
			my $eid = sprintf('%08x-%04x-4000-8000-%012x', $$, $k % 65536, ++$event_seq);
			my $payload;
			if ($r < 0.55)
			{
				$v++;
				my $title = "t$id-$v";
				$payload = qq({"t":"up","id":$id,"title":"$title","v":$v});
				if ($row)
				{
					@$row[ 0, 2 ] = ($title, $v) if $row->[2] < $v;
				}
				elsif (!defined $tomb || $tomb < $v)
				{
					$row = [ $title, 0, $v ];
				}
			}
			elsif ($r < 0.65)
			{
				$v++;
				$payload = qq({"t":"del","id":$id,"v":$v});
				if ($row)
				{
					if ($row->[2] <= $v)
					{
						$row = undef;
						$tomb = $v if !defined $tomb || $tomb < $v;
					}
				}
				else
				{
					$tomb = $v if !defined $tomb || $tomb < $v;
				}
			}
			else
			{
				my $d = 1 + int(rand(5));
				$payload = qq({"t":"like","id":$id,"d":$d});
				if ($row) { $row->[1] += $d }
				elsif (!defined $tomb) { $row = [ '', $d, 0 ] }
			}
			push @stream, [ $i, [ "k$id", $eid, $payload ] ];
			# the copies come later in the key's stream
			for (2 .. $copies)
			{
				my $later = rand() < 0.3 ? $i + 0.5 : $i + 1 + rand(20);
				push @stream, [ $later, [ "k$id", $eid, $payload ] ];
			}
		}
		$expected{$id} = join('|', @$row) if $row;
		push @streams, [ map { $_->[1] } sort { $a->[0] <=> $b->[0] } @stream ];
	}
	# interleave the keys at random, each key in its order
	my @events;
	my @live = grep { @{ $streams[$_] } } 0 .. $#streams;
	while (@live)
	{
		my $pick = int(rand(@live));
		push @events, shift @{ $streams[ $live[$pick] ] };
		splice(@live, $pick, 1) unless @{ $streams[ $live[$pick] ] };
	}
	return (\@events, \%expected);
}

=pod

=item exact_check($node, \%expected, $name, [$first_id, $last_id])

Compares table exact_model (ids in the range, default all) with the
expected rows; one test, with the first differences in diag.

=cut

sub exact_check
{
	my ($node, $expected, $name, $from, $to) = @_;
	my $where = defined $from ? "WHERE id BETWEEN $from AND $to" : '';
	my %got = map { my ($id, $rest) = split /\|/, $_, 2; ($id => $rest) }
	  split /\n/,
	  $node->safe_psql('postgres',
		"SELECT id, coalesce(title, ''), likes, version FROM exact_model $where ORDER BY id");
	my @diff;
	for my $id (sort { $a <=> $b } keys %{ { %$expected, %got } })
	{
		my ($e, $g) = ($expected->{$id} // '(none)', $got{$id} // '(none)');
		push @diff, "id $id: expected $e, got $g" if $e ne $g;
	}
	ok(!@diff, "$name (" . scalar(keys %$expected) . ' rows, ' . scalar(@diff) . ' differences)')
	  or diag(join("\n", @diff[ 0 .. ($#diff < 19 ? $#diff : 19) ]));
	return !@diff;
}

=pod

=item sink_counts($node, $sink)

Sums over the sink's partitions from cqrs_sink_offset: a hash with
applied, duplicates, retried, dead_lettered, dlt_failed, positions (the
sum of next_offset).

=cut

sub sink_counts
{
	my ($node, $sink) = @_;
	my @v = split /\|/,
	  $node->safe_psql('postgres',
		"SELECT coalesce(sum(applied), 0), coalesce(sum(duplicates), 0), coalesce(sum(retried), 0),"
		  . " coalesce(sum(dead_lettered), 0), coalesce(sum(dlt_failed), 0), coalesce(sum(next_offset), 0)"
		  . " FROM cqrs_sink_offset WHERE sink = '$sink'");
	my %c;
	@c{qw(applied duplicates retried dead_lettered dlt_failed positions)} = @v;
	return \%c;
}

=pod

=item wait_applied($node, $sink, $messages, $timeout)

Waits until the sink's events applied plus skipped as duplicates reach
$messages (every message of its topics accounted for, when nothing is held);
tolerates a server in crash recovery.  True on success, else a diag.

=cut

sub wait_applied
{
	my ($node, $sink, $messages, $timeout) = @_;
	$timeout //= 120;
	my $deadline = time + $timeout;
	my $last = '';
	while (time < $deadline)
	{
		my ($out, $err) = ('', '');
		eval {    # (a broken pipe during a crash restart: see sink_worker_pids)
			$node->psql('postgres',
				"SELECT coalesce(sum(applied + duplicates), 0) FROM cqrs_sink_offset WHERE sink = '$sink'",
				stdout => \$out, stderr => \$err, timeout => 30);
		};
		$last = $out;
		return 1 if defined $out && $out eq "$messages";
		usleep(200_000);
	}
	diag("wait_applied($sink): $last of $messages after ${timeout}s");
	return 0;
}

=pod

=item sink_worker_pids($node)

The pids of the node's sink workers (backend_type 'cqrs_sync sink').

=cut

sub sink_worker_pids
{
	my ($node) = @_;
	my ($out, $err) = ('', '');
	# (in eval: psql refused a connection during a crash restart may exit
	# before it read its query, and IPC::Run then dies of a broken pipe)
	eval {
		$node->psql('postgres',
			"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink' ORDER BY pid",
			stdout => \$out, stderr => \$err, timeout => 30);
	};
	return grep { /^\d+$/ } split /\n/, ($out // '');
}

=pod

=back

=cut

1;
