=pod

=head1 NAME

CqrsMonitoring - the monitoring chain for the cqrs_sync TAP tests: the real
Debian postgres_exporter, Prometheus and Alertmanager, and a local webhook
receiver, on free loopback ports

=head1 SYNOPSIS

  use FindBin;
  use lib $FindBin::RealBin;
  use CqrsMonitoring;

  my $mon  = CqrsMonitoring->new('100_alerting');
  my $hook = $mon->webhook_start;
  my $am   = $mon->alertmanager_start;              # docs routing, test receivers
  my $exp  = $mon->exporter_start($node);           # as a pg_monitor member
  my $prom = $mon->prometheus_start(exporter => $exp, alertmanager => $am);
  my $r    = $mon->prom_query('cqrs_relay_up == 1');
  my @posts = $mon->webhook_posts;                  # { receiver, alerts => [...] }

Every daemon runs under timeout(1) as a backstop, keeps its data under the
test's temporary directory, logs to C<< <log dir>/<test>_<daemon>.log >> and is
stopped when the test ends, also on failure.  The configurations are the
bundle's own: F<docs/monitoring/postgres_exporter.yml> and
F<docs/monitoring/alerts.yml> unchanged, the routing and inhibition of
F<docs/monitoring/alertmanager.yml> with its receivers replaced by
F<test/monitoring/alertmanager.yml.in> (webhooks to the local receiver, one
path per receiver name); only the scrape and evaluation intervals are the
test's (F<test/monitoring/prometheus.yml.in>).

=cut

package CqrsMonitoring;

use strict;
use warnings;

use FindBin;
use HTTP::Tiny;
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my @all_daemons;    # [name, IPC::Run harness], of every chain

sub _stop_all
{
	while (my $d = pop @all_daemons)
	{
		my ($name, $h) = @$d;
		eval { $h->kill_kill(grace => 5); 1 } or diag("stopping $name: $@");
	}
}

END
{
	my $rc = $?;
	_stop_all();
	$? = $rc;
}

=pod

=head1 METHODS

=over

=item new($test_name)

A chain for the test $test_name (used in log file names).  Finds the Debian
binaries in PATH; bails out if one is missing.

=cut

sub new
{
	my ($class, $test) = @_;
	my %bin;
	for my $b (qw(prometheus prometheus-alertmanager prometheus-postgres-exporter))
	{
		my ($path) = grep { -x "$_/$b" } split /:/, $ENV{PATH};
		BAIL_OUT("$b not found in PATH: install the Debian package (test/setup-deps.sh)")
		  unless $path;
		$bin{$b} = "$path/$b";
	}
	$SIG{TERM} = $SIG{INT} = sub { _stop_all(); die "killed by a signal\n" };
	return bless {
		test => $test,
		repo => $ENV{CQRS_REPO} // "$FindBin::RealBin/../..",
		bin  => \%bin,
		dir  => PostgreSQL::Test::Utils::tempdir('monitoring'),
		http => HTTP::Tiny->new(timeout => 5),
	}, $class;
}

sub repo { return $_[0]{repo} }
sub dir  { return $_[0]{dir} }

sub _start_daemon
{
	my ($self, $name, $cmd, %env) = @_;
	my $log = "$PostgreSQL::Test::Utils::log_path/$self->{test}_$name.log";
	note("starting $name: @$cmd (log $log)");
	local @ENV{ keys %env } = values %env;
	my $h = IPC::Run::start([ 'timeout', '-k', '5', '900', @$cmd ],
		'<', \undef, '>>', $log, '2>>', $log);
	push @all_daemons, [ $name, $h ];
	$self->{log}{$name} = $log;
	return $log;
}

=pod

=item stop

Stops every daemon started so far (also done at exit).

=cut

sub stop { _stop_all(); return }

=pod

=item log_tail($daemon, $lines)

The last $lines lines of a daemon's log ('webhook', 'alertmanager',
'exporter', 'prometheus').

=cut

