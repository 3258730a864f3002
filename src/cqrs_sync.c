/*-------------------------------------------------------------------------
 *
 * cqrs_sync.c
 *	  Module entry point: settings, shared memory hooks, background workers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "utils/guc.h"

#include "apply.h"
#include "cleanup_worker.h"
#include "cqrs_sync.h"
#include "enqueue.h"
#include "monitor_worker.h"
#include "relay_worker.h"
#include "shmem.h"
#include "sink.h"
#include "sink_worker.h"

PG_MODULE_MAGIC;

char	   *cqrs_database = NULL;
char	   *cqrs_brokers = NULL;
char	   *cqrs_kafka_config_file = NULL;
char	   *cqrs_dlt_suffix = NULL;
int			cqrs_max_retries = 5;
int			cqrs_batch_size = 5000;
int			cqrs_poll_interval_ms = 1000;
int			cqrs_linger_ms = 1;
int			cqrs_retry_backoff_ms = 1000;
bool		cqrs_relay_enabled = true;
bool		cqrs_delete_on_sent = false;
int			cqrs_dlt_depth_interval_ms = 30000;
char	   *cqrs_read_side_dlt_topics = NULL;

/* the sink (issue 14) */
char	   *cqrs_sink_database = NULL;
int			cqrs_sink_workers = 1;
int			cqrs_sink_batch_size = 1000;

void		_PG_init(void);

/* ------------------------------------------------------------------------
 * Checks of the settings the relay uses: a bad value is refused when it is
 * set (ALTER SYSTEM) or ignored, with a log message, by a reload or at
 * start-up, instead of failing every message later.
 * ------------------------------------------------------------------------
 */

static bool
topic_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		(c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

/* cqrs_sync.dlt_suffix: appended to a topic name, the result is one too */
static bool
check_dlt_suffix(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL || v[0] == '\0')
	{
		GUC_check_errdetail("The dead-letter suffix must not be empty: dead letters would go to the source topic itself.");
		return false;
	}
	if (strlen(v) > 248)
	{
		GUC_check_errdetail("The dead-letter suffix must not be longer than 248 bytes: a Kafka topic name has at most 249.");
		return false;
	}
	for (const char *p = v; *p; p++)
		if (!topic_char(*p))
		{
			GUC_check_errdetail("Kafka topic names may hold only ASCII letters, digits, \".\", \"_\" and \"-\"; \"%c\" is not allowed.",
								*p);
			return false;
		}
	return true;
}

/* One entry of the broker list: [protocol://]host[:port] */
static bool
broker_valid(const char *b)
{
	static const char *const protocols[] = {"plaintext", "ssl", "sasl_plaintext", "sasl_ssl"};
	const char *sep = strstr(b, "://");
	const char *host = b;
	const char *end;

	if (sep != NULL)
	{
		bool		known = false;

		for (int i = 0; i < lengthof(protocols); i++)
			known |= (size_t) (sep - b) == strlen(protocols[i]) &&
				pg_strncasecmp(b, protocols[i], sep - b) == 0;
		if (!known)
		{
			GUC_check_errdetail("Unknown security protocol \"%.*s\" in broker \"%s\"; use PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
								(int) (sep - b), b, b);
			return false;
		}
		host = sep + 3;
	}
	if (host[0] == '[')
	{
		/* an IPv6 address */
		end = strchr(host, ']');
		if (end == NULL || end == host + 1)
			goto bad;
		for (const char *p = host + 1; p < end; p++)
			if (!isxdigit((unsigned char) *p) && *p != ':' && *p != '.')
				goto bad;
		end++;
	}
	else
	{
		end = host;
		while (*end && *end != ':')
		{
			if (!isalnum((unsigned char) *end) && *end != '.' && *end != '-' && *end != '_')
				goto bad;
			end++;
		}
		if (end == host)
			goto bad;
	}
	if (*end == ':')
	{
		long		port = 0;
		const char *p = end + 1;

		if (*p == '\0')
			goto bad;
		for (; *p; p++)
		{
			if (!isdigit((unsigned char) *p) || port > 65535)
				goto bad;
			port = port * 10 + (*p - '0');
		}
		if (port < 1 || port > 65535)
			goto bad;
	}
	else if (*end != '\0')
		goto bad;
	return true;

bad:
	GUC_check_errdetail("Broker \"%s\" is not host:port (the port from 1 to 65535, default 9092), optionally after a security protocol such as SASL_SSL://.",
						b);
	return false;
}

