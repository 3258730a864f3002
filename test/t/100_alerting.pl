# Monitoring end to end, with the real Debian binaries on loopback:
#
#   PostgreSQL node (cqrs_sync) <- prometheus-postgres-exporter
#     (docs/monitoring/postgres_exporter.yml, as a pg_monitor role)
#   <- prometheus (docs/monitoring/alerts.yml) -> prometheus-alertmanager
#     (docs/monitoring/alertmanager.yml's routing and inhibition)
#   -> webhook receiver (test/monitoring/webhook_receiver.pl), one path per
#      receiver: oncall-webhook (the pager), slack-cqrs, team-email
#
#  - a healthy run (events flowing for HEALTHY_SECONDS) produces no alert:
#    nothing at the webhook, nothing in Alertmanager, no ALERTS in Prometheus
#    (not even pending);
#  - one message arriving in a watched dead-letter topic (a read side's,
#    cqrs_sync.read_side_dlt_topics) pages: CqrsSyncDltMessages reaches the
#    paging receiver within PAGE_DEADLINE seconds of its arrival;
#  - a message made to end DLT_FAILED (300 kB, its topic and its .DLT both
#    with max.message.bytes=200000, max_retries=1) pages once: CqrsSyncDltFailed
#    reaches the pager within PAGE_DEADLINE seconds of the row becoming
#    DLT_FAILED, and CqrsSyncDltPublishFailing (same incident) is inhibited,
#    never sent to anyone;
#  - DLT depth figures that go stale (the monitor cannot reach Kafka) raise
#    CqrsSyncDltDepthStale (a warning: chat and e-mail, not the pager), while
#    the DLT alert stays firing on the last figures; it resolves once Kafka
#    answers again.
#
# The rules are docs/monitoring/alerts.yml as it is: Prometheus loads the
# file itself, "for:" durations included.  Scrape and evaluation run every
# second (test/monitoring/prometheus.yml.in); Alertmanager's grouping and
# waits are the real ones (test/monitoring/alertmanager.yml.in replaces only
# the receivers).
#
# All daemons listen on 127.0.0.1 on free ports, keep their data under this
# test's temporary directory, run under timeout(1) as a backstop, and are
# stopped at the end, also on failure (CqrsMonitoring.pm).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsMonitoring;
use CqrsTest;
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use constant HEALTHY_SECONDS => 25;
# the issue's bound: a message in a DLT reaches the pager within 30 s
use constant PAGE_DEADLINE => 30;

my $mon  = CqrsMonitoring->new('100_alerting');
my $repo = $mon->repo;

# ---- the node -----------------------------------------------------------

my $readside_dlt = unique_topic('readside') . '.DLT';
create_topic($readside_dlt, 2);

my $node = new_node(
	'alerting',
	'cqrs_sync.max_retries'          => '1',
	'cqrs_sync.retry_backoff'        => '100ms',
	'cqrs_sync.dlt_depth_interval'   => '1s',
	'cqrs_sync.read_side_dlt_topics' => $readside_dlt);

# the topics of the failure phase, made now: the JVM tool takes seconds
my $bad_topic = create_topic(unique_topic('refused'), 1, 'max.message.bytes=200000');
create_topic("$bad_topic.DLT", 1, 'max.message.bytes=200000');

# ---- the monitoring chain -----------------------------------------------

$mon->webhook_start;
my $am  = $mon->alertmanager_start;
my $exp = $mon->exporter_start($node);

my $metrics = $mon->wait_until(
	'the exporter to show cqrs_relay_up 1',
	30,
	sub {
		my $m = $mon->exporter_metrics;
		return defined $m && $m =~ /^cqrs_relay_up\{[^}]*\} 1$/m ? $m : undef;
	});
