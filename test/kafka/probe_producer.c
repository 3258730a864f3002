/*-------------------------------------------------------------------------
 *
 * probe_producer.c
 *	  An idempotent librdkafka producer driven by commands on stdin, for the
 *	  tests of the test infrastructure (test/t/006_mock_cluster.pl,
 *	  test/t/007_second_broker.pl): it tells, per message, whether the
 *	  delivery report came and what it said, and whether the producer is in
 *	  a fatal state.  Test infrastructure only: not part of the extension's
 *	  build; test/kafka/ctool.sh builds it into the test state directory.
 *
 *	  probe_producer -b BROKERS [-X property=value]...
 *
 *	  Defaults are the relay's (src/kafka.c): enable.idempotence=true (hence
 *	  acks=all), message.timeout.ms=0 (never give up), linger.ms=1,
 *	  reconnect.backoff.max.ms=1000; -X overrides them or sets any other
 *	  property.  Prints "ready" once the producer exists, then one answer
 *	  line per command, "ok ..." or "error: ...":
 *
 *	  produce TOPIC PARTITION KEY [VALUE]  PARTITION -1: the partitioner;
 *	                       "error: ERR: ..." if librdkafka refused it at once
 *	                       (e.g. _FATAL)
 *	  poll MS              serve delivery reports for MS milliseconds
 *	  wait N MS            poll until N delivery reports arrived in all, or MS
 *	                       passed
 *	                       (poll and wait answer "ok DELIVERED FAILED PENDING")
 *	  report KEY           the last message produced with KEY: "ok pending",
 *	                       "ok delivered PARTITION OFFSET" or
 *	                       "ok failed ERR STATUS" (STATUS: NOT_PERSISTED,
 *	                       POSSIBLY_PERSISTED, PERSISTED)
 *	  fatal                "ok NO_ERROR" or "ok ERR REASON"
 *	                       (rd_kafka_fatal_error())
 *	  describe-config TOPIC NAME MS   DescribeConfigs of the topic: "ok VALUE"
 *	                       or "error: ERR: ..."
 *	  quit                 purge what is left and exit
 *
 *	  Errors, fatal ones included, also go to stderr as they are reported.
 *
 *-------------------------------------------------------------------------
 */
#include <stdint.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "linecmd.h"

typedef struct Sent
{
	char	   *key;
	int			done;
	rd_kafka_resp_err_t err;
	rd_kafka_msg_status_t status;
	int32_t		partition;
	int64_t		offset;
} Sent;

static Sent *sent;
static size_t nsent,
			sent_cap;
static size_t ndelivered,
			nfailed;

/* A line on stderr with the wall-clock time, for the test's log. */
static void
note(const char *fmt,...)
{
	va_list		ap;
	struct timeval tv;
	char		ts[32];

	gettimeofday(&tv, NULL);
	strftime(ts, sizeof(ts), "%H:%M:%S", localtime(&tv.tv_sec));
	fprintf(stderr, "%s.%03ld probe_producer: ", ts, (long) (tv.tv_usec / 1000));
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static long
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void
delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	Sent	   *s = &sent[(uintptr_t) m->_private];

	s->done = 1;
	s->err = m->err;
	s->status = rd_kafka_message_status(m);
	s->partition = m->partition;
	s->offset = m->offset;
	if (m->err)
	{
		nfailed++;
		note("delivery of key %s failed: %s (%s)", s->key,
			 rd_kafka_err2name(m->err), rd_kafka_err2str(m->err));
	}
	else
		ndelivered++;
}

static void
error_callback(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	note("error_cb: %s: %s", rd_kafka_err2name(err), reason);
}

static const char *
status_name(rd_kafka_msg_status_t st)
{
	switch (st)
	{
		case RD_KAFKA_MSG_STATUS_NOT_PERSISTED:
			return "NOT_PERSISTED";
		case RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED:
			return "POSSIBLY_PERSISTED";
		case RD_KAFKA_MSG_STATUS_PERSISTED:
			return "PERSISTED";
	}
	return "UNKNOWN";
}

static void
answer_counts(void)
{
	answer("ok %zu %zu %zu", ndelivered, nfailed, nsent - ndelivered - nfailed);
}

