# The relay's waits heed interrupts, timers and Kafka's news (issue 12,
# item 9).  With a broker of its own (auto-creation off):
#  - a retry wakes the relay at its time, not at the next poll (poll
#    interval one hour here): a message failing for its size is
#    dead-lettered after its backoffs, within seconds;
#  - an idle relay still serves librdkafka: a broker that goes away while
#    nothing is sent shows in cqrs_stats_relay.last_error;
#  - the state is published also when no batch has rows: a paused topic
#    whose rows were discarded is not shown paused for ever;
#  - during an outage with librdkafka's queue full, the relay exits on
#    SIGTERM at once (within 2 s: nothing it waits for can come), DROP
#    DATABASE ... WITH (FORCE) of its database succeeds, and the relay exits
#    when the postmaster dies.
# The dead-letter depth poll is off here (cqrs_sync.dlt_depth_interval = 0),
# so that nothing but the relay's own loop serves librdkafka and wakes it.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $broker = kafka_broker_start(env => { KAFKA_AUTO_CREATE => 'false' });
my $brokers = $broker->bootstrap;
local $ENV{KAFKA_BROKERS} = $brokers;

my $props = PostgreSQL::Test::Utils::tempdir('props') . '/producer.properties';
PostgreSQL::Test::Utils::append_to_file($props,
	"topic.metadata.propagation.max.ms = 1000\nqueue.buffering.max.messages = 500\n");
chmod 0600, $props;

my $node = new_node(
	'interrupts',
	_create_extension             => 0,
	'cqrs_sync.database'          => 'app',
	'cqrs_sync.brokers'           => $brokers,
	'cqrs_sync.kafka_config_file' => $props,
	'cqrs_sync.poll_interval'     => '1h',
	# nothing else wakes the relay: no dead-letter depth poll beside it
	'cqrs_sync.dlt_depth_interval' => '0',
	'cqrs_sync.retry_backoff'     => '200ms',
	'cqrs_sync.max_retries'       => '3');
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->safe_psql('app',      'CREATE EXTENSION cqrs_sync');

sub app_sql { return $node->safe_psql('app', $_[0]) }

sub app_wait
{
	my ($sql, $expected, $timeout) = @_;
	my $deadline = time + ($timeout // 30);
	my $out;
	while (time < $deadline)
	{
		my ($rc, $o) = $node->psql('app', $sql);
		$out = $o;
		return 1 if $rc == 0 && $o eq $expected;
		usleep(100_000);
	}
	diag("app_wait: $sql gave '" . ($out // '') . "', expected '$expected'");
	return 0;
}

sub relay_pid
{
	my $pid = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
	return $pid =~ /^\d+$/ ? $pid : undef;
}

# ---- a retry wakes the relay at its time -------------------------------------------
my $small = unique_topic('small');
create_topic($small, 1, 'max.message.bytes=200000');
create_topic("$small.DLT", 1);
app_sql("SELECT cqrs_enqueue('$small', 'k', '{}')");
ok(app_wait("SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 60), 'the topic works');
my $t0 = time;
my $big = app_sql("SELECT cqrs_enqueue('$small', 'big', jsonb_build_object('big', repeat('x', 300000)))");
ok(app_wait("SELECT status FROM cqrs_outbox WHERE id = $big", 'DEAD_LETTERED', 30),
	'the oversized row is dead-lettered after its retries, with a poll interval of an hour');
note(sprintf('dead-lettered after %.1f s (backoffs 0.2 + 0.4 + 0.8 s and a limit check)', time - $t0));
is(app_sql("SELECT retry_count FROM cqrs_outbox WHERE id = $big"), '4', 'after 1 + 3 failed attempts');

# ---- a paused topic whose rows were discarded is not shown paused for ever ----------
my $missing = unique_topic('missing');
my $mid = app_sql("SELECT cqrs_enqueue('$missing', 'k', '{}')");
ok(app_wait("SELECT state FROM cqrs_stats_relay", 'paused', 30), 'a missing topic pauses the relay');
my $discarded = 0;
for (1 .. 100)
{
	my ($rc) = $node->psql('app', "SELECT cqrs_discard($mid, 'test: the topic will not exist')");
	if ($rc == 0) { $discarded = 1; last }
	usleep(100_000);    # refused while in flight
}
ok($discarded, 'its row was discarded');
ok(app_wait("SELECT state FROM cqrs_stats_relay", 'running', 90),
	'once the pause lapsed the relay says running again, though no batch has rows');

# ---- an idle relay serves librdkafka ----------------------------------------------------
app_sql("SELECT cqrs_enqueue('$small', 'k', '{}')");
ok(app_wait("SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT' AND topic = '$small'", '2', 30),
	'caught up: the relay is idle');
my $halted_at = app_sql('SELECT now()');
$broker->halt;
ok( app_wait(
		"SELECT last_error_at > '$halted_at' AND last_error ~ 'TRANSPORT|ALL_BROKERS_DOWN' FROM cqrs_relay_state()",
		't', 30),
	'the idle relay noticed that the broker went away (last_error)');

# ---- an outage with librdkafka's queue full ---------------------------------------------
app_sql("SELECT count(cqrs_enqueue('$small', 'o' || (g % 50), jsonb_build_object('n', g))) FROM generate_series(1, 5000) g");
sleep 3;    # the relay fills librdkafka's queue (500 messages) and waits

my $pid = relay_pid();
ok(defined $pid, 'the relay runs during the outage');
$t0 = time;
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
my $gone = 0;
while (time - $t0 < 10)
{
	if (!kill 0, $pid) { $gone = 1; last }
	usleep(50_000);
}
my $took = time - $t0;
ok($gone && $took < 2, sprintf('SIGTERM: the relay exited at once (%.1f s) although Kafka is away', $took));

ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay' AND pid <> $pid",
		'1', 30),
	'it was started again');
sleep 3;
$t0 = time;
my ($rc, $out, $err) = $node->psql('postgres', 'DROP DATABASE app WITH (FORCE)', timeout => 60);
is($rc, 0, 'DROP DATABASE app WITH (FORCE) succeeds during the outage') or diag($err);
note(sprintf('DROP DATABASE took %.1f s', time - $t0));

# the relay cannot connect to a dropped database: give it one back, wait
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->safe_psql('app',      'CREATE EXTENSION cqrs_sync');
app_sql("SELECT count(cqrs_enqueue('$small', 'o' || (g % 50), jsonb_build_object('n', g))) FROM generate_series(1, 5000) g");
ok(wait_for($node, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'", '1', 30),
	'the relay runs again in the new database');
sleep 3;
$pid = relay_pid();
my $postmaster = $node->{_pid};
my @others = grep { $_ != $pid } split ' ', `pgrep -P $postmaster`;
kill 'KILL', $postmaster;
$t0 = time;
$gone = 0;
while (time - $t0 < 10)
{
	if (!kill 0, $pid) { $gone = 1; last }
	usleep(50_000);
}
ok($gone, sprintf('the relay exited %.1f s after the postmaster died', time - $t0));
kill 'KILL', @others;
$node->{_pid} = undef;

done_testing();
