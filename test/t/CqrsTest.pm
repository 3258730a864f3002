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
use File::Basename ();
use IO::Socket::INET ();
use IPC::Run ();
use JSON::PP ();
use MIME::Base64 ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @EXPORT = qw(new_node kafka_brokers kafka_ping kafka_consume unique_topic
  wait_for create_topic create_topic_assigned alter_topic_config kafka_acl
  kafka_broker_start
  kafka_cluster_start kafka_partition_leaders mock_cluster_start
  first_row_sent dead_letter_one
  order_schedule_module
  probe_producer_start freeze_relay freeze_waiting crash_cluster
  restart_relay stop_during_dead_letter terminate_backend stall_reported);

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

=item kafka_partition_leaders($topic, [$bootstrap])

The leader of each partition of $topic as the cluster's metadata says now
(kcat -L, from $bootstrap, default $ENV{KAFKA_BROKERS}): a hash reference
partition =E<gt> broker id, -1 for a partition without a leader (e.g. its only
replica is on a frozen broker the controller has fenced).  Empty if the
metadata request failed.

=cut

sub kafka_partition_leaders
{
	my ($topic, $bootstrap) = @_;
	my ($out, $err) = ('', '');
	eval {
		IPC::Run::run(
			[ 'kcat', '-L', '-b', $bootstrap // kafka_brokers(), '-t', $topic, '-m', 5 ],
			'<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout(15));
	};
	my %leader = $out =~ /^\s*partition (\d+), leader (-?\d+),/mg;
	return \%leader;
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
	return _create_topic('create', $name, $partitions, "$partitions partitions", @configs);
}

=pod

=item create_topic_assigned($name, $assignment, @configs)

Creates a topic whose replicas are placed explicitly (test/kafka/topic.sh
create-assigned, TopicCommand's --replica-assignment) on the cluster of
$ENV{KAFKA_BROKERS}: partitions separated by commas, each partition's broker
ids (preferred leader first) by colons, the same number of replicas for every
partition.  Dies on failure.

  # partition 0 on broker 1, partition 1 on broker 2 only
  create_topic_assigned($topic, '1,2');
  # both brokers in every partition, acks=all needs both
  create_topic_assigned($topic2, '1:2', 'min.insync.replicas=2');

=cut

sub create_topic_assigned
{
	my ($name, $assignment, @configs) = @_;
	return _create_topic('create-assigned', $name, $assignment, "replicas $assignment",
		@configs);
}

=pod

=item alter_topic_config($name, @configs)

Changes configs ('max.message.bytes=1000000', ...) of topic $name on
$ENV{KAFKA_BROKERS} (test/kafka/topic.sh alter-config).  Dies on failure.

=item kafka_acl($action, $principal, $operations, $name)

Adds ($action 'add') or removes ('remove') an ACL allowing $principal
('User:relay') the $operations ('Write,Describe') on topic $name, or on the
cluster when $name is 'cluster', through $ENV{KAFKA_BROKERS} (test/kafka/topic.sh
acl; for a broker started with KAFKA_SASL_PORT).  Dies on failure.

=cut

sub alter_topic_config
{
	my ($name, @configs) = @_;
	_kafka_script({}, 'topic.sh', 'alter-config', $name, @configs);
	note("altered topic $name: @configs");
	return;
}

sub kafka_acl
{
	my ($action, $principal, $operations, $name) = @_;
	_kafka_script({}, 'topic.sh', 'acl', $action, $principal, $operations, $name);
	note("ACL $action: $principal $operations on $name");
	return;
}

# topic.sh $cmd $name $placement @configs, noted as $what
sub _create_topic
{
	my ($cmd, $name, $placement, $what, @configs) = @_;
	_kafka_script({}, 'topic.sh', $cmd, $name, $placement, @configs);
	note("created topic $name ($what) @configs");
	return $name;
}

# Runs test/kafka/$script with @args and the environment overrides in
# %$env; returns its stdout, dies with its output if it fails.
sub _kafka_script
{
	return _kafka_script_finish(_kafka_script_start(@_));
}

# The same in two steps, for scripts that run side by side.
sub _kafka_script_start
{
	my ($env, $script, @args) = @_;
	my $repo = $ENV{CQRS_REPO} // die "CQRS_REPO is not set";
	my $run  = { what => "$script @args", out => '', err => '' };
	local @ENV{ keys %$env } = values %$env;
	$run->{h} = IPC::Run::start([ 'bash', "$repo/test/kafka/$script", @args ],
		'<', \undef, '>', \$run->{out}, '2>', \$run->{err},
		IPC::Run::timeout(180));
	return $run;
}

sub _kafka_script_finish
{
	my ($run) = @_;
	my $ok = eval { $run->{h}->finish };
	die "$run->{what} failed: $run->{out}$run->{err}" . ($@ // '') unless $ok;
	return $run->{out};
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
need); C<partition =E<gt> N> reads partition N only (e.g. the healthy one of a
topic with a sick partition, which could never be read to its end).

=cut

sub kafka_consume
{
	my ($topic, $expected, $timeout, %opts) = @_;
	$expected //= 1;
	$timeout  //= 30;
	my $decode   = $opts{json} // 1;
	my @part     = defined $opts{partition} ? ('-p', $opts{partition}) : ();
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
					'kcat', '-C', '-b', kafka_brokers(), '-t', $topic, @part,
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

=item freeze_relay($node), freeze_waiting($node, $backend_type, $wait_event)

Stop a process of the node (the relay worker; any process by its
C<backend_type>) with SIGSTOP at a safe moment and return its pid (thaw it
with C<kill 'CONT', $pid>).  A process stopped at a random moment may hold a
lock others need (a WAL insertion lock in the middle of its transaction, the
WAL write lock), and every other session would hang.  These processes hold
none while they wait for work: this sends SIGSTOP, then looks at the
process's reported wait event (C<$wait_event>; the relay's is its
C<Extension> wait), which a process sets right before waiting and clears
right after; if the process was not stopped inside that wait, it is let go
and tried again.  Dies after 30 s.

  my $relay = freeze_relay($node);
  my $walwriter = freeze_waiting($node, 'walwriter', 'WalWriterMain');

=cut

sub freeze_waiting
{
	my ($node, $type, $wait_event) = @_;
	my $waiting = "backend_type = '$type' AND (wait_event = '$wait_event' OR wait_event_type = '$wait_event')";
	my $deadline = time + 30;
	while (time < $deadline)
	{
		my $row = $node->safe_psql('postgres',
			"SELECT pid FROM pg_stat_activity WHERE $waiting");
		if ($row =~ /^(\d+)$/)
		{
			my $pid = $1;
			kill 'STOP', $pid;
			# reported after the stop: still waiting means stopped in the wait
			my $still = $node->safe_psql('postgres',
				"SELECT count(*) FROM pg_stat_activity WHERE pid = $pid AND $waiting");
			return $pid if $still eq '1';
			kill 'CONT', $pid;
		}
		usleep(int(rand(20_000)));
	}
	die "freeze_waiting: no $type caught in its wait ($wait_event)";
}

sub freeze_relay
{
	my ($node) = @_;
	return freeze_waiting($node, 'cqrs_sync relay', 'Extension');
}

=pod

=item restart_relay($node)

Ends the relay worker with pg_terminate_backend() (it exits with 1 and the
postmaster starts it again) and waits up to 30 s for another one to run.
Returns true when one does.  A relay stopped with SIGSTOP is let go first.

=cut

sub restart_relay
{
	my ($node) = @_;
	my $old = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
	die 'restart_relay: no relay runs' unless $old =~ /^\d+$/;
	kill 'CONT', $old;
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
	return wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay' AND pid <> $old",
		'1', 30);
}

=pod

=item stop_during_dead_letter($node, $id)

The stop of a relay whose dead letter for row $id is in flight (its
dead-letter topic does not answer) must not count as a failed dead-letter
publish (docs/failures.md).  Waits until a message is in flight and checks
the row is PENDING, restarts the relay (librdkafka purges the dead letter),
then checks that dlt_retry_count is still 0 and that no DLT_PUBLISH_FAILED
audit row was written: five checks.

=cut

sub stop_during_dead_letter
{
	my ($node, $id) = @_;
	ok(wait_for($node, 'SELECT "window" FROM cqrs_stats_relay', '1', 30),
		'a message is in flight');
	sleep 2;
	is( $node->safe_psql('postgres',
			"SELECT status || ' ' || dlt_retry_count FROM cqrs_outbox WHERE id = $id"),
		'PENDING 0', 'the row is PENDING while its dead letter waits for the dead-letter topic');

	# the stop interrupts the dead letter (librdkafka purges it)
	ok(restart_relay($node), 'the relay is stopped and starts again');
	is($node->safe_psql('postgres', "SELECT dlt_retry_count FROM cqrs_outbox WHERE id = $id"),
		'0', 'the interrupted dead letter did not count as a failed dead-letter publish');
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM cqrs_outbox_audit WHERE outbox_id = $id AND action = 'DLT_PUBLISH_FAILED'"),
		'0', 'and left no DLT_PUBLISH_FAILED row in the audit trail');
	return;
}

=pod

=item terminate_backend($node, $pid, $timeout)

Sends SIGTERM to server process $pid with pg_terminate_backend() and waits
up to $timeout seconds (default 60) for it to be gone.  Returns the seconds it
took, or undef if it still runs.  (A background worker that exits is started
again under another pid.)

=cut

sub terminate_backend
{
	my ($node, $pid, $timeout) = @_;
	$timeout //= 60;
	my $t0 = Time::HiRes::time();
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
	while (Time::HiRes::time() - $t0 < $timeout)
	{
		return Time::HiRes::time() - $t0 unless kill(0, $pid);
		usleep(100_000);
	}
	return undef;
}

=pod

=item crash_cluster($node)

Kill every process of the node's cluster with SIGKILL at once (stopped ones
too, such as a frozen WAL writer), as a power loss would leave it: whatever
was not flushed is gone.  Returns once they are all gone; start the node
again with C<< $node->start >>.

=cut

sub crash_cluster
{
	my ($node) = @_;
	my $postmaster = $node->{_pid};
	my @children = split ' ', `pgrep -P $postmaster`;
	kill 'KILL', $postmaster, @children;
	for (1 .. 100)
	{
		last unless grep { kill 0, $_ } ($postmaster, @children);
		usleep(100_000);
	}
	$node->{_pid} = undef;
	return;
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
		# (in eval: psql refused a connection during a crash restart may
		# exit before it read its query, and IPC::Run then dies of a broken
		# pipe)
		eval {
			$node->psql('postgres', $sql,
				stdout    => \$out,
				stderr    => \$err,
				timeout   => 30,
				timed_out => \$timed_out);
		};
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

=item stall_reported($node, $partition)

Three checks that the relay reports Kafka partition $partition
("topic[p]") stalled, and only it: its state becomes "partition stalled"
(within 30 s), cqrs_stats_relay.stalled_partitions names it, and the server
log has a WARNING with SQLSTATE CQ003 naming it.

=cut

sub stall_reported
{
	my ($node, $partition) = @_;
	ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'partition stalled', 30),
		'the relay says a partition is stalled');
	is($node->safe_psql('postgres', 'SELECT stalled_partitions FROM cqrs_stats_relay'),
		$partition, "and which: $partition");
	ok($node->wait_for_log(qr/CQ003 WARNING:  cqrs_sync relay: Kafka partition \Q$partition\E/),
		'a WARNING with SQLSTATE CQ003 names it');
	return;
}

