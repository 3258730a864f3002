# A held event that cannot even be tried again does not make the sink worker
# spin.  A handler fails on one event, which is held as RETRY with a large
# retry budget and a short backoff, so it is due again and again.  The
# database is then made read-only (ALTER SYSTEM SET
# default_transaction_read_only, a reload) for about 20 s: every try of the
# held events fails as a whole (sink_retry_due() returns -1, the failure
# cannot be recorded, so the event stays due) and the worker must wait a
# second before the next.
#
# Before the fix it did not: retry_held() returned early while that second
# ran, but a catalog read (every 5 s, and at each wake-up by
# cqrs_sink_wake(), which sink changes and operator functions call) or the
# end of a replay fetch set next_retry_at to 0, and sink_turn() took 0 for
# "go on at once": the worker looped without sleeping, at full CPU, until the
# second was over, and every second after each wake-up.  The test wakes the
# workers about four times a second while it samples the worker's CPU time,
# so a worker that spins uses most of the 15 s (seconds of CPU) where a
# sleeping one uses a few tens of ms.  Once the database accepts writes again
# and the handler is fixed, the held event, the event of its key behind it
# and a new event are applied.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use POSIX ();
use Test::More;
use Time::HiRes qw(time usleep);

my $SAMPLE = 15;       # seconds of CPU sampling, while read-only
my $MAX_CPU = 1.5;     # seconds of CPU allowed in them

my $node = new_node('sink_retry_wait',
	'cqrs_sync.relay_enabled' => 'off',
	'log_line_prefix'         => '%m [%p] %e ');
my $topic = unique_topic('sink-retry-wait');
create_topic($topic, 2);

# wait_apply(): records the events it applies; with $poison_raises, events
# marked "poison" raise (a handler that cannot cope with them yet)
sub define_handler
{
	my ($poison_raises) = @_;
	poison_handler($node, 'wait_apply',
		q{INSERT INTO wait_order (id, event_id) VALUES ((e.payload->>'id')::bigint, e.event_id);},
		$poison_raises);
	return;
}

$node->safe_psql('postgres', 'CREATE TABLE wait_order (n serial, id bigint, event_id text)');
define_handler(1);
# 10 ms, doubled per attempt up to 64 times: the event is due at least every 640 ms
$node->safe_psql('postgres', qq{
SELECT cqrs_sink_create('wait', ARRAY['$topic'], 'wait_apply(cqrs_event)',
                        '{"max_retries": 1000, "retry_backoff": "10ms"}');
});

kafka_produce_events($topic, [
	[ 'k1', 'e-poison', '{"id":1,"poison":true}' ],
	[ 'k1', 'e-after',  '{"id":1}' ],
	[ 'k2', 'e-other',  '{"id":2}' ] ]);
ok(wait_for($node,
	"SELECT string_agg(status, ',' ORDER BY \"offset\") FROM cqrs_sink_held WHERE sink = 'wait'",
	'RETRY,BLOCKED', 30),
	'the failing event is held for a retry, the later event of its key behind it');
ok(wait_for($node, "SELECT attempts >= 3 FROM cqrs_sink_held WHERE event_id = 'e-poison'", 't', 30),
	'and is tried again and again');
ok(wait_for($node, "SELECT count(*) FROM wait_order WHERE event_id = 'e-other'", '1', 30),
	'the other key was applied');

my @pids = sink_worker_pids($node);
is(scalar @pids, 1, 'one sink worker');
my $pid = $pids[0];

# utime + stime of the whole process (librdkafka's threads too), in seconds
my $tck = POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100;
sub worker_cpu_s
{
	my @f = split ' ', (split /\)/, slurp_file("/proc/$pid/stat"))[-1];
	return ($f[11] + $f[12]) / $tck;
}

# ---- read-only ------------------------------------------------------------------

my $log_offset = -s $node->logfile;
$node->safe_psql('postgres', 'ALTER SYSTEM SET default_transaction_read_only = on');
$node->reload;
ok($node->wait_for_log(
		qr/cqrs_sync sink: could not try held events again: .*read-only transaction/, $log_offset),
	'read-only, the held event cannot be tried again');

# This tests for a busy loop, not for a speed: a worker spinning here uses
# several seconds of CPU, one that sleeps a few tens of ms; the bound is
# generous because the machine running the tests is noisy.
my $t0   = time;
my $cpu0 = worker_cpu_s();
my $wakes = 0;
while (time - $t0 < $SAMPLE)
{
	# each wake-up makes the worker read the sinks (next_retry_at = 0)
	$node->safe_psql('postgres', 'SELECT cqrs_sink_wake()');
	$wakes++;
	usleep(250_000);
}
my $used    = worker_cpu_s() - $cpu0;
my $elapsed = time - $t0;
cmp_ok($used, '<', $MAX_CPU,
	sprintf('a held event that cannot be tried does not make the worker spin'
		  . ' (%.2f s of CPU in %.1f s, %d wake-ups)', $used, $elapsed, $wakes));
is($node->safe_psql('postgres', "SELECT status FROM cqrs_sink_held WHERE event_id = 'e-poison'"),
	'RETRY', 'the event is still held for a retry');

$node->safe_psql('postgres', 'ALTER SYSTEM RESET default_transaction_read_only');
$node->reload;

# ---- writable again, the handler fixed ---------------------------------------------

define_handler(0);
ok(wait_for($node, "SELECT string_agg(event_id, ',' ORDER BY n) FROM wait_order WHERE id = 1",
	'e-poison,e-after', 30),
	'writable again and the handler fixed, the held event is applied, then the one behind it');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_sink_held WHERE sink = 'wait'"), '0',
	'nothing held any more');
kafka_produce_events($topic, [ [ 'k3', 'e-new', '{"id":3}' ] ]);
ok(wait_for($node, "SELECT count(*) FROM wait_order WHERE event_id = 'e-new'", '1', 30),
	'and the worker goes on consuming');
is_deeply([ sink_worker_pids($node) ], [$pid], 'the same worker throughout');

$node->stop;
done_testing();
