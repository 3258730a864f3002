# The relay's life: it starts before the extension exists and before Kafka
# is reachable, catches up once both are there, reloads its settings on
# SIGHUP, and on SIGTERM flushes what is in flight, leaves the rest PENDING,
# and comes back (exit 1, no crash) without losing anything.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# Nothing listens on port 9 of loopback (discard): Kafka is "unreachable".
my $node = new_node('lifecycle', 'cqrs_sync.brokers' => '127.0.0.1:9', _create_extension => 0);
my $topic = unique_topic('lifecycle');

ok( wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'", '1', 30),
	'the relay runs before CREATE EXTENSION');
ok( $node->wait_for_log(qr/extension "cqrs_sync" does not exist in database "postgres", waiting/),
	'and says it waits for the extension');

$node->safe_psql('postgres', 'CREATE EXTENSION cqrs_sync');
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'k' || (g % 10), jsonb_build_object('n', g)) FROM generate_series(1, 100) g"
);
usleep(2_000_000);
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status = 'PENDING'"),
	'100', 'with Kafka unreachable, events stay PENDING');
is($node->safe_psql('postgres', "SELECT sum(retry_count) FROM cqrs_outbox"),
	'0', 'and an outage spends no retry budget');

# SIGHUP: point the relay at the real broker
$node->safe_psql('postgres',
	"ALTER SYSTEM SET cqrs_sync.brokers = '" . kafka_brokers() . "'; SELECT pg_reload_conf();");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '100', 60),
	'after the reload the relay catches up');
ok($node->log_contains(qr/Kafka settings changed, re-creating the producer/),
	'the reload re-created the producer');
my @msgs = kafka_consume($topic, 100, 30);
is(scalar @msgs, 100, 'all 100 events are in Kafka');

# SIGTERM in the middle of a backlog
my $start_time = $node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()');
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 10), jsonb_build_object('n', g))) FROM generate_series(101, 60100) g"
);
my $old = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
my $sent_before = $node->safe_psql('postgres', 'SELECT events_sent FROM cqrs_stats_relay');
cmp_ok($sent_before, '>=', 100, "the relay counted what it sent ($sent_before)");
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
my $t0 = time;
my $new;
while (time - $t0 < 30)
{
	$new = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'");
	last if $new ne '' && $new != $old;
	usleep(50_000);
}
ok($new ne '' && $new != $old, sprintf('a new relay runs %.1f s after SIGTERM', time - $t0));
ok($node->log_contains(qr/cqrs_sync relay shutting down/), 'the relay shut down cleanly');
ok($node->log_contains(qr/background worker "cqrs_sync relay" \(PID $old\) exited with exit code 1/),
	'and exited with code 1 (restart, not crash)');
is($node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()'),
	$start_time, 'the server did not restart');

ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 60),
	'the new relay sends the rest');
cmp_ok($node->safe_psql('postgres', 'SELECT events_sent FROM cqrs_stats_relay'),
	'>=', 100 + 60000,
	'the counters in shared memory survived the worker restart: all 60,100 events counted');

# a fast shutdown and start in the middle of another backlog
$node->safe_psql('postgres',
	"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 10), jsonb_build_object('n', g))) FROM generate_series(60101, 90100) g"
);
$node->stop('fast');
$node->start;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 60),
	'after a fast shutdown and start, everything is sent');

my $batch = $node->safe_psql('postgres', 'SHOW cqrs_sync.batch_size');
@msgs = kafka_consume($topic, 90100, 60);
my %seen;
$seen{ $_->{headers}{event_id} // '' }++ for @msgs;
my $lost = $node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic'")
  - scalar(grep { $_ ne '' } keys %seen);
is($lost, 0, 'no event lost across SIGTERM and shutdown');
cmp_ok(scalar(@msgs) - scalar(keys %seen), '<=', 2 * $batch, 'duplicates within one batch per stop');

$node->stop;
done_testing();