=pod

=item kafka_broker_start(%opts)

Starts a throwaway Kafka broker of the test's own with test/kafka/broker.sh
(state under the TAP temporary directory, on a free port) and returns a
C<CqrsTest::Broker>; every broker started this way is stopped when the test
exits.  Without C<join> it is a combined broker+controller, node 1, a cluster
of its own.  With C<join =E<gt> $first-E<gt>bootstrap> it is a broker-only
KRaft node (node.id C<node_id>, default 2) joining that first broker's
controller quorum.  Join a broker started here, not the shared
$ENV{KAFKA_BROKERS}: topics and consumer-offset partitions placed on the
second broker would break the other tests once it is gone.  Options:
C<port> (default: a free one), C<join>, C<node_id>, C<env> (a hash of more
broker.sh settings, e.g. C<{ KAFKA_MESSAGE_MAX_BYTES =E<gt> 200000 }>).

Methods: C<bootstrap> ("127.0.0.1:PORT"), C<node_id>, C<port>, C<pid>,
C<freeze> (SIGSTOP: the broker keeps its sockets, clients hang),
C<thaw> (SIGCONT), C<halt> and C<resume> (stop keeping the data, start again
on the same port: see DESIGN.md section 6 on rebinding), C<stop>, C<status>
(broker.sh status's line).

  my $b1 = kafka_broker_start();
  my $b2 = kafka_broker_start(join => $b1->bootstrap);

=item kafka_cluster_start($brokers, %opts)

The same for a cluster of $brokers (default 2) nodes started side by side
(faster: they share a cluster id made here): node 1 a combined
broker+controller, nodes 2.. broker-only nodes joining it.  Returns the
C<CqrsTest::Broker>s, node 1 first.  %opts: C<env> as above.  This is how to
make some partitions sick while others stay healthy (DESIGN.md section 6):

  my ($b1, $b2) = kafka_cluster_start(2);
  local $ENV{KAFKA_BROKERS} = $b1->bootstrap;
  create_topic_assigned($topic, '1,2');   # partition 1 lives on broker 2 only
  $b2->freeze;  ...;  $b2->thaw;

Verified topology (test/t/007_second_broker.pl): with C<'1,2'> and broker 2
frozen, an idempotent acks=all producer's messages to partition 0 are
acknowledged at once while those to partition 1 stay unacknowledged (its
leader becomes -1 once the controller fences broker 2, 8-9 s in), and are
delivered within a second or two of the thaw, once each.  With C<'1:2'> and
C<min.insync.replicas=2> the partition's messages stay unacknowledged too, but
its leader is broker 1: a produce waiting there for broker 2 holds up every
later produce of the same client to broker 1 (a broker serves one request per
connection at a time) until the request times out (librdkafka's
request.timeout.ms, 30 s by default), so partitions led by broker 1 stall as
well for that long.

=cut

sub kafka_broker_start
{
	my (%opts) = @_;
	my $port = $opts{port} // _free_port($opts{join} ? 0 : 1);
	my ($b) = _brokers_start({ %opts, port => $port });
	return $b;
}

sub kafka_cluster_start
{
	my ($brokers, %opts) = @_;
	$brokers //= 2;
	my $first = _free_port(1);
	my @avoid = ($first, $first + 1);
	my $id    = _kafka_uuid();
	my @specs = ({ %opts, port => $first, cluster_id => $id });
	for my $node (2 .. $brokers)
	{
		my $port = _free_port(0, @avoid);
		push @avoid, $port;
		push @specs,
		  { %opts, port => $port, cluster_id => $id,
			join => "127.0.0.1:$first", node_id => $node };
	}
	return _brokers_start(@specs);
}

# Starts the brokers described by @specs side by side; returns them when all
# answer (dies if one does not; END stops the others).
sub _brokers_start
{
	my (@specs) = @_;
	my @brokers;
	for my $o (@specs)
	{
		my $b = bless {
			port    => $o->{port},
			node_id => $o->{join} ? ($o->{node_id} // 2) : 1,
			env     => {
				%{ $o->{env} // {} },
				KAFKA_PORT    => $o->{port},
				CQRS_TEST_DIR => PostgreSQL::Test::Utils::tempdir("kafka$o->{port}"),
				($o->{cluster_id} ? (KAFKA_CLUSTER_ID => $o->{cluster_id}) : ()),
				($o->{join} ? (KAFKA_JOIN => $o->{join}, KAFKA_NODE_ID => $o->{node_id} // 2) : ()),
			},
		}, 'CqrsTest::Broker';
		push @CqrsTest::Broker::started, $b;
		$b->{run} = _kafka_script_start($b->{env}, 'broker.sh', 'start');
		push @brokers, $b;
	}
	for my $b (@brokers)
	{
		my $addr = _kafka_script_finish(delete $b->{run});
		chomp $addr;
		$b->{bootstrap} = $addr;
		note("kafka broker node $b->{node_id} at $addr"
			  . ($b->{env}{KAFKA_JOIN} ? " (joined $b->{env}{KAFKA_JOIN})" : ''));
	}
	return @brokers;
}

# A free port, not one of @avoid; with $pair, port+1 (a combined broker's
# controller) is free too.
sub _free_port
{
	my ($pair, @avoid) = @_;
	for (1 .. 50)
	{
		my $port = PostgreSQL::Test::Cluster::get_free_port();
		next if grep { $_ == $port || ($pair && $_ == $port + 1) } @avoid;
		return $port unless $pair;
		my $sock = IO::Socket::INET->new(
			LocalAddr => '127.0.0.1',
			LocalPort => $port + 1,
			Proto     => 'tcp',
			ReuseAddr => 1,
			Listen    => 1);
		next unless $sock;
		close $sock;
		return $port;
	}
	die "no free port for a Kafka broker";
}

# A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (as
# kafka-storage random-uuid makes them, never starting with "-").
sub _kafka_uuid
{
	while (1)
	{
		my $bytes = join '', map { chr(int(rand(256))) } 1 .. 16;
		my $id    = MIME::Base64::encode_base64url($bytes);
		return $id unless $id =~ /^-/;
	}
}

=pod

=item order_schedule_module()

The path of the test module test/order/order_schedule.so, built (once per
test script) by test/order/build.sh into tmp_check/bin: a library to load
with CREATE FUNCTION ... AS '$path' into a node that preloads cqrs_sync (see
test/order/order_schedule.c and test/t/036_order_schedules.pl).

=cut

my $order_module;

sub order_schedule_module
{
	return $order_module //= do
	{
		my $repo = $ENV{CQRS_REPO} // die "CQRS_REPO is not set";
		my ($out, $err) = ('', '');
		IPC::Run::run([ 'bash', "$repo/test/order/build.sh", "$PostgreSQL::Test::Utils::tmp_check/bin" ],
			'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(180))
		  or die "test/order/build.sh failed: $out$err";
		chomp $out;
		$out;
	};
}

=pod

=item first_row_sent($node, $topic)

Enqueues one event (key C<warm>) for $topic and checks, as one test, that it
is SENT within 60 s: the relay's producer exists and its cluster (a mock
cluster, typically) takes messages, before a fault is injected.

=cut

sub first_row_sent
{
	my ($node, $topic) = @_;
	$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{}')");
	ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 60),
		'a first row is sent through the mock cluster');
	return;
}

=pod

=item dead_letter_one($node, $mock, $topic)

Makes every Produce to the mock cluster $mock fail with INVALID_RECORD from
now on, enqueues one event (key C<doomed>) for $topic, and checks, as one
test, that it is DEAD_LETTERED within 60 s (with cqrs_sync.max_retries 0; the
dead-letter topic must be on a broker that takes it).  Returns its id.

=cut

sub dead_letter_one
{
	my ($node, $mock, $topic) = @_;
	$mock->cmd('errors Produce INVALID_RECORD');
	my $id = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'doomed', '{}')");
	ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'DEAD_LETTERED', 60),
		'a row is dead-lettered');
	return $id;
}

