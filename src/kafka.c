/*-------------------------------------------------------------------------
 *
 * kafka.c
 *	  cqrs_sync's Kafka clients.
 *
 * librdkafka calls our callbacks from rd_kafka_poll() in the worker's own
 * thread (delivery reports, errors, logs: log.queue is on and the log queue
 * is forwarded to the main queue); the partitioner runs in any thread.  None
 * of them calls elog, allocates with palloc or takes a PostgreSQL lock: they
 * only record, and the worker reports (cqrs_kafka_emit_logs,
 * cqrs_kafka_take_error).  librdkafka announces work on its queues by writing
 * to a pipe (rd_kafka_queue_io_event_enable), which the worker waits on
 * beside its latch.
 *
 * Extra client properties come from the file named by
 * cqrs_sync.kafka_config_file, never from SQL: some properties run commands
 * (sasl.kerberos.kinit.cmd) and some are secrets (sasl.password).  The file
 * must be a regular file owned by the server's OS user or root and not
 * accessible to group or others.  No value from it is ever written to a log,
 * an error or a view: the values of sensitive properties are redacted from
 * every text librdkafka hands us.
 *
 * The relay's producer chooses partitions with its own partitioner (the Java
 * client's murmur2, random for NULL keys) so that the relay knows, before a
 * message is acknowledged, which partition it waits on.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lib/stringinfo.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "cqrs_sync.h"
#include "kafka.h"
#include "topics.h"

/* What the current client was built from, to notice changes on SIGHUP. */
static char *built_brokers = NULL;
static char *built_config_file = NULL;
static struct stat built_config_stat;

/* Values of sensitive properties read from the file, to redact. */
static List *secrets = NIL;

/* The pipe librdkafka writes to when one of our queues gets work. */
static int	event_pipe[2] = {-1, -1};

/* The longest a metadata client waits for an answer (ms). */
#define MONITOR_SOCKET_TIMEOUT_MS 2000

/* The relay's queue of DescribeConfigs results, and the main queue. */
static rd_kafka_queue_t *admin_queue = NULL;
static rd_kafka_queue_t *main_queue = NULL;
static bool main_wakeups = true;	/* the main queue writes to event_pipe */

static CqrsDeliveryHook delivery_hook = NULL;

/*
 * Log lines and the last client error, recorded by the callbacks and served
 * by the worker.  The mutex is for safety should librdkafka ever call the
 * log callback from one of its threads (it does not with log.queue on).
 */
#define LOG_RING 64
#define LOG_LINE 512
static pthread_mutex_t cb_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct
{
	int			level;
	char		text[LOG_LINE];
}			log_ring[LOG_RING];
static int	log_head = 0;		/* next to write */
static int	log_count = 0;
static int	log_dropped = 0;
static bool error_pending = false;
static char error_text[LOG_LINE];

/* ---- callbacks (no elog, no palloc) ------------------------------------ */

static void
delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *rkmessage, void *opaque)
{
	CqrsMessage *msg = (CqrsMessage *) rkmessage->_private;

	if (msg == NULL)
		return;
	msg->err = rkmessage->err;
	if (rkmessage->partition >= 0)
		pg_atomic_write_u32(&msg->partition, (uint32) rkmessage->partition + 1);
	msg->offset = rkmessage->offset;
	msg->done = true;
	if (delivery_hook)
		delivery_hook(msg);
}

static void
error_callback(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	pthread_mutex_lock(&cb_mutex);
	snprintf(error_text, sizeof(error_text), "kafka: %s: %s",
			 rd_kafka_err2name((rd_kafka_resp_err_t) err), reason);
	error_pending = true;
	pthread_mutex_unlock(&cb_mutex);
}

static void
log_callback(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	pthread_mutex_lock(&cb_mutex);
	if (log_count == LOG_RING)
		log_dropped++;
	else
	{
		log_ring[log_head].level = level;
		snprintf(log_ring[log_head].text, LOG_LINE, "%s: %s", fac, buf);
		log_head = (log_head + 1) % LOG_RING;
		log_count++;
	}
	pthread_mutex_unlock(&cb_mutex);
}

/*
 * The Java client's partitioning: murmur2 of the key, a random available
 * partition for a NULL key.  Records the choice in the message and the
 * partition count in the topic's state (atomics: any thread).
 */
static int32_t
partitioner(const rd_kafka_topic_t *rkt, const void *key, size_t keylen,
			int32_t partition_cnt, void *rkt_opaque, void *msg_opaque)
{
	CqrsMessage *msg = (CqrsMessage *) msg_opaque;
	int32_t		p;

	if (key == NULL)
		p = rd_kafka_msg_partitioner_murmur2_random(rkt, key, keylen, partition_cnt,
													rkt_opaque, msg_opaque);
	else
		p = rd_kafka_msg_partitioner_murmur2(rkt, key, keylen, partition_cnt,
											 rkt_opaque, msg_opaque);
	if (msg != NULL && p >= 0)
	{
		pg_atomic_write_u32(&msg->partition, (uint32) p + 1);
		if (msg->tstate)
			pg_atomic_write_u32(&msg->tstate->partition_cnt, (uint32) partition_cnt);
	}
	return p;
}

/* ---- the worker's side of the callbacks ---------------------------------- */

void
cqrs_kafka_set_delivery_hook(CqrsDeliveryHook hook)
{
	delivery_hook = hook;
}

/*
 * Replace every occurrence of value in text (NUL-terminated) by "***"; the
 * text never grows.
 */