/*
 * cqrs_sync.brokers: a comma-separated list of brokers (librdkafka also
 * separates them by spaces)
 */
static bool
check_brokers(char **newval, void **extra, GucSource source)
{
	char	   *list = pstrdup(*newval ? *newval : "");
	int			n = 0;
	char	   *entry = list;

	for (;;)
	{
		char	   *comma = strchr(entry, ',');
		char	   *tok;
		char	   *save;
		int			in_entry = 0;

		if (comma)
			*comma = '\0';
		for (tok = strtok_r(entry, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save))
		{
			if (!broker_valid(tok))
				return false;
			in_entry++;
		}
		if (in_entry == 0 && (comma != NULL || n > 0))
		{
			GUC_check_errdetail("The broker list has an empty entry.");
			return false;
		}
		n += in_entry;
		if (comma == NULL)
			break;
		entry = comma + 1;
	}
	if (n == 0)
	{
		GUC_check_errdetail("The relay needs at least one broker, host:port; several are separated by commas.");
		return false;
	}
	return true;
}

/* cqrs_sync.read_side_dlt_topics: topic names, separated by commas or spaces */
static bool
check_topic_list(char **newval, void **extra, GucSource source)
{
	char	   *list = pstrdup(*newval ? *newval : "");
	char	   *save;

	for (char *tok = strtok_r(list, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save))
		if (!cqrs_topic_name_valid(tok))
		{
			GUC_check_errdetail("Topic \"%s\" is not a valid Kafka topic name: 1 to 249 ASCII letters, digits, \".\", \"_\" or \"-\", and not \".\" or \"..\".",
								tok);
			return false;
		}
	return true;
}