ok($metrics, 'postgres_exporter exposes cqrs_relay_up 1 as a pg_monitor member')
  or diag($mon->log_tail('exporter', 30), $mon->exporter_metrics // '(no metrics)');
$metrics //= '';
for my $m (
	qw(cqrs_outbox_rows cqrs_relay_paused cqrs_relay_events_sent_total
	cqrs_relay_events_failed_total cqrs_relay_dead_lettered_total
	cqrs_relay_dlt_failed_total cqrs_relay_producer_restarts_total
	cqrs_relay_oldest_pending_age_seconds cqrs_relay_last_success_age_seconds
	cqrs_relay_table_bytes cqrs_relay_index_bytes cqrs_relay_state_info
	cqrs_dlt_depth_age_seconds cqrs_dlt_depth_monitor_up
	cqrs_cleanup_worker_up cqrs_cleanup_passes_total cqrs_cleanup_errors_total
	cqrs_cleanup_last_success_age_seconds cqrs_cleanup_sent_expired_rows
	cqrs_cleanup_sent_overdue_seconds cqrs_cleanup_awaiting_approval_rows
	cqrs_cleanup_awaiting_approval_max_wait_seconds cqrs_cleanup_deleted_rows_total))
{
	like($metrics, qr/^\Q$m\E\{/m, "the exporter exposes $m");
}
like($metrics, qr/^cqrs_outbox_rows\{[^}]*status="DLT_FAILED"[^}]*\} 0$/m,
	'cqrs_outbox_rows{status="DLT_FAILED"} is there, 0');
like($metrics, qr/^cqrs_relay_in_database\{[^}]*\} 1$/m,
	'cqrs_relay_in_database is 1: the relay runs in the database the exporter watches');
like($metrics, qr/^cqrs_dlt_depth_interval_seconds\{[^}]*\} 1$/m,
	'cqrs_dlt_depth_interval_seconds says the poll interval (1 s here)');
like($metrics, qr/^cqrs_cleanup_interval_seconds\{[^}]*\} 60$/m,
	'cqrs_cleanup_interval_seconds says the cleanup interval (60 s)');
like($metrics, qr/^pg_exporter_last_scrape_error 0$/m, 'no exporter query failed')
  or diag($mon->log_tail('exporter', 20));

# prometheus, with the real rules file, untouched
my $prom = $mon->prometheus_start(exporter => $exp, alertmanager => $am);
ok( $mon->wait_until('Prometheus to scrape cqrs_relay_up 1', 60,
		sub { my $r = $mon->prom_query('cqrs_relay_up == 1'); $r && @$r }),
	'prometheus scrapes cqrs_relay_up 1 from the exporter')
  or diag($mon->log_tail('prometheus', 30));
my $rules_text = slurp_file("$repo/docs/monitoring/alerts.yml");
my @rules_in_file = sort($rules_text =~ /^\s*- alert:\s*(\S+)/mg);
is( join(' ', sort keys %{ $mon->rules }),
	join(' ', @rules_in_file),
	'prometheus loaded every alerting rule of alerts.yml (' . scalar(@rules_in_file) . ')');
# each rule's "for:" as the file has it
my %for_in_file;
for my $block (split /\n(?=\s+- alert:)/, $rules_text)
{
	my ($name) = $block =~ /- alert:\s*(\S+)/ or next;
	my ($for) = $block =~ /^\s+for:\s*(\d+)([smh])\s*$/m ? ($1 * { s => 1, m => 60, h => 3600 }->{$2}) : (0);
	$for_in_file{$name} = $for;
}
is_deeply({ map { $_ => $mon->rules->{$_}{duration} } keys %{ $mon->rules } },
	\%for_in_file, 'every rule runs with the "for:" of alerts.yml');
is($mon->rules->{CqrsSyncDltMessages}{duration}, 0, 'CqrsSyncDltMessages has no "for:"');
is($mon->rules->{CqrsSyncDltMessages}{labels}{severity}, 'critical', 'CqrsSyncDltMessages pages');

# ---- healthy run: events flow, nothing fires ----------------------------

