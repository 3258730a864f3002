# The docs cannot drift from the code:
#  - every settings table of the docs (a Markdown table with the columns
#    Setting, Default and Context: docs/configuration.md, README.md,
#    docs/cleanup.md, ...) is compared with pg_settings on a server with the
#    library preloaded: each documented default (with its unit: 1s is 1000 for
#    a setting in milliseconds, a bare number only for a setting without a
#    unit), the documented range where there is one, and the context;
#    docs/configuration.md documents every cqrs_sync.* setting there is;
#  - every function heading of docs/sql-api.md ("### `name(args) RETURNS
#    type`") is compared with the catalog (argument names, types and
#    defaults, result), and every function of the extension has one;
#  - the comparison itself must catch drift: mutated rows and headings are
#    refused.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use DocSql;
use PostgreSQL::Test::Utils;
use Test::More;

my $repo = $ENV{CQRS_REPO} // "$FindBin::RealBin/../..";

my $node = new_node('docs', 'cqrs_sync.relay_enabled' => 'off');

sub slurp_doc { return slurp_file_utf8("$repo/$_[0]") }

# ---- settings ---------------------------------------------------------------

my %setting = map {
	my ($name, $boot, $unit, $context, $min, $max, $vartype) = split /\|/, $_, 7;
	$name => { boot => $boot, unit => $unit, context => $context, min => $min, max => $max,
		vartype => $vartype }
} split /\n/, $node->safe_psql('postgres',
	q{SELECT name, coalesce(boot_val, ''), coalesce(unit, ''), context, coalesce(min_val, ''),
	         coalesce(max_val, ''), vartype
	    FROM pg_settings WHERE name LIKE 'cqrs\_sync.%' ORDER BY name});
cmp_ok(scalar keys %setting, '>=', 20, 'pg_settings has the cqrs_sync settings (' . scalar(keys %setting) . ')');

my %ms_per = (ms => 1, s => 1000, min => 60_000, h => 3_600_000, d => 86_400_000);

# A documented value ("1s", "5000", "-1") in the setting's base unit, or
# undef with a reason.
sub doc_value_in_unit
{
	my ($text, $unit) = @_;
	if ($text =~ /^(-?\d+)(ms|s|min|h|d)$/)
	{
		my ($n, $u) = ($1, $2);
		return (undef, "\"$text\" has a time unit, the setting has none") unless exists $ms_per{$unit};
		my $v = $n * $ms_per{$u} / $ms_per{$unit};
		return (undef, "\"$text\" is not a whole number of $unit") if $v != int($v);
		return ($v);
	}
	if ($text =~ /^-?\d+$/)
	{
		# a bare number is in the setting's unit only where it has none (or
		# is -1 / 0, which read the same in every unit)
		return ($text) if $unit eq '' || $text eq '0' || $text eq '-1';
		return (undef, "\"$text\" has no unit, the setting is in $unit");
	}
	return (undef, "\"$text\" is not a number");
}

