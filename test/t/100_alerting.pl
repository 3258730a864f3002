# Monitoring end to end, with the real Debian binaries on loopback:
#
#   PostgreSQL node (cqrs_sync) <- prometheus-postgres-exporter
#     (docs/monitoring/postgres_exporter.yml, as a pg_monitor role)
#   <- prometheus (docs/monitoring/alerts.yml) -> prometheus-alertmanager
#   -> webhook receiver (test/monitoring/webhook_receiver.pl)
#
#  - a healthy run (events flowing for HEALTHY_SECONDS) produces no alert:
#    nothing at the webhook, nothing in Alertmanager, no ALERTS in Prometheus
#    (not even pending);
#  - then a message made to end DLT_FAILED (300 kB, its topic and its .DLT
#    both with max.message.bytes=200000, max_retries=1) produces a
#    CqrsSyncDltFailed alert (and CqrsSyncDltPublishFailing) at the webhook
#    within 90 seconds of the enqueue;
#  - messages in a read-side dead-letter topic (cqrs_sync.read_side_dlt_topics)
#    produce CqrsSyncDltMessages.
#
# The rules are docs/monitoring/alerts.yml with one transformation, the one
# documented there: every "for: <duration>" becomes "for: 10s" (the real ones
# are minutes).  The expressions are the real ones.  Scrape and evaluation
# every second, Alertmanager group_wait 1s (test/monitoring/*.in).
#
# All daemons listen on 127.0.0.1 on free ports, keep their data under this
# test's temporary directory, run under timeout(1) as a backstop, and are
# stopped at the end, also on failure.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use HTTP::Tiny;
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use constant HEALTHY_SECONDS => 25;
use constant ALERT_DEADLINE  => 90;
use constant TEST_FOR        => '10s';

my $repo = $ENV{CQRS_REPO} // "$FindBin::RealBin/../..";
my %bin;
for my $b (qw(prometheus prometheus-alertmanager prometheus-postgres-exporter))
{
	my ($path) = grep { -x "$_/$b" } split /:/, $ENV{PATH};
	BAIL_OUT("$b not found in PATH: install the Debian package (test/setup-deps.sh)")
	  unless $path;
	$bin{$b} = "$path/$b";
}

# ---- daemons ------------------------------------------------------------

my @daemons;    # [name, IPC::Run harness]

sub stop_daemons
{
	while (my $d = pop @daemons)
	{
		my ($name, $h) = @$d;
		eval { $h->kill_kill(grace => 5); 1 } or diag("stopping $name: $@");
	}
}

END
{
	my $rc = $?;
	stop_daemons();
	$? = $rc;
}
$SIG{TERM} = $SIG{INT} = sub { stop_daemons(); die "killed by a signal\n" };

sub start_daemon
{
	my ($name, $cmd, %env) = @_;
	my $log = "$PostgreSQL::Test::Utils::log_path/100_alerting_$name.log";
	note("starting $name: @$cmd (log $log)");
	local @ENV{ keys %env } = values %env;
	# timeout(1): a backstop should this test die without its END block
	my $h = IPC::Run::start([ 'timeout', '-k', '5', '600', @$cmd ],
		'<', \undef, '>>', $log, '2>>', $log);
	push @daemons, [ $name, $h ];
	return $log;
}

my %reserved = map { $_ => 1 } (19092, 19093, 19100, 19101, 55432, 55460,
	9090, 9093, 9094, 9187);

sub free_port
{
	while (1)
	{
		my $p = PostgreSQL::Test::Cluster::get_free_port();
		return $p unless $reserved{$p};
	}
}

my $http = HTTP::Tiny->new(timeout => 5);

sub http_get
{
	my ($url) = @_;
	my $r = $http->get($url);
	return $r->{success} ? $r->{content} : undef;
}

sub wait_until
{
	my ($what, $timeout, $check) = @_;
	my $deadline = time + $timeout;
	while (time < $deadline)
	{
		my $v = eval { $check->() };
		return $v if $v;
		usleep(250_000);
	}
	diag("timed out after ${timeout}s waiting for $what");
	return undef;
}