my $topic   = unique_topic('healthy');
my $t_start = time;
my $sent    = 0;
while (time - $t_start < HEALTHY_SECONDS)
{
	$node->safe_psql('postgres',
		"SELECT count(cqrs_enqueue('$topic', 'k' || (g % 7), jsonb_build_object('n', g))) FROM generate_series(1, 20) g"
	);
	$sent += 20;
	usleep(500_000);
}
ok( wait_for($node, "SELECT count(*) FROM cqrs_outbox WHERE topic = '$topic' AND status = 'SENT'", $sent, 30),
	"healthy run: $sent events sent over " . HEALTHY_SECONDS . ' s');
ok( $mon->wait_until("Prometheus to see $sent events sent", 15,
		sub { my $r = $mon->prom_query("cqrs_relay_events_sent_total >= $sent"); $r && @$r }),
	'prometheus sees cqrs_relay_events_sent_total grow with the events');
my $r = $mon->prom_query('cqrs_outbox_rows{status="SENT"}');
is($r && @$r ? $r->[0]{value}[1] : undef, $sent, 'cqrs_outbox_rows{status="SENT"} counts them');
$r = $mon->prom_query('cqrs_relay_last_success_age_seconds < 60');
ok($r && @$r, 'cqrs_relay_last_success_age_seconds is recent');
$r = $mon->prom_query('cqrs_cleanup_passes_total > 0');
ok($r && @$r, 'the cleanup worker\'s passes are counted');
$r = $mon->prom_query('ALERTS');
is(scalar(@{ $r // [] }), 0, 'healthy run: no alert in Prometheus, not even pending')
  or diag(explain($r));
is_deeply($mon->am_alerts, [], 'healthy run: no alert in Alertmanager');
my @early = $mon->webhook_alerts;
is(scalar @early, 0, 'healthy run: nothing at the webhook') or diag(explain(\@early));

sub pages_of
{
	my ($alertname) = @_;
	return grep { grep { $_->{labels}{alertname} eq $alertname && $_->{status} eq 'firing' } @{ $_->{alerts} } }
	  grep { $_->{receiver} eq 'oncall-webhook' } $mon->webhook_posts;
}

sub diag_chain
{
	diag("webhook:\n", join("\n", map { "$_->{receiver}: " . join(',', map { $_->{labels}{alertname} } @{ $_->{alerts} }) } $mon->webhook_posts),
		"\nALERTS: ", explain($mon->prom_query('ALERTS')),
		"\nalertmanager log:\n", $mon->log_tail('alertmanager', 20),
		"\nprometheus log:\n", $mon->log_tail('prometheus', 20));
}

# ---- one message in a watched dead-letter topic pages -------------------

my ($kout, $kerr) = ('', '');
IPC::Run::run([ 'kcat', '-P', '-b', kafka_brokers(), '-t', $readside_dlt, '-p', '1', '-K', ':' ],
	'<', \"r1:{\"failed\":1}\n", '>', \$kout, '2>', \$kerr, IPC::Run::timeout(30))
  or diag("kcat produce to $readside_dlt: $kerr");
my $t_msg = time;    # the message is in the topic once kcat returned

my ($dlt_page) = @{
	$mon->wait_until('CqrsSyncDltMessages at the pager', PAGE_DEADLINE + 30,
		sub { my @p = pages_of('CqrsSyncDltMessages'); @p ? \@p : undef }) // [] };
ok($dlt_page && $dlt_page->{at} - $t_msg <= PAGE_DEADLINE,
	sprintf('one message in a dead-letter topic paged (CqrsSyncDltMessages at the paging receiver) %.1f s after it arrived (limit %d s)',
		($dlt_page ? $dlt_page->{at} : time) - $t_msg, PAGE_DEADLINE))
  or diag_chain();
my ($dltmsg) = grep { $_->{labels}{alertname} eq 'CqrsSyncDltMessages' } @{ $dlt_page->{alerts} // [] };
is($dltmsg && $dltmsg->{labels}{topic},    $readside_dlt, 'for the read side dead-letter topic');
is($dltmsg && $dltmsg->{labels}{severity}, 'critical',    'severity critical');
like($dltmsg ? $dltmsg->{annotations}{summary} : '', qr/holds 1 message\(s\)/, 'summary: one message');
is($node->safe_psql('postgres', "SELECT coalesce(sum(messages), 0) FROM cqrs_dlt_depth WHERE topic = '$readside_dlt'"),
	'1', 'cqrs_dlt_depth counts the message');

# ---- a row ends DLT_FAILED: one page, not two ---------------------------

my $t0  = time;
my $bad = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$bad_topic', 'x', jsonb_build_object('big', repeat('y', 300000)))");
ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $bad", 'DLT_FAILED', 60),
	'the oversized row ends DLT_FAILED');
my $t_failed = time;
note(sprintf('DLT_FAILED %.1f s after the enqueue', $t_failed - $t0));

my ($failed_page) = @{
	$mon->wait_until('CqrsSyncDltFailed at the pager', PAGE_DEADLINE + 30,
		sub { my @p = pages_of('CqrsSyncDltFailed'); @p ? \@p : undef }) // [] };
ok($failed_page && $failed_page->{at} - $t_failed <= PAGE_DEADLINE,
	sprintf('CqrsSyncDltFailed reached the paging receiver %.1f s after the row became DLT_FAILED (limit %d s)',
		($failed_page ? $failed_page->{at} : time) - $t_failed, PAGE_DEADLINE))
  or diag_chain();
my ($fired) = grep { $_->{labels}{alertname} eq 'CqrsSyncDltFailed' } @{ $failed_page->{alerts} // [] };
$fired //= { labels => {}, annotations => {} };
is($fired->{labels}{severity}, 'critical',   'severity critical');
is($fired->{labels}{service},  'cqrs_sync',  'service cqrs_sync');
is($fired->{labels}{status},   'DLT_FAILED', 'status label DLT_FAILED');
like($fired->{annotations}{summary}, qr/1 outbox row\(s\) DLT_FAILED/, 'summary says how many rows');
like($fired->{annotations}{runbook_url}, qr{docs/runbook\.md#cqrssyncdltfailed$}, 'runbook_url anchor');

# the same incident's second alert fires, and is inhibited
ok( $mon->wait_until('CqrsSyncDltPublishFailing firing in Prometheus', 30,
		sub { my $r = $mon->prom_query('ALERTS{alertname="CqrsSyncDltPublishFailing",alertstate="firing"}'); $r && @$r }),
	'CqrsSyncDltPublishFailing fires in Prometheus');
my $inhibited = $mon->wait_until(
	'CqrsSyncDltPublishFailing inhibited in Alertmanager',
	30,
	sub {
		my ($a) = grep { $_->{labels}{alertname} eq 'CqrsSyncDltPublishFailing' } @{ $mon->am_alerts // [] };
		return $a && @{ $a->{status}{inhibitedBy} // [] } ? $a : undef;
	});
ok($inhibited, 'Alertmanager holds CqrsSyncDltPublishFailing as inhibited (by CqrsSyncDltFailed)')
  or diag(explain($mon->am_alerts));
# longer than the critical route's group_wait (10 s): had it not been
# inhibited, it would have been sent by now
usleep(12_000_000);
is(scalar(grep { $_->{labels}{alertname} eq 'CqrsSyncDltPublishFailing' } $mon->webhook_alerts),
	0, 'CqrsSyncDltPublishFailing was sent to no receiver');
is(scalar(pages_of('CqrsSyncDltFailed')), 1, 'the DLT_FAILED incident paged once');

# ---- stale DLT depth: an alert, not a silence ---------------------------

my $dead_port = CqrsMonitoring::free_port();
$node->safe_psql('postgres',
	"ALTER SYSTEM SET cqrs_sync.brokers = '127.0.0.1:$dead_port'; SELECT pg_reload_conf()");
my $t_cut = time;
ok( $mon->wait_until('CqrsSyncDltDepthStale firing', 60,
		sub { my $r = $mon->prom_query('ALERTS{alertname="CqrsSyncDltDepthStale",alertstate="firing"}'); $r && @$r }),
	sprintf('the monitor cannot reach Kafka: CqrsSyncDltDepthStale fires (%.1f s)', time - $t_cut))
  or diag_chain();
like($node->safe_psql('postgres', 'SELECT last_error FROM cqrs_stats_dlt_depth'),
	qr/\S/, 'cqrs_stats_dlt_depth says why the figures are stale');
$r = $mon->prom_query('ALERTS{alertname="CqrsSyncDltMessages",alertstate="firing"}');
ok($r && @$r, 'CqrsSyncDltMessages still fires on the last figures');
my $stale = $mon->wait_until(
	'CqrsSyncDltDepthStale at the chat receiver',
	60,
	sub {
		my @a = grep { $_->{labels}{alertname} eq 'CqrsSyncDltDepthStale' } $mon->webhook_alerts('slack-cqrs');
		@a ? \@a : undef;
	});
ok($stale, 'CqrsSyncDltDepthStale reached the chat receiver (a warning)') or diag_chain();
is(scalar(grep { $_->{labels}{alertname} eq 'CqrsSyncDltDepthStale' } $mon->webhook_alerts('oncall-webhook')),
	0, 'and did not page');

# back to the brokers of postgresql.conf
$node->safe_psql('postgres', 'ALTER SYSTEM RESET cqrs_sync.brokers; SELECT pg_reload_conf()');
ok( $mon->wait_until('CqrsSyncDltDepthStale to resolve', 60,
		sub { my $r = $mon->prom_query('ALERTS{alertname="CqrsSyncDltDepthStale"}'); $r && !@$r }),
	'once Kafka answers again, the figures are fresh and the alert resolves');

my %names = map { $_->{labels}{alertname} => 1 } $mon->webhook_alerts;
is(join(' ', sort keys %names), 'CqrsSyncDltDepthStale CqrsSyncDltFailed CqrsSyncDltMessages',
	'no other alert (relay down, paused, stuck, publish failing) was sent');
my %paged = map { $_->{labels}{alertname} => 1 } $mon->webhook_alerts('oncall-webhook');
is(join(' ', sort keys %paged), 'CqrsSyncDltFailed CqrsSyncDltMessages', 'the pager got the two incidents');
is(scalar(grep { $_->{receiver} eq 'oncall-webhook' } $mon->webhook_posts), 2, 'one page each');

# The dashboard's queries run on this data: each answers, and those on the
# relay's metrics return something.
my $dash = JSON::PP::decode_json(slurp_file("$repo/docs/monitoring/grafana-dashboard.json"));
my @exprs;
my $walk;
$walk = sub {
	my ($x) = @_;
	if (ref $x eq 'HASH')
	{
		push @exprs, $x->{expr} if defined $x->{expr} && !ref $x->{expr};
		$walk->($_) for values %$x;
	}
	elsif (ref $x eq 'ARRAY') { $walk->($_) for @$x }
};
$walk->($dash);
my @bad;
for my $e (@exprs)
{
	(my $q = $e) =~ s/\$__rate_interval/1m/g;
	$q =~ s/\$instance/.*/g;
	my $res = $mon->prom_query($q);
	push @bad, "$e: " . (defined $res ? 'empty' : 'error')
	  unless $res && (@$res || $e =~ /ALERTS|> 0$/);
}
ok(@exprs > 10 && !@bad, scalar(@exprs) . ' dashboard queries answer with data')
  or diag(join("\n", @bad));

$mon->stop;
$node->stop;
done_testing();
