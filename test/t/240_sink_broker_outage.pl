# A broker outage pauses the sink and spends no retry budget (issue 14):
# the test's own broker is stopped for 60 s while a sink consumes from it;
# meanwhile the application keeps committing events (the relay holds them),
# the sink says "waiting for broker" for the whole outage (librdkafka
# reports a repeated connection error once per 30 s: before, the state went
# back to "running" 5 s after each report, so CqrsSyncSinkBrokerDown, with
# its "for: 5m", could not fire), and nothing is held, retried or
# dead-lettered.  When the broker returns the sink resumes by itself: every
# event of before, during and after the outage is applied exactly once.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $OUTAGE = 60;

my $broker = kafka_broker_start();
local $ENV{KAFKA_BROKERS} = $broker->bootstrap;

my $node  = new_node('sink_outage', 'cqrs_sync.brokers' => $broker->bootstrap);
my $topic = unique_topic('sink-outage');
create_topic($topic, 4);

# keys 1-500 published twice before the outage; keys 501-1000 committed
# through the outbox during it, and keys 1001-1500 after it
my ($before, $exp1) = exact_events(500, 20, 2, 1);
my ($during, $exp2) = exact_events(500, 20, 1, 501);
my ($after,  $exp3) = exact_events(500, 20, 1, 1001);
my %expected = (%$exp1, %$exp2, %$exp3);

# the application's events, committed through cqrs_enqueue() in order
sub enqueue
{
	my ($events) = @_;
	my $values = join(",\n", map {
		my ($k, undef, $v) = @$_;
		$v =~ s/'/''/g;
		"('$k', '$v')"
	} @$events);
	$node->safe_psql('postgres', qq{
CREATE TEMP TABLE batch (n serial, k text, v jsonb);
INSERT INTO batch (k, v) VALUES $values;
SELECT count(cqrs_enqueue('$topic', k, v)) FROM (SELECT * FROM batch ORDER BY n) b;
});
}

exact_setup($node, 'outage', $topic, max_retries => 0);
kafka_produce_events($topic, $before);
ok(wait_applied($node, 'outage', scalar @$before, 60), 'the events before the outage are applied');

$broker->halt;
my $down = time;
enqueue($during);
ok(wait_for($node, "SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0", 'waiting for broker', 40),
	'the sink says it waits for the broker');
# the state, every second until the outage ends
my %seen;
while (time - $down < $OUTAGE - 1)
{
	$seen{ $node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0') }++;
	usleep(1_000_000);
}
is(join(',', sort keys %seen), 'waiting for broker', 'the sink says so for the whole outage')
  or diag(join(', ', map { "$_: $seen{$_} s" } sort keys %seen));
usleep(int(($OUTAGE - (time - $down)) * 1_000_000)) if time - $down < $OUTAGE;
is($node->safe_psql('postgres',
	"SELECT count(*) FROM cqrs_sink_held WHERE sink = 'outage'"), '0',
	sprintf('after %.0f s without a broker nothing is held or dead-lettered', time - $down));
is($node->safe_psql('postgres',
	"SELECT sum(retried + dead_lettered + dlt_failed) FROM cqrs_sink_offset WHERE sink = 'outage'"), '0',
	'no retry budget spent');
$broker->resume;
note(sprintf('broker back after %.1f s', time - $down));

enqueue($after);
my $total = scalar(@$before) + scalar(@$during) + scalar(@$after);
ok(wait_applied($node, 'outage', $total, 120), 'the sink resumed by itself and accounted for every message');
ok(wait_for($node, "SELECT state FROM cqrs_stats_sink_workers WHERE worker = 0", 'running', 30),
	'the sink says it runs again');
my $c = sink_counts($node, 'outage');
is($c->{applied},    $total - @$before / 2, 'each event applied exactly once');
is($c->{duplicates}, @$before / 2, 'each copy skipped once');
is($c->{retried} + $c->{dead_lettered} + $c->{dlt_failed}, 0, 'nothing retried or dead-lettered');
exact_check($node, \%expected, 'the read model is exact');

$node->stop;
done_testing();