sub slurp_tail
{
	my ($file, $lines) = @_;
	return '' unless -f $file;
	my @l = split /^/m, slurp_file($file);
	return join '', @l[ ($#l >= $lines ? $#l - $lines + 1 : 0) .. $#l ];
}

# ---- the node -----------------------------------------------------------

my $readside_dlt = unique_topic('readside') . '.DLT';
create_topic($readside_dlt, 2);

my $node = new_node(
	'alerting',
	'cqrs_sync.max_retries'          => '1',
	'cqrs_sync.retry_backoff'        => '100ms',
	'cqrs_sync.dlt_depth_interval'   => '1s',
	'cqrs_sync.read_side_dlt_topics' => $readside_dlt);
$node->safe_psql('postgres', 'CREATE ROLE cqrs_exporter LOGIN IN ROLE pg_monitor');

# the topics of the failure phase, made now: the JVM tool takes seconds
my $bad_topic = create_topic(unique_topic('refused'), 1, 'max.message.bytes=200000');
create_topic("$bad_topic.DLT", 1, 'max.message.bytes=200000');

# ---- the monitoring chain -----------------------------------------------

my $dir = PostgreSQL::Test::Utils::tempdir('alerting');

# webhook receiver: picks its own port
my $hook_out  = "$dir/webhook.jsonl";
my $hook_port = "$dir/webhook.port";
start_daemon('webhook', [ 'perl', "$repo/test/monitoring/webhook_receiver.pl", $hook_out, $hook_port ]);
my $hport = wait_until('the webhook receiver', 10,
	sub { -s $hook_port && slurp_file($hook_port) =~ /^(\d+)/ ? $1 : undef });
BAIL_OUT('the webhook receiver did not start') unless $hport;

# alertmanager
my $am_port = free_port();
my $am_conf = slurp_file("$repo/test/monitoring/alertmanager.yml.in");
$am_conf =~ s/\@WEBHOOK_URL\@/http:\/\/127.0.0.1:$hport\/alerts/g;
PostgreSQL::Test::Utils::append_to_file("$dir/alertmanager.yml", $am_conf);
mkdir "$dir/alertmanager-data";
my $am_log = start_daemon(
	'alertmanager',
	[
		$bin{'prometheus-alertmanager'},
		"--config.file=$dir/alertmanager.yml",
		"--storage.path=$dir/alertmanager-data",
		"--web.listen-address=127.0.0.1:$am_port",
		'--cluster.listen-address=',    # no HA mesh (it would take port 9094)
	]);

# postgres_exporter, as a pg_monitor member, with the bundle's queries
my $exp_port = free_port();
my $dsn = sprintf('host=%s port=%d user=cqrs_exporter dbname=postgres sslmode=disable',
	$node->host, $node->port);
my $exp_log = start_daemon(
	'exporter',
	[
		$bin{'prometheus-postgres-exporter'},
		"--extend.query-path=$repo/docs/monitoring/postgres_exporter.yml",
		"--web.listen-address=127.0.0.1:$exp_port",
		'--disable-default-metrics', '--disable-settings-metrics',
	],
	DATA_SOURCE_NAME => $dsn);

ok( wait_until('Alertmanager ready', 30,
		sub { defined http_get("http://127.0.0.1:$am_port/-/ready") }),
	'alertmanager is ready')
  or diag(slurp_tail($am_log, 30));

my $metrics = wait_until(
	'the exporter to show cqrs_relay_up 1',
	30,
	sub {
		my $m = http_get("http://127.0.0.1:$exp_port/metrics");
		return defined $m && $m =~ /^cqrs_relay_up\{[^}]*\} 1$/m ? $m : undef;
	});
ok($metrics, 'postgres_exporter exposes cqrs_relay_up 1 as a pg_monitor member')
  or diag(slurp_tail($exp_log, 30),
	http_get("http://127.0.0.1:$exp_port/metrics") // '(no metrics)');
$metrics //= '';
for my $m (
	qw(cqrs_outbox_rows cqrs_relay_paused cqrs_relay_events_sent_total
	cqrs_relay_events_failed_total cqrs_relay_dead_lettered_total
	cqrs_relay_dlt_failed_total cqrs_relay_producer_restarts_total
	cqrs_relay_oldest_pending_age_seconds cqrs_relay_last_success_age_seconds
	cqrs_relay_table_bytes cqrs_relay_index_bytes cqrs_relay_state_info))
{
	like($metrics, qr/^\Q$m\E\{/m, "the exporter exposes $m");
}
like($metrics, qr/^cqrs_outbox_rows\{[^}]*status="DLT_FAILED"[^}]*\} 0$/m,
	'cqrs_outbox_rows{status="DLT_FAILED"} is there, 0');
like($metrics, qr/^pg_exporter_last_scrape_error 0$/m, 'no exporter query failed')
  or diag(slurp_tail($exp_log, 20));

# prometheus, with the real rules and only their "for:" shortened
my $rules = slurp_file("$repo/docs/monitoring/alerts.yml");
my $n_for = ($rules =~ s/^(\s+for:\s*)\S+/$1 . TEST_FOR/mge);
cmp_ok($n_for, '>', 0, "alerts.yml loaded with $n_for \"for:\" durations set to " . TEST_FOR);
PostgreSQL::Test::Utils::append_to_file("$dir/alerts.yml", $rules);

my $prom_port = free_port();
my $prom_conf = slurp_file("$repo/test/monitoring/prometheus.yml.in");
$prom_conf =~ s/\@RULES_FILE\@/$dir\/alerts.yml/g;
$prom_conf =~ s/\@ALERTMANAGER_ADDRESS\@/127.0.0.1:$am_port/g;
$prom_conf =~ s/\@EXPORTER_ADDRESS\@/127.0.0.1:$exp_port/g;
PostgreSQL::Test::Utils::append_to_file("$dir/prometheus.yml", $prom_conf);
my $prom_log = start_daemon(
	'prometheus',
	[
		$bin{prometheus},
		"--config.file=$dir/prometheus.yml",
		"--storage.tsdb.path=$dir/prometheus-data",
		"--web.listen-address=127.0.0.1:$prom_port",
	]);

sub prom_query
{
	my ($q) = @_;
	my $body = http_get("http://127.0.0.1:$prom_port/api/v1/query?"
		  . $http->www_form_urlencode({ query => $q }));
	return undef unless defined $body;
	my $r = JSON::PP::decode_json($body);
	return undef unless $r->{status} eq 'success';
	return $r->{data}{result};
}

ok( wait_until('Prometheus to scrape cqrs_relay_up 1', 60,
		sub { my $r = prom_query('cqrs_relay_up == 1'); $r && @$r }),
	'prometheus scrapes cqrs_relay_up 1 from the exporter')
  or diag(slurp_tail($prom_log, 30));
my $groups = wait_until(
	'Prometheus rules',
	10,
	sub {
		my $b = http_get("http://127.0.0.1:$prom_port/api/v1/rules");
		my $g = $b ? JSON::PP::decode_json($b)->{data}{groups} : undef;
		return $g && @$g ? $g : undef;
	});
my @rules_in_file = sort(slurp_file("$ENV{CQRS_REPO}/docs/monitoring/alerts.yml") =~ /^\s*- alert:\s*(\S+)/mg);
is( join(' ', sort map { $_->{name} } map { @{ $_->{rules} } } @{ $groups // [] }),
	join(' ', @rules_in_file),
	'prometheus loaded every alerting rule of alerts.yml (' . scalar(@rules_in_file) . ')');

sub webhook_alerts
{
	return () unless -s $hook_out;
	my @alerts;
	for my $line (split /\n/, slurp_file($hook_out))
	{
		my $msg = eval { JSON::PP::decode_json($line) } or next;
		push @alerts, @{ $msg->{alerts} // [] };
	}
	return @alerts;
}

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
ok( wait_until("Prometheus to see $sent events sent", 15,
		sub { my $r = prom_query("cqrs_relay_events_sent_total >= $sent"); $r && @$r }),
	'prometheus sees cqrs_relay_events_sent_total grow with the events');
my $r = prom_query('cqrs_outbox_rows{status="SENT"}');
is($r && @$r ? $r->[0]{value}[1] : undef, $sent, 'cqrs_outbox_rows{status="SENT"} counts them');
$r = prom_query('cqrs_relay_last_success_age_seconds < 60');
ok($r && @$r, 'cqrs_relay_last_success_age_seconds is recent');
$r = prom_query('ALERTS');
is(scalar(@{ $r // [] }), 0, 'healthy run: no alert in Prometheus, not even pending')
  or diag(explain($r));
my $am = http_get("http://127.0.0.1:$am_port/api/v2/alerts");
is_deeply($am ? JSON::PP::decode_json($am) : undef, [], 'healthy run: no alert in Alertmanager');
my @early = webhook_alerts();
is(scalar @early, 0, 'healthy run: nothing at the webhook') or diag(explain(\@early));

# ---- failure: a row ends DLT_FAILED; an alert reaches the webhook -------

my $t0  = time;
my $bad = $node->safe_psql('postgres',
	"SELECT cqrs_enqueue('$bad_topic', 'x', jsonb_build_object('big', repeat('y', 300000)))");
# and, meanwhile, two messages in the read side's dead-letter topic
my ($kout, $kerr) = ('', '');
IPC::Run::run([ 'kcat', '-P', '-b', kafka_brokers(), '-t', $readside_dlt, '-p', '0', '-K', ':' ],
	'<', \"r1:{\"failed\":1}\nr2:{\"failed\":2}\n", '>', \$kout, '2>', \$kerr,
	IPC::Run::timeout(30))
  or diag("kcat produce to $readside_dlt: $kerr");

ok(wait_for($node, "SELECT status FROM cqrs_outbox WHERE id = $bad", 'DLT_FAILED', 60),
	'the oversized row ends DLT_FAILED');
note(sprintf('DLT_FAILED %.1f s after the enqueue', time - $t0));

my $fired = wait_until(
	'CqrsSyncDltFailed at the webhook',
	ALERT_DEADLINE - (time - $t0),
	sub {
		my ($alert) = grep { $_->{labels}{alertname} eq 'CqrsSyncDltFailed' && $_->{status} eq 'firing' }
		  webhook_alerts();
		return $alert;
	});
my $elapsed = time - $t0;
ok($fired, sprintf('CqrsSyncDltFailed reached the webhook %.1f s after the enqueue (limit %d s)',
		$elapsed, ALERT_DEADLINE))
  or diag("webhook:\n", (-f $hook_out ? slurp_file($hook_out) : '(nothing)'),
	"\nALERTS: ", explain(prom_query('ALERTS')),
	"\nalertmanager log:\n", slurp_tail($am_log, 20),
	"\nprometheus log:\n", slurp_tail($prom_log, 20));
$fired //= { labels => {}, annotations => {} };
is($fired->{labels}{severity}, 'critical',   'severity critical');
is($fired->{labels}{service},  'cqrs_sync',  'service cqrs_sync');
is($fired->{labels}{status},   'DLT_FAILED', 'status label DLT_FAILED');
like($fired->{annotations}{summary}, qr/1 outbox row\(s\) DLT_FAILED/, 'summary says how many rows');
like($fired->{annotations}{runbook_url}, qr{docs/runbook\.md#cqrssyncdltfailed$}, 'runbook_url anchor');

ok( wait_until('CqrsSyncDltPublishFailing at the webhook', ALERT_DEADLINE - (time - $t0),
		sub { grep { $_->{labels}{alertname} eq 'CqrsSyncDltPublishFailing' } webhook_alerts() }),
	'CqrsSyncDltPublishFailing reached the webhook too');

ok( wait_until('cqrs_dlt_depth to show the read side DLT', 30,
		sub { $node->safe_psql('postgres',
				"SELECT coalesce(sum(messages), 0) FROM cqrs_dlt_depth WHERE topic = '$readside_dlt'") eq '2' }),
	'cqrs_dlt_depth counts the two messages of the read side dead-letter topic');
my $dl = wait_until('CqrsSyncDltMessages at the webhook', 60,
	sub { my @a = grep { $_->{labels}{alertname} eq 'CqrsSyncDltMessages' } webhook_alerts(); @a ? \@a : undef });
my ($dltmsg) = @{ $dl // [] };
ok($dltmsg, 'CqrsSyncDltMessages reached the webhook');
is($dltmsg && $dltmsg->{labels}{topic}, $readside_dlt, 'for the read side dead-letter topic');

my %names = map { $_->{labels}{alertname} => 1 } webhook_alerts();
is(join(' ', sort keys %names), 'CqrsSyncDltFailed CqrsSyncDltMessages CqrsSyncDltPublishFailing',
	'no other alert (relay down, paused, stuck) was sent');

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
	my $res = prom_query($q);
	push @bad, "$e: " . (defined $res ? 'empty' : 'error')
	  unless $res && (@$res || $e =~ /ALERTS|> 0$/);
}
ok(@exprs > 10 && !@bad, scalar(@exprs) . ' dashboard queries answer with data')
  or diag(join("\n", @bad));

stop_daemons();
$node->stop;
done_testing();
