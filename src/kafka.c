/*-------------------------------------------------------------------------
 *
 * kafka.c
 *	  The relay's Kafka producer.
 *
 * librdkafka calls our callbacks only from rd_kafka_poll()/rd_kafka_flush()
 * in the worker's own thread: delivery reports, errors, and logs (log.queue
 * is on and the log queue is forwarded to the main queue).  The callbacks
 * still never ereport(): they only record, and the worker reports.
 *
 * Extra producer properties come from the file named by
 * cqrs_sync.kafka_config_file, never from SQL: some properties run commands
 * (sasl.kerberos.kinit.cmd) and some are secrets (sasl.password).  Their
 * values are never logged.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>

#include "storage/fd.h"
#include "utils/memutils.h"

#include "cqrs_sync.h"
#include "kafka.h"
#include "shmem.h"

/* What the current producer was built from, to notice changes on SIGHUP. */
static char *built_brokers = NULL;
static char *built_config_file = NULL;
static time_t built_config_mtime = 0;
static time_t built_config_ctime = 0;

/* Last error reported by librdkafka's error callback, for the worker. */
static rd_kafka_resp_err_t last_client_error = RD_KAFKA_RESP_ERR_NO_ERROR;

static void
delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *rkmessage, void *opaque)
{
	CqrsMessage *msg = (CqrsMessage *) rkmessage->_private;

	if (msg == NULL)
		return;
	msg->err = rkmessage->err;
	msg->done = true;
}

static void
error_callback(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	char		buf[CQRS_ERROR_LEN];

	/* runs inside rd_kafka_poll() in the worker's thread (main queue) */
	last_client_error = (rd_kafka_resp_err_t) err;
	snprintf(buf, sizeof(buf), "kafka: %s: %s",
			 rd_kafka_err2name((rd_kafka_resp_err_t) err), reason);
	if (cqrs_shared)
		cqrs_relay_note_failure(buf, 0);
}

static void
log_callback(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	/*
	 * With log.queue=true and the log queue forwarded to the main queue,
	 * this runs inside rd_kafka_poll() in the worker's own thread, where
	 * ereport is safe.
	 */
	ereport(level <= 4 ? LOG : DEBUG1,
			(errmsg_internal("cqrs_sync relay: librdkafka %s: %s", fac, buf)));
}

static bool
sensitive_property(const char *name)
{
	return strstr(name, "password") != NULL ||
		strstr(name, "secret") != NULL ||
		strstr(name, ".key") != NULL ||
		strstr(name, "jaas") != NULL;
}

/* Set one property; never reveals the value of a sensitive one. */
static bool
conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
		 const char *origin, char *errbuf, size_t errlen)
{
	char		rderr[256];

	if (rd_kafka_conf_set(conf, name, value, rderr, sizeof(rderr)) == RD_KAFKA_CONF_OK)
		return true;
	if (sensitive_property(name))
		snprintf(errbuf, errlen, "invalid librdkafka property \"%s\" (%s)",
				 name, origin);
	else
		snprintf(errbuf, errlen, "invalid librdkafka property \"%s\" (%s): %s",
				 name, origin, rderr);
	return false;
}

static char *
trim(char *s)
{
	char	   *end;

	while (*s == ' ' || *s == '\t')
		s++;
	end = s + strlen(s);
	while (end > s && (end[-1] == ' ' || end[-1] == '\t' ||
					   end[-1] == '\n' || end[-1] == '\r'))
		*--end = '\0';
	return s;
}

/* Apply name=value lines of the properties file. */
static bool
read_config_file(rd_kafka_conf_t *conf, const char *path,
				 char *errbuf, size_t errlen)
{
	FILE	   *fp;
	struct stat st;
	char		line[4096];
	int			lineno = 0;
	bool		ok = true;

	if (stat(path, &st) != 0)
	{
		snprintf(errbuf, errlen, "could not stat librdkafka settings file \"%s\": %m", path);
		return false;
	}
	if (st.st_mode & (S_IWGRP | S_IWOTH))
	{
		snprintf(errbuf, errlen,
				 "librdkafka settings file \"%s\" is writable by group or others; it may name commands to run, so only its owner may write it",
				 path);
		return false;
	}
	built_config_mtime = st.st_mtime;
	built_config_ctime = st.st_ctime;

	fp = AllocateFile(path, "r");
	if (fp == NULL)
	{
		snprintf(errbuf, errlen, "could not open librdkafka settings file \"%s\": %m", path);
		return false;
	}
	while (ok && fgets(line, sizeof(line), fp) != NULL)
	{
		char	   *s = trim(line);
		char	   *eq;
		char		origin[MAXPGPATH + 32];

		lineno++;
		if (*s == '\0' || *s == '#')
			continue;
		eq = strchr(s, '=');
		if (eq == NULL)
		{
			snprintf(errbuf, errlen, "line %d of librdkafka settings file \"%s\" is not name=value",
					 lineno, path);
			ok = false;
			break;
		}
		*eq = '\0';
		snprintf(origin, sizeof(origin), "%s line %d", path, lineno);
		ok = conf_set(conf, trim(s), trim(eq + 1), origin, errbuf, errlen);
	}
	FreeFile(fp);
	return ok;
}

