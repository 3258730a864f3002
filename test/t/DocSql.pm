=pod

=head1 NAME

DocSql - the SQL blocks of the Markdown docs, for the tests that run them
(test/t/110_runbook_sql.pl: the runbooks; test/t/125_migrating_sql.pl: the
migration guides)

=head1 FUNCTIONS

slurp_file_utf8($path); github_anchor($heading); parse_markdown($text)
returns (\@headings, \@blocks), each block { section, h2, n, sql };
documented_variables($text): the first column of the table whose header
starts with "| Variable |" (or "| 변수 |"); used_variables($sql): the psql
variables a block interpolates; normalized_sql($sql): comments and
whitespace folded, to compare two translations' blocks.

=cut

package DocSql;

use strict;
use warnings;
use utf8;

use Exporter 'import';

our @EXPORT = qw(slurp_file_utf8 github_anchor parse_markdown documented_variables
  used_variables normalized_sql);

sub slurp_file_utf8
{
	my ($path) = @_;
	open my $fh, '<:encoding(UTF-8)', $path or die "cannot read $path: $!";
	local $/;
	my $text = <$fh>;
	close $fh;
	return $text;
}

# GitHub's heading anchor: lower case, punctuation other than - and _ dropped,
# spaces to hyphens.
sub github_anchor
{
	my ($heading) = @_;
	my $a = lc $heading;
	$a =~ s/[^\p{L}\p{N}\p{M} _-]//g;
	$a =~ s/ /-/g;
	return $a;
}

# Headings (outside code fences) and ```sql blocks of a Markdown file.  Each
# block: { section => "## heading[ / ### heading]", n => number within the
# ## section, sql => text }.
sub parse_markdown
{
	my ($text) = @_;
	my (@headings, @blocks);
	my ($h2, $h3) = ('(top)', undef);
	my %count;
	my ($fence, $indent, $is_sql, @body);
	for my $line (split /\n/, $text)
	{
		if (defined $fence)
		{
			if ($line =~ /^\s*\Q$fence\E\s*$/)
			{
				if ($is_sql)
				{
					my $sql = join("\n", map { my $l = $_; $l =~ s/^ {0,$indent}//; $l } @body) . "\n";
					my $sect = defined $h3 ? "$h2 / $h3" : $h2;
					push @blocks, { section => $sect, h2 => $h2, n => ++$count{$h2}, sql => $sql };
				}
				undef $fence;
				next;
			}
			push @body, $line;
			next;
		}
		if ($line =~ /^(\s*)(```+|~~~+)\s*(\S*)/)
		{
			($indent, $fence, $is_sql, @body) = (length $1, $2, ($3 eq 'sql'), ());
			next;
		}
		if ($line =~ /^(#{1,6})\s+(.*?)\s*#*\s*$/)
		{
			push @headings, { level => length $1, text => $2 };
			if (length $1 <= 2) { ($h2, $h3) = ($2, undef) }
			elsif (length $1 == 3) { $h3 = $2 }
		}
	}
	die "unterminated code fence" if defined $fence;
	return (\@headings, \@blocks);
}

# The variables documented in a runbook: the first cells of the table whose
# header starts with "| Variable |" (or "| 변수 |").
sub documented_variables
{
	my ($text) = @_;
	my (%vars, $in_table);
	for my $line (split /\n/, $text)
	{
		if (!$in_table)
		{
			$in_table = 1 if $line =~ /^\|\s*(Variable|변수)\s*\|/;
			next;
		}
		last unless $line =~ /^\|/;
		$vars{$1} = 1 if $line =~ /^\|\s*`([A-Za-z_]\w*)`\s*\|/;
	}
	return \%vars;
}

# psql variables a block interpolates: :name, :'name', :"name" (not ::casts).
sub used_variables
{
	my ($sql) = @_;
	my %used;
	my $code = join("\n", map { s/--.*$//r } split /\n/, $sql);
	while ($code =~ /(?<![:\w]):(['"]?)([A-Za-z_]\w*)\1/g)
	{
		$used{$2} = 1;
	}
	return keys %used;
}

sub normalized_sql
{
	my ($sql) = @_;
	my $s = join("\n", map { s/--.*$//r } split /\n/, $sql);
	$s =~ s/\s+/ /g;
	$s =~ s/^ | $//g;
	return $s;
}

1;