=item mock_cluster_start($brokers, @topics)

Builds (test/kafka/ctool.sh, into the TAP temporary directory) and starts
test/kafka/mock_cluster, a librdkafka 2.0.2 mock cluster of $brokers brokers
(default 1) listening on real TCP on 127.0.0.1; @topics are
"NAME:PARTITIONS[:REPLICATION]" to create at once.  Returns a
C<CqrsTest::MockCluster>, stopped when the test exits:

  my $mock = mock_cluster_start(3, "$topic:4");
  $mock->bootstrap;                     # "127.0.0.1:p1,127.0.0.1:p2,..."
  $mock->cmd('errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER');
  $mock->cmd('down 2');  $mock->cmd('up 2');
  my $answer = $mock->try_cmd('errors DescribeConfigs TOPIC_AUTHORIZATION_FAILED');
  $mock->stop;

C<cmd> sends one command line and returns what follows "ok" in its answer
(often ''); it dies on an "error: ..." answer, C<try_cmd> returns the answer
line as it is.  The commands (topic, errors, broker-errors, pending, clear,
down, up, rtt, rack, leader, follower, follower-wmarks, topic-error,
coordinator, apiversion, bootstrap) are described at the top of
test/kafka/mock_cluster.c.  stderr goes to tmp_check/log/<test>_mock_cluster_N.log.