/*
 * Create the idempotent producer; batch_bytes > 0 caps its record batches.
 * Returns NULL and fills errbuf on error.
 */
rd_kafka_t *
cqrs_kafka_create(int batch_bytes, char *errbuf, size_t errlen)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;
	char		rderr[512];
	char		batch_size[32];

	/* defaults the properties file may change */
	if (!conf_set(conf, "client.id", "cqrs_sync", "default", errbuf, errlen) ||
		!conf_set(conf, "linger.ms", "1", "default", errbuf, errlen) ||
		!conf_set(conf, "partitioner", "murmur2_random", "default", errbuf, errlen) ||
		!conf_set(conf, "reconnect.backoff.max.ms", "1000", "default", errbuf, errlen) ||
		/* an outage pauses delivery; it never fails messages */
		!conf_set(conf, "message.timeout.ms", "0", "default", errbuf, errlen))
		goto fail;

	built_config_mtime = 0;
	if (cqrs_kafka_config_file && cqrs_kafka_config_file[0] != '\0' &&
		!read_config_file(conf, cqrs_kafka_config_file, errbuf, errlen))
		goto fail;

	/* never a record batch larger than the smallest topic limit seen */
	if (batch_bytes > 0)
	{
		snprintf(batch_size, sizeof(batch_size), "%d", batch_bytes);
		if (!conf_set(conf, "batch.size", batch_size, "smallest max.message.bytes", errbuf, errlen))
			goto fail;
	}

	/* what the relay's guarantees rest on; the file cannot change these */
	if (!conf_set(conf, "bootstrap.servers", cqrs_brokers, "cqrs_sync.brokers", errbuf, errlen) ||
		!conf_set(conf, "enable.idempotence", "true", "required", errbuf, errlen) ||
		!conf_set(conf, "acks", "all", "required", errbuf, errlen) ||
		!conf_set(conf, "log.queue", "true", "required", errbuf, errlen))
		goto fail;

	rd_kafka_conf_set_dr_msg_cb(conf, delivery_report);
	rd_kafka_conf_set_error_cb(conf, error_callback);
	rd_kafka_conf_set_log_cb(conf, log_callback);

	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, rderr, sizeof(rderr));
	if (rk == NULL)
	{
		snprintf(errbuf, errlen, "could not create Kafka producer: %s", rderr);
		rd_kafka_conf_destroy(conf);	/* only freed by a successful rd_kafka_new */
		return NULL;
	}
	/* serve librdkafka's logs from rd_kafka_poll() in this thread */
	rd_kafka_set_log_queue(rk, NULL);

	if (built_brokers)
		pfree(built_brokers);
	built_brokers = MemoryContextStrdup(TopMemoryContext, cqrs_brokers);
	if (built_config_file)
		pfree(built_config_file);
	built_config_file = MemoryContextStrdup(TopMemoryContext,
											cqrs_kafka_config_file ? cqrs_kafka_config_file : "");
	last_client_error = RD_KAFKA_RESP_ERR_NO_ERROR;
	return rk;

fail:
	rd_kafka_conf_destroy(conf);
	return NULL;
}

/*
 * Destroy the producer, waiting up to timeout_ms for messages in flight.
 * Messages still queued after that are purged (their delivery reports say
 * so), so nothing is reported delivered that was not.
 */
void
cqrs_kafka_destroy(rd_kafka_t *rk, int timeout_ms)
{
	if (rk == NULL)
		return;
	if (timeout_ms > 0)
		rd_kafka_flush(rk, timeout_ms);
	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_poll(rk, 0);
	rd_kafka_destroy(rk);
}

/* Did the brokers or the properties file change since the producer was built? */
bool
cqrs_kafka_config_changed(void)
{
	const char *file = cqrs_kafka_config_file ? cqrs_kafka_config_file : "";
	struct stat st;

	if (built_brokers == NULL || strcmp(built_brokers, cqrs_brokers) != 0)
		return true;
	if (built_config_file == NULL || strcmp(built_config_file, file) != 0)
		return true;
	/* ctime: a chmod counts, the file's permissions are checked too */
	if (file[0] != '\0' && stat(file, &st) == 0 &&
		(st.st_mtime != built_config_mtime || st.st_ctime != built_config_ctime))
		return true;
	return false;
}

/*
 * Hand one message to the producer.  The message's memory must live until
 * its delivery report (no copy is made).
 */
