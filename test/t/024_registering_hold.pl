# Order per key and availability when a transaction is between registering
# its key and taking its id (issue 12: found by the latency benchmark, where
# four writers enqueue for the same key at once).
#
# cqrs_enqueue() registers the key before it takes the id, so while it is
# "registering" the relay must hold every visible row of that key, also rows
# with lower ids than the transaction will take.  When that transaction ends,
# the relay must go back to the rows it held because of it.  The old relay
# went back only to the ids the transaction could have committed itself
# (above the previous claim's high-water mark), so a lower row it had held
# (and every later row of its key) stayed PENDING until something else made
# the relay rescan.
#
# The window is made wide on purpose: T2 registers key K, then its INSERT
# queues for the outbox's lock behind L (LOCK TABLE ... IN SHARE MODE), which
# queues behind T1 (the earlier row of K, open).  T1 commits: its row is
# visible while T2 is registering.  Then L lets go, T2 commits.  Both rows of
# K must reach Kafka, in id order.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node  = new_node('registering');
my $topic = unique_topic('registering');
my $connstr = $node->connstr('postgres');

# T2's session enqueues once first: its INSERT plan is prepared (preparing
# it would take the outbox's lock before the key is registered).
my ($t2_in, $t2_out, $t2_err) = ('', '', '');
my $t2 = IPC::Run::start([ 'psql', '-X', '-At', '-v', 'ON_ERROR_STOP=1', '-d', $connstr ],
	'<', \$t2_in, '>', \$t2_out, '2>', \$t2_err);
$t2_in .= "SELECT 'warm ' || pg_backend_pid() || ' ' || count(cqrs_enqueue('$topic', 'W', '{\"seq\": 0}'));\n";
$t2->pump until $t2_out =~ /warm (\d+) 1/;
my $t2_pid = $1;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE key = 'W' AND status = 'SENT'", '1', 30),
	'warm-up event sent');

# T1: the earlier row of K, open
my $t1 = $node->background_psql('postgres');
$t1->query_safe('BEGIN');
my $a = $t1->query_safe("SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 1}')");

# a claim whose high-water mark is above T1's id
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'X', '{\"seq\": 0}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE key = 'X' AND status = 'SENT'", '1', 30),
	'a later row of another key is sent while T1 is open');

# L queues for a SHARE lock behind T1's ROW EXCLUSIVE lock
my ($l_out, $l_err) = ('', '');
my $l = IPC::Run::start(
	[ 'psql', '-X', '-d', $connstr, '-c',
		'BEGIN; LOCK TABLE cqrs_outbox IN SHARE MODE; SELECT pg_sleep(3); COMMIT;' ],
	'<', \undef, '>', \$l_out, '2>', \$l_err);
ok( wait_for($node,
		"SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'cqrs_outbox' AND l.mode = 'ShareLock' AND NOT l.granted",
		'1', 30),
	'L waits for the outbox lock behind T1');

# T2 registers K, then its INSERT queues behind L
$t2_in .= "BEGIN;\nSELECT 't2 ' || cqrs_enqueue('$topic', 'K', '{\"seq\": 2}');\nCOMMIT;\n";
$t2->pump_nb;
ok( wait_for($node,
		"SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'cqrs_outbox' AND l.pid = $t2_pid AND NOT l.granted",
		'1', 30),
	'T2 has registered K and waits for the outbox lock');

# T1 commits while T2 is registering; L holds its lock for 3 s, then T2 goes on
$t1->query_safe('COMMIT');
$t1->quit;
$l->finish;
$t2->pump until $t2_out =~ /t2 /;
$t2_in .= "\\q\n";
$t2->finish;

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'", '2', 30),
	'both rows of K are sent')
  or diag($node->safe_psql('postgres', 'SELECT id, key, status FROM cqrs_outbox ORDER BY id'));
my @k = grep { $_->{key} eq 'K' } kafka_consume($topic, 4, 30);
is(join(',', map { $_->{json}{seq} } @k), '1,2', 'K reached Kafka in id order');

$node->stop;
done_testing();