/* Settings only the workers read; they exist only when preloaded. */
static void
define_worker_settings(void)
{
	DefineCustomStringVariable("cqrs_sync.database",
							   "Database the cqrs_sync workers connect to.",
							   "The extension must be created in this database; the relay waits until it is.",
							   &cqrs_database,
							   "postgres",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.sink_workers",
							"Number of sink workers; 0 runs none.",
							"Each worker consumes every sink, in the sink's consumer group: Kafka shares the partitions between them. A reload starts or stops workers; from 0, a restart is needed.",
							&cqrs_sink_workers,
							1, 0, CQRS_SINK_MAX_WORKERS,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("cqrs_sync.relay_enabled",
							 "Starts the outbox relay worker.",
							 "Turn off on servers that only use the read-side helpers.",
							 &cqrs_relay_enabled,
							 true,
							 PGC_POSTMASTER,
							 0,
							 NULL, NULL, NULL);
}

/*
 * Settings any session may see.  PGC_POSTMASTER settings cannot be created
 * after startup, so those are in define_worker_settings().
 */
static void
define_settings(void)
{
	DefineCustomStringVariable("cqrs_sync.brokers",
							   "Kafka bootstrap servers the relay produces to.",
							   "A comma-separated list of host:port pairs (librdkafka bootstrap.servers).",
							   &cqrs_brokers,
							   "localhost:9092",
							   PGC_SIGHUP,
							   0,
							   check_brokers, NULL, NULL);

	DefineCustomStringVariable("cqrs_sync.kafka_config_file",
							   "File of extra librdkafka producer properties, one name=value per line.",
							   "Secrets such as sasl.password belong in this file, which only the server reads; they never appear in settings, logs or views.",
							   &cqrs_kafka_config_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("cqrs_sync.dlt_suffix",
							   "Suffix appended to a topic's name to form its dead-letter topic.",
							   "Not empty, and only characters Kafka allows in topic names: ASCII letters, digits, \".\", \"_\" and \"-\".",
							   &cqrs_dlt_suffix,
							   ".DLT",
							   PGC_SIGHUP,
							   0,
							   check_dlt_suffix, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.max_retries",
							"Failed attempts of a message before it is dead-lettered.",
							"Only failures caused by the message itself count; broker outages never do.",
							&cqrs_max_retries,
							5, 0, 1000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.batch_size",
							"Most outbox rows the relay has between claiming them and recording their outcome.",
							"The relay claims, produces and records continuously within this window; a crash can duplicate at most this many messages.",
							&cqrs_batch_size,
							5000, 1, 100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.poll_interval",
							"Longest time the relay sleeps between scans of the outbox.",
							"Committing transactions wake the relay at once; this is only the fallback.",
							&cqrs_poll_interval_ms,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.linger",
							"Shortest time between two claims of the relay while commits keep waking it.",
							"A commit after a quiet spell this long is claimed at once; while commits come faster, those of this time go out together, in one claim and one Kafka request. 0 claims at every commit.",
							&cqrs_linger_ms,
							1, 0, 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("cqrs_sync.delete_on_sent",
							 "Deletes an outbox row as soon as Kafka acknowledged it, instead of marking it SENT.",
							 "For sites that need the throughput: deleting is several times cheaper than updating, but SENT rows are then not kept for inspection or cqrs_outbox_stats().",
							 &cqrs_delete_on_sent,
							 false,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.dlt_depth_interval",
							"How often the monitor worker asks Kafka how many messages each dead-letter topic holds.",
							"The figures are in the view cqrs_dlt_depth; 0 turns the polling off.",
							&cqrs_dlt_depth_interval_ms,
							30000, 0, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomStringVariable("cqrs_sync.read_side_dlt_topics",
							   "Further dead-letter topics whose depth the monitor worker watches, comma-separated.",
							   "For example the dead-letter topics of the read side's consumers; the dead-letter topics of the outbox are watched by themselves.",
							   &cqrs_read_side_dlt_topics,
							   "",
							   PGC_SIGHUP,
							   0,
							   check_topic_list, NULL, NULL);

	DefineCustomStringVariable("cqrs_sync.sink_database",
							   "Database the sink workers connect to; empty: cqrs_sync.database.",
							   "The read models and CREATE EXTENSION cqrs_sync live there; the workers wait until the extension exists. A reload that changes it restarts the workers.",
							   &cqrs_sink_database,
							   "",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.sink_batch_size",
							"Most messages a sink applies in one transaction.",
							"A worker applies what has arrived, up to this many messages, without waiting for more; larger batches are faster, and a handler error costs the batch one more attempt.",
							&cqrs_sink_batch_size,
							1000, 1, 100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.retry_backoff",
							"First delay before a failed message is tried again.",
							"The delay doubles with every further failure of the message, up to 64 times this value.",
							&cqrs_retry_backoff_ms,
							1000, 1, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	cqrs_apply_init();
	cqrs_cleanup_init();
}

void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

	if (process_shared_preload_libraries_in_progress)
		define_worker_settings();
	define_settings();
	MarkGUCPrefixReserved("cqrs_sync");
	cqrs_enqueue_init();

	if (!process_shared_preload_libraries_in_progress)
		return;

	cqrs_shmem_init();
	cqrs_sink_shmem_init();
	if (cqrs_relay_enabled)
		cqrs_relay_register();
	cqrs_cleanup_register();
	cqrs_monitor_register();
	if (cqrs_sink_workers > 0)
		cqrs_sink_register();
}