static void
redact_value(char *text, const char *value)
{
	size_t		vlen = strlen(value);
	char	   *hit;

	if (vlen == 0)
		return;
	/* search on after each replacement: a value may match its own stars */
	while ((hit = strstr(text, value)) != NULL)
	{
		if (vlen >= 3)
		{
			memcpy(hit, "***", 3);
			memmove(hit + 3, hit + vlen, strlen(hit + vlen) + 1);
			text = hit + 3;
		}
		else
		{
			memset(hit, '*', vlen);
			text = hit + vlen;
		}
	}
}

/* Redact every secret value of the properties file from text. */
void
cqrs_kafka_redact(char *text)
{
	ListCell   *lc;

	foreach(lc, secrets)
		redact_value(text, (const char *) lfirst(lc));
}

/* Write librdkafka's log lines to the server log (the worker's thread). */
void
cqrs_kafka_emit_logs(const char *who)
{
	for (;;)
	{
		int			level;
		char		text[LOG_LINE];
		int			dropped;

		pthread_mutex_lock(&cb_mutex);
		if (log_count == 0)
		{
			dropped = log_dropped;
			log_dropped = 0;
			pthread_mutex_unlock(&cb_mutex);
			if (dropped > 0)
				ereport(LOG,
						(errmsg("%s: %d librdkafka log lines were dropped", who, dropped)));
			return;
		}
		{
			int			tail = (log_head - log_count + LOG_RING) % LOG_RING;

			level = log_ring[tail].level;
			memcpy(text, log_ring[tail].text, LOG_LINE);
			log_count--;
		}
		pthread_mutex_unlock(&cb_mutex);

		cqrs_kafka_redact(text);
		ereport(level <= 4 ? LOG : DEBUG1,
				(errmsg_internal("%s: librdkafka %s", who, text)));
	}
}

/* The last error librdkafka reported, if one came since the last call. */
bool
cqrs_kafka_take_error(char *buf, size_t len)
{
	bool		had;

	pthread_mutex_lock(&cb_mutex);
	had = error_pending;
	if (had)
		strlcpy(buf, error_text, len);
	error_pending = false;
	pthread_mutex_unlock(&cb_mutex);
	if (had)
		cqrs_kafka_redact(buf);
	return had;
}

static void ensure_event_pipe(void);

/* The fd that becomes readable when a client queue has work. */
int
cqrs_kafka_event_fd(void)
{
	ensure_event_pipe();
	return event_pipe[0];
}

/* Empty the pipe before serving the queues. */
void
cqrs_kafka_drain_events(void)
{
	char		buf[64];

	if (event_pipe[0] < 0)
		return;
	while (read(event_pipe[0], buf, sizeof(buf)) > 0)
		;
}

/*
 * Whether the main queue (delivery reports, logs, errors) writes to the event
 * pipe when something arrives in it.  The relay turns this off while its
 * reports may wait for its next wake-up anyway: each write costs librdkafka's
 * thread a system call, and the relay another to read it.  Turning it on
 * announces nothing already queued: returns true when the queue holds events
 * (the caller must not sleep).
 */
bool
cqrs_kafka_main_wakeups(bool on)
{
	if (main_queue == NULL)
		return false;
	if (on != main_wakeups)
	{
		rd_kafka_queue_io_event_enable(main_queue, on ? event_pipe[1] : -1,
									   "m", 1);
		main_wakeups = on;
	}
	return on && rd_kafka_queue_length(main_queue) > 0;
}

/* Serve delivery reports, errors and logs; returns the events served. */
int
cqrs_kafka_serve(rd_kafka_t *rk)
{
	return rk ? rd_kafka_poll(rk, 0) : 0;
}

/* ---- the properties file ------------------------------------------------ */

static bool
sensitive_property(const char *name)
{
	return strstr(name, "password") != NULL ||
		strstr(name, "secret") != NULL ||
		strstr(name, "key") != NULL ||
		strstr(name, "jaas") != NULL ||
		strstr(name, "token") != NULL ||
		strstr(name, "oauthbearer.config") != NULL ||
		strstr(name, "credential") != NULL;
}

