# The librdkafka properties file (issue 12, item 10): its lines may be long
# (PEM values), it must not be readable by group or others, and no value of
# it is ever echoed into the server log, last_error or a view, even when
# librdkafka refuses it.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Fcntl qw(O_WRONLY O_NONBLOCK);

my $SECRET = 'Sup3r-Secret-Valu3';
my $dir    = PostgreSQL::Test::Utils::tempdir('props');
my $props  = "$dir/producer.properties";

sub write_props
{
	my ($text, $mode) = @_;
	open my $fh, '>', $props or die "$props: $!";
	print $fh $text;
	close $fh;
	chmod $mode, $props;
}

# a line of 10,000 characters
my $long = 'c' x 10000;
write_props("# producer settings\nclient.id = $long\nsasl.password = $SECRET\n", 0600);

my $node = new_node(
	'props',
	'cqrs_sync.kafka_config_file' => $props,
	'log_line_prefix'             => '%m [%p] %e ');
my $topic = unique_topic('props');

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k', '{\"n\": 1}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 30),
	'a file with a 10,000-character line is read whole and used');

# readable by the group: refused
chmod 0640, $props;
$node->reload;
ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'no producer', 30),
	'a properties file readable by group is refused (state: no producer)');
like($node->safe_psql('postgres', 'SELECT last_error FROM cqrs_stats_relay'),
	qr/group or world access/, 'and last_error says why');

# a value librdkafka refuses is not echoed
write_props("linger.ms = not-a-number-$SECRET\nsasl.password = $SECRET\n", 0600);
$node->reload;
ok( wait_for($node,
		"SELECT last_error LIKE '%linger.ms%' FROM cqrs_stats_relay", 't', 30),
	'a refused property is reported by name');
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$SECRET\E/, 'the refused value is not in the server log');
unlike($node->safe_psql('postgres', 'SELECT last_error FROM cqrs_stats_relay'),
	qr/\Q$SECRET\E/, 'nor in last_error');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM cqrs_stats_relay s WHERE s::text LIKE '%$SECRET%'"),
	'0', 'nor anywhere in the view');

# a Java-style "name: value" line whose value ends in "=" (base64): what
# comes before the "=" is no property name, holds the secret, and is not
# quoted
my $B64 = 'U2VjcmV0QmFzZTY0VmFsdWU';
write_props("sasl.password: $B64==\n", 0600);
$node->reload;
ok( wait_for($node,
		"SELECT last_error LIKE '%line 1 of librdkafka settings file%is not name=value%' FROM cqrs_stats_relay",
		't', 30),
	'a "name: value" line is refused as not name=value');
unlike(slurp_file($node->logfile), qr/\Q$B64\E/, 'its value is not in the server log');
unlike($node->safe_psql('postgres', 'SELECT last_error FROM cqrs_stats_relay'),
	qr/\Q$B64\E/, 'nor in last_error');

# a secret that matches its own redaction ("***", a placeholder left in the
# file): redacting a text that holds it must end.  librdkafka echoes a value
# it refuses for a property with a fixed set of values.
write_props("sasl.password = ***\ncompression.codec = ***\n", 0600);
$node->reload;
ok( wait_for($node,
		"SELECT last_error LIKE '%compression.codec%' FROM cqrs_stats_relay", 't', 30),
	'a secret of "***" is redacted without looping: the refused property is reported');

# without a producer the relay waits: a rescan it cannot serve (here the one
# cqrs_wake_relay() asks for, back to the first row) once kept it busy, at
# full CPU, until the file was fixed
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k', '{\"n\": 2}')");
$node->safe_psql('postgres', 'SELECT cqrs_wake_relay()');
my $relay = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");

sub relay_cpu_s
{
	my @f = split ' ', (split /\)/, slurp_file("/proc/$relay/stat"))[-1];
	return ($f[11] + $f[12]) / 100;
}
my $cpu0 = relay_cpu_s();
sleep 5;
my $used = relay_cpu_s() - $cpu0;
cmp_ok($used, '<', 0.1, "without a producer the relay does not spin ($used s of CPU in 5 s)");
is($node->safe_psql('postgres', 'SELECT state FROM cqrs_stats_relay'),
	'no producer', 'and still says why it does not send');

# fixed: it runs again
write_props("sasl.password = $SECRET\n", 0600);
$node->reload;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '2', 30),
	'with the file fixed, the relay sends again');

# settings that would break what the relay rests on are refused: without the
# reports of delivered messages nothing becomes SENT, and every restart sends
# the window again; a transactional producer fails every produce outside a
# transaction
for my $bad ('delivery.report.only.error = true', 'transactional.id = cqrs')
{
	my ($name) = $bad =~ /^(\S+)/;
	write_props("sasl.password = $SECRET\n$bad\n", 0600);
	$node->reload;
	ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'no producer', 30),
		"a file that sets $name is refused (state: no producer)");
	like($node->safe_psql('postgres', 'SELECT last_error FROM cqrs_stats_relay'),
		qr/sets "\Q$name\E", which cqrs_sync sets itself/, 'and last_error names the setting');
	write_props("sasl.password = $SECRET\n", 0600);
	$node->reload;
	ok(wait_for($node, 'SELECT state FROM cqrs_stats_relay', 'running', 30),
		'with the line removed, the relay runs again');
}
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k', '{\"n\": 3}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '3', 30),
	'and sends');

# librdkafka's unsecured JWT is refused: with librdkafka 2.0.2 its token
# refresh crashed the relay (SIGSEGV on librdkafka's own thread), and the
# postmaster restarted the whole server, at every refresh (here every 2 s)
my $logpos = -s $node->logfile;
write_props("security.protocol = SASL_PLAINTEXT\nsasl.mechanism = OAUTHBEARER\n"
	  . "enable.sasl.oauthbearer.unsecure.jwt = true\n"
	  . "sasl.oauthbearer.config = principal=cqrs lifeSeconds=2\n",
	0600);
$node->reload;
ok( wait_for($node,
		"SELECT state || ': ' || (last_error LIKE '%enable.sasl.oauthbearer.unsecure.jwt%refuses%') FROM cqrs_stats_relay",
		'no producer: true', 30),
	'a file that enables the unsecured JWT is refused (state: no producer, and why)');
sleep 6;
unlike(slurp_file($node->logfile, $logpos), qr/terminated by signal/,
	'and no process of the server crashed');
write_props("sasl.password = $SECRET\n", 0600);
$node->reload;
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k', '{\"n\": 5}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '4', 30),
	'with the file fixed, the relay sends again');

# a named pipe in the file's place is refused without waiting for a writer;
# before, the relay hung in open() (deaf to SIGTERM, the server could not
# stop) until something wrote to the pipe
unlink $props or die "$props: $!";
system('mkfifo', '-m', '0600', $props) == 0 or die "mkfifo $props failed";
$node->reload;
ok( wait_for($node,
		"SELECT state || ': ' || (last_error LIKE '%is not a regular file%') FROM cqrs_stats_relay",
		'no producer: true', 30),
	'a named pipe as the properties file is refused at once (state: no producer, and why)');
# (a relay held in open() is let go, so that the server can stop)
if (sysopen(my $w, $props, O_WRONLY | O_NONBLOCK))
{
	print $w "sasl.password = $SECRET\n";
	close $w;
}
unlink $props or die "$props: $!";
write_props("sasl.password = $SECRET\n", 0600);
$node->reload;
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k', '{\"n\": 6}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '5', 30),
	'with a file again, the relay sends');

$node->stop;
done_testing();
