/*-------------------------------------------------------------------------
 *
 * monitor_worker.c
 *	  The monitor background worker ("cqrs_sync monitor").
 *
 * Every cqrs_sync.dlt_depth_interval it asks Kafka for the watermarks of
 * the partitions of every dead-letter topic it knows of (those of the
 * outbox's DEAD_LETTERED rows, every one it has seen since it started, and
 * cqrs_sync.read_side_dlt_topics) and publishes them in shared memory for
 * the view cqrs_dlt_depth (dlt_depth.c).  Kafka's metadata and watermark
 * queries block until the broker answers; they run here, in a process of
 * their own, so that a slow or unreachable partition never delays the
 * relay.  When the relay dead-letters rows it sets this worker's latch: the
 * next round starts at once (at most one a second), so that a new dead
 * letter shows, and pages, without waiting for the poll interval.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cqrs_sync.h"
#include "dlt_depth.h"
#include "kafka.h"
#include "monitor_worker.h"
#include "shmem.h"
#include "util.h"

PGDLLEXPORT void cqrs_monitor_main(Datum main_arg);

/* Rounds asked for by the relay come at most this often */
#define WAKE_MIN_INTERVAL_MS 1000

static rd_kafka_t *client = NULL;

/*
 * Every dead-letter topic seen since the worker started (TopMemoryContext),
 * and at its start those of the rows an operator retried, discarded or
 * purged while they were DEAD_LETTERED (cqrs_outbox_audit): their messages
 * stay in the topic, and CqrsSyncDltMessages keeps firing, until the
 * records are deleted, also across a restart.
 */
static List *seen_topics = NIL;
static bool audit_read = false;

void
cqrs_monitor_register(void)
{
	cqrs_register_worker("cqrs_monitor_main", "cqrs_sync monitor", 5);
}

static void
remember_topic(const char *name)
{
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, seen_topics)
		if (strcmp((char *) lfirst(lc), name) == 0)
			return;
	old = MemoryContextSwitchTo(TopMemoryContext);
	seen_topics = lappend(seen_topics, pstrdup(name));
	MemoryContextSwitchTo(old);
}

/*
 * The dead-letter topics of the outbox's DEAD_LETTERED rows (in the caller's
 * memory context), remembered; at the first call also those of the audit.
 * The caller's memory context is current again afterwards (the commit leaves
 * TopMemoryContext current, where the round's lists would never be freed).
 * An error (the outbox locked for longer than the monitor's lock_timeout, say)
 * is reported as a WARNING, and in *error; the round watches the topics it
 * knew of (none at the first call: refresh() fails the round then): a
 * lock held on the outbox must neither keep the monitor from its rounds nor
 * from noticing a stop, which it cannot while it waits for a lock.
 */
static List *
read_dead_letter_topics(char **error)
{
	MemoryContext caller = CurrentMemoryContext;
	List	   *volatile current = NIL;

	*error = NULL;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		Oid			ext;

		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "cqrs_sync monitor: listing dead-letter topics");
		ext = get_extension_oid("cqrs_sync", true);
		if (OidIsValid(ext))
		{
			const char *schema = quote_identifier(cqrs_extension_schema(ext));

			/*
			 * The topics of the index of rows with an error, one index probe
			 * each (not a read of every such row: after a mass dead-lettering
			 * there may be millions, and this runs up to once a second), that
			 * have a DEAD_LETTERED row.
			 */
			char	   *sql = psprintf("WITH RECURSIVE t(topic) AS ("
									   "  SELECT pg_catalog.min(topic) FROM %s.cqrs_outbox"
									   "   WHERE last_error IS NOT NULL"
									   "  UNION ALL"
									   "  SELECT (SELECT pg_catalog.min(o.topic) FROM %s.cqrs_outbox o"
									   "           WHERE o.last_error IS NOT NULL AND o.topic > t.topic)"
									   "    FROM t WHERE t.topic IS NOT NULL)"
									   " SELECT t.topic FROM t WHERE t.topic IS NOT NULL"
									   "  AND EXISTS (SELECT FROM %s.cqrs_outbox o WHERE o.topic = t.topic"
									   "               AND o.last_error IS NOT NULL AND o.status = 'DEAD_LETTERED')",
									   schema, schema, schema);

			if (SPI_execute(sql, true, 0) != SPI_OK_SELECT)
				elog(ERROR, "cqrs_sync monitor: could not list dead-letter topics");
			for (uint64 i = 0; i < SPI_processed; i++)
			{
				char	   *topic = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
				char	   *dlt;

				MemoryContextSwitchTo(caller);
				dlt = psprintf("%s%s", topic, cqrs_dlt_suffix);
				current = lappend(current, dlt);
				remember_topic(dlt);
			}
			if (!audit_read)
			{
				sql = psprintf("SELECT DISTINCT topic FROM %s.cqrs_outbox_audit"
							   " WHERE status = 'DEAD_LETTERED' AND topic IS NOT NULL",
							   schema);
				if (SPI_execute(sql, true, 0) != SPI_OK_SELECT)
					elog(ERROR, "cqrs_sync monitor: could not list dead-letter topics");
				for (uint64 i = 0; i < SPI_processed; i++)
					remember_topic(psprintf("%s%s",
											SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1),
											cqrs_dlt_suffix));
				audit_read = true;
			}
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("cqrs_sync monitor: could not list the outbox's dead-letter topics: %s",
						edata->message),
				 errdetail("This round watches the dead-letter topics the monitor already knew of.")));
		*error = pstrdup(edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	pgstat_report_activity(STATE_IDLE, NULL);
	return current;
}

