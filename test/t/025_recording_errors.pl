# An error while recording outcomes never re-sends a batch for ever
# (issue 12, item 2):
#  - settings the relay inherits through ALTER DATABASE / ALTER ROLE
#    (read-only transactions, tiny timeouts, serializable isolation, an
#    empty search_path) do not stop it: it pins its own;
#  - a DLT_FAILED row whose key is far longer than a NOTIFY payload may be is
#    recorded; its alert carries ids, topic and error, not the key;
#  - a recording that fails (a lock held on the row beyond the relay's lock
#    timeout) is retried without producing the message again, and the
#    relay's state says so meanwhile;
#  - told to stop while its recording keeps failing, the relay exits (the
#    rows go again after its restart) instead of trying for ever.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = new_node(
	'recording',
	'cqrs_sync.max_retries'   => '0',
	'cqrs_sync.retry_backoff' => '100ms');

sub relay_pid
{
	return $node->safe_psql('postgres',
		"SET statement_timeout = 0; SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
}

# ---- inherited settings ----------------------------------------------------------
my $topic = unique_topic('settings');
$node->safe_psql('postgres', q{
	ALTER DATABASE postgres SET default_transaction_read_only = on;
	ALTER DATABASE postgres SET statement_timeout = '1ms';
	ALTER DATABASE postgres SET lock_timeout = '1ms';
	ALTER DATABASE postgres SET default_transaction_isolation = 'serializable';
	ALTER ROLE postgres SET search_path = 'nowhere';
	ALTER ROLE postgres SET idle_in_transaction_session_timeout = '1ms';
});
# the relay picks them up when it starts
my $old = relay_pid();
$node->safe_psql('postgres', "SET statement_timeout = 0; SELECT pg_terminate_backend($old)");
ok(wait_for($node,
		"SET statement_timeout = 0; SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay' AND pid <> $old",
		'1', 30),
	'the relay was restarted with the inherited settings');
my $pid = relay_pid();

# this session undoes them for itself
my $undo = q{SET default_transaction_read_only = off; SET statement_timeout = 0;
	SET lock_timeout = 0; SET default_transaction_isolation = 'read committed';
	SET search_path = public;};
$node->safe_psql('postgres',
	"$undo SELECT count(cqrs_enqueue('$topic', 'k' || (g % 50), jsonb_build_object('n', g))) FROM generate_series(1, 1000) g");

ok( wait_for($node,
		"$undo SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status = 'SENT'",
		'1000', 60),
	'all 1,000 rows are recorded SENT despite the inherited settings');
my @msgs = kafka_consume($topic, 1000, 30, json => 0);
sleep 2;
@msgs = kafka_consume($topic, 1000, 10, json => 0);
is(scalar @msgs, 1000, 'each was produced once: no batch was sent again');
is(relay_pid(), $pid, 'the relay did not restart');

$node->safe_psql('postgres', qq{$undo
	ALTER DATABASE postgres RESET ALL;
	ALTER ROLE postgres RESET ALL;
});

# ---- a DLT_FAILED row with a very long key ------------------------------------------
my $big = create_topic(unique_topic('longkey'), 1, 'max.message.bytes=200000');
create_topic("$big.DLT", 1, 'max.message.bytes=200000');
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cqrs_sync_alert');
my $key = 'K' x 10000;
my $id = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$big', repeat('K', 10000), jsonb_build_object('big', repeat('x', 300000)))");
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$big', 'small', '{\"n\": 1}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $id", 'DLT_FAILED', 60),
	'the oversized row with a 10,000-character key ends DLT_FAILED');
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$big' AND key = 'small' AND status = 'SENT'",
		'1', 30),
	'the next row is sent');
is(relay_pid(), $pid, 'the relay did not restart meanwhile');
my $notices = '';
my $t0 = time;
while (time - $t0 < 10)
{
	# a statement makes psql print the notifications that arrived
	$notices .= $listener->query_safe('SELECT 1');
	last if $notices =~ /dlt_failed/;
	usleep(200_000);
}
like($notices, qr/"alert":"dlt_failed","outbox_id":$id/, 'a dlt_failed alert was sent');
unlike($notices, qr/KKKKKKKKKK/, 'the alert does not carry the key');
$listener->quit;

# ---- a recording that fails is retried, nothing is produced again --------------------
my $lock_topic = unique_topic('locked');
my $locker = $node->background_psql('postgres');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$lock_topic', 'warm', '{}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$lock_topic' AND status = 'SENT'", '1', 30),
	'warm-up row sent');
# the row is enqueued and locked before the relay can claim it: the relay is
# frozen meanwhile
$pid = freeze_relay($node);
my $lid = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$lock_topic', 'L', '{\"n\": 1}')");
$locker->query_safe('BEGIN');
$locker->query_safe("SELECT id FROM cqrs_outbox WHERE id = $lid FOR UPDATE");
kill 'CONT', $pid;
ok( wait_for($node, "SELECT state FROM cqrs_stats_relay", 'recording failed', 60),
	'the relay says that it cannot record (lock timeout), instead of hanging');