Recipes, verified by test/t/006_mock_cluster.pl against librdkafka 2.0.2:

=over

=item *

A fatal idempotent producer: C<errors Produce OUT_OF_ORDER_SEQUENCE_NUMBER>.
The producer's next ProduceRequest gets it; when that request is the head of
its partition's line (always, for a producer idle at the time of the push)
librdkafka raises a fatal error: rd_kafka_fatal_error() returns
OUT_OF_ORDER_SEQUENCE_NUMBER, the batch's delivery reports fail with
OUT_OF_ORDER_SEQUENCE_NUMBER (POSSIBLY_PERSISTED), other queued messages with
_PURGE_QUEUE, later rd_kafka_producev() calls with _FATAL.  A new producer on
the same cluster works.  An idle producer sends no request that can turn
fatal, so the fatal state begins with the first produce after the push.

=item *

A producer fatal from its start: C<errors InitProducerId
CLUSTER_AUTHORIZATION_FAILED> before it is created (or re-created).

=item *

Not fatal in 2.0.2 (the idempotent producer recovers by bumping its epoch
itself, or fails the message only): Produce UNKNOWN_PRODUCER_ID (even five
in a row), INVALID_PRODUCER_EPOCH, PRODUCER_FENCED; InitProducerId errors
after the start (an idempotent producer without transactional.id never asks
for a producer id again).

