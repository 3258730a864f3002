# Crashes during a 125,000-event run: the relay worker is killed with SIGKILL
# five times while it drains a backlog, and the postmaster once.  Every
# committed event must reach Kafka (0 lost), duplicates stay within one batch
# per kill, per-key order holds (by first delivery), and the worker is back
# within 5 s each time.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $CHUNK  = 5_000;
my $CHUNKS = 10;
my $KEYS   = 1_000;
# A backlog the relay is killed in is this many chunks: on a quiet machine the
# relay drains 5,000 rows in well under 100 ms, less than the random wait plus
# the count before the kill.
my $BACKLOG = 4;

my $node  = new_node('crash');
my $topic = unique_topic('crash');
my $batch = $node->safe_psql('postgres', 'SHOW cqrs_sync.batch_size');

# psql that tolerates a server in crash recovery: returns undef on failure
# (also when psql, refused a connection, exits before it read the query it
# is given on its input: IPC::Run then dies of a broken pipe)
sub try_psql
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $rc = eval { $node->psql('postgres', $sql, stdout => \$out, stderr => \$err, timeout => 30) };
	return (defined $rc && $rc == 0) ? $out : undef;
}

sub relay_pid
{
	my $pid = try_psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
	return (defined $pid && $pid =~ /^\d+$/) ? $pid : undef;
}

# seconds until a relay other than $old runs (undef after 30 s)
sub relay_back_after
{
	my ($old, $since) = @_;
	while (time - $since < 30)
	{
		my $pid = relay_pid();
		return time - $since if defined $pid && (!defined $old || $pid != $old);
		usleep(50_000);
	}
	return undef;
}

# commit $n chunks (default 1) in one transaction, retrying while the server
# restarts
my $next = 1;
sub enqueue_chunk
{
	my ($n) = @_;
	my $from = $next;
	my $to   = $from + $CHUNK * ($n // 1) - 1;
	$next = $to + 1;
	my $deadline = time + 90;
	while (time < $deadline)
	{
		return 1 if defined try_psql(
			"SELECT count(cqrs_enqueue('$topic', 'key-' || (g % $KEYS), jsonb_build_object('n', g, 'body', repeat('x', 200)))) FROM generate_series($from, $to) g"
		);
		usleep(200_000);
	}
	return 0;
}

my $kills = 0;
my @back;
for my $c (0 .. $CHUNKS - 1)
{
	if ($c >= 1 && $c <= 5)
	{
		# the chunk is a backlog the relay drains when it is killed: it is
		# frozen while the chunk is written, and killed shortly after it
		# resumed
		my $pid = relay_pid();
		ok(defined $pid, "relay running before kill $c");
		next unless defined $pid;
		$pid = freeze_relay($node);
		ok(enqueue_chunk($BACKLOG), "chunk $c committed ($BACKLOG x $CHUNK rows)");
		kill 'CONT', $pid;
		usleep(int(rand(40_000)));
		# (a killed worker makes the postmaster restart the cluster: count first)
		my $pending = try_psql("SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'") // 0;
		my $t0 = time;
		kill 'KILL', $pid;
		$kills++;
		cmp_ok($pending, '>', 0, "killed while draining a backlog ($pending rows pending just before)");
		my $s = relay_back_after($pid, $t0);
		push @back, $s;
		ok(defined $s && $s <= 5,
			sprintf('relay back %.2f s after SIGKILL %d', $s // -1, $kills));
	}
	elsif ($c == 7)
	{
		ok(enqueue_chunk(), "chunk $c committed");
		usleep(int(rand(60_000)));
		my $postmaster = $node->{_pid};
		$node->kill9;
		$kills++;
		# the old backends and workers exit once they notice its death
		for (1 .. 100)
		{
			last unless kill 0, $postmaster;
			usleep(100_000);
		}
		my $started = 0;
		for (1 .. 50)
		{
			last if $started = $node->start(fail_ok => 1);
			$node->{_pid} = undef;    # a failed start may have read the old pid file
			usleep(200_000);
		}
		ok($started, 'postmaster restarted after SIGKILL');
		my $t0 = time;
		my $s = relay_back_after(undef, $t0);
		push @back, $s;
		ok(defined $s && $s <= 5,
			sprintf('relay back %.2f s after the postmaster restart', $s // -1));
	}
	else
	{
		ok(enqueue_chunk(), "chunk $c committed");
	}
}
is($kills, 6, 'six kills: five of the relay, one of the postmaster');

ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 120),
	'every committed row became SENT');

my %outbox;    # event_id => id
for my $line (split /\n/,
	$node->safe_psql('postgres', "SELECT event_id, id FROM cqrs_outbox WHERE topic = '$topic'"))
{
	my ($eid, $id) = split /\|/, $line;
	$outbox{$eid} = $id;
}
my $committed = scalar keys %outbox;
cmp_ok($committed, '>=', $next - 1, "at least " . ($next - 1) . " events committed ($committed)");

my @msgs = kafka_consume($topic, $committed, 120);
my (%seen, $unknown);
for my $m (@msgs)
{
	my $eid = $m->{headers}{event_id} // '';
	$unknown++ unless exists $outbox{$eid};
	$seen{$eid}++;
}
my $lost = grep { !$seen{$_} } keys %outbox;
my $dups = scalar(@msgs) - scalar(keys %seen);
is($lost, 0, 'no committed event lost');
is($unknown // 0, 0, 'no message without an outbox row');
cmp_ok($dups, '<=', $kills * $batch, "duplicates ($dups) at most one batch ($batch) per kill");
note("messages: " . scalar(@msgs) . ", distinct: " . scalar(keys %seen) . ", duplicates: $dups");

# order per key, by first delivery
my (%last, %first_seen, $disorder);
for my $m (@msgs)
{
	my $eid = $m->{headers}{event_id} // '';
	next if $first_seen{$eid}++ || !exists $outbox{$eid};
	my $id = $outbox{$eid};
	$disorder++ if defined $last{ $m->{key} } && $id < $last{ $m->{key} };
	$last{ $m->{key} } = $id;
}
is($disorder // 0, 0, 'per key, first deliveries are in outbox id order');

$node->stop;
done_testing();
