# The relay's mark (cqrs_relay_mark.scan_from: no committed row below it is
# PENDING) is lowered to 1 when the outbox's id sequence goes back
# (TRUNCATE ... RESTART IDENTITY).  When the transaction that lowers it
# fails (a lock timeout, here a trigger), the lowering is done again.
# Before, the relay forgot it had to: the mark stayed above the new rows'
# ids, which cqrs_outbox_stats() (and the alerts on it) then did not count
# as PENDING, and which a relay restarted once the ids had passed the old
# mark, starting its scan there, would never have sent.
#
# Against the real broker.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('markagain', 'log_line_prefix' => '%m [%p] %e ');
my $topic = unique_topic('markagain');

$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 10), jsonb_build_object('n', g))) FROM generate_series(1, 100) g");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '100', 60),
	'100 rows sent');
# the mark is written with a recording, at most once a second: a few more
# rows carry it past the hundred
my $moved = 'f';
for my $i (1 .. 10)
{
	sleep 1;
	$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'more', '{}')");
	wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", 100 + $i, 30);
	$moved = $node->safe_psql('postgres', 'SELECT scan_from > 100 FROM cqrs_relay_mark');
	last if $moved eq 't';
}
is($moved, 't', 'the mark moved past them');

# the transaction that lowers the mark to 1 fails the first time, at its
# commit, after the lowering itself went through (a deferred trigger; its
# sequence is not rolled back with it, later ones pass)
$node->safe_psql('postgres', q{
CREATE SEQUENCE mark_refusals;
CREATE FUNCTION refuse_first_lowering() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.scan_from = 1 AND nextval('public.mark_refusals') = 1 THEN
        RAISE EXCEPTION 'lowering of the mark refused once, for the test';
    END IF;
    RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER refuse_first_lowering AFTER UPDATE ON cqrs_relay_mark
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION refuse_first_lowering();
});
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres', 'TRUNCATE cqrs_outbox RESTART IDENTITY');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'n' || g, '{}')) FROM generate_series(1, 5) g");
ok($node->wait_for_log(qr/lowering of the mark refused once, for the test/, $log_offset),
	'the transaction that lowered the mark failed');
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '5', 30),
	'the new rows are sent');
ok(wait_for($node, 'SELECT scan_from <= 6 FROM cqrs_relay_mark', 't', 30),
	'and the mark is lowered again, to the new rows');

# the proof: rows the relay has not sent when it restarts are found
$node->safe_psql('postgres', 'DROP TRIGGER refuse_first_lowering ON cqrs_relay_mark');
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.brokers = '127.0.0.1:1'");
$node->reload;
sleep 2;
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'm' || g, '{}')) FROM generate_series(1, 5) g");
is($node->safe_psql('postgres', 'SELECT pending FROM cqrs_outbox_stats()'), '5',
	'cqrs_outbox_stats() counts the rows waiting');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET cqrs_sync.brokers');
$node->restart;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '10', 60),
	'a restarted relay sends them');

$node->stop;
done_testing();