=item *

DescribeConfigs always fails on the mock cluster, with _TIMED_OUT after the
admin request timeout (the mock names controller 0, which does not exist, and
topic DescribeConfigs goes to the controller); no error can be injected into
it.

=back

The mock cluster does not check an idempotent producer's sequences
(DESIGN.md section 5): use it for error paths, never for loss or duplication
figures.

=cut

sub mock_cluster_start
{
	my ($brokers, @topics) = @_;
	$brokers //= 1;
	my $self = CqrsTest::LineProc::_start('CqrsTest::MockCluster', 'mock_cluster',
		[ '-b', $brokers, map { ('-t', $_) } @topics ]);
	$self->{bootstrap} = $self->{first_line};
	die "mock_cluster printed no bootstrap servers: $self->{bootstrap}"
	  unless $self->{bootstrap} =~ /^\S+:\d+(,\S+:\d+)*$/;
	note("mock cluster ($brokers brokers) at $self->{bootstrap}");
	return $self;
}

=pod

=item probe_producer_start($bootstrap, %properties)

Builds and starts test/kafka/probe_producer: an idempotent librdkafka
producer with the relay's defaults (acks=all, message.timeout.ms=0,
linger.ms=1, reconnect.backoff.max.ms=1000), %properties added or overriding
(e.g. C<'max.in.flight' =E<gt> 1>).  Returns a C<CqrsTest::LineProc> with
C<cmd>, C<try_cmd> and C<stop> as above; its commands: C<produce TOPIC
PARTITION KEY [VALUE]>, C<poll MS>, C<wait N MS>, C<report KEY>
("pending", "delivered PARTITION OFFSET", "failed ERR STATUS"), C<fatal>
("NO_ERROR" or "ERR REASON"), C<describe-config TOPIC NAME MS> (see
test/kafka/probe_producer.c).  For checking what the test infrastructure
does to a librdkafka client, without the relay.

  my $p = probe_producer_start($mock->bootstrap);
  $p->cmd("produce $topic 0 k1");
  $p->cmd('wait 1 5000');                 # "1 0 0": delivered failed pending
  is($p->cmd('report k1'), 'delivered 0 0');

