# A broker outage pauses the relay and spends no retry budget: the broker is
# stopped for 60 s in the middle of 50,000 events; afterwards nothing is
# dead-lettered, nothing lost, per-key order holds, and everything is SENT
# within 30 s of the broker's return.  This test runs its own broker (it
# stops and restarts it, keeping its data).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $OUTAGE = $ENV{CQRS_OUTAGE_SECONDS} // 60;
my $CHUNK  = 5_000;
my $KEYS   = 1_000;

# our own broker, on a port of its own
my $port = PostgreSQL::Test::Cluster::get_free_port();    # the controller takes +1
local $ENV{KAFKA_PORT}    = $port;
local $ENV{CQRS_TEST_DIR} = PostgreSQL::Test::Utils::tempdir('outage');
sub broker
{
	my ($cmd) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'bash', "$ENV{CQRS_REPO}/test/kafka/broker.sh", $cmd ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(120))
	  or die "broker.sh $cmd failed: $out$err";
	note("broker.sh $cmd: $err");
	return $out;
}
my $brokers = broker('start');
chomp $brokers;
local $ENV{KAFKA_BROKERS} = $brokers;

my $node  = new_node('outage', 'cqrs_sync.brokers' => $brokers);
my $topic = unique_topic('outage');

sub enqueue_chunk
{
	my ($c) = @_;
	my $from = $c * $CHUNK + 1;
	my $to   = $from + $CHUNK - 1;
	$node->safe_psql('postgres',
		"SELECT count(cqrs_enqueue('$topic', 'key-' || (g % $KEYS), jsonb_build_object('n', g))) FROM generate_series($from, $to) g"
	);
}

enqueue_chunk($_) for 0 .. 2;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", 3 * $CHUNK, 60),
	'the first 15,000 events are sent');

broker('halt');
my $down = time;
enqueue_chunk($_) for 3 .. 9;    # 35,000 events while the broker is down
usleep(int(($OUTAGE - (time - $down)) * 1_000_000)) if time - $down < $OUTAGE;
is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE status IN ('DEAD_LETTERED', 'DLT_FAILED') OR retry_count > 0"),
	'0', "after ${OUTAGE} s of outage: nothing dead-lettered, no retry budget spent");
cmp_ok($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'"),
	'>', 0, 'the events of the outage wait as PENDING');
is($node->safe_psql('postgres', 'SELECT paused, state FROM cqrs_stats_relay'),
	'1|waiting for broker', 'cqrs_stats_relay says the relay waits for the broker');

# cqrs_discard() refuses a row the relay has in flight, and drops one it has not
my $inflight = $node->safe_psql('postgres', "SELECT min(id) FROM cqrs_outbox WHERE status = 'PENDING'");
my ($rc, $out, $err) = $node->psql('postgres', "SELECT cqrs_discard($inflight, 'outage test')");
isnt($rc, 0, 'discarding a row waiting in the producer is refused');
like($err, qr/is being sent right now/, 'with a reason');
my ($last, $last_eid) = split /\|/, $node->safe_psql('postgres',
	"SELECT id, event_id FROM cqrs_outbox WHERE status = 'PENDING' ORDER BY id DESC LIMIT 1");
($rc, $out, $err) = $node->psql('postgres', "SELECT cqrs_discard($last, 'outage test')");
is($rc, 0, 'a row not yet claimed is discarded') or diag($err);

broker('resume');
my $back = time;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 30),
	'all SENT within 30 s of the broker\'s return');
note(sprintf('all SENT %.1f s after the broker answered again', time - $back));
is($node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_relay'), 'running', 'and runs again');

is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT' OR retry_count > 0 OR dlt_retry_count > 0"),
	'0', '0 dead-lettered, 0 retries counted');

my %outbox;
for my $line (split /\n/, $node->safe_psql('postgres', "SELECT event_id, id FROM cqrs_outbox"))
{
	my ($eid, $id) = split /\|/, $line;
	$outbox{$eid} = $id;
}
# every event but the discarded one (waiting for that one would take the whole timeout)
my @msgs = kafka_consume($topic, 10 * $CHUNK - 1, 60, json => 0);
my (%seen, %last, $disorder);
for my $m (@msgs)
{
	my $eid = $m->{headers}{event_id} // '';
	next if $seen{$eid}++;
	my $id = $outbox{$eid} // next;
	$disorder++ if defined $last{ $m->{key} } && $id < $last{ $m->{key} };
	$last{ $m->{key} } = $id;
}
is(scalar(grep { !$seen{$_} } keys %outbox), 0, '0 lost: every event is in Kafka');
ok(!$seen{$last_eid}, 'the discarded event is not');
is($disorder // 0, 0, 'per-key order intact (by first delivery)');
note('messages ' . scalar(@msgs) . ', distinct ' . scalar(keys %seen));

$node->stop;
broker('stop');
done_testing();
