# A revisit walks over rows in flight: they go to Kafka once (issue 12).
#
# When a transaction that took an early id commits after the relay's cursor
# passed that id, the relay goes back and walks the ids from there again.
# Rows it produced since, whose delivery reports have not come back, are
# still PENDING in the outbox; the relay must skip them (its table of ids in
# flight), not produce them a second time.  Here the rows stay in flight
# because this test's own broker is frozen (SIGSTOP) while the revisit runs;
# each is the only row of its key, so nothing else holds it back.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $b = kafka_broker_start();
local $ENV{KAFKA_BROKERS} = $b->bootstrap;
my $node  = new_node('revisit', 'cqrs_sync.brokers' => $b->bootstrap);
my $topic = unique_topic('revisit');

# the topic exists and the relay knows its limits before the broker freezes
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'warm', '{\"seq\": 0}')");
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'", '1', 60),
	'warm-up event sent');

# T: an early id of key A, open
my $t = $node->background_psql('postgres');
$t->query_safe('BEGIN');
$t->query_safe("SELECT cqrs_enqueue('$topic', 'A', '{\"seq\": 1}')");

$b->freeze;
$node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'K' || g, jsonb_build_object('seq', g)) FROM generate_series(1, 5) g"
);
ok(wait_for($node, 'SELECT "window" FROM cqrs_relay_state()', '5', 30),
	'the five later rows are in flight, unacknowledged')
  or diag($node->safe_psql('postgres', 'SELECT * FROM cqrs_relay_state()'));

# T commits: the relay goes back to its id and walks over the five
$t->query_safe('COMMIT');
$t->quit;
ok(wait_for($node, 'SELECT "window" FROM cqrs_relay_state()', '6', 30),
	"the relay went back for T's row");
sleep 1;    # a second claim would come within the relay's next turns
is($node->safe_psql('postgres', 'SELECT "window" FROM cqrs_relay_state()'),
	'6', 'and claimed nothing else');

$b->thaw;
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE status <> 'SENT'", '0', 60),
	'after the thaw every row is SENT');
my @msgs = kafka_consume($topic, 7, 30);
sleep 2;
@msgs = kafka_consume($topic, 7, 10);
is(join(',', sort map { $_->{key} } @msgs),
	'A,K1,K2,K3,K4,K5,warm', 'each row reached Kafka once');

$node->stop;
done_testing();
