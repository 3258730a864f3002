# Order per key when the relay sees a transaction between registering its
# key and taking its first outbox id (DESIGN.md section 4; found by
# 160_attach.pl, where rows of a key stayed PENDING for good under load).
#
# Such a transaction holds every row of its key, also committed rows below
# the relay's high-water mark that a revisit scans again; when it ends, the
# relay must go back to those rows, not only to the ids the transaction
# itself could have taken.  The window (microseconds in real life) is held
# open here by a BEFORE INSERT trigger on cqrs_outbox that sleeps: the id is
# taken (column default) before the trigger runs, and the registry learns it
# only after the INSERT.
#
#   A: enqueues a0 for key K, stays open
#   B: commits b1 of K (held behind a0); the relay claims (high-water mark
#      above b1)
#   C: enqueues c2 of K, sleeping inside the INSERT (registered, no id yet)
#   A commits: the relay revisits from a0 and holds a0 and b1 for C
#   C commits: a0, b1 and c2 must all be sent, in this order
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

$node->safe_psql(
	'postgres', q{
CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payload ? 'slow' THEN
        PERFORM pg_sleep((NEW.payload->>'slow')::float8);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow_insert BEFORE INSERT ON cqrs_outbox
    FOR EACH ROW EXECUTE FUNCTION slow_insert();
});

my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
my $a0 = $a->query_safe("SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 0}')");
my $b1 = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 1}')");
# other keys' commits make the relay claim rows above b1
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'other-' || g, '{}') FROM generate_series(1, 10) g");
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key LIKE 'other-%' AND status = 'SENT'", '10', 30),
	'the relay claimed rows above b1');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE id = $b1"),
	'PENDING', 'b1 waits for a0');

# C registers K and sleeps 4 s inside its INSERT
my ($c_out, $c_err) = ('', '');
my $c = IPC::Run::start(
	[
		'psql', '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
		'-c', "SELECT cqrs_enqueue('$topic', 'K', '{\"seq\": 2, \"slow\": 4}')"
	],
	'<', \undef, '>', \$c_out, '2>', \$c_err);
ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'", '1', 30),
	'C is inside its INSERT');
usleep(300_000);
$a->query_safe('COMMIT');
$a->quit;
# the relay revisits from a0 while C is registered without an id
usleep(1_000_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'"),
	'0', 'while C is open, no row of K is sent');
$c->finish;
is($?, 0, 'C committed') or diag($c_err);
chomp(my $c2 = $c_out);

ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE key = 'K' AND status = 'SENT'", '3', 30),
	'once C ended, every row of K is sent')
  or diag($node->safe_psql('postgres', "SELECT id, status FROM cqrs_outbox WHERE key = 'K' ORDER BY id"));
my @k = grep { $_->{key} eq 'K' } kafka_consume($topic, 13, 30);
is(join(',', map { $_->{json}{seq} } @k), '0,1,2', 'K reached Kafka in id order');
ok($a0 < $b1 && $b1 < $c2, "ids in that order ($a0, $b1, $c2)");

$node->stop;
done_testing();