# Compare one table row with pg_settings; returns a list of problems.
sub check_setting_row
{
	my ($name, $default, $context) = @_;
	my $s = $setting{$name};
	return ("$name is not a setting of the server") unless $s;
	my @problems;

	# context: the cell's first word
	my ($ctx) = $context =~ /^\s*([a-z]+)/;
	push @problems, "context \"" . ($ctx // $context) . "\", pg_settings says \"$s->{context}\""
	  unless defined $ctx && $ctx eq $s->{context};

	# default: the first `value` of the cell, "empty" or "(empty)"
	my $doc;
	if ($default =~ /^\s*`([^`]*)`/) { $doc = $1 }
	elsif ($default =~ /^\s*\(?empty\)?/i) { $doc = '' }
	else { return (@problems, "default cell \"$default\" names no value") }
	if ($s->{vartype} eq 'integer' || $s->{vartype} eq 'real')
	{
		my ($v, $why) = doc_value_in_unit($doc, $s->{unit});
		if (!defined $v) { push @problems, "default $why" }
		elsif ($v != $s->{boot}) { push @problems, "default \"$doc\" = $v $s->{unit}, the code's is $s->{boot} $s->{unit}" }

		# the range, where documented as "(min to max)"
		if ($default =~ /\((-?[\w.]+) to (-?[\w.]+)\)/)
		{
			my ($lo, $hi) = ($1, $2);
			for my $pair ([ $lo, 'min', $s->{min} ], [ $hi, 'max', $s->{max} ])
			{
				my ($txt, $which, $real) = @$pair;
				next if $txt !~ /^-?\d+(ms|s|min|h|d)?$/;    # e.g. "68 years": not compared
				my ($v2, $why2) = doc_value_in_unit($txt, $s->{unit});
				push @problems, "range $which $why2" unless defined $v2;
				push @problems, "range $which \"$txt\" = $v2, the code's is $real"
				  if defined $v2 && $v2 != $real;
			}
		}
	}
	else
	{
		push @problems, "default \"$doc\", the code's is \"$s->{boot}\"" if $doc ne $s->{boot};
	}
	return @problems;
}

# Settings tables of a Markdown file: rows as [name, default cell, context cell].
sub settings_rows
{
	my ($text) = @_;
	my @rows;
	my ($iname, $idef, $ictx);
	for my $line (split /\n/, $text)
	{
		if ($line !~ /^\|/) { undef $iname; next; }
		my @cells = map { s/^\s+|\s+$//gr } split /(?<!\\)\|/, $line;
		shift @cells;    # before the first |
		if (!defined $iname)
		{
			my %col;
			@col{@cells} = (0 .. $#cells);
			($iname, $idef, $ictx) = @col{ 'Setting', 'Default', 'Context' };
			undef $iname unless defined $idef && defined $ictx;
			next;
		}
		next if $cells[$iname] !~ /^`(cqrs_sync\.[a-z_]+)`$/;
		push @rows, [ $1, $cells[$idef], $cells[$ictx] ];
	}
	return @rows;
}

# The checker must catch drift before it is trusted.
{
	my @bad = (
		[ 'cqrs_sync.batch_size', '`4000` (1 to 100000)', 'sighup', 'another default' ],
		[ 'cqrs_sync.batch_size', '`5000` (1 to 1000)', 'sighup', 'another range' ],
		[ 'cqrs_sync.batch_size', '`5000`', 'superuser', 'another context' ],
		[ 'cqrs_sync.cleanup_delay', '`10`', 'superuser', 'a time without its unit' ],
		[ 'cqrs_sync.cleanup_delay', '`10s`', 'superuser', 'another unit' ],
		[ 'cqrs_sync.cleanup_batch_size', '`2000ms`', 'superuser', 'a unit where there is none' ],
		[ 'cqrs_sync.dlt_suffix', '`-DLT`', 'sighup', 'another string' ],
		[ 'cqrs_sync.no_such_setting', '`1`', 'sighup', 'a setting that does not exist' ],);
	for my $b (@bad)
	{
		my @p = check_setting_row(@$b[ 0 .. 2 ]);
		ok(scalar @p, "the settings check catches $b->[3] (@p)");
	}
	ok(!check_setting_row('cqrs_sync.poll_interval', '`1s` (10ms to 1h)', 'sighup'),
		'and passes a right row');
}

my @files = grep { -f "$repo/$_" } ('README.md', map { "docs/" . ($_ =~ s{.*/}{}r) } glob("$repo/docs/*.md"));
my %documented;
for my $file (@files)
{
	my @rows = settings_rows(slurp_doc($file));
	next unless @rows;
	for my $r (@rows)
	{
		my @p = check_setting_row(@$r);
		ok(!@p, "$file: $r->[0] as in pg_settings") or diag(join("\n", @p));
		$documented{$file}{ $r->[0] } = 1;
	}
}
cmp_ok(scalar keys %documented, '>=', 3, 'settings tables found in ' . join(', ', sort keys %documented));
for my $name (sort keys %setting)
{
	ok($documented{'docs/configuration.md'}{$name}, "docs/configuration.md documents $name");
}

# ---- functions ------------------------------------------------------------------

sub norm_sig
{
	my ($s) = @_;
	$s =~ s/"//g;                     # "row" jsonb
	$s =~ s/::[a-z ]+(\[\])?//g;      # DEFAULT NULL::jsonb
	$s =~ s/'\{\}'/'{}'/g;
	$s =~ s/\s+/ /g;
	$s =~ s/^ | $//g;
	$s =~ s/ ?, ?/, /g;
	$s =~ s/\( /(/g;
	$s =~ s/ \)/)/g;
	return lc $s;
}

# Catalog: name(args) RETURNS result of every function of the extension.
# (the input arguments as pg_get_function_arguments() shows them, without
# OUT parameters, which the docs list in the function's section: a function
# with OUT parameters RETURNS record, or SETOF record)
my (%catalog, %out_columns);
for (split /\n/, $node->safe_psql('postgres', q{
	SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
	       p.proname, pg_get_function_arguments(p.oid),
	       CASE WHEN p.proretset AND p.prorettype = 'record'::regtype THEN 'setof record'
	            ELSE pg_get_function_result(p.oid) END
	  FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
	 WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
	   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cqrs_sync')}))
{
	my ($id, $name, $args, $result) = split /\|/, $_, 4;
	# split on commas outside parentheses and quotes
	my @args = grep { $_ ne '' } map { s/^\s+|\s+$//gr } ($args =~ /((?:[^,('"]|\([^)]*\)|'[^']*'|"[^"]*")+)/g);
	push @{ $out_columns{$name} }, map { /^OUT\s+"?(\w+)"?/ ? $1 : () } @args;
	my $in = join(', ', grep { !/^OUT\s/ } @args);
	$catalog{$id} = norm_sig("$name($in) RETURNS $result");
}
cmp_ok(scalar keys %catalog, '>=', 20, 'the extension has functions (' . scalar(keys %catalog) . ')');

# Documented: "### `name(args) RETURNS type`" headings of docs/sql-api.md.
my $api = slurp_doc('docs/sql-api.md');
my (%doc_fn, %doc_section);
my @api_lines = split /\n/, $api;
for my $i (0 .. $#api_lines)
{
	next unless $api_lines[$i] =~ /^#{2,4} .*?`(cqrs_\w+\([^`]*\) RETURNS [^`]+)`/;
	my $sig = $1;
	my ($name) = $sig =~ /^(\w+)\(/;
	push @{ $doc_fn{$name} }, norm_sig($sig);    # overloads: one heading each
	# its section: up to the next heading
	my $j = $i + 1;
	$j++ while $j <= $#api_lines && $api_lines[$j] !~ /^#/;
	$doc_section{$name} .= join("\n", @api_lines[ $i .. $j - 1 ]) . "\n";
}
cmp_ok(scalar keys %doc_fn, '>=', 20, 'docs/sql-api.md has function headings (' . scalar(keys %doc_fn) . ')');

my %catalog_by_name;
for my $id (sort keys %catalog)
{
	my ($name) = $id =~ /^(\w+)\(/;
	push @{ $catalog_by_name{$name} }, $catalog{$id};
}

sub check_function
{
	my ($name, $doc) = @_;
	my $cat = $catalog_by_name{$name};
	return ("$name is not a function of the extension") unless defined $cat;
	return ("documented as \"$doc\", the catalog says \"" . join('" or "', @$cat) . '"')
	  unless grep { $_ eq $doc } @$cat;
	return ();
}

{
	my @bad = (
		[ 'cqrs_enqueue', norm_sig('cqrs_enqueue(topic text, key text, payload jsonb) RETURNS bigint'), 'a missing argument' ],
		[ 'cqrs_enqueue', norm_sig('cqrs_enqueue(topic text, key text, payload jsonb, headers jsonb DEFAULT NULL) RETURNS integer'), 'another result' ],
		[ 'cqrs_retry', norm_sig('cqrs_retry(row_id bigint) RETURNS boolean'), 'another argument name' ],
		[ 'cqrs_no_such', norm_sig('cqrs_no_such() RETURNS void'), 'a function that does not exist' ],);
	ok(scalar check_function(@$_[ 0, 1 ]), "the function check catches $_->[2]") for @bad;
}

for my $name (sort keys %doc_fn)
{
	my @p = map { check_function($name, $_) } @{ $doc_fn{$name} };
	# the columns of a function with OUT parameters are named in its section
	for my $col (@{ $out_columns{$name} // [] })
	{
		push @p, "its section does not name its column $col" unless $doc_section{$name} =~ /`\Q$col\E`/;
	}
	ok(!@p, "docs/sql-api.md: $name as in the catalog") or diag(join("\n", @p));
}
for my $id (sort keys %catalog)
{
	my ($name) = $id =~ /^(\w+)\(/;
	ok((grep { $_ eq $catalog{$id} } @{ $doc_fn{$name} // [] }),
		"docs/sql-api.md documents $id with its signature");
}

$node->stop;
done_testing();
