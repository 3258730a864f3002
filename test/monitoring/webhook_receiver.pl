#!/usr/bin/perl
# test/monitoring/webhook_receiver.pl OUTFILE PORTFILE
#
# A tiny HTTP receiver for Alertmanager's webhook_configs, for the
# end-to-end alerting test (test/t/100_alerting.pl).  Listens on 127.0.0.1
# on a port the kernel picks, writes that port to PORTFILE (atomically, once
# it listens), and appends every POST to OUTFILE, one line each: the time it
# arrived (epoch seconds), the request path (Alertmanager's receiver, as the
# test's configuration names it) and the body, separated by tabs.  Answers
# 200 with an empty body.  Core Perl only; runs until killed (SIGTERM ends it
# at once: no handler, which Perl would defer past accept).
use strict;
use warnings;
use IO::Socket::INET;
use IO::Handle;
use Time::HiRes qw(time);

my ($outfile, $portfile) = @ARGV;
die "usage: $0 OUTFILE PORTFILE\n" unless defined $portfile;

my $srv = IO::Socket::INET->new(
	LocalAddr => '127.0.0.1',
	LocalPort => 0,
	Proto     => 'tcp',
	Listen    => 16,
	ReuseAddr => 1) or die "listen: $!\n";

open(my $pf, '>', "$portfile.tmp") or die "$portfile.tmp: $!\n";
print $pf $srv->sockport, "\n";
close($pf);
rename("$portfile.tmp", $portfile) or die "rename $portfile: $!\n";


while (my $c = $srv->accept)
{
	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm 10;
		my ($len, $line) = (0, '');
		my $request = <$c>;
		die "no request\n" unless defined $request;
		while (defined($line = <$c>))
		{
			last if $line =~ /^\r?\n$/;
			$len = $1 if $line =~ /^Content-Length:\s*(\d+)/i;
		}
		my $body = '';
		while (length($body) < $len)
		{
			my $n = read($c, $body, $len - length($body), length($body));
			last unless $n;
		}
		if ($request =~ m{^POST (\S+)})
		{
			my $path = $1;
			$body =~ s/[\r\n\t]+/ /g;
			open(my $out, '>>', $outfile) or die "$outfile: $!\n";
			printf $out "%.3f\t%s\t%s\n", time, $path, $body;
			close($out);
		}
		print $c "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
		alarm 0;
	};
	alarm 0;
	close($c);
}