my @locked = kafka_consume($lock_topic, 2, 30, json => 0);
is(scalar(grep { $_->{key} eq 'L' } @locked), 1, 'the locked row was produced once');
sleep 12;    # several retries of the recording
$locker->query_safe('COMMIT');
$locker->quit;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $lid", 'SENT', 60),
	'once the lock is gone the row is recorded SENT');
ok(wait_for($node, "SELECT state FROM cqrs_stats_relay", 'running', 30), 'and the relay runs again');
@locked = kafka_consume($lock_topic, 2, 10, json => 0);
is(scalar(grep { $_->{key} eq 'L' } @locked), 1,
	'still one copy in Kafka: retrying the recording did not produce it again');
is(relay_pid(), $pid, 'the relay did not restart');

# ---- a shutdown while the recording fails ends -----------------------------------
# (the relay records what came back once more when told to stop; when that
# fails too, it goes without it instead of trying again for ever)
$locker = $node->background_psql('postgres');
$pid = freeze_relay($node);
$lid = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$lock_topic', 'S', '{\"n\": 2}')");
$locker->query_safe('BEGIN');
$locker->query_safe("SELECT id FROM cqrs_outbox WHERE id = $lid FOR UPDATE");
kill 'CONT', $pid;
ok(wait_for($node, "SELECT state FROM cqrs_stats_relay", 'recording failed', 60),
	'the recording fails again (lock timeout)');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok( wait_for($node,
		"SET statement_timeout = 0; SELECT count(*) FROM pg_stat_activity WHERE pid = $pid",
		'0', 30),
	'told to stop, the relay exits although its last recording fails');
ok($node->wait_for_log(qr/shutting down without recording the outcomes that came back/),
	'and says that it did not record them');
$locker->query_safe('COMMIT');
$locker->quit;
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $lid", 'SENT', 60),
	'the restarted relay sends the row again and records it');
$pid = relay_pid();

# ---- its statements prepared again, and a prepare fails halfway -------------------
# A change to the outbox makes the relay prepare its five statements again.
# With the audit trail locked, the first two (outbox only) are prepared and
# the third waits beyond the relay's lock timeout.  The next attempt must not
# free again what the failed one had freed already.
my $prep_topic = unique_topic('prepare');
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$prep_topic', 'P', '{\"n\": 0}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$prep_topic' AND status = 'SENT'", '1', 30),
	'warm-up row sent: the statements are prepared');
$locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE cqrs_outbox_audit IN ACCESS EXCLUSIVE MODE');
$node->safe_psql('postgres', 'ALTER TABLE cqrs_outbox ALTER COLUMN payload SET STATISTICS 200');
my $pid_before = relay_pid();
my $log_at = -s $node->logfile;
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$prep_topic', 'P', '{\"n\": 1}')");
# two failed attempts of the relay (each waits out its 5 s lock timeout)
my $t_prep = time;
my $fails = 0;
while (time - $t_prep < 60)
{
	my $log = slurp_file($node->logfile, $log_at);
	$fails = () = $log =~ /\[$pid_before\] ERROR:  canceling statement due to lock timeout/g;
	last if $fails >= 2;
	sleep 1;
}
cmp_ok($fails, '>=', 2, 'the relay failed twice to prepare its statements on the locked audit trail');
$locker->query_safe('COMMIT');
$locker->quit;
ok( wait_for($node,
		"SELECT count(*) FROM cqrs_outbox WHERE topic = '$prep_topic' AND status = 'SENT'",
		'2', 60),
	'once the lock is gone the row is sent and recorded');
unlike(slurp_file($node->logfile, $log_at), qr/terminated by signal|double free|corrupted/,
	'no process crashed meanwhile');
is(relay_pid(), $pid_before, 'the relay did not restart');
$node->safe_psql('postgres', 'ALTER TABLE cqrs_outbox ALTER COLUMN payload SET STATISTICS -1');
$pid = relay_pid();

# ---- the claim's index gone: a clear error, the relay waits, then goes on ----------
# (the relay walks the outbox's primary key itself, not through a query that
# would fall back to another plan)
my $idx_topic = unique_topic('noindex');
$node->safe_psql('postgres', 'ALTER TABLE cqrs_outbox DROP CONSTRAINT cqrs_outbox_pkey');
my $iid = $node->safe_psql('postgres', "SELECT cqrs_enqueue('$idx_topic', 'I', '{}')");
ok( wait_for($node,
		"SELECT last_error LIKE '%outbox has no primary key%' FROM cqrs_stats_relay",
		't', 30),
	'without its primary key the relay says so');
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox WHERE id = $iid"),
	'PENDING', 'and sends nothing meanwhile');
$node->safe_psql('postgres', 'ALTER TABLE cqrs_outbox ADD PRIMARY KEY (id)');
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $iid", 'SENT', 60),
	'once the primary key is back the row is sent');
is(relay_pid(), $pid, 'the relay did not restart for it');

$node->stop;
done_testing();
