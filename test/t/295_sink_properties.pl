# The sink's consumer keeps the settings its guarantees rest on whatever the
# properties file says (docs/configuration.md).  Here the file asks for the
# cooperative-sticky assignment strategy, a common tuning tip.  The sink
# worker assigns whole assignments (rd_kafka_assign()), which librdkafka
# refuses under a cooperative strategy: before, the sink got no partition
# and applied nothing, while its state said running.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use SinkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $dir   = PostgreSQL::Test::Utils::tempdir('sinkprops');
my $props = "$dir/kafka.properties";
open my $fh, '>', $props or die "$props: $!";
print $fh "partition.assignment.strategy = cooperative-sticky\n";
close $fh;
chmod 0600, $props;

my $node = new_node('sink_props',
	'cqrs_sync.relay_enabled'     => 'off',
	'cqrs_sync.kafka_config_file' => $props);
my $topic = unique_topic('sink-props');
create_topic($topic, 2);
exact_setup($node, 'props', $topic);
kafka_produce_events($topic, [ map { [ "k$_", "e-$_", qq({"t":"up","id":$_,"title":"t","v":1}) ] } 1 .. 10 ]);
ok(wait_applied($node, 'props', 10, 60), 'the sink consumes with the strategy it needs');
is($node->safe_psql('postgres', 'SELECT count(*) FROM exact_model'), '10', 'every event is applied');

$node->stop;
done_testing();
