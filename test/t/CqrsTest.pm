=pod

=head1 NAME

CqrsTest - helpers for the cqrs_sync end-to-end TAP tests

=head1 SYNOPSIS

  use FindBin;
  use lib $FindBin::RealBin;
  use CqrsTest;
  use Test::More;

  my $node  = new_node('main', 'cqrs_sync.max_retries' => 2);
  my $topic = unique_topic('orders');
  $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k1', '{\"n\":1}')");
  ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
     'event sent');
  my @msgs = kafka_consume($topic, 1, 30);
  is($msgs[0]{headers}{event_id}, ..., 'event_id header');

Run through test/e2e.sh (or test/run.sh), which sets KAFKA_BROKERS, PERL5LIB
(PostgreSQL::Test::Cluster) and the rest of the environment.

=cut

package CqrsTest;

use strict;
use warnings;

use Exporter 'import';
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @EXPORT = qw(new_node kafka_brokers kafka_ping kafka_consume unique_topic
  wait_for create_topic);

=pod

=head1 FUNCTIONS

=over

=item kafka_brokers()

The test broker's bootstrap address ($ENV{KAFKA_BROKERS}); bails out if unset.

=cut

sub kafka_brokers
{
	my $b = $ENV{KAFKA_BROKERS};
	BAIL_OUT('KAFKA_BROKERS is not set: run the TAP tests through test/e2e.sh')
	  unless defined $b && $b ne '';
	return $b;
}

sub _quote_conf
{
	my ($v) = @_;
	$v =~ s/'/''/g;
	return "'$v'";
}

=pod

=item new_node($name, %extra_conf)

A started PostgreSQL::Test::Cluster node with cqrs_sync preloaded and
C<CREATE EXTENSION cqrs_sync> done in database postgres.  Settings:
shared_preload_libraries='cqrs_sync', cqrs_sync.brokers=$KAFKA_BROKERS,
cqrs_sync.database='postgres', cqrs_sync.poll_interval=200ms,
restart_after_crash=on.  %extra_conf adds or overrides settings (values are
written quoted, which is valid for every setting type).  Two keys are options,
not settings: C<_create_extension =E<gt> 0> skips the CREATE EXTENSION, and
C<_start =E<gt> 0> returns the node initialised but not started (and without
the extension).

=cut

sub new_node
{
	my ($name, %extra) = @_;
	my $create = exists $extra{_create_extension} ? delete $extra{_create_extension} : 1;
	my $start  = exists $extra{_start}            ? delete $extra{_start}            : 1;

	my %conf = (
		'shared_preload_libraries' => 'cqrs_sync',
		'cqrs_sync.brokers'        => kafka_brokers(),
		'cqrs_sync.database'       => 'postgres',
		'cqrs_sync.poll_interval'  => '200ms',
		'restart_after_crash'      => 'on',
		%extra);

	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf',
		"\n# CqrsTest::new_node\n"
		  . join('', map { "$_ = " . _quote_conf($conf{$_}) . "\n" } sort keys %conf));
	return $node unless $start;

	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION cqrs_sync') if $create;
	return $node;
}

=pod

=item kafka_ping([$timeout])

True if the broker answers a metadata request within $timeout seconds
(default 10).

=cut

sub kafka_ping
{
	my ($timeout) = @_;
	$timeout //= 10;
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run(
			[ 'kcat', '-L', '-b', kafka_brokers(), '-m', $timeout ],
			'<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout($timeout + 5));
	};
	return ($ok && $out =~ /broker \d+ at/) ? 1 : 0;
}

=pod

=item unique_topic($prefix)

A topic name not used before: "cqrs-$prefix-<time>-<pid>-<n>".

=cut

my $topic_seq = 0;

sub unique_topic
{
	my ($prefix) = @_;
	$prefix //= 't';
	$prefix =~ s/[^A-Za-z0-9-]/-/g;
	$topic_seq++;
	return sprintf('cqrs-%s-%d-%d-%d', $prefix, time, $$, $topic_seq);
}

=pod

=item create_topic($name, $partitions, @configs)

