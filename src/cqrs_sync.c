/*-------------------------------------------------------------------------
 *
 * cqrs_sync.c
 *	  Module entry point: settings, shared memory hooks, background workers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

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

PG_MODULE_MAGIC;

char	   *cqrs_database = NULL;
char	   *cqrs_brokers = NULL;
char	   *cqrs_kafka_config_file = NULL;
char	   *cqrs_dlt_suffix = NULL;
int			cqrs_max_retries = 5;
int			cqrs_batch_size = 5000;
int			cqrs_poll_interval_ms = 1000;
int			cqrs_retry_backoff_ms = 1000;
bool		cqrs_relay_enabled = true;
bool		cqrs_delete_on_sent = false;
int			cqrs_dlt_depth_interval_ms = 30000;
char	   *cqrs_read_side_dlt_topics = NULL;

void		_PG_init(void);

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
							   NULL, NULL, NULL);

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
							   NULL,
							   &cqrs_dlt_suffix,
							   ".DLT",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);

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
							   "Further dead-letter topics whose depth the relay watches, comma-separated.",
							   "For example the dead-letter topics of the read side's consumers; the dead-letter topics of the outbox are watched by themselves.",
							   &cqrs_read_side_dlt_topics,
							   "",
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
	if (cqrs_relay_enabled)
		cqrs_relay_register();
	cqrs_cleanup_register();
	cqrs_monitor_register();
}
