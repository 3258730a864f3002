/*-------------------------------------------------------------------------
 *
 * event_producer.c
 *	  Publishes events to Kafka as the relay does, for the sink's tests:
 *	  one message per input line, each with its own event_id header (which
 *	  kcat cannot give per message).  Test infrastructure only: not part of
 *	  the extension's build; test/kafka/ctool.sh builds it into the test
 *	  state directory.
 *
 *	  event_producer -b BROKERS -t TOPIC [-f FILE] [-X property=value]...
 *
 *	  Each line of FILE (default stdin) is KEY<TAB>EVENT_ID<TAB>VALUE; a KEY
 *	  of "-" is a null key, an EVENT_ID of "-" means no event_id header, a
 *	  VALUE of "-" a null value.  An optional fourth field adds headers
 *	  after event_id: NAME=VALUE or NAME (a null value), separated by ",".
 *	  A KEY, header NAME or VALUE written "\x" and hex digits is those
 *	  bytes.  The producer is the relay's: idempotent
 *	  (acks=all), murmur2 partitioning of the key like the Java client (a
 *	  random partition for a null key), so a key's messages are in one
 *	  partition in line order.  It waits for every delivery report and
 *	  prints "ok N" (N delivered), or "error: ..." and exits 1 if any
 *	  message failed.
 *
 *-------------------------------------------------------------------------
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

static long delivered = 0;
static long failed = 0;
static char first_error[512];

static void
report(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
		delivered++;
	else
	{
		if (failed++ == 0)
			snprintf(first_error, sizeof(first_error), "%s", rd_kafka_err2str(m->err));
	}
}

/* "\x" and hex digits: decoded in place; returns the length in bytes */
static size_t
unhex(char *s)
{
	size_t		n = 0;

	if (strncmp(s, "\\x", 2) != 0)
		return strlen(s);
	for (const char *p = s + 2; p[0] && p[1]; p += 2)
	{
		char		byte[3] = {p[0], p[1], '\0'};

		s[n++] = (char) strtol(byte, NULL, 16);
	}
	return n;
}

static void
set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		err[512];

	if (rd_kafka_conf_set(conf, name, value, err, sizeof(err)) != RD_KAFKA_CONF_OK)
	{
		printf("error: %s\n", err);
		exit(1);
	}
}

int
main(int argc, char **argv)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;
	const char *topic = NULL;
	FILE	   *in = stdin;
	char		err[512];
	char	   *line = NULL;
	size_t		cap = 0;
	ssize_t		len;
	long		sent = 0;
	int			opt;

	set(conf, "enable.idempotence", "true");
	set(conf, "linger.ms", "5");
	set(conf, "message.timeout.ms", "0");
	set(conf, "partitioner", "murmur2_random");
	while ((opt = getopt(argc, argv, "b:t:f:X:")) != -1)
	{
		switch (opt)
		{
			case 'b':
				set(conf, "bootstrap.servers", optarg);
				break;
			case 't':
				topic = optarg;
				break;
			case 'f':
				in = fopen(optarg, "r");
				if (in == NULL)
				{
					printf("error: cannot open %s\n", optarg);
					return 1;
				}
				break;
			case 'X':
				{
					char	   *eq = strchr(optarg, '=');

					if (eq == NULL)
					{
						printf("error: -X needs property=value\n");
						return 1;
					}
					*eq = '\0';
					set(conf, optarg, eq + 1);
					break;
				}
			default:
				printf("error: usage: event_producer -b BROKERS -t TOPIC [-f FILE] [-X p=v]\n");
				return 1;
		}
	}
	if (topic == NULL)
	{
		printf("error: -t TOPIC is required\n");
		return 1;
	}
	rd_kafka_conf_set_dr_msg_cb(conf, report);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
	if (rk == NULL)
	{
		printf("error: %s\n", err);
		return 1;
	}

	while ((len = getline(&line, &cap, in)) > 0)
	{
		char	   *key,
				   *eid,
				   *value,
				   *extra,
				   *tab;
		size_t		keylen;
		rd_kafka_headers_t *hdrs;
		rd_kafka_resp_err_t e;

		if (line[len - 1] == '\n')
			line[--len] = '\0';
		if (len == 0)
			continue;
		key = line;
		tab = strchr(key, '\t');
		if (tab == NULL)
			continue;
		*tab = '\0';
		eid = tab + 1;
		tab = strchr(eid, '\t');
		if (tab == NULL)
			continue;
		*tab = '\0';
		value = tab + 1;
		extra = strchr(value, '\t');
		if (extra != NULL)
			*extra++ = '\0';
		keylen = strcmp(key, "-") ? unhex(key) : 0;

		hdrs = rd_kafka_headers_new(1);
		if (strcmp(eid, "-") != 0)
			rd_kafka_header_add(hdrs, "event_id", -1, eid, -1);
		for (char *h = extra ? strtok(extra, ",") : NULL; h != NULL; h = strtok(NULL, ","))
		{
			char	   *eq = strchr(h, '=');
			size_t		namelen;

			if (eq != NULL)
				*eq++ = '\0';
			namelen = unhex(h);
			rd_kafka_header_add(hdrs, h, namelen, eq, eq ? unhex(eq) : 0);
		}
		for (;;)
		{
			e = rd_kafka_producev(rk,
								  RD_KAFKA_V_TOPIC(topic),
								  RD_KAFKA_V_KEY(strcmp(key, "-") ? key : NULL, keylen),
								  RD_KAFKA_V_VALUE(strcmp(value, "-") ? value : NULL,
												   strcmp(value, "-") ? strlen(value) : 0),
								  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								  RD_KAFKA_V_HEADERS(hdrs),
								  RD_KAFKA_V_END);
			if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
				break;
			rd_kafka_poll(rk, 100);
		}
		if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			rd_kafka_headers_destroy(hdrs);
			printf("error: %s\n", rd_kafka_err2str(e));
			return 1;
		}
		sent++;
		rd_kafka_poll(rk, 0);
	}
	while (delivered + failed < sent)
		rd_kafka_poll(rk, 100);
	rd_kafka_destroy(rk);
	if (failed > 0)
	{
		printf("error: %ld of %ld messages failed: %s\n", failed, sent, first_error);
		return 1;
	}
	printf("ok %ld\n", delivered);
	return 0;
}
