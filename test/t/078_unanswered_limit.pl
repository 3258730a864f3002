# A question about a topic's limit that Kafka does not answer (a timeout, a
# broker that stopped answering) keeps the limit Kafka last told (issue 12,
# items 6 and 7).  A row larger than it is refused once, free, the limit is
# asked again, and when that question times out the row is charged for the
# limit last told, as before any question.  Before (on 5459545), the
# unanswered question forgot the limit and the row went to Kafka, which would
# refuse it: a refusal makes librdkafka's idempotent producer wait for every
# request in flight before it sends anything more, so while a broker does not
# answer every partition, of every topic, waited up to socket.timeout.ms
# (seen in e2e 084).  An answer with an error (no permission) still forgets
# the limit: 077.
#
# One real broker, frozen (SIGSTOP) after the limit was learned: the row is
# charged while it is frozen, and dead-lettered after the thaw.  Not covered
# here: a limit kept so is asked again every 10 s (not every 10 minutes), and
# forgotten 30 minutes after Kafka's last answer.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $b = kafka_broker_start();
local $ENV{KAFKA_BROKERS} = $b->bootstrap;
my $topic = create_topic(unique_topic('unanswered'), 1, 'max.message.bytes=200000');
create_topic("$topic.DLT", 1);

my $node = new_node(
	'unanswered',
	'cqrs_sync.brokers'       => $b->bootstrap,
	'cqrs_sync.max_retries'   => '1',
	# each state of the row below lasts seconds (a charged row waits twice
	# this before it goes again)
	'cqrs_sync.retry_backoff' => '5s');

$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'small', '{}')");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE key = 'small'", 'SENT', 60),
	'a small row is sent');

$b->freeze;
my $id = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$topic', 'big', jsonb_build_object('big', repeat('x', 300000)))");
my $charged = "last_error LIKE 'MSG_SIZE_TOO_LARGE: message of % bytes exceeds max.message.bytes 200000 of topic%'";
ok( wait_for($node,
		"SELECT retry_count || ' ' || (last_error LIKE 'message of % bytes exceeds the max.message.bytes 200000 last known of topic%asking Kafka again') FROM cqrs_outbox WHERE id = $id",
		'0 true', 30),
	'the limit was learned before the freeze: the row is refused once, free, and the limit asked again');
ok( wait_for($node,
		"SELECT status || ' ' || retry_count || ' ' || ($charged) FROM cqrs_outbox WHERE id = $id",
		'PENDING 1 true', 45),
	'the question timed out, and the row is charged for the limit last told, not sent to Kafka')
  or diag($node->safe_psql('postgres',
	"SELECT row_to_json(o) FROM (SELECT status, retry_count, last_error FROM cqrs_outbox WHERE id = $id) o"));

$b->thaw;
ok( wait_for($node, "SELECT status || ' ' || ($charged) FROM cqrs_outbox WHERE id = $id",
		'DEAD_LETTERED true', 90),
	'after the thaw it is dead-lettered, for the limit Kafka told');
my @dl = grep { $_->{key} eq 'big' } kafka_consume("$topic.DLT", 1, 30, json => 0);
is(scalar(@dl), 1, 'the dead-letter topic holds it');
is($node->safe_psql('postgres', "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT'"),
	'1', 'nothing else was sent');

$node->stop;
done_testing();