static void
cmd_produce(rd_kafka_t *rk, int argc, char **argv)
{
	long		partition;
	const char *value;
	rd_kafka_resp_err_t err;

	if (argc < 4 || argc > 5 || !parse_long(argv[2], -1, INT32_MAX, &partition))
	{
		answer("error: usage: produce TOPIC PARTITION KEY [VALUE]");
		return;
	}
	value = argc == 5 ? argv[4] : argv[3];
	if (nsent == sent_cap)
	{
		sent_cap = sent_cap ? sent_cap * 2 : 64;
		sent = realloc(sent, sent_cap * sizeof(Sent));
		if (sent == NULL)
		{
			note("out of memory");
			exit(1);
		}
	}
	memset(&sent[nsent], 0, sizeof(Sent));
	sent[nsent].key = strdup(argv[3]);
	err = rd_kafka_producev(rk,
							RD_KAFKA_V_TOPIC(argv[1]),
							RD_KAFKA_V_PARTITION(partition < 0 ? RD_KAFKA_PARTITION_UA :
												 (int32_t) partition),
							RD_KAFKA_V_KEY(argv[3], strlen(argv[3])),
							RD_KAFKA_V_VALUE((void *) value, strlen(value)),
							RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
							RD_KAFKA_V_OPAQUE((void *) (uintptr_t) nsent),
							RD_KAFKA_V_END);
	if (err)
	{
		free(sent[nsent].key);
		answer("error: %s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
		return;
	}
	nsent++;
	answer("ok");
}

static void
cmd_report(int argc, char **argv)
{
	if (argc != 2)
	{
		answer("error: usage: report KEY");
		return;
	}
	for (size_t i = nsent; i-- > 0;)
	{
		Sent	   *s = &sent[i];

		if (strcmp(s->key, argv[1]) != 0)
			continue;
		if (!s->done)
			answer("ok pending");
		else if (s->err)
			answer("ok failed %s %s", rd_kafka_err2name(s->err), status_name(s->status));
		else
			answer("ok delivered %d %lld", (int) s->partition, (long long) s->offset);
		return;
	}
	answer("error: no message with key %s", argv[1]);
}

static void
cmd_describe_config(rd_kafka_t *rk, int argc, char **argv)
{
	rd_kafka_ConfigResource_t *res;
	rd_kafka_AdminOptions_t *opts;
	rd_kafka_queue_t *queue;
	rd_kafka_event_t *ev;
	char		errstr[512];
	long		timeout;
	const char *value = NULL;
	int			found = 0;

	if (argc != 4 || !parse_long(argv[3], 1, 600000, &timeout))
	{
		answer("error: usage: describe-config TOPIC NAME MS");
		return;
	}
	res = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, argv[1]);
	opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS);
	rd_kafka_AdminOptions_set_request_timeout(opts, (int) timeout, errstr, sizeof(errstr));
	queue = rd_kafka_queue_new(rk);
	rd_kafka_DescribeConfigs(rk, &res, 1, opts, queue);
	ev = rd_kafka_queue_poll(queue, (int) timeout + 1000);
	if (ev == NULL)
		answer("error: _TIMED_OUT: no DescribeConfigs result");
	else if (rd_kafka_event_error(ev))
		answer("error: %s: %s", rd_kafka_err2name(rd_kafka_event_error(ev)),
			   rd_kafka_event_error_string(ev));
	else
	{
		const rd_kafka_DescribeConfigs_result_t *result =
			rd_kafka_event_DescribeConfigs_result(ev);
		const rd_kafka_ConfigResource_t **rs;
		size_t		nres = 0;

		rs = rd_kafka_DescribeConfigs_result_resources(result, &nres);
		if (nres != 1)
			answer("error: %zu resources in the result", nres);
		else if (rd_kafka_ConfigResource_error(rs[0]))
			answer("error: %s: %s", rd_kafka_err2name(rd_kafka_ConfigResource_error(rs[0])),
				   rd_kafka_ConfigResource_error_string(rs[0]));
		else
		{
			const rd_kafka_ConfigEntry_t **entries;
			size_t		n = 0;

			entries = rd_kafka_ConfigResource_configs(rs[0], &n);
			for (size_t i = 0; i < n; i++)
				if (strcmp(rd_kafka_ConfigEntry_name(entries[i]), argv[2]) == 0)
				{
					value = rd_kafka_ConfigEntry_value(entries[i]);
					found = 1;
				}
			if (found)
				answer("ok %s", value ? value : "(null)");
			else
				answer("error: no config %s in the result", argv[2]);
		}
	}
	if (ev)
		rd_kafka_event_destroy(ev);
	rd_kafka_queue_destroy(queue);
	rd_kafka_AdminOptions_destroy(opts);
	rd_kafka_ConfigResource_destroy(res);
}