/* One round, in the loop's memory context (reset after it). */
static void
refresh(void)
{
	List	   *topics;
	List	   *required;
	char	   *list = pstrdup(cqrs_read_side_dlt_topics ? cqrs_read_side_dlt_topics : "");
	char	   *save;
	char	   *list_error;
	char		errbuf[1024];

	/* those of rows dead-lettered now, and those listed, must be in Kafka */
	required = read_dead_letter_topics(&list_error);

	/*
	 * A monitor that never listed them (just started) knows none: a round
	 * without them would publish their topics as gone, and their messages as
	 * none.  The figures it has stay, and age, with the error.
	 */
	if (list_error != NULL && !audit_read)
	{
		cqrs_dlt_depth_failed(psprintf("could not list the outbox's dead-letter topics: %s",
									   list_error));
		return;
	}
	for (char *tok = strtok_r(list, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save))
		required = lappend(required, tok);
	/* required ones first: the partitions kept are measured in this order */
	topics = list_concat(list_copy(required), seen_topics);

	if (topics == NIL)
	{
		/* nothing to watch: nothing can be stale */
		cqrs_dlt_depth_refresh(NULL, NIL, NIL);
		return;
	}

	if (client == NULL)
	{
		client = cqrs_kafka_create(CQRS_KAFKA_MONITOR, 0, errbuf, sizeof(errbuf));
		if (client == NULL)
		{
			ereport(WARNING,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("cqrs_sync monitor: %s", errbuf)));
			cqrs_dlt_depth_failed(errbuf);
			return;
		}
	}
	pgstat_report_activity(STATE_RUNNING, "cqrs_sync monitor: asking Kafka for dead-letter topic depth");
	cqrs_dlt_depth_refresh(client, topics, required);
	cqrs_kafka_drain_events();
	cqrs_kafka_serve(client);
	cqrs_kafka_emit_logs("cqrs_sync monitor");
	pgstat_report_activity(STATE_IDLE, NULL);
}

static void
monitor_detach_shmem(int code, Datum arg)
{
	LWLockAcquire(cqrs_shared->dlt_lock, LW_EXCLUSIVE);
	if (cqrs_shared->monitor_pid == MyProcPid)
	{
		cqrs_shared->monitor_pid = 0;
		cqrs_shared->monitor_latch = NULL;
	}
	LWLockRelease(cqrs_shared->dlt_lock);
}

void
cqrs_monitor_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	TimestampTz last = 0;
	bool		asked = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(cqrs_database, NULL, 0);
	SetConfigOption("statement_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	/* it reads the outbox once a round; a lock on it must not hold the round */
	SetConfigOption("lock_timeout", "1s", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_OVERRIDE);

	LWLockAcquire(cqrs_shared->dlt_lock, LW_EXCLUSIVE);
	cqrs_shared->monitor_pid = MyProcPid;
	cqrs_shared->monitor_latch = MyLatch;
	LWLockRelease(cqrs_shared->dlt_lock);
	before_shmem_exit(monitor_detach_shmem, (Datum) 0);

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync monitor loop",
									 ALLOCSET_DEFAULT_SIZES);
	while (!ShutdownRequestPending)
	{
		long		timeout = cqrs_dlt_depth_interval_ms > 0 ? cqrs_dlt_depth_interval_ms : 60000;
		TimestampTz now;
		bool		due;
		MemoryContext old;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (client && cqrs_kafka_config_changed())
			{
				cqrs_kafka_destroy(client, 0);
				client = NULL;
			}
			last = 0;
		}
		/* the relay dead-lettered rows: a round soon, not at the next poll */
		if (pg_atomic_exchange_u32(&cqrs_shared->dlt_refresh, 0) != 0)
			asked = true;
		now = GetCurrentTimestamp();
		due = cqrs_dlt_depth_interval_ms > 0 &&
			(TimestampDifferenceExceeds(last, now, cqrs_dlt_depth_interval_ms) ||
			 (asked && TimestampDifferenceExceeds(last, now, WAKE_MIN_INTERVAL_MS)));
		if (due)
		{
			asked = false;
			old = MemoryContextSwitchTo(loop_cxt);
			refresh();
			MemoryContextSwitchTo(old);
			MemoryContextReset(loop_cxt);
			last = GetCurrentTimestamp();
		}
		else if (asked && cqrs_dlt_depth_interval_ms > 0)
		{
			long		secs;
			int			usecs;

			TimestampDifference(now, TimestampTzPlusMilliseconds(last, WAKE_MIN_INTERVAL_MS),
								&secs, &usecs);
			timeout = Min(timeout, secs * 1000 + usecs / 1000 + 1);
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
	}
	cqrs_kafka_destroy(client, 0);
	proc_exit(1);
}