=cut

sub probe_producer_start
{
	my ($bootstrap, %props) = @_;
	my $self = CqrsTest::LineProc::_start('CqrsTest::LineProc', 'probe_producer',
		[ '-b', $bootstrap, map { ('-X', "$_=$props{$_}") } sort keys %props ]);
	die "probe_producer did not start: $self->{first_line}"
	  unless $self->{first_line} eq 'ready';
	return $self;
}

package CqrsTest::LineProc;

# A child that answers one line per command line (mock_cluster,
# probe_producer).  All still running at exit are stopped.

use Time::HiRes qw(usleep);

our @started;
my %tool_path;
my $proc_seq = 0;

# Builds test/kafka/$tool.c once per test script.
sub _tool
{
	my ($tool) = @_;
	return $tool_path{$tool} //= do
	{
		my $path = CqrsTest::_kafka_script({}, 'ctool.sh', $tool,
			"$PostgreSQL::Test::Utils::tmp_check/bin");
		chomp $path;
		$path;
	};
}

sub _start
{
	my ($class, $tool, $args) = @_;
	my $self = bless { name => $tool, in => '', out => '' }, $class;
	$proc_seq++;
	$self->{log} = sprintf('%s/%s_%s_%d.log',
		$PostgreSQL::Test::Utils::log_path, File::Basename::basename($0, '.pl'),
		$tool, $proc_seq);
	$self->{h} = IPC::Run::start([ _tool($tool), @$args ],
		'<', \$self->{in}, '>', \$self->{out}, '2>', $self->{log});
	push @started, $self;
	$self->{first_line} = $self->_line(30);
	return $self;
}