static int
set_conf(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		note("%s", errstr);
		return 0;
	}
	return 1;
}

int
main(int argc, char **argv)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;
	char		errstr[512];
	char		line[8192];
	int			have_brokers = 0;

	if (!set_conf(conf, "client.id", "cqrs_sync_probe") ||
		!set_conf(conf, "enable.idempotence", "true") ||
		!set_conf(conf, "message.timeout.ms", "0") ||
		!set_conf(conf, "linger.ms", "1") ||
		!set_conf(conf, "reconnect.backoff.max.ms", "1000"))
		return 1;
	for (int i = 1; i < argc; i++)
	{
		char	   *eq;

		if (strcmp(argv[i], "-b") == 0 && i + 1 < argc)
		{
			if (!set_conf(conf, "bootstrap.servers", argv[++i]))
				return 1;
			have_brokers = 1;
		}
		else if (strcmp(argv[i], "-X") == 0 && i + 1 < argc &&
				 (eq = strchr(argv[i + 1], '=')) != NULL)
		{
			*eq = '\0';
			if (!set_conf(conf, argv[i + 1], eq + 1))
				return 1;
			i++;
		}
		else
			have_brokers = -1;
	}
	if (have_brokers != 1)
	{
		fprintf(stderr, "usage: %s -b BROKERS [-X property=value]...\n", argv[0]);
		return 2;
	}
	rd_kafka_conf_set_dr_msg_cb(conf, delivery_report);
	rd_kafka_conf_set_error_cb(conf, error_callback);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		note("%s", errstr);
		return 1;
	}
	answer("ready");

	while (fgets(line, sizeof(line), stdin))
	{
		char	   *words[8];
		int			n;
		long		a,
					b;
		char		reason[512];
		rd_kafka_resp_err_t err;

		n = split_words(line, words, 8);
		if (n == 0)
			continue;
		if (n < 0)
		{
			answer("error: too many words");
			continue;
		}
		if (strcmp(words[0], "produce") == 0)
			cmd_produce(rk, n, words);
		else if (strcmp(words[0], "poll") == 0 && n == 2 && parse_long(words[1], 0, 600000, &a))
		{
			long		deadline = now_ms() + a;

			do
				rd_kafka_poll(rk, 50);
			while (now_ms() < deadline);
			answer_counts();
		}
		else if (strcmp(words[0], "wait") == 0 && n == 3 &&
				 parse_long(words[1], 0, 1000000, &a) &&
				 parse_long(words[2], 0, 600000, &b))
		{
			long		deadline = now_ms() + b;

			while (ndelivered + nfailed < (size_t) a && now_ms() < deadline)
				rd_kafka_poll(rk, 50);
			answer_counts();
		}
		else if (strcmp(words[0], "report") == 0)
			cmd_report(n, words);
		else if (strcmp(words[0], "fatal") == 0)
		{
			rd_kafka_poll(rk, 0);
			err = rd_kafka_fatal_error(rk, reason, sizeof(reason));
			if (err)
				answer("ok %s %s", rd_kafka_err2name(err), reason);
			else
				answer("ok NO_ERROR");
		}
		else if (strcmp(words[0], "describe-config") == 0)
			cmd_describe_config(rk, n, words);
		else if (strcmp(words[0], "quit") == 0)
		{
			answer("ok");
			break;
		}
		else
			answer("error: unknown command or bad arguments: %s", words[0]);
	}

	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_poll(rk, 0);
	rd_kafka_destroy(rk);
	return 0;
}