rd_kafka_resp_err_t
cqrs_kafka_produce(rd_kafka_t *rk, CqrsMessage *msg)
{
	rd_kafka_headers_t *hdrs = rd_kafka_headers_new(msg->nheaders + 1);
	rd_kafka_resp_err_t err;

	for (int i = 0; i < msg->nheaders; i++)
		rd_kafka_header_add(hdrs, msg->header_names[i], -1,
							msg->header_values[i], -1);
	rd_kafka_header_add(hdrs, "event_id", -1, msg->event_id, -1);

	msg->done = false;
	msg->err = RD_KAFKA_RESP_ERR_NO_ERROR;
	err = rd_kafka_producev(rk,
							RD_KAFKA_V_TOPIC(msg->topic),
							RD_KAFKA_V_KEY(msg->key, msg->key ? msg->keylen : 0),
							RD_KAFKA_V_VALUE((void *) msg->value, msg->valuelen),
							RD_KAFKA_V_HEADERS(hdrs),
							RD_KAFKA_V_MSGFLAGS(0),
							RD_KAFKA_V_OPAQUE(msg),
							RD_KAFKA_V_END);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		rd_kafka_headers_destroy(hdrs);
	return err;
}

/*
 * The topic's max.message.bytes, asked with DescribeConfigs; -1 when Kafka
 * did not say (the topic does not exist yet, the broker is unreachable, no
 * permission to describe it).  The broker rejects a whole record batch, and
 * every message in it, when the batch exceeds this limit, so the relay keeps
 * batches and messages below it.
 */
int
cqrs_kafka_topic_limit(rd_kafka_t *rk, const char *topic, int timeout_ms)
{
	rd_kafka_ConfigResource_t *res;
	rd_kafka_AdminOptions_t *opts;
	rd_kafka_queue_t *queue;
	rd_kafka_event_t *ev;
	char		errstr[256];
	int			limit = -1;

	res = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
	opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS);
	rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, errstr, sizeof(errstr));
	queue = rd_kafka_queue_new(rk);

	rd_kafka_DescribeConfigs(rk, &res, 1, opts, queue);
	ev = rd_kafka_queue_poll(queue, timeout_ms + 1000);
	if (ev != NULL && rd_kafka_event_error(ev) == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		const rd_kafka_DescribeConfigs_result_t *result =
			rd_kafka_event_DescribeConfigs_result(ev);
		const rd_kafka_ConfigResource_t **resources;
		size_t		nres = 0;

		resources = result ?
			rd_kafka_DescribeConfigs_result_resources(result, &nres) : NULL;
		if (nres == 1 &&
			rd_kafka_ConfigResource_error(resources[0]) == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			const rd_kafka_ConfigEntry_t **entries;
			size_t		nentries = 0;

			entries = rd_kafka_ConfigResource_configs(resources[0], &nentries);
			for (size_t i = 0; i < nentries; i++)
			{
				const char *value = rd_kafka_ConfigEntry_value(entries[i]);

				if (strcmp(rd_kafka_ConfigEntry_name(entries[i]), "max.message.bytes") == 0 &&
					value != NULL)
					limit = atoi(value);
			}
		}
	}
	if (ev != NULL)
		rd_kafka_event_destroy(ev);
	rd_kafka_queue_destroy(queue);
	rd_kafka_AdminOptions_destroy(opts);
	rd_kafka_ConfigResource_destroy(res);
	return limit;
}

/*
 * Bytes a message takes in a record batch of its own, for comparison with
 * max.message.bytes: payload plus a generous allowance for the batch header
 * (61 bytes) and the record framing.
 */
int
cqrs_kafka_message_size(const CqrsMessage *msg)
{
	int			size = 61 + 32 + msg->keylen + msg->valuelen;

	for (int i = 0; i < msg->nheaders; i++)
		size += 10 + strlen(msg->header_names[i]) + strlen(msg->header_values[i]);
	size += 10 + strlen("event_id") + strlen(msg->event_id);
	return size;
}

/* Is the producer in a fatal state (it must be re-created)? */
bool
cqrs_kafka_fatal(rd_kafka_t *rk, char *errbuf, size_t errlen)
{
	return rd_kafka_fatal_error(rk, errbuf, errlen) != RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* DESIGN.md section 5: what each delivery failure means. */
CqrsFailureClass
cqrs_kafka_classify(rd_kafka_resp_err_t err)
{
	switch (err)
	{
			/* this one message can never be written as it is */
		case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_INVALID_RECORD:
		case RD_KAFKA_RESP_ERR_INVALID_MSG:
		case RD_KAFKA_RESP_ERR__BAD_MSG:
		case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT:
			return CQRS_FAIL_MESSAGE;

			/* the topic or the cluster refuses us: an operator must act */
		case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
		case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
		case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
		case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
		case RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS:
		case RD_KAFKA_RESP_ERR_POLICY_VIOLATION:
		case RD_KAFKA_RESP_ERR__INVALID_ARG:
			return CQRS_FAIL_CONFIG;

		case RD_KAFKA_RESP_ERR__FATAL:
		case RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER:
		case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH:
		case RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID:
		case RD_KAFKA_RESP_ERR_PRODUCER_FENCED:
			return CQRS_FAIL_FATAL;

			/* timeouts, purges, transport: the message may be fine */
		default:
			return CQRS_FAIL_TRANSIENT;
	}
}
