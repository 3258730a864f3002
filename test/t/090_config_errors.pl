# A configuration error is not the message's fault: with a topic that does
# not exist (auto-creation off), its rows stay PENDING without spending
# budget, nothing is dead-lettered, the topic is paused with a WARNING
# (SQLSTATE CQ002) and a NOTIFY, other topics flow, and once the topic exists
# its rows are sent.  Also: librdkafka settings come from the properties
# file, and a secret in it appears in no log, setting or view.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $SECRET = 'Sup3r-Secret-Passw0rd';

my $port = PostgreSQL::Test::Cluster::get_free_port();    # the controller takes +1
local $ENV{KAFKA_PORT}        = $port;
local $ENV{KAFKA_AUTO_CREATE} = 'false';
local $ENV{CQRS_TEST_DIR}     = PostgreSQL::Test::Utils::tempdir('cfg');
sub run_script
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'bash', @cmd ], '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(120))
	  or die "@cmd failed: $out$err";
	return $out;
}
my $brokers = run_script("$ENV{CQRS_REPO}/test/kafka/broker.sh", 'start');
chomp $brokers;
local $ENV{KAFKA_BROKERS} = $brokers;

# the properties file: unknown topics fail fast; a secret that must not leak
my $props = PostgreSQL::Test::Utils::tempdir('props') . '/producer.properties';
open my $fh, '>', $props or die;
print $fh "# producer settings for the test\n",
  "topic.metadata.propagation.max.ms = 1000\n",
  "sasl.password = $SECRET\n";
close $fh;
chmod 0600, $props;

my $node = new_node(
	'config',
	'cqrs_sync.brokers'           => $brokers,
	'cqrs_sync.kafka_config_file' => $props,
	'cqrs_sync.retry_backoff'     => '200ms',
	'cqrs_sync.max_retries'       => '1',
	'log_line_prefix'             => '%m [%p] %e ');

my $good    = 'cqrs-good';
my $missing = 'cqrs-missing';
run_script("$ENV{CQRS_REPO}/test/kafka/topic.sh", 'create', $good, 2);

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cqrs_sync_alert');

$node->safe_psql('postgres',
	"SELECT cqrs_enqueue(CASE WHEN g % 2 = 0 THEN '$good' ELSE '$missing' END, 'k' || (g % 5), jsonb_build_object('n', g)) FROM generate_series(1, 20) g"
);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$good' AND status = 'SENT'", '10', 30),
	'rows of the existing topic are sent');
ok($node->wait_for_log(qr/CQ002 WARNING:  cqrs_sync relay: topic "$missing" is paused/),
	'the missing topic is paused with a WARNING (SQLSTATE CQ002)');
is( $node->safe_psql('postgres', 'SELECT paused, state, paused_topic FROM cqrs_stats_relay'),
	"1|paused|$missing", 'cqrs_stats_relay says the relay is paused, and on which topic');
like($node->safe_psql('postgres', 'SELECT paused_reason FROM cqrs_stats_relay'),
	qr/UNKNOWN_TOPIC/, 'and why');
usleep(3_000_000);
is( $node->safe_psql('postgres',
		"SELECT status || ' ' || count(*) || ' ' || sum(retry_count) FROM cqrs_outbox WHERE topic = '$missing' GROUP BY status"),
	'PENDING 10 0',
	'its rows stay PENDING and spend no retry budget, even with max_retries = 1');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status <> 'PENDING' AND topic = '$missing'"),
	'0', 'nothing dead-lettered');
like($listener->query('SELECT 1'),
	qr/Asynchronous notification "cqrs_sync_alert" with payload ".*topic_paused.*\Q$missing\E/s,
	'a topic_paused NOTIFY');
$listener->quit;

# while the topic is paused, the other topic's rows flow on and the relay
# records them, but its mark stays at the paused topic's first row: a relay
# restarted now still sends that topic's rows once it exists
my $first_missing =
  $node->safe_psql('postgres', "SELECT min(id) FROM cqrs_outbox WHERE topic = '$missing'");
for my $n (1 .. 10)
{
	$node->safe_psql('postgres', "SELECT cqrs_enqueue('$good', 'more', jsonb_build_object('more', $n))");
	usleep(300_000);
}
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$good' AND status = 'SENT'", '20', 30),
	'the other topic flows on while one is paused');
is($node->safe_psql('postgres', "SELECT scan_from <= $first_missing FROM cqrs_relay_mark"),
	't', "the relay's mark stays at the paused topic's first row");
ok(restart_relay($node), 'the relay restarts');

run_script("$ENV{CQRS_REPO}/test/kafka/topic.sh", 'create', $missing, 2);
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$missing' AND status = 'SENT'", '10', 90),
	'once the topic exists its rows are sent');
my @msgs = kafka_consume($missing, 10, 30);
is(scalar @msgs, 10, 'all 10 in Kafka');
is($node->safe_psql('postgres', 'SELECT paused, state FROM cqrs_stats_relay'),
	'0|running', 'the relay is running again');

# the secret never shows
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$SECRET\E/, 'the secret is not in the server log');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_settings WHERE setting LIKE '%$SECRET%'"),
	'0', 'nor in any setting');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_outbox_stats() s WHERE s::text LIKE '%$SECRET%'"),
	'0', 'nor in the stats');

# a properties file others may write is refused
chmod 0666, $props;
$node->reload;
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$good', 'k', '{}')");
ok($node->wait_for_log(qr/librdkafka settings file .* has group or world access/),
	'a group- or world-writable properties file is refused');
chmod 0600, $props;

$node->stop;
run_script("$ENV{CQRS_REPO}/test/kafka/broker.sh", 'stop');
done_testing();
