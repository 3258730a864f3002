# Settings are checked when they are set, not when the relay uses them
# (issue 13, item 5).  An empty cqrs_sync.dlt_suffix would dead-letter into
# the source topic itself; a suffix with characters Kafka refuses would make
# every dead letter DLT_FAILED; a malformed broker list or read-side DLT
# topic list fails later, in the relay.  Each is refused by ALTER SYSTEM
# (SQLSTATE 22023), ignored with a log message by a reload and at start-up
# (the setting keeps its value), while valid values are accepted.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('settings', 'cqrs_sync.relay_enabled' => 'off');

sub alter_system
{
	my ($name, $value) = @_;
	(my $q = $value) =~ s/'/''/g;
	my ($rc, $out, $err) = $node->psql('postgres', "ALTER SYSTEM SET $name = '$q'",
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	$node->psql('postgres', "ALTER SYSTEM RESET $name");
	return ($rc, $err);
}

my @bad = (
	[ 'cqrs_sync.dlt_suffix', '', qr/The dead-letter suffix must not be empty/ ],
	[ 'cqrs_sync.dlt_suffix', '.DLT/x', qr/"\/"/ ],
	[ 'cqrs_sync.dlt_suffix', 'dead letters', qr/" "/ ],
	[ 'cqrs_sync.dlt_suffix', 'x' x 249, qr/longer than/ ],
	[ 'cqrs_sync.brokers', '', qr/at least one broker/ ],
	[ 'cqrs_sync.brokers', 'kafka1:9092,kafka2:notaport', qr/"kafka2:notaport"/ ],
	[ 'cqrs_sync.brokers', 'kafka1:0', qr/"kafka1:0"/ ],
	[ 'cqrs_sync.brokers', 'kafka1:70000', qr/"kafka1:70000"/ ],
	[ 'cqrs_sync.brokers', 'kafka1:9092,,kafka2:9092', qr/empty/ ],
	[ 'cqrs_sync.brokers', 'kafka_1!:9092', qr/"kafka_1!:9092"/ ],
	[ 'cqrs_sync.brokers', 'ftp://kafka1:9092', qr/"ftp"/ ],
	[ 'cqrs_sync.read_side_dlt_topics', 'orders.DLT,bad/topic', qr/"bad\/topic"/ ],
	[ 'cqrs_sync.read_side_dlt_topics', 'orders.DLT,..', qr/"\.\."/ ],
);
for my $b (@bad)
{
	my ($name, $value, $why) = @$b;
	my ($rc, $err) = alter_system($name, $value);
	my $shown = length($value) > 40 ? substr($value, 0, 20) . '...' : $value;
	isnt($rc, 0, "ALTER SYSTEM SET $name = '$shown' is refused");
	like($err, qr/22023: invalid value for parameter "\Q$name\E"/, '... with SQLSTATE 22023');
	like($err, $why, '... saying why');
}

my @good = (
	[ 'cqrs_sync.dlt_suffix',           '-dead-letters' ],
	[ 'cqrs_sync.dlt_suffix',           '.DLT' ],
	[ 'cqrs_sync.brokers',              'kafka1:9092, kafka2:9093' ],
	[ 'cqrs_sync.brokers',              'SASL_SSL://kafka-1.example.com:9093,PLAINTEXT://10.0.0.7' ],
	[ 'cqrs_sync.brokers',              '[::1]:9092,localhost' ],
	[ 'cqrs_sync.read_side_dlt_topics', '' ],
	[ 'cqrs_sync.read_side_dlt_topics', 'board-view.DLT, search_index.DLT' ],
);
for my $g (@good)
{
	my ($name, $value) = @$g;
	my ($rc, $err) = alter_system($name, $value);
	is($rc, 0, "ALTER SYSTEM SET $name = '$value' is accepted") or diag($err);
}

# A reload with a bad value keeps the old one and says so in the log.
$node->append_conf('postgresql.conf', "cqrs_sync.dlt_suffix = ''\n");
my $offset = -s $node->logfile;
$node->reload;
ok($node->wait_for_log(qr/invalid value for parameter "cqrs_sync.dlt_suffix": ""/, $offset),
	'a reload with an empty suffix logs the invalid value');
is($node->safe_psql('postgres', 'SHOW cqrs_sync.dlt_suffix'), '.DLT', '... and keeps .DLT');

# At start-up too: the server starts, with the default, and a warning.
$node->append_conf('postgresql.conf', "cqrs_sync.brokers = 'kafka1:notaport'\n");
$offset = -s $node->logfile;
$node->restart;
ok($node->wait_for_log(qr/invalid value for parameter "cqrs_sync.brokers": "kafka1:notaport"/, $offset),
	'a bad broker list at start-up is logged');
is($node->safe_psql('postgres', 'SHOW cqrs_sync.dlt_suffix'), '.DLT', 'the suffix is still .DLT after the restart');
isnt($node->safe_psql('postgres', 'SHOW cqrs_sync.brokers'), 'kafka1:notaport', 'the bad broker list is not used');

$node->stop;
done_testing();
