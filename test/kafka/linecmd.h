/*-------------------------------------------------------------------------
 *
 * linecmd.h
 *	  What the test tools driven by commands on stdin (mock_cluster.c,
 *	  probe_producer.c) share: one flushed answer line per command, words of
 *	  a command line, integer arguments.  Header only: each tool is a single
 *	  file that test/kafka/ctool.sh compiles.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_LINECMD_H
#define CQRS_LINECMD_H

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* One answer line, flushed: the driving test reads it at once. */
static inline void
answer(const char *fmt,...)
__attribute__((format(printf, 1, 2)));

static inline void
answer(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

/* A whole decimal integer within [min, max]; 0 if s is anything else. */
static inline int
parse_long(const char *s, long min, long max, long *out)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
		return 0;
	*out = v;
	return 1;
}

/*
 * Splits line in place into words separated by white space; the number of
 * words, or -1 when there are more than max.
 */
static inline int
split_words(char *line, char **words, int max)
{
	int			n = 0;
	char	   *p = line;

	for (;;)
	{
		while (isspace((unsigned char) *p))
			p++;
		if (*p == '\0')
			return n;
		if (n == max)
			return -1;
		words[n++] = p;
		while (*p && !isspace((unsigned char) *p))
			p++;
		if (*p)
			*p++ = '\0';
	}
}

#endif							/* CQRS_LINECMD_H */
