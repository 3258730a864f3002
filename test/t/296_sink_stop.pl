# A sink worker stops promptly while a handler runs (docs/sink.md, "How a
# batch is applied"): SIGTERM (a fast shutdown, pg_terminate_backend(),
# DROP DATABASE ... WITH (FORCE)) interrupts the handler; the batch's
# transaction is rolled back, and its events are applied again from the
# stored positions by the next worker.  Before, the worker noted the request
# and let the handler, and the rest of its batch, run to the end.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_node('sink_stop', 'cqrs_sync.relay_enabled' => 'off');
my $topic = unique_topic('sink-stop');
create_topic($topic, 1);
# a read model that takes 60 s per event
exact_setup($node, 'slow', $topic, _sleep => 60);
kafka_produce_events($topic, [ [ 'k', 'e-1', '{"t":"up","id":1,"title":"a","v":1}' ] ]);
ok(wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink' AND wait_event = 'PgSleep'",
		'1', 60),
	'the handler runs');
my ($pid) = sink_worker_pids($node);
my $took = terminate_backend($node, $pid, 30);
ok(defined $took && $took < 5, 'the worker ends within 5 s of SIGTERM')
  or diag('took ' . ($took // 'over 30') . ' s');
note(sprintf('ended %.2f s after SIGTERM', $took)) if defined $took;

# the next worker applies the event (its handler quick now)
$node->safe_psql('postgres', 'DELETE FROM exact_sleep');
ok(wait_applied($node, 'slow', 1, 90), 'the next worker applies the event');
is($node->safe_psql('postgres', 'SELECT title FROM exact_model WHERE id = 1'), 'a', 'once');

$node->stop;
done_testing();