/* Set one property; never reveals its value. */
static bool
conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
		 const char *origin, char *errbuf, size_t errlen)
{
	char		rderr[512];

	if (rd_kafka_conf_set(conf, name, value, rderr, sizeof(rderr)) == RD_KAFKA_CONF_OK)
		return true;
	redact_value(rderr, value);
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

/*
 * Properties cqrs_sync decides itself, or that would break what it rests on;
 * the file may not set them.  delivery.report.only.error would withhold the
 * reports of delivered messages (nothing would become SENT, and every
 * restart would send the window again); transactional.id would make every
 * produce fail outside a transaction.
 */
static bool
reserved_property(const char *name)
{
	return strcmp(name, "delivery.report.only.error") == 0 ||
		strcmp(name, "transactional.id") == 0 ||
		strcmp(name, "partitioner") == 0 ||
		strcmp(name, "bootstrap.servers") == 0 ||
		strcmp(name, "metadata.broker.list") == 0 ||
		strcmp(name, "enable.idempotence") == 0 ||
		strcmp(name, "acks") == 0 ||
		strcmp(name, "request.required.acks") == 0 ||
		strcmp(name, "log.queue") == 0 ||
		strcmp(name, "batch.size") == 0;
}

/* One name=value line of the properties file. */
static bool
apply_line(rd_kafka_conf_t *conf, char *line, const char *path, int lineno,
		   char *errbuf, size_t errlen)
{
	char	   *s = trim(line);
	char	   *eq;
	char	   *name;
	char	   *value;
	char		origin[MAXPGPATH + 32];
	bool		on;

	if (*s == '\0' || *s == '#')
		return true;
	eq = strchr(s, '=');
	if (eq == NULL)
	{
		snprintf(errbuf, errlen, "line %d of librdkafka settings file \"%s\" is not name=value",
				 lineno, path);
		return false;
	}
	*eq = '\0';
	name = trim(s);
	value = trim(eq + 1);

	/*
	 * A name that is no property name (a "name: value" or "name value" line
	 * of a Java properties file, whose value may hold an "=") is not quoted:
	 * it may hold a secret.
	 */
	if (name[0] == '\0' ||
		strspn(name, "abcdefghijklmnopqrstuvwxyz"
			   "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != strlen(name))
	{
		snprintf(errbuf, errlen, "line %d of librdkafka settings file \"%s\" is not name=value (a property name is letters, digits, \".\", \"_\" and \"-\")",
				 lineno, path);
		return false;
	}
	if (reserved_property(name))
	{
		snprintf(errbuf, errlen,
				 "librdkafka settings file \"%s\" line %d sets \"%s\", which cqrs_sync sets itself",
				 path, lineno, name);
		return false;
	}

	/*
	 * librdkafka's unsecured JWT (a development aid) refreshes its token on
	 * its own thread, and with librdkafka 2.0.2 that refresh crashed the
	 * worker (SIGSEGV in rdk:main) every time: the postmaster then restarts
	 * the whole server, again and again.
	 */
	if (strcmp(name, "enable.sasl.oauthbearer.unsecure.jwt") == 0 &&
		parse_bool(value, &on) && on)
	{
		snprintf(errbuf, errlen,
				 "librdkafka settings file \"%s\" line %d sets \"%s\", which cqrs_sync refuses: the token refresh of librdkafka's unsecured JWT crashes the worker, and with it the server",
				 path, lineno, name);
		return false;
	}
	if (sensitive_property(name) && value[0] != '\0')
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		ListCell   *lc;
		int			pos = 0;

		/* longest first: a secret inside another must not leave its rest */
		foreach(lc, secrets)
		{
			if (strlen((const char *) lfirst(lc)) < strlen(value))
				break;
			pos++;
		}
		secrets = list_insert_nth(secrets, pos, pstrdup(value));
		MemoryContextSwitchTo(old);
	}
	snprintf(origin, sizeof(origin), "%s line %d", path, lineno);
	return conf_set(conf, name, value, origin, errbuf, errlen);
}

/*
 * Apply the name=value lines of the properties file.  The checks are made on
 * the opened file, so the file checked is the file read.  It is opened
 * without waiting (O_NONBLOCK): a named pipe or a device put in its place is
 * refused as not a regular file, instead of holding the worker in open() for
 * ever, deaf to SIGTERM.
 */
static bool
read_config_file(rd_kafka_conf_t *conf, const char *path,
				 char *errbuf, size_t errlen)
{
	int			fd;
	struct stat st;
	StringInfoData line;
	char		buf[8192];
	int			lineno = 0;
	bool		ok = true;

	fd = OpenTransientFile(path, O_RDONLY | O_NONBLOCK | PG_BINARY);
	if (fd < 0)
	{
		snprintf(errbuf, errlen, "could not open librdkafka settings file \"%s\": %m", path);
		return false;
	}
	if (fstat(fd, &st) != 0)
	{
		snprintf(errbuf, errlen, "could not stat librdkafka settings file \"%s\": %m", path);
		CloseTransientFile(fd);
		return false;
	}
	if (!S_ISREG(st.st_mode))
	{
		snprintf(errbuf, errlen, "librdkafka settings file \"%s\" is not a regular file", path);
		CloseTransientFile(fd);
		return false;
	}
	if (st.st_uid != geteuid() && st.st_uid != 0)
	{
		snprintf(errbuf, errlen,
				 "librdkafka settings file \"%s\" must be owned by the database server's user or root; it may name commands to run and hold secrets",
				 path);
		CloseTransientFile(fd);
		return false;
	}
	if (st.st_mode & (S_IRWXG | S_IRWXO))
	{
		snprintf(errbuf, errlen,
				 "librdkafka settings file \"%s\" has group or world access; it may name commands to run and hold secrets, so only its owner may read or write it (chmod 0600)",
				 path);
		CloseTransientFile(fd);
		return false;
	}
	built_config_stat = st;

	initStringInfo(&line);
	while (ok)
	{
		ssize_t		n = read(fd, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
		{
			snprintf(errbuf, errlen, "could not read librdkafka settings file \"%s\": %m", path);
			ok = false;
			break;
		}
		for (ssize_t i = 0; i < n && ok; i++)
		{
			if (buf[i] != '\n')
			{
				appendStringInfoChar(&line, buf[i]);
				continue;
			}
			lineno++;
			if (line.len > 0)
				ok = apply_line(conf, line.data, path, lineno, errbuf, errlen);
			resetStringInfo(&line);
		}
		if (n == 0)
		{
			/* the last line, without a newline */
			lineno++;
			if (ok && line.len > 0)
				ok = apply_line(conf, line.data, path, lineno, errbuf, errlen);
			break;
		}
	}
	pfree(line.data);
	CloseTransientFile(fd);
	return ok;
}

/* ---- clients -------------------------------------------------------------- */

static void
ensure_event_pipe(void)
{
	if (event_pipe[0] >= 0)
		return;
	if (pipe(event_pipe) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create a pipe for librdkafka events: %m")));
	if (fcntl(event_pipe[0], F_SETFL, O_NONBLOCK) != 0 ||
		fcntl(event_pipe[1], F_SETFL, O_NONBLOCK) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not make the librdkafka event pipe non-blocking: %m")));
}

/* What a client was built from, for cqrs_kafka_config_changed(). */
static void
remember_built(void)
{
	if (built_brokers)
		pfree(built_brokers);
	built_brokers = MemoryContextStrdup(TopMemoryContext, cqrs_brokers);
	if (built_config_file)
		pfree(built_config_file);
	built_config_file = MemoryContextStrdup(TopMemoryContext,
											cqrs_kafka_config_file ? cqrs_kafka_config_file : "");
}

/*
 * Read the properties file into conf (forgetting the secrets of the last
 * read); false and errbuf on error.
 */
static bool
apply_config_file(rd_kafka_conf_t *conf, char *errbuf, size_t errlen)
{
	list_free_deep(secrets);
	secrets = NIL;
	memset(&built_config_stat, 0, sizeof(built_config_stat));
	if (cqrs_kafka_config_file && cqrs_kafka_config_file[0] != '\0' &&
		!read_config_file(conf, cqrs_kafka_config_file, errbuf, errlen))
		return false;
	return true;
}

/*
 * rd_kafka_new() with our error and log callbacks, its logs served by this
 * thread's polls.  conf is consumed either way; NULL and errbuf ("could not
 * create a Kafka <what>: ...", redacted) on error.
 */
static rd_kafka_t *
new_client(rd_kafka_type_t type, rd_kafka_conf_t *conf, const char *what,
		   char *errbuf, size_t errlen)
{
	rd_kafka_t *rk;
	char		rderr[512];

	rd_kafka_conf_set_error_cb(conf, error_callback);
	rd_kafka_conf_set_log_cb(conf, log_callback);
	rk = rd_kafka_new(type, conf, rderr, sizeof(rderr));
	if (rk == NULL)
	{
		cqrs_kafka_redact(rderr);
		snprintf(errbuf, errlen, "could not create a Kafka %s: %s", what, rderr);
		rd_kafka_conf_destroy(conf);	/* only freed by a successful rd_kafka_new */
		return NULL;
	}
	rd_kafka_set_log_queue(rk, NULL);
	return rk;
}

/*
 * Create a client: the relay's idempotent producer (role CQRS_KAFKA_RELAY;
 * batch_bytes > 0 caps its record batches) or a plain one for metadata.
 * Returns NULL and fills errbuf on error.
 */
rd_kafka_t *
cqrs_kafka_create(CqrsKafkaRole role, int batch_bytes, char *errbuf, size_t errlen)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_topic_conf_t *tconf = rd_kafka_topic_conf_new();
	rd_kafka_t *rk;
	char		batch_size[32];
	bool		relay = (role == CQRS_KAFKA_RELAY);

	ensure_event_pipe();

	/* our partitioner; topic-level properties set below land in tconf */
	if (relay)
		rd_kafka_topic_conf_set_partitioner_cb(tconf, partitioner);
	rd_kafka_conf_set_default_topic_conf(conf, tconf);

	/* defaults the properties file may change */
	if (!conf_set(conf, "client.id", relay ? "cqrs_sync" : "cqrs_sync-monitor",
				  "default", errbuf, errlen) ||
		!conf_set(conf, "linger.ms", "0", "default", errbuf, errlen) ||
		!conf_set(conf, "reconnect.backoff.max.ms", "1000", "default", errbuf, errlen) ||
		/* an outage pauses delivery; it never fails messages */
		!conf_set(conf, "message.timeout.ms", "0", "default", errbuf, errlen))
		goto fail;

	/*
	 * Fewer requests in flight than idempotence allows (5): while they are,
	 * messages gather into fuller batches.  On a nearby broker a backlog
	 * drains faster for it, at half librdkafka's CPU.
	 */
	if (relay &&
		!conf_set(conf, "max.in.flight.requests.per.connection", "3", "default",
				  errbuf, errlen))
		goto fail;

	if (!apply_config_file(conf, errbuf, errlen))
		goto fail;

	/* never a record batch larger than the smallest topic limit known */
	if (relay && batch_bytes > 0)
	{
		snprintf(batch_size, sizeof(batch_size), "%d", batch_bytes);
		if (!conf_set(conf, "batch.size", batch_size, "largest batch the topics accept",
					  errbuf, errlen))
			goto fail;
	}

	/*
	 * A metadata client's blocking calls end within socket.timeout.ms, not
	 * their own timeout (rd_kafka_query_watermark_offsets() in 2.0.2 waits
	 * for its answers that long, and sends a timed-out request twice more):
	 * the monitor's round, and its stop, would wait three minutes for each
	 * query to a broker that does not answer; now about six seconds.
	 */
	if (!relay)
	{
		char		value[32];
		size_t		size = sizeof(value);

		if (rd_kafka_conf_get(conf, "socket.timeout.ms", value, &size) == RD_KAFKA_CONF_OK &&
			atoi(value) > MONITOR_SOCKET_TIMEOUT_MS)
		{
			snprintf(value, sizeof(value), "%d", MONITOR_SOCKET_TIMEOUT_MS);
			if (!conf_set(conf, "socket.timeout.ms", value, "a metadata client's bound",
						  errbuf, errlen))
				goto fail;
		}
	}

	/* what the relay's guarantees rest on; the file cannot change these */
	if (!conf_set(conf, "bootstrap.servers", cqrs_brokers, "cqrs_sync.brokers", errbuf, errlen) ||
		!conf_set(conf, "log.queue", "true", "required", errbuf, errlen))
		goto fail;
	if (relay &&
		(!conf_set(conf, "enable.idempotence", "true", "required", errbuf, errlen) ||
		 !conf_set(conf, "acks", "all", "required", errbuf, errlen)))
		goto fail;

	if (relay)
		rd_kafka_conf_set_dr_msg_cb(conf, delivery_report);
	rk = new_client(RD_KAFKA_PRODUCER, conf, "client", errbuf, errlen);
	if (rk == NULL)
		return NULL;
	main_queue = rd_kafka_queue_get_main(rk);
	rd_kafka_queue_io_event_enable(main_queue, event_pipe[1], "m", 1);
	main_wakeups = true;
	if (relay)
	{
		admin_queue = rd_kafka_queue_new(rk);
		rd_kafka_queue_io_event_enable(admin_queue, event_pipe[1], "a", 1);
	}

	remember_built();
	return rk;

fail:
	rd_kafka_conf_destroy(conf);
	return NULL;
}

/*
 * Destroy a client, waiting up to timeout_ms for messages in flight.
 * Messages still queued after that are purged: their delivery reports (with
 * _PURGE_* errors) are served before the client goes, so nothing is reported
 * delivered that was not.
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
	if (admin_queue)
	{
		rd_kafka_queue_destroy(admin_queue);
		admin_queue = NULL;
	}
	if (main_queue)
	{
		rd_kafka_queue_io_event_enable(main_queue, -1, NULL, 0);
		rd_kafka_queue_destroy(main_queue);
		main_queue = NULL;
	}
	rd_kafka_destroy(rk);
}

/* Did the brokers or the properties file change since the client was built? */
bool
cqrs_kafka_config_changed(void)
{
	const char *file = cqrs_kafka_config_file ? cqrs_kafka_config_file : "";
	struct stat st;

	if (built_brokers == NULL || strcmp(built_brokers, cqrs_brokers) != 0)
		return true;
	if (built_config_file == NULL || strcmp(built_config_file, file) != 0)
		return true;
	/*
	 * ctime: a chmod or chown counts, the file's permissions are checked too.
	 * To the nanosecond, and the size: two edits within a second count.
	 */
	if (file[0] != '\0' && stat(file, &st) == 0 &&
		(st.st_mtim.tv_sec != built_config_stat.st_mtim.tv_sec ||
		 st.st_mtim.tv_nsec != built_config_stat.st_mtim.tv_nsec ||
		 st.st_ctim.tv_sec != built_config_stat.st_ctim.tv_sec ||
		 st.st_ctim.tv_nsec != built_config_stat.st_ctim.tv_nsec ||
		 st.st_size != built_config_stat.st_size ||
		 st.st_ino != built_config_stat.st_ino))
		return true;
	return false;
}

/* ---- producing -------------------------------------------------------------- */

/*
 * Hand one message to the producer.  librdkafka copies the key, the value
 * and the headers (RD_KAFKA_MSG_F_COPY: the copy goes in the same allocation
 * as its own message, so it costs a memcpy); msg itself, the delivery
 * report's opaque, must live until its delivery report.
 */
rd_kafka_resp_err_t
cqrs_kafka_produce(rd_kafka_t *rk, CqrsMessage *msg)
{
	rd_kafka_headers_t *hdrs = rd_kafka_headers_new(msg->nheaders + 1);
	rd_kafka_resp_err_t err;
	rd_kafka_topic_t *rkt = msg->tstate ? cqrs_topic_handle(rk, msg->tstate) : NULL;
	int32		partition = RD_KAFKA_PARTITION_UA;

	for (int i = 0; i < msg->nheaders; i++)
		rd_kafka_header_add(hdrs, msg->header_names[i], -1,
							msg->header_values[i],
							msg->header_sizes && msg->header_values[i] ? msg->header_sizes[i] : -1);
	if (msg->event_id != NULL)
		rd_kafka_header_add(hdrs, "event_id", -1, msg->event_id, -1);

	msg->done = false;
	msg->err = RD_KAFKA_RESP_ERR_NO_ERROR;
	msg->offset = -1;
	pg_atomic_write_u32(&msg->partition, 0);
	/* without a key, none of a stalled partition (the partitioner is skipped) */
	if (msg->key == NULL && msg->tstate != NULL &&
		(partition = cqrs_topic_keyless_partition(msg->tstate, (uint64) msg->id)) >= 0)
		pg_atomic_write_u32(&msg->partition, (uint32) partition + 1);
	else
		partition = RD_KAFKA_PARTITION_UA;
	if (rkt)
		err = rd_kafka_producev(rk,
								RD_KAFKA_V_RKT(rkt),
								RD_KAFKA_V_PARTITION(partition),
								RD_KAFKA_V_KEY(msg->key, msg->key ? msg->keylen : 0),
								RD_KAFKA_V_VALUE((void *) msg->value, msg->valuelen),
								RD_KAFKA_V_HEADERS(hdrs),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_OPAQUE(msg),
								RD_KAFKA_V_END);
	else
		err = rd_kafka_producev(rk,
								RD_KAFKA_V_TOPIC(msg->topic),
								RD_KAFKA_V_PARTITION(partition),
								RD_KAFKA_V_KEY(msg->key, msg->key ? msg->keylen : 0),
								RD_KAFKA_V_VALUE((void *) msg->value, msg->valuelen),
								RD_KAFKA_V_HEADERS(hdrs),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_OPAQUE(msg),
								RD_KAFKA_V_END);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		rd_kafka_headers_destroy(hdrs);
	return err;
}

/*
 * The partition a keyed message goes to, given the topic's partition count
 * (the same function the partitioner uses); -1 for a NULL key, which goes to
 * a random partition.
 */
int32
cqrs_kafka_partition_of(const CqrsMessage *msg, int32 partition_cnt)
{
	if (msg->key == NULL || partition_cnt <= 0)
		return -1;
	return rd_kafka_msg_partitioner_murmur2(NULL, msg->key, msg->keylen,
											partition_cnt, NULL, NULL);
}

/*
 * Bytes a message takes in a record batch of its own, for comparison with
 * max.message.bytes: payload plus a generous allowance for the batch header
 * (61 bytes) and the record framing.  A header value may be null, or binary
 * with its size given (the sink's dead letters carry the event's headers as
 * they were).
 */
int
cqrs_kafka_message_size(const CqrsMessage *msg)
{
	int			size = 61 + 32 + msg->keylen + msg->valuelen;

	for (int i = 0; i < msg->nheaders; i++)
	{
		size += 10 + strlen(msg->header_names[i]);
		if (msg->header_values[i] == NULL)
			continue;
		if (msg->header_sizes && msg->header_sizes[i] >= 0)
			size += msg->header_sizes[i];
		else
			size += strlen(msg->header_values[i]);
	}
	if (msg->event_id != NULL)
		size += 10 + strlen("event_id") + strlen(msg->event_id);
	return size;
}

/*
 * Kafka refused a message as too large (MSG_SIZE_TOO_LARGE or
 * RECORD_LIST_TOO_LARGE): its own fault, or its record batch's?  librdkafka
 * never splits a batch, and Kafka refuses a batch larger than the topic's
 * max.message.bytes with every message in it, though each would fit alone
 * (DESIGN.md section 5).  size is the message's (cqrs_kafka_message_size),
 * limit the topic's max.message.bytes (0 unknown), batch_bytes the
 * producer's batch.size and wanted_bytes the batch.size already asked for
 * (not above batch_bytes).
 *
 * Returns the batch.size to go on with, the message going again without
 * spending its retry budget; or 0: the message is at fault, beyond the limit
 * known, travelling alone (not smaller than batch.size), or in a batch that
 * cannot get smaller (batch.size at its floor, CQRS_MIN_BATCH_BYTES).
 */
int
cqrs_kafka_smaller_batch(int size, int limit, int batch_bytes, int wanted_bytes)
{
	int			smaller;

	if ((limit > 0 && size > limit) || size >= batch_bytes)
		return 0;
	smaller = Max(Max(batch_bytes / 2, size), CQRS_MIN_BATCH_BYTES);
	if (smaller >= batch_bytes && wanted_bytes >= batch_bytes)
		return 0;
	return Min(wanted_bytes, smaller);
}

/*
 * How long to wait before the next producer after streak fatal errors in a
 * row with nothing delivered between: none after the first (a fatal error
 * that a new producer does not meet again), then 1 s, 2 s, ... up to a
 * minute (one that every new producer meets, such as an InitProducerId
 * refused for good).
 */
int
cqrs_kafka_fatal_pause_ms(int streak)
{
	if (streak <= 1)
		return 0;
	return Min(60000, 1000 << Min(streak - 2, 6));
}

/* Is the producer in a fatal state (it must be re-created)? */
bool
cqrs_kafka_fatal(rd_kafka_t *rk, char *errbuf, size_t errlen)
{
	char		reason[512];
	rd_kafka_resp_err_t err;

	if (rk == NULL)
		return false;
	err = rd_kafka_fatal_error(rk, reason, sizeof(reason));
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		return false;
	snprintf(errbuf, errlen, "%s: %s", rd_kafka_err2name(err), reason);
	cqrs_kafka_redact(errbuf);
	return true;
}

/* "NAME: description" of an error code, in buf. */
const char *
cqrs_kafka_error_text(rd_kafka_resp_err_t err, char *buf, size_t len)
{
	snprintf(buf, len, "%s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
	return buf;
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

/* ---- topic limits ------------------------------------------------------------- */

/*
 * Ask for a topic's max.message.bytes; the answer comes to the admin queue.
 * The answer carries topic itself, not a copy, so that no copy is lost when
 * the producer goes with the question unanswered: it must live as long as
 * the process (the relay's topic table never frees its names).
 */
void
cqrs_kafka_request_limit(rd_kafka_t *rk, const char *topic)
{
	rd_kafka_ConfigResource_t *res;
	rd_kafka_AdminOptions_t *opts;
	char		errstr[256];

	if (rk == NULL || admin_queue == NULL)
		return;
	res = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
	opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS);
	rd_kafka_AdminOptions_set_request_timeout(opts, 10000, errstr, sizeof(errstr));
	/* the topic's name comes back with the answer, also when it failed */
	rd_kafka_AdminOptions_set_opaque(opts, unconstify(char *, topic));
	rd_kafka_DescribeConfigs(rk, &res, 1, opts, admin_queue);
	rd_kafka_AdminOptions_destroy(opts);
	rd_kafka_ConfigResource_destroy(res);
}

/*
 * Hand every DescribeConfigs answer that arrived to hook: the topic, how the
 * question came back (answered, answered with an error such as
 * TOPIC_AUTHORIZATION_FAILED, or not answered: a local error such as a
 * timeout), its max.message.bytes and whether its cleanup.policy has
 * compact (a compacted topic refuses a message without a key, and the
 * record batch with it); each -1 when Kafka did not say.
 */
void
cqrs_kafka_collect_limits(CqrsLimitHook hook)
{
	rd_kafka_event_t *ev;

	if (admin_queue == NULL)
		return;
	while ((ev = rd_kafka_queue_poll(admin_queue, 0)) != NULL)
	{
		const rd_kafka_DescribeConfigs_result_t *result =
			rd_kafka_event_DescribeConfigs_result(ev);
		const rd_kafka_ConfigResource_t **resources = NULL;
		size_t		nres = 0;
		const char *asked = rd_kafka_event_opaque(ev);
		int			limit = -1;
		int			compacted = -1;
		CqrsAnswer	answer = CQRS_ANSWER_NONE;
		rd_kafka_resp_err_t everr = rd_kafka_event_error(ev);

		/*
		 * librdkafka's own errors (a timeout, no broker) are negative, and so
		 * is Kafka's UNKNOWN_SERVER_ERROR (-1): neither says anything about
		 * the topic.  Kafka's other errors are positive.
		 */
		if (everr > RD_KAFKA_RESP_ERR_NO_ERROR)
			answer = CQRS_ANSWER_ERROR;
		else if (result && everr == RD_KAFKA_RESP_ERR_NO_ERROR)
			resources = rd_kafka_DescribeConfigs_result_resources(result, &nres);
		for (size_t r = 0; r < nres; r++)
		{
			rd_kafka_resp_err_t err = rd_kafka_ConfigResource_error(resources[r]);

			if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
			{
				const rd_kafka_ConfigEntry_t **entries;
				size_t		nentries = 0;

				answer = CQRS_ANSWER_OK;
				entries = rd_kafka_ConfigResource_configs(resources[r], &nentries);
				for (size_t i = 0; i < nentries; i++)
				{
					const char *value = rd_kafka_ConfigEntry_value(entries[i]);
					const char *name = rd_kafka_ConfigEntry_name(entries[i]);

					if (value == NULL)
						continue;
					if (strcmp(name, "max.message.bytes") == 0)
						limit = atoi(value);
					else if (strcmp(name, "cleanup.policy") == 0)
						compacted = (strstr(value, "compact") != NULL);
				}
			}
			else if (err > RD_KAFKA_RESP_ERR_NO_ERROR)
				answer = CQRS_ANSWER_ERROR;
		}
		if (asked)
			hook(asked, answer, limit, compacted);
		rd_kafka_event_destroy(ev);
	}
}

/* ---- the sink's consumers ------------------------------------------------------ */

/*
 * Create a consumer for a sink (role CQRS_KAFKA_SINK): a member of
 * consumer group group_id (NULL: no group, for reading single messages with
 * rd_kafka_assign()).  The properties file applies, then what the sink's
 * exactness rests on: offsets are stored and committed by the sink only
 * (after its database transaction), an offset out of range is an error the
 * sink handles (auto.offset.reset=error), only committed transactional
 * messages are read.  rebalance (with opaque) is the rebalance callback;
 * it runs inside rd_kafka_consumer_poll() and must not elog.  Its consumer
 * queue wakes cqrs_kafka_event_fd().  Returns NULL and fills errbuf on
 * error.
 */
rd_kafka_t *
cqrs_kafka_create_consumer(const char *group_id, const char *client_id, void *opaque,
						   CqrsRebalanceHook rebalance, char *errbuf, size_t errlen)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;
	rd_kafka_queue_t *queue;

	ensure_event_pipe();

	/* defaults the properties file may change */
	if (!conf_set(conf, "client.id", client_id, "default", errbuf, errlen) ||
		!conf_set(conf, "reconnect.backoff.max.ms", "1000", "default", errbuf, errlen) ||
		/* a killed worker's partitions move on within seconds */
		!conf_set(conf, "session.timeout.ms", "10000", "default", errbuf, errlen) ||
		!conf_set(conf, "heartbeat.interval.ms", "2000", "default", errbuf, errlen))
		goto fail;
	if (!apply_config_file(conf, errbuf, errlen))
		goto fail;

	/* what the sink's guarantees rest on; the file cannot change these */
	if (!conf_set(conf, "bootstrap.servers", cqrs_brokers, "cqrs_sync.brokers", errbuf, errlen) ||
		!conf_set(conf, "log.queue", "true", "required", errbuf, errlen) ||
		!conf_set(conf, "enable.auto.commit", "false", "required", errbuf, errlen) ||
		!conf_set(conf, "enable.auto.offset.store", "false", "required", errbuf, errlen) ||
		!conf_set(conf, "auto.offset.reset", "error", "required", errbuf, errlen) ||
		!conf_set(conf, "enable.partition.eof", "false", "required", errbuf, errlen) ||
		!conf_set(conf, "isolation.level", "read_committed", "required", errbuf, errlen) ||
		/* eager: the worker assigns whole assignments (rd_kafka_assign()) */
		!conf_set(conf, "partition.assignment.strategy", "range,roundrobin", "required",
				  errbuf, errlen))
		goto fail;
	if (group_id != NULL &&
		!conf_set(conf, "group.id", group_id, "the sink's consumer group", errbuf, errlen))
		goto fail;

	rd_kafka_conf_set_opaque(conf, opaque);
	if (rebalance != NULL)
		rd_kafka_conf_set_rebalance_cb(conf, rebalance);
	rk = new_client(RD_KAFKA_CONSUMER, conf, "consumer", errbuf, errlen);
	if (rk == NULL)
		return NULL;
	/* logs, errors and rebalances are served by rd_kafka_consumer_poll() */
	rd_kafka_poll_set_consumer(rk);
	queue = rd_kafka_queue_get_consumer(rk);
	if (queue != NULL)
	{
		rd_kafka_queue_io_event_enable(queue, event_pipe[1], "c", 1);
		rd_kafka_queue_destroy(queue);
	}
	remember_built();
	return rk;

fail:
	rd_kafka_conf_destroy(conf);
	return NULL;
}

/*
 * Close a sink's consumer: leave the group (for at most timeout_ms: a
 * stopping worker does not wait for an unreachable coordinator), then
 * destroy it.
 */
void
cqrs_kafka_destroy_consumer(rd_kafka_t *rk, int timeout_ms)
{
	rd_kafka_queue_t *queue;
	rd_kafka_error_t *error;
	struct timespec start,
				now;

	if (rk == NULL)
		return;
	queue = rd_kafka_queue_get_consumer(rk);
	if (queue != NULL)
	{
		rd_kafka_queue_io_event_enable(queue, -1, NULL, 0);
		rd_kafka_queue_destroy(queue);
	}
	queue = rd_kafka_queue_new(rk);
	error = rd_kafka_consumer_close_queue(rk, queue);
	if (error != NULL)
		rd_kafka_error_destroy(error);
	else
	{
		clock_gettime(CLOCK_MONOTONIC, &start);
		while (!rd_kafka_consumer_closed(rk))
		{
			rd_kafka_event_t *ev = rd_kafka_queue_poll(queue, 100);

			if (ev != NULL)
			{
				/* the final revocation: nothing to keep */
				if (rd_kafka_event_type(ev) == RD_KAFKA_EVENT_REBALANCE)
					(void) rd_kafka_assign(rk, NULL);
				rd_kafka_event_destroy(ev);
			}
			clock_gettime(CLOCK_MONOTONIC, &now);
			if ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 > timeout_ms)
				break;
		}
	}
	rd_kafka_queue_destroy(queue);
	rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
}

/*
 * For every partition of the topics, the first offset whose timestamp is at
 * or after at_ms (Unix milliseconds; the end of the partition when there is
 * none), or the beginning (0) when beginning is true.  Blocks for at most
 * timeout_ms; a short-lived client of its own.  Returns the number of
 * partitions filled in *out (palloc'd), or -1 and errbuf.
 */
int
cqrs_kafka_offsets_for_time(char **topics, int ntopics, int64 at_ms, bool beginning,
							int timeout_ms, CqrsPartitionOffset **out,
							char *errbuf, size_t errlen)
{
	rd_kafka_t *rk;
	rd_kafka_topic_partition_list_t *list;
	int			n = 0;
	int			result = -1;

	rk = cqrs_kafka_create(CQRS_KAFKA_MONITOR, 0, errbuf, errlen);
	if (rk == NULL)
		return -1;
	list = rd_kafka_topic_partition_list_new(16);

	/*
	 * The metadata of all topics: asking for one by name, or making a topic
	 * handle for it, could have Kafka create a topic that does not exist
	 * (auto.create.topics.enable, its default; librdkafka's producers ask
	 * for that).
	 */
	{
		const rd_kafka_metadata_t *md = NULL;
		rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, NULL, &md, timeout_ms);

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			snprintf(errbuf, errlen, "could not read the topics' metadata: %s",
					 rd_kafka_err2str(err));
			goto done;
		}
		for (int t = 0; t < ntopics; t++)
		{
			const rd_kafka_metadata_topic_t *mt = NULL;

			for (int i = 0; i < md->topic_cnt && mt == NULL; i++)
				if (strcmp(md->topics[i].topic, topics[t]) == 0)
					mt = &md->topics[i];
			if (mt == NULL || mt->err != RD_KAFKA_RESP_ERR_NO_ERROR)
			{
				snprintf(errbuf, errlen, "could not read the partitions of topic \"%s\": %s",
						 topics[t],
						 rd_kafka_err2str(mt ? mt->err : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART));
				rd_kafka_metadata_destroy(md);
				goto done;
			}
			for (int p = 0; p < mt->partition_cnt; p++)
				rd_kafka_topic_partition_list_add(list, topics[t], mt->partitions[p].id)->offset = at_ms;
		}
		rd_kafka_metadata_destroy(md);
	}
	*out = palloc0(sizeof(CqrsPartitionOffset) * Max(list->cnt, 1));
	if (!beginning && list->cnt > 0)
	{
		rd_kafka_resp_err_t err = rd_kafka_offsets_for_times(rk, list, timeout_ms);

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			snprintf(errbuf, errlen, "could not look up offsets by time: %s", rd_kafka_err2str(err));
			goto done;
		}
	}
	for (int i = 0; i < list->cnt; i++)
	{
		rd_kafka_topic_partition_t *tp = &list->elems[i];
		CqrsPartitionOffset *o = &(*out)[n++];

		strlcpy(o->topic, tp->topic, sizeof(o->topic));
		o->partition = tp->partition;
		if (beginning)
			o->offset = 0;
		else if (tp->err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			snprintf(errbuf, errlen, "could not look up the offset of %s[%d] by time: %s",
					 tp->topic, tp->partition, rd_kafka_err2str(tp->err));
			goto done;
		}
		else if (tp->offset >= 0)
			o->offset = tp->offset;
		else
		{
			/* no message at or after that time: the end of the partition */
			int64_t		low,
						high;
			rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(rk, tp->topic, tp->partition,
																	   &low, &high, timeout_ms);

			if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			{
				snprintf(errbuf, errlen, "could not read the end of %s[%d]: %s",
						 tp->topic, tp->partition, rd_kafka_err2str(err));
				goto done;
			}
			o->offset = high;
		}
	}
	result = n;

done:
	rd_kafka_topic_partition_list_destroy(list);
	cqrs_kafka_destroy(rk, 0);
	cqrs_kafka_redact(errbuf);
	return result;
}