sub log_tail
{
	my ($self, $name, $lines) = @_;
	my $file = $self->{log}{$name};
	return '' unless $file && -f $file;
	my @l = split /^/m, slurp_file($file);
	return join '', @l[ ($#l >= $lines ? $#l - $lines + 1 : 0) .. $#l ];
}

my %reserved = map { $_ => 1 } (19092, 19093, 19100, 19101, 55432, 55460,
	9090, 9093, 9094, 9187);

=pod

=item free_port

A free loopback port, none of the well-known ones of the daemons.

=cut

sub free_port
{
	while (1)
	{
		my $p = PostgreSQL::Test::Cluster::get_free_port();
		return $p unless $reserved{$p} || ($ENV{KAFKA_PORT} && $p == $ENV{KAFKA_PORT});
	}
}

=pod

=item http_get($url)

The body, or undef on any failure.

=cut

sub http_get
{
	my ($self, $url) = @_;
	my $r = $self->{http}->get($url);
	return $r->{success} ? $r->{content} : undef;
}

=pod

=item wait_until($what, $timeout, $check)

Calls $check every 250 ms until it returns a true value (returned) or
$timeout seconds pass (undef, with a diag naming $what).  A $check that dies
counts as false.

=cut

sub wait_until
{
	my ($self, $what, $timeout, $check) = @_;
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

=pod

=item webhook_start

Starts test/monitoring/webhook_receiver.pl; returns its base URL.

=cut

sub webhook_start
{
	my ($self) = @_;
	$self->{hook_out} = "$self->{dir}/webhook.jsonl";
	my $portfile = "$self->{dir}/webhook.port";
	$self->_start_daemon('webhook',
		[ 'perl', "$self->{repo}/test/monitoring/webhook_receiver.pl", $self->{hook_out}, $portfile ]);
	my $port = $self->wait_until('the webhook receiver', 10,
		sub { -s $portfile && slurp_file($portfile) =~ /^(\d+)/ ? $1 : undef });
	BAIL_OUT('the webhook receiver did not start') unless $port;
	return $self->{hook_url} = "http://127.0.0.1:$port";
}

=pod

=item webhook_posts

Every notification the webhook received so far, in order:
C<< { receiver => 'oncall-webhook', at => $epoch, alerts => [ ... ] } >> (the
receiver is the path it was posted to).

=cut

sub webhook_posts
{
	my ($self) = @_;
	return () unless $self->{hook_out} && -s $self->{hook_out};
	my @posts;
	for my $line (split /\n/, slurp_file($self->{hook_out}))
	{
		my ($at, $path, $body) = split /\t/, $line, 3;
		my $msg = eval { JSON::PP::decode_json($body // '') } or next;
		(my $receiver = $path) =~ s{^/+}{};
		push @posts, { receiver => $receiver, at => $at, alerts => $msg->{alerts} // [] };
	}
	return @posts;
}

=pod

=item webhook_alerts([$receiver])

The alerts of every notification (of one receiver), each with its receiver
and arrival time added (C<_receiver>, C<_at>).

=cut

sub webhook_alerts
{
	my ($self, $receiver) = @_;
	my @alerts;
	for my $p ($self->webhook_posts)
	{
		next if defined $receiver && $p->{receiver} ne $receiver;
		push @alerts, map { { %$_, _receiver => $p->{receiver}, _at => $p->{at} } } @{ $p->{alerts} };
	}
	return @alerts;
}

=pod

=item alertmanager_start

Starts Alertmanager with the routing and inhibition of
docs/monitoring/alertmanager.yml and test/monitoring/alertmanager.yml.in's
receivers (the webhook must be started first); returns its address.

=cut

sub alertmanager_start
{
	my ($self) = @_;
	die 'start the webhook first' unless $self->{hook_url};
	my $port = free_port();
	my $conf = slurp_file("$self->{repo}/docs/monitoring/alertmanager.yml");
	$conf =~ s/^receivers:.*//ms or die 'no receivers: in docs/monitoring/alertmanager.yml';
	my $recv = slurp_file("$self->{repo}/test/monitoring/alertmanager.yml.in");
	$recv =~ s/\@WEBHOOK_URL\@/$self->{hook_url}/g;
	PostgreSQL::Test::Utils::append_to_file("$self->{dir}/alertmanager.yml", $conf . $recv);
	mkdir "$self->{dir}/alertmanager-data";
	$self->_start_daemon(
		'alertmanager',
		[
			$self->{bin}{'prometheus-alertmanager'},
			"--config.file=$self->{dir}/alertmanager.yml",
			"--storage.path=$self->{dir}/alertmanager-data",
			"--web.listen-address=127.0.0.1:$port",
			'--cluster.listen-address=',    # no HA mesh (it would take port 9094)
		]);
	ok( $self->wait_until('Alertmanager ready', 30,
			sub { defined $self->http_get("http://127.0.0.1:$port/-/ready") }),
		'alertmanager is ready')
	  or diag($self->log_tail('alertmanager', 30));
	return $self->{am} = "127.0.0.1:$port";
}

=pod

=item am_alerts

Alertmanager's alerts (API v2), decoded; undef on failure.

=cut

sub am_alerts
{
	my ($self) = @_;
	my $b = $self->http_get("http://$self->{am}/api/v2/alerts");
	return defined $b ? JSON::PP::decode_json($b) : undef;
}

=pod

=item exporter_start($node, [$role])

Starts postgres_exporter with docs/monitoring/postgres_exporter.yml,
connected to database postgres of $node as $role (default cqrs_exporter,
created here as a member of pg_monitor if missing); returns its address.

=cut

sub exporter_start
{
	my ($self, $node, $role) = @_;
	$role //= 'cqrs_exporter';
	$node->safe_psql('postgres', qq{
		DO \$\$ BEGIN
			IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') THEN
				CREATE ROLE $role LOGIN IN ROLE pg_monitor;
			END IF;
		END \$\$;});
	my $port = free_port();
	my $dsn = sprintf('host=%s port=%d user=%s dbname=postgres sslmode=disable',
		$node->host, $node->port, $role);
	$self->_start_daemon(
		'exporter',
		[
			$self->{bin}{'prometheus-postgres-exporter'},
			"--extend.query-path=$self->{repo}/docs/monitoring/postgres_exporter.yml",
			"--web.listen-address=127.0.0.1:$port",
			'--disable-default-metrics', '--disable-settings-metrics',
		],
		DATA_SOURCE_NAME => $dsn);
	return $self->{exporter} = "127.0.0.1:$port";
}

=pod

=item exporter_metrics

The exporter's /metrics text, or undef.

=cut

sub exporter_metrics
{
	my ($self) = @_;
	return $self->http_get("http://$self->{exporter}/metrics");
}

=pod

=item prometheus_start(exporter => $addr, [alertmanager => $addr])

Starts Prometheus with docs/monitoring/alerts.yml as it is (not a copy:
its "for:" durations and expressions are the real ones) and
test/monitoring/prometheus.yml.in (scrape and evaluation every second);
returns its address once it has loaded the rules.

=cut

sub prometheus_start
{
	my ($self, %o) = @_;
	my $port = free_port();
	my $conf = slurp_file("$self->{repo}/test/monitoring/prometheus.yml.in");
	my $rules = "$self->{repo}/docs/monitoring/alerts.yml";
	# without an Alertmanager, a port nothing listens on
	my $am = $o{alertmanager} // ('127.0.0.1:' . free_port());
	$conf =~ s/\@RULES_FILE\@/$rules/g;
	$conf =~ s/\@ALERTMANAGER_ADDRESS\@/$am/g;
	$conf =~ s/\@EXPORTER_ADDRESS\@/$o{exporter}/g;
	PostgreSQL::Test::Utils::append_to_file("$self->{dir}/prometheus.yml", $conf);
	$self->_start_daemon(
		'prometheus',
		[
			$self->{bin}{prometheus},
			"--config.file=$self->{dir}/prometheus.yml",
			"--storage.tsdb.path=$self->{dir}/prometheus-data",
			"--web.listen-address=127.0.0.1:$port",
		]);
	$self->{prom} = "127.0.0.1:$port";
	my $groups = $self->wait_until(
		'Prometheus rules',
		30,
		sub {
			my $b = $self->http_get("http://$self->{prom}/api/v1/rules");
			my $g = $b ? JSON::PP::decode_json($b)->{data}{groups} : undef;
			return $g && @$g ? $g : undef;
		});
	$self->{rules} = { map { $_->{name} => $_ } map { @{ $_->{rules} } } @{ $groups // [] } };
	return $self->{prom};
}

=pod

=item rules

The alerting rules Prometheus loaded: a hash, alert name => rule (with
C<query>, C<duration> in seconds, C<labels>, C<annotations>).

=cut

sub rules { return $_[0]{rules} // {} }

=pod

=item prom_query($promql)

The result vector of an instant query (an array reference), or undef on
failure.

=cut

sub prom_query
{
	my ($self, $q) = @_;
	my $body = $self->http_get("http://$self->{prom}/api/v1/query?"
		  . $self->{http}->www_form_urlencode({ query => $q }));
	return undef unless defined $body;
	my $r = JSON::PP::decode_json($body);
	return undef unless $r->{status} eq 'success';
	return $r->{data}{result};
}

=pod

=back

=cut

1;