sub _line
{
	my ($self, $secs) = @_;
	my $deadline = Time::HiRes::time() + $secs;
	while ($self->{out} !~ /\n/)
	{
		die "$self->{name}: no answer within ${secs}s (log: $self->{log})"
		  if Time::HiRes::time() > $deadline;
		die "$self->{name} exited (log: $self->{log})"
		  unless $self->{h}->pumpable;
		$self->{h}->pump_nb;
		usleep(5_000) if $self->{out} !~ /\n/;
	}
	$self->{out} =~ s/^([^\n]*)\n//;
	return $1;
}

=pod

=back

=head2 CqrsTest::LineProc methods

C<try_cmd($line, $timeout)> sends one command and returns its answer line
(waits up to $timeout seconds, default 60; dies if none comes).
C<cmd($line, $timeout)> the same, but returns the text after "ok " and dies
on any other answer.  C<stop> ends the child (closes its stdin, then kills
it if it lingers).

=cut

sub try_cmd
{
	my ($self, $line, $timeout) = @_;
	die "$self->{name} is stopped" unless $self->{h};
	$self->{in} .= "$line\n";
	my $answer = $self->_line($timeout // 60);
	Test::More::note("$self->{name}> $line => $answer");
	return $answer;
}

sub cmd
{
	my ($self, $line, $timeout) = @_;
	my $answer = $self->try_cmd($line, $timeout);
	die "$self->{name}: \"$line\" answered: $answer\n" unless $answer =~ /^ok(?: (.*))?$/;
	return $1 // '';
}

sub stop
{
	my ($self) = @_;
	my $h = delete $self->{h} or return;
	eval {
		$self->{in} .= "quit\n";
		$h->finish(IPC::Run::timeout(10));
		1;
	} or eval { $h->kill_kill(grace => 2) };
	return;
}

package CqrsTest::MockCluster;

our @ISA = ('CqrsTest::LineProc');

sub bootstrap { return $_[0]{bootstrap} }

package CqrsTest::Broker;

our @started;

sub bootstrap { return $_[0]{bootstrap} }
sub node_id   { return $_[0]{node_id} }
sub port      { return $_[0]{port} }

sub pid
{
	my ($self) = @_;
	my $file = "$self->{env}{CQRS_TEST_DIR}/kafka-$self->{port}/broker.pid";
	open my $fh, '<', $file or return undef;
	my $pid = <$fh>;
	close $fh;
	chomp $pid if defined $pid;
	return $pid;
}

sub _run
{
	my ($self, $cmd) = @_;
	my $out = CqrsTest::_kafka_script($self->{env}, 'broker.sh', $cmd);
	$self->{stopped} = 1 if $cmd eq 'stop';
	return $out;
}

sub freeze { $_[0]->_run('freeze'); return }
sub thaw   { $_[0]->_run('thaw');   return }
sub halt   { $_[0]->_run('halt');   return }
sub resume { $_[0]->_run('resume'); return }
sub stop   { $_[0]->_run('stop');   return }

# broker.sh status's line, whatever its exit status
sub status
{
	my ($self) = @_;
	my $run = CqrsTest::_kafka_script_start($self->{env}, 'broker.sh', 'status');
	eval { $run->{h}->finish };
	my $out = $run->{out};
	chomp $out;
	return $out;
}

package CqrsTest;

# Children of the helpers above do not outlive the test: probes and mock
# clusters first, then the brokers, the last started (a joined one) first.
END
{
	local $?;
	$_->stop for grep { $_->{h} } @CqrsTest::LineProc::started;
	for my $b (reverse @CqrsTest::Broker::started)
	{
		next if $b->{stopped};
		eval { $b->stop };
	}
}

1;