Creates a topic with test/kafka/topic.sh (Kafka's TopicCommand); @configs are
"name=value" topic configs, e.g. 'max.message.bytes=200000'.  Dies on failure.

=cut

sub create_topic
{
	my ($name, $partitions, @configs) = @_;
	my $repo = $ENV{CQRS_REPO} // die "CQRS_REPO is not set";
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run(
			[ 'bash', "$repo/test/kafka/topic.sh", 'create', $name, $partitions, @configs ],
			'<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout(120));
	};
	die "could not create topic $name: $out$err" unless $ok;
	note("created topic $name ($partitions partitions) @configs");
	return $name;
}

=pod

=item kafka_consume($topic, $expected_count, $timeout, %opts)

Reads $topic from the beginning with kcat until at least $expected_count
messages are there or $timeout seconds (default 30) passed; returns the
messages of the last read, ordered by partition and offset, as hashes:

  { partition => 0, offset => 5, key => 'k1',
    headers => { event_id => '...', ... },   # name => value
    headers_raw => 'event_id=...,x=y',
    value => '{"n": 1}',                     # as sent
    json  => { n => 1 } }                    # decoded value, or undef

A null key reads as ''.  With $expected_count 0 it reads once and returns
what is there.  Fewer messages than expected after the timeout is not an
error here: compare the count in the test so the failure shows.

Options: C<json =E<gt> 0> skips decoding the values (JSON::PP decodes about
13,000 small values a second: use it for large topics and decode what you
need).

=cut

sub kafka_consume
{
	my ($topic, $expected, $timeout, %opts) = @_;
	$expected //= 1;
	$timeout  //= 30;
	my $decode   = $opts{json} // 1;
	my $deadline = time + $timeout;
	my ($out, $count) = ('', 0);
	my $last_err = '';

	while (1)
	{
		my $err = '';
		$out = '';
		my $left = $deadline - time;
		$left = 5 if $left < 5;
		eval {
			IPC::Run::run(
				[
					'kcat', '-C', '-b', kafka_brokers(), '-t', $topic,
					'-o', 'beginning', '-e', '-q',
					'-f', '%p\t%o\t%k\t%h\t%s\n'
				],
				'<', \undef, '>', \$out, '2>', \$err,
				IPC::Run::timeout($left));
		};
		$last_err = $err if $err ne '';
		$count = ($out =~ tr/\n//);
		last if $count >= $expected || time >= $deadline;
		usleep(200_000);
	}
	my @msgs = _parse_kcat($out, $decode);
	if (@msgs < $expected)
	{
		diag(sprintf('kafka_consume(%s): %d of %d messages after %ds%s',
			$topic, scalar @msgs, $expected, $timeout,
			$last_err ne '' ? "; kcat said: $last_err" : ''));
	}
	return @msgs;
}

sub _parse_kcat
{
	my ($out, $decode) = @_;
	my @msgs;
	for my $line (split /\n/, $out)
	{
		my ($p, $o, $k, $h, $v) = split /\t/, $line, 5;
		next unless defined $o && $p =~ /^\d+$/ && $o =~ /^\d+$/;
		my %hdr;
		for my $pair (split /,/, ($h // ''))
		{
			my ($hn, $hv) = split /=/, $pair, 2;
			$hdr{$hn} = $hv if defined $hn && $hn ne '';
		}
		my $json = $decode ? eval { JSON::PP::decode_json($v // '') } : undef;
		push @msgs,
		  {
			partition   => $p + 0,
			offset      => $o + 0,
			key         => $k // '',
			headers     => \%hdr,
			headers_raw => $h // '',
			value       => $v // '',
			json        => $json,
		  };
	}
	return sort { $a->{partition} <=> $b->{partition} || $a->{offset} <=> $b->{offset} }
	  @msgs;
}

=pod

=item wait_for($node, $sql, $expected, $timeout)

Runs $sql (database postgres) every 100 ms until its output equals $expected
or $timeout seconds (default 30) pass.  SQL errors count as "not yet".
Returns true on success; on timeout, false, after a diag with the last output
and error.

=cut

sub wait_for
{
	my ($node, $sql, $expected, $timeout) = @_;
	$timeout //= 30;
	my $deadline = time + $timeout;
	my ($out, $err) = ('', '');
	while (1)
	{
		($out, $err) = ('', '');
		my $timed_out;
		$node->psql('postgres', $sql,
			stdout    => \$out,
			stderr    => \$err,
			timeout   => 30,
			timed_out => \$timed_out);
		return 1 if defined $out && $out eq $expected;
		last if time >= $deadline;
		usleep(100_000);
	}
	diag("wait_for timed out after ${timeout}s: $sql\n"
		  . "expected: $expected\n"
		  . "last result: " . ($out // '') . "\n"
		  . ($err ne '' ? "last error: $err\n" : ''));
	return 0;
}

=pod

=back

=cut

1;
