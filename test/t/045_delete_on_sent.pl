# cqrs_sync.delete_on_sent: a row is deleted as soon as Kafka acknowledged
# it (no SENT rows kept), and still only after its delivery report.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node  = new_node('delete_on_sent', 'cqrs_sync.delete_on_sent' => 'on');
my $topic = unique_topic('delete');

# the event ids, read in the enqueuing transaction (the rows leave at commit)
my ($count, $eids) = split /\n/, $node->safe_psql('postgres', "
	BEGIN;
	SELECT count(cqrs_enqueue('$topic', 'k' || (g % 10), jsonb_build_object('n', g))) FROM generate_series(1, 1000) g;
	SELECT string_agg(event_id::text, ',' ORDER BY event_id::text) FROM cqrs_outbox WHERE topic = '$topic';
	COMMIT;");
is($count, 1000, '1,000 events enqueued');
ok(wait_for($node, "SELECT count(*) FROM cqrs_outbox", '0', 60), 'the acknowledged rows are gone');
is($node->safe_psql('postgres', "SELECT sent, pending FROM cqrs_outbox_stats()"), '0|0',
	'no SENT row is kept');
my @msgs = kafka_consume($topic, 1000, 60);
is(join(',', sort map { $_->{headers}{event_id} } @msgs), $eids,
	'every deleted row is in Kafka, exactly once');

# rows Kafka cannot take are not deleted
$node->safe_psql('postgres', "ALTER SYSTEM SET cqrs_sync.brokers = '127.0.0.1:9'; SELECT pg_reload_conf()");
sleep 1;
$node->safe_psql('postgres', "SELECT cqrs_enqueue('$topic', 'k', '{}')");
sleep 3;
is($node->safe_psql('postgres', "SELECT status FROM cqrs_outbox"), 'PENDING',
	'a row without a delivery report stays');

$node->stop;
done_testing();
