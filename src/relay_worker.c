/*-------------------------------------------------------------------------
 *
 * relay_worker.c
 *	  The outbox relay background worker: its loop, its session settings,
 *	  its transactions, error recovery, and the producer's life cycle.
 *
 * The loop waits on three things at once: its latch (set by committing
 * enqueuers, signals and operators), librdkafka's event pipe (a delivery
 * report, an error or a log line is ready) and postmaster death; while the
 * rows in flight change nothing urgent, on its latch alone, for at most
 * RECORD_DELAY_MS after the oldest was produced (relay_wait()).  Each turn
 * it serves librdkafka, turns reports into outcomes, and, when there are
 * outcomes to record or rows may be ready, runs one short transaction that
 * records the outcomes and claims the next rows (relay_pipeline.c), then
 * produces them.  It never waits for delivery reports: rows are produced
 * while earlier ones are in flight, up to a window of cqrs_sync.batch_size
 * rows between the outbox and their recorded outcome.
 *
 * Durability: claims are read-only transactions (nothing to flush: a new
 * event goes out at once); outcomes are recorded in batches, at most
 * RECORD_DELAY_MS after the first was produced, in transactions committed
 * asynchronously: the relay does not wait for their flush.  Recorded rows
 * leave the window only once the WAL holding their recording is flushed
 * (usually at once, by the commits of the events that come next, or by the
 * WAL writer); the relay flushes it itself only when the window is full.
 * Rows between their claim and their durable outcome are therefore at most
 * the window, so a crash duplicates at most that many messages.  Before
 * producing rows whose commit may not be durable (an
 * enqueuer with synchronous_commit = off, or local while synchronous standbys
 * are configured, or whose wait for them was cancelled: such writers
 * announce it, see shmem.c), the relay flushes
 * the WAL up to that commit and, where synchronous standbys are configured,
 * waits for them: an event is never published for a transaction a crash or
 * a failover then loses.  Rows of writers that waited for their commit need
 * no flush.
 *
 * Errors: the relay pins its session settings, so that ALTER DATABASE or
 * ALTER ROLE settings (read-only transactions, timeouts, isolation,
 * search_path) cannot break it.  An error in its transaction is reported,
 * rolled back, and retried with a growing pause; outcomes are kept in
 * memory meanwhile and nothing is produced again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <setjmp.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "libpq/pqsignal.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "replication/syncrep.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cqrs_sync.h"
#include "relay.h"
#include "relay_worker.h"
#include "shmem.h"
#include "util.h"

PGDLLEXPORT void cqrs_relay_main(Datum main_arg);

/* How long a shutting-down relay waits for messages in flight. */
#define SHUTDOWN_FLUSH_MS	1000
/* librdkafka's batch.size default, the largest the relay uses. */
#define DEFAULT_BATCH_BYTES 1000000
/* How often stalls are looked for, and state published at least. */
#define CHECK_MS			1000
/* Outcomes wait at most this long to be recorded together. */
#define RECORD_DELAY_MS		10

rd_kafka_t *relay_producer = NULL;
int			relay_producer_batch_bytes = DEFAULT_BATCH_BYTES;
static int	wanted_batch_bytes = DEFAULT_BATCH_BYTES;
static TimestampTz resize_wanted_at = 0;	/* since when it waits */

/* Plans, prepared for the extension's current schema. */
static Oid	plans_ext = InvalidOid;
static Oid	outbox_relid = InvalidOid;
static bool plans_valid = false;
static bool extension_changed = false;
static bool extension_missing = false;

/* Claimed rows' commits that may not be flushed yet. */
static XLogRecPtr rows_lsn = InvalidXLogRecPtr;
static XLogRecPtr standby_lsn = InvalidXLogRecPtr;	/* the standbys confirmed
													 * it */
static bool standby_waiting = false;
/* the end of the last recording's commit, and the rows recorded up to it */
static XLogRecPtr record_lsn = InvalidXLogRecPtr;
static int	unflushed_rows = 0;

/* Errors in a row of the relay's transactions, for the pause between tries. */
static int	txn_errors = 0;
static TimestampTz retry_txn_at = 0;
static char txn_error[CQRS_ERROR_LEN];

static TimestampTz next_poll_at = 0;	/* the fallback scan */
static TimestampTz next_record_at = 0;	/* outcomes wait until then */
static TimestampTz next_check_at = 0;
static TimestampTz max_reset_at = 0;	/* of ack_wait_max_us */
static TimestampTz producer_retry_at = 0;
static int	fatal_streak = 0;	/* fatal errors with no acknowledgement between */
static TimestampTz fatal_at = 0;	/* the last one */
static char producer_error[CQRS_ERROR_LEN];
static bool wake_claim = true;	/* the latch was set: rows may be ready */
static TimestampTz last_claim_at = 0;
static TimestampTz linger_until = 0;	/* commits gather until then */

static WaitEventSet *wait_set = NULL;
static WaitEventSet *wait_set_latch = NULL;	/* the same without the pipe */
static WaitEventSet *wait_set_linger = NULL;	/* postmaster death alone */

/*
 * Register the relay; called from _PG_init during shared_preload_libraries.
 */
void
cqrs_relay_register(void)
{
	cqrs_register_worker("cqrs_relay_main", "cqrs_sync relay", 1);
}

static void
relay_detach_shmem(int code, Datum arg)
{
	if (cqrs_shared && cqrs_shared->relay_pid == MyProcPid)
	{
		cqrs_shared->relay_latch = NULL;
		SpinLockAcquire(&cqrs_shared->mutex);
		cqrs_shared->relay_pid = 0;
		cqrs_shared->relay_dboid = InvalidOid;
		SpinLockRelease(&cqrs_shared->mutex);
	}
}

/*
 * Session settings the relay depends on, whatever ALTER DATABASE or ALTER
 * ROLE set for its database or user: its transactions must be able to write,
 * must not time out in the middle, must take a fresh snapshot per statement
 * (the scan's must be taken after the registry was read), and resolve names
 * only where the relay says.
 */
static void
pin_settings(void)
{
	static const char *const pins[][2] = {
		{"default_transaction_read_only", "off"},
		{"default_transaction_isolation", "read committed"},
		{"default_transaction_deferrable", "off"},
		{"statement_timeout", "0"},
		{"lock_timeout", "5s"},
		{"idle_in_transaction_session_timeout", "0"},
		{"idle_session_timeout", "0"},
		{"search_path", "pg_catalog, pg_temp"},
		{"session_replication_role", "origin"},
		{"jit", "off"},
		{"check_function_bodies", "on"},
		/* recordings: not waited for; in the window until flushed (see above) */
		{"synchronous_commit", "off"},

		/*
		 * Every statement of the relay finds outbox rows by id, a few
		 * thousand at most, and must cost the same on an outbox of a thousand
		 * rows and of fifty million.  Generic plans only: a custom plan's
		 * estimate of an id range probes the ends of the index, walking every
		 * dead entry the SENT updates left there (no limit on that walk in
		 * PostgreSQL 15).  And no plan that reads the whole id range before
		 * its LIMIT (a bitmap scan and a sort), nor a sequential scan: a
		 * generic plan made while the statistics say "nearly all SENT" chose
		 * one, and each claim of a 200,000-row backlog then took 0.7 s.
		 */
		{"plan_cache_mode", "force_generic_plan"},
		{"enable_seqscan", "off"},
		{"enable_bitmapscan", "off"},
		{"enable_sort", "off"},
	};

	for (int i = 0; i < lengthof(pins); i++)
		SetConfigOption(pins[i][0], pins[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}

/* The outbox table changed (or all relations): look at the extension again. */
static void
relay_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == outbox_relid)
		plans_valid = false;
}

/*
 * Prepare the statements for the extension's current schema.  Returns false
 * when the extension does not exist (yet) in this database.  Inside a
 * transaction, SPI connected.
 */
static bool
ensure_plans(void)
{
	Oid			ext;
	const char *schema;
	char	   *outbox;
	char	   *audit = NULL;
	char	   *mark = NULL;
	int			ret;
	bool		isnull;
	Oid			seq;

	if (plans_valid)
		return true;
	ext = get_extension_oid("cqrs_sync", true);
	if (!OidIsValid(ext))
	{
		if (OidIsValid(plans_ext))
			extension_changed = true;
		plans_ext = InvalidOid;
		return false;
	}
	if (OidIsValid(plans_ext) && ext != plans_ext)
	{
		/* dropped and created again: nothing in flight belongs to it */
		extension_changed = true;
		plans_ext = InvalidOid;
		return false;
	}

	schema = quote_identifier(cqrs_extension_schema(ext));
	outbox = psprintf("%s.cqrs_outbox", schema);
	ret = SPI_execute(psprintf("SELECT %s::pg_catalog.regclass::pg_catalog.oid,"
							   " pg_catalog.pg_get_serial_sequence(%s, 'id')::pg_catalog.regclass::pg_catalog.oid",
							   quote_literal_cstr(outbox), quote_literal_cstr(outbox)),
					  true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cqrs_sync relay: could not find %s", outbox);
	outbox_relid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 1, &isnull));
	seq = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
										 SPI_tuptable->tupdesc, 2, &isnull));
	if (isnull)
		elog(ERROR, "cqrs_sync relay: %s.id has no sequence", outbox);

	/*
	 * Failed dead-letter publishes are audited, and the relay's mark kept,
	 * from version 0.2.0 on (an older cqrs_outbox_audit refuses the action,
	 * and there is no cqrs_relay_mark): before ALTER EXTENSION ... UPDATE the
	 * relay only counts them, and its scan starts at id 1 after a restart.
	 */
	ret = SPI_execute("SELECT extversion <> '0.1.0' FROM pg_catalog.pg_extension"
					  " WHERE extname = 'cqrs_sync'", true, 1);
	if (ret == SPI_OK_SELECT && SPI_processed == 1 &&
		DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
	{
		audit = psprintf("%s.cqrs_outbox_audit", schema);
		mark = psprintf("%s.cqrs_relay_mark", schema);
	}

	pipeline_prepare(outbox_relid, seq, mark);
	record_prepare(outbox, audit);
	plans_ext = ext;
	plans_valid = true;
	return true;
}

static int64
elapsed_us(instr_time start)
{
	instr_time	now;

	INSTR_TIME_SET_CURRENT(now);
	INSTR_TIME_SUBTRACT(now, start);
	return INSTR_TIME_GET_MICROSEC(now);
}

/* ---- the producer ------------------------------------------------------------------ */

/*
 * Kafka refused a message of size bytes, to a topic whose max.message.bytes
 * is limit (0 unknown), as too large.  When its record batch was at fault,
 * smaller batches from now on: true.  False when the message itself was
 * (cqrs_kafka_smaller_batch).
 */
bool
relay_batch_refused(int size, int limit)
{
	int			smaller = cqrs_kafka_smaller_batch(size, limit,
												   relay_producer_batch_bytes,
												   wanted_batch_bytes);

	if (smaller == 0)
		return false;
	wanted_batch_bytes = smaller;
	return true;
}

/*
 * Destroy the producer: purging its queues fires the reports of what was in
 * flight (with _PURGE_* errors); anything still unreported failed with err.
 * Nothing without a successful report becomes SENT; the rows go again.
 */
static void
destroy_producer(rd_kafka_resp_err_t err)
{
	if (relay_producer == NULL)
		return;
	cqrs_topics_forget_producer();
	cqrs_kafka_destroy(relay_producer, 0);
	relay_producer = NULL;
	pipeline_abandon_inflight(err);
	pipeline_serve_reports();
	cqrs_kafka_emit_logs("cqrs_sync relay");
}

static bool
create_producer(TimestampTz now)
{
	char		errbuf[1024];

	if (relay_producer != NULL)
		return true;
	if (producer_retry_at != 0 && now < producer_retry_at)
		return false;
	relay_producer = cqrs_kafka_create(CQRS_KAFKA_RELAY, relay_producer_batch_bytes,
									   errbuf, sizeof(errbuf));
	if (relay_producer == NULL)
	{
		if (strcmp(errbuf, producer_error) != 0)
			ereport(WARNING,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("cqrs_sync relay: %s", errbuf),
					 errhint("Fix cqrs_sync.brokers or cqrs_sync.kafka_config_file and reload the configuration.")));
		strlcpy(producer_error, errbuf, sizeof(producer_error));
		cqrs_relay_note_failure(errbuf, 0);
		producer_retry_at = TimestampTzPlusMilliseconds(now, 5000);
		return false;
	}
	producer_error[0] = '\0';
	producer_retry_at = 0;
	return true;
}

/* Serve librdkafka: reports, errors, logs; re-create a fatally failed producer. */
static void
serve_kafka(void)
{
	char		errbuf[CQRS_ERROR_LEN];
	instr_time	t0;

	INSTR_TIME_SET_CURRENT(t0);
	cqrs_kafka_serve(relay_producer);
	pipeline_serve_reports();
	cqrs_relay_add_phase(CQRS_PHASE_POLL, elapsed_us(t0));
	cqrs_kafka_emit_logs("cqrs_sync relay");
	if (cqrs_kafka_take_error(errbuf, sizeof(errbuf)))
		cqrs_relay_note_failure(errbuf, 0);
	cqrs_kafka_collect_limits(pipeline_learn_limit);

	/* a fatal error, whenever it came: between polls as well as in one */
	if (cqrs_kafka_fatal(relay_producer, errbuf, sizeof(errbuf)))
	{
		TimestampTz now = GetCurrentTimestamp();
		int			pause_ms;

		/*
		 * Re-created at once; but a fatal error that every new producer meets
		 * (an InitProducerId refused for good) waits 1 s, 2 s, ... up to a
		 * minute between producers, until one gets a row acknowledged.
		 */
		fatal_streak = (fatal_at != 0 && pipeline_last_ack() <= fatal_at) ?
			fatal_streak + 1 : 1;
		fatal_at = now;
		pause_ms = cqrs_kafka_fatal_pause_ms(fatal_streak);
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("cqrs_sync relay: fatal Kafka producer error: %s", errbuf),
				 pause_ms == 0 ?
				 errdetail("The producer is re-created; unacknowledged rows stay PENDING and are sent again.") :
				 errdetail("The producer is re-created in %d s (fatal error %d in a row, none acknowledged since); unacknowledged rows stay PENDING and are sent again.",
						   pause_ms / 1000, fatal_streak)));
		cqrs_relay_note_failure(errbuf, 0);
		pg_atomic_fetch_add_u64(&cqrs_shared->producer_restarts, 1);
		destroy_producer(RD_KAFKA_RESP_ERR__FATAL);
		if (pause_ms > 0)
		{
			/* the state says so: no producer, and why */
			snprintf(producer_error, sizeof(producer_error),
					 "fatal Kafka producer error %d times in a row: %s",
					 fatal_streak, errbuf);
			producer_retry_at = TimestampTzPlusMilliseconds(now, pause_ms);
		}
	}
}

/* Keep batch.size within the smallest limit known; re-create when drained. */
static void
adjust_batch_size(TimestampTz now)
{
	int			min_limit = cqrs_topics_min_limit();

	if (min_limit > 0 && min_limit < wanted_batch_bytes)
		wanted_batch_bytes = min_limit;
	if (wanted_batch_bytes == relay_producer_batch_bytes || relay_producer == NULL)
	{
		resize_wanted_at = 0;
		return;
	}
	if (resize_wanted_at == 0)
		resize_wanted_at = now;

	/*
	 * Not while messages are in flight, unless they all wait on stalled
	 * partitions: claims stop until then, and every other key would wait too.
	 * A row can wait without its partition known to be stalled (the last
	 * rows produced to a sick partition, before it is found): once nothing
	 * but rows in flight is left, they are waited for CQRS_RESIZE_WAIT_MS
	 * at most, then go again with the new producer too.
	 */
	if (!pipeline_idle() && !pipeline_only_stalled() &&
		!(pipeline_only_inflight() &&
		  now >= TimestampTzPlusMilliseconds(resize_wanted_at, CQRS_RESIZE_WAIT_MS)))
		return;
	ereport(LOG,
			(errmsg("cqrs_sync relay: producer batch.size lowered from %d to %d bytes",
					relay_producer_batch_bytes, wanted_batch_bytes),
			 errdetail("A topic accepts smaller record batches: its max.message.bytes, or a batch Kafka refused as too large.")));
	destroy_producer(RD_KAFKA_RESP_ERR__PURGE_QUEUE);
	relay_producer_batch_bytes = wanted_batch_bytes;
	resize_wanted_at = 0;
}

/* The Kafka settings changed: what was learned of the topics may be wrong. */
static void
reload_settings(void)
{
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	/* (also while there is no producer: after fatal errors, for a minute) */
	if (cqrs_kafka_config_changed())
	{
		if (relay_producer)
		{
			ereport(LOG,
					(errmsg("cqrs_sync relay: Kafka settings changed, re-creating the producer"),
					 errdetail("Unacknowledged rows stay PENDING and are sent again.")));
			destroy_producer(RD_KAFKA_RESP_ERR__PURGE_QUEUE);
		}
		cqrs_topics_forget_limits();
		relay_producer_batch_bytes = wanted_batch_bytes = DEFAULT_BATCH_BYTES;
		fatal_streak = 0;
		fatal_at = 0;
	}
	producer_retry_at = 0;
	wake_claim = true;
}

static void publish_state(TimestampTz now);

/* ---- the relay's transactions -------------------------------------------------------- */

/*
 * One transaction: record the outcomes that came back (record), then claim
 * up to limit rows (limit 0: no claim).  A claim alone writes nothing: it has
 * no commit record to flush, so a new event goes out without waiting for a
 * disk.  Recording commits asynchronously: its rows stay in the window
 * until it is flushed (window_room()).
 */
static void
relay_transaction(bool record, int limit, TimestampTz now)
{
	instr_time	t0;
	bool		claimed = false;
	bool		wrote;
	int			nrecorded = 0;
	dlist_head *done = pipeline_done_rows();
	bool		spi;
	bool		had_errors = txn_errors > 0;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();

	/*
	 * A claim alone reads the outbox with a snapshot of its own, without SPI
	 * (asked after the start, whose invalidations may make the plans stale).
	 */
	spi = record || !plans_valid || pipeline_needs_mark();
	if (spi)
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
	}
	pgstat_report_activity(STATE_RUNNING, "cqrs_sync relay");

	if (!ensure_plans())
		extension_missing = !extension_changed;
	else
	{
		extension_missing = false;
		pipeline_read_mark();
		if (record)
		{
			INSTR_TIME_SET_CURRENT(t0);
			pipeline_write_mark(now);
			nrecorded = record_outcomes(done, now);
			cqrs_relay_add_phase(CQRS_PHASE_RECORD, elapsed_us(t0));
		}
		if (limit > 0)
		{
			INSTR_TIME_SET_CURRENT(t0);
			(void) pipeline_claim(limit, now);
			claimed = true;
			cqrs_relay_add_phase(CQRS_PHASE_CLAIM, elapsed_us(t0));
		}
	}

	if (spi)
	{
		SPI_finish();
		PopActiveSnapshot();
	}
	wrote = TransactionIdIsValid(GetTopTransactionIdIfAny());
	INSTR_TIME_SET_CURRENT(t0);
	CommitTransactionCommand();
	pipeline_committed();
	cqrs_relay_add_phase(CQRS_PHASE_COMMIT, elapsed_us(t0));
	if (wrote)
	{
		record_lsn = Max(record_lsn, XactLastCommitEnd);
		unflushed_rows += nrecorded;
	}
	pg_atomic_fetch_add_u64(&cqrs_shared->transactions, 1);

	if (claimed)
	{
		XLogRecPtr	lsn = pipeline_claimed_lsn();

		pipeline_claim_commit();
		if (lsn > rows_lsn)
			rows_lsn = lsn;
	}
	if (record && !extension_missing && !extension_changed)
	{
		record_after_commit(done);
		pipeline_recorded();
		/* let autovacuum see the relay's updates (the outbox is a queue) */
		pgstat_report_stat(false);
	}
	pgstat_report_activity(STATE_IDLE, NULL);
	txn_errors = 0;
	/* a claim alone changes no state that periodic_checks() does not publish */
	if (record || had_errors)
		publish_state(GetCurrentTimestamp());
}

/*
 * SIGTERM and SIGINT while waiting for the synchronous standbys:
 * SyncRepWaitForLSN() ends its wait on a cancel, so both are turned into one,
 * and noted: SIGTERM as the worker's shutdown request; SIGINT (a cancel
 * request, pg_cancel_backend()), on which SyncRepWaitForLSN() returns as if
 * the standbys had confirmed, so that the relay waits again.
 */
static volatile sig_atomic_t syncrep_canceled = false;

static void
relay_signal_in_syncrep(SIGNAL_ARGS)
{
	int			save_errno = errno;

	if (postgres_signal_arg == SIGTERM)
		ShutdownRequestPending = true;
	else
		syncrep_canceled = true;
	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * Wait until the synchronous standbys have the WAL up to lsn, as a commit
 * with synchronous_commit = on waits.  The relay's own setting is off (its
 * recordings are not waited for), so it is raised for the wait.  A cancel
 * request does not end it.  Returns false when the wait ended for a shutdown
 * or postmaster death.
 */
static bool
wait_for_standbys(XLogRecPtr lsn)
{
	pqsigfunc	prev_term;
	pqsigfunc	prev_int;

	standby_waiting = true;
	publish_state(GetCurrentTimestamp());
	SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_OVERRIDE);
	prev_term = pqsignal(SIGTERM, relay_signal_in_syncrep);
	prev_int = pqsignal(SIGINT, relay_signal_in_syncrep);
	while (!ShutdownRequestPending && !ProcDiePending)
	{
		syncrep_canceled = false;
		SyncRepWaitForLSN(lsn, false);
		if (!syncrep_canceled || ShutdownRequestPending || ProcDiePending)
			break;
		QueryCancelPending = false;
		ereport(LOG,
				(errmsg("cqrs_sync relay: a cancel request does not end the wait for the synchronous standbys"),
				 errdetail("The rows were not produced; the relay waits for the standbys again."),
				 errhint("To publish without them, change synchronous_standby_names.")));
	}
	pqsignal(SIGINT, prev_int);
	pqsignal(SIGTERM, prev_term);
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);
	/* the wait reset the latch: commits meanwhile set it for nothing */
	wake_claim = true;
	if (ShutdownRequestPending)
	{
		QueryCancelPending = false; /* it was the shutdown */
		ereport(LOG,
				(errmsg("cqrs_sync relay: shutting down while rows wait for the synchronous standbys"),
				 errdetail("The rows were not produced; they wait in the outbox for the next start.")));
	}
	standby_waiting = false;
	publish_state(GetCurrentTimestamp());
	return !ShutdownRequestPending && !ProcDiePending;
}

/*
 * Before producing rows whose commit may not be durable yet (their writer
 * used synchronous_commit = off, or local while synchronous standbys are
 * configured, or its wait for them was cancelled): flush the WAL up to it, and wait for the synchronous standbys
 * where they are configured.  Rows from commits that waited for their
 * durability need nothing: rows_lsn then stays below what is flushed and
 * confirmed.  Returns false when the rows must not be produced (shutdown).
 */
static bool
flush_before_producing(void)
{
	instr_time	t0;
	bool		flush;
	bool		standbys;

	if (XLogRecPtrIsInvalid(rows_lsn))
		return true;
	flush = rows_lsn > GetFlushRecPtr(NULL);
	standbys = cqrs_sync_standbys_configured() && rows_lsn > standby_lsn;
	if (flush || standbys)
	{
		INSTR_TIME_SET_CURRENT(t0);
		if (flush)
			XLogFlush(rows_lsn);
		if (standbys)
		{
			if (!wait_for_standbys(rows_lsn))
				return false;
			standby_lsn = rows_lsn;
		}
		cqrs_relay_add_phase(CQRS_PHASE_FLUSH, elapsed_us(t0));
	}
	rows_lsn = InvalidXLogRecPtr;
	return true;
}

/*
 * Room in the window: rows whose recording is not yet on disk still count
 * (after a crash they would be sent again).  Recordings flushed meanwhile, by
 * anyone, free their rows; when only they fill the window, the relay flushes
 * them itself.
 */
static int
window_room(void)
{
	int			room;

	if (unflushed_rows > 0 && record_lsn <= GetFlushRecPtr(NULL))
		unflushed_rows = 0;
	room = pipeline_room() - unflushed_rows;
	if (room <= 0 && unflushed_rows > 0 && pipeline_room() > 0)
	{
		instr_time	t0;

		INSTR_TIME_SET_CURRENT(t0);
		XLogFlush(record_lsn);
		cqrs_relay_add_phase(CQRS_PHASE_FLUSH, elapsed_us(t0));
		unflushed_rows = 0;
		room = pipeline_room();
	}
	return Max(room, 0);
}

/* ---- state ------------------------------------------------------------------------------ */

static void
publish_state(TimestampTz now)
{
	CqrsTopic  *paused;
	char		stalled[CQRS_STALLED_LEN];
	int			nstalled = cqrs_topics_stalled_text(stalled, sizeof(stalled));

	cqrs_relay_set_stalled(stalled, nstalled);
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->window = pipeline_inflight();
	SpinLockRelease(&cqrs_shared->mutex);

	if (relay_producer == NULL && producer_error[0] != '\0')
		cqrs_relay_set_state(CQRS_RELAY_NO_PRODUCER, NULL, producer_error);
	else if (standby_waiting)
		cqrs_relay_set_state(CQRS_RELAY_WAITING_STANDBY, NULL,
							 "rows committed without waiting for the synchronous standbys wait for them");
	else if (txn_errors > 0)
		cqrs_relay_set_state(CQRS_RELAY_RECORDING_FAILED, NULL, txn_error);
	else if (pipeline_broker_waiting(now))
		cqrs_relay_set_state(CQRS_RELAY_WAITING_BROKER, NULL,
							 "no delivery report for 5 s; messages wait for Kafka");
	else if ((paused = cqrs_topics_first_paused(now)) != NULL)
		cqrs_relay_set_state(CQRS_RELAY_PAUSED, paused->name, paused->pause_reason);
	else if (nstalled > 0)
		cqrs_relay_set_state(CQRS_RELAY_PARTITION_STALLED, NULL, stalled);
	else
		cqrs_relay_set_state(CQRS_RELAY_RUNNING, NULL, NULL);
}

/* Once a second: stalled partitions, the state, the longest wait figure. */
static void
periodic_checks(TimestampTz now)
{
	List	   *newly = NIL;
	ListCell   *lc;

	if (now < next_check_at)
		return;
	next_check_at = TimestampTzPlusMilliseconds(now, CHECK_MS);

	pipeline_check_stalls(now, &newly);
	foreach(lc, newly)
	{
		const char *alert = lfirst(lc);
		StringInfoData json;

		ereport(WARNING,
				(errcode(CQRS_ERRCODE_PARTITION_STALLED),
				 errmsg("cqrs_sync relay: Kafka partition %s has answered nothing for 5 s while others answered", alert),
				 errdetail("Rows whose key maps to that partition wait (of a dead-letter topic: rows whose dead letter goes there); other keys and topics keep flowing."),
				 errhint("Check the partition's leader and in-sync replicas (min.insync.replicas) on the broker.")));
		initStringInfo(&json);
		appendStringInfoString(&json, "{\"alert\":\"partition_stalled\",\"partition\":");
		escape_json(&json, alert);
		appendStringInfoChar(&json, '}');
		record_queue_alert(json.data);
		pfree(json.data);
	}
	list_free_deep(newly);
	if (now >= max_reset_at)
	{
		SpinLockAcquire(&cqrs_shared->mutex);
		cqrs_shared->ack_wait_max_us = 0;
		SpinLockRelease(&cqrs_shared->mutex);
		max_reset_at = TimestampTzPlusMilliseconds(now, 60000);
	}
	publish_state(now);
}

/* ---- the loop ------------------------------------------------------------------------------ */

/* May the relay claim rows now: a producer, with the batch.size wanted? */
static bool
can_claim(void)
{
	return relay_producer != NULL &&
		wanted_batch_bytes == relay_producer_batch_bytes;
}

/* Alerts wait for a transaction only where they can be recorded. */
static bool
alerts_to_record(void)
{
	return record_alerts_queued() && !extension_missing;
}

/* One turn of the loop.  Returns how long it may sleep (ms; 0: go on at once). */
static long
relay_turn(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next_wake;
	int			room;
	bool		want_claim;
	bool		claim_due;		/* for more than commits */
	bool		want_record;
	bool		record_urgent;
	long		sleep_ms;

	linger_until = 0;
	if (extension_changed)
	{
		/* nothing in flight belongs to the extension now in place */
		ereport(LOG,
				(errmsg("cqrs_sync relay: extension \"cqrs_sync\" was dropped or created again; starting over")));
		destroy_producer(RD_KAFKA_RESP_ERR__PURGE_QUEUE);
		pipeline_reset();
		order_reset();
		record_forget_alerts();
		extension_changed = false;
		plans_valid = false;
	}

	create_producer(now);
	serve_kafka();
	adjust_batch_size(now);

	next_wake = pipeline_timers(now);
	periodic_checks(now);

	/* a failed transaction is tried again after a pause */
	if (txn_errors > 0 && now < retry_txn_at)
		return Max(1, (retry_txn_at - now) / 1000);

	room = window_room();
	claim_due = pipeline_more_ready() ||
		order_revisit_pending(pipeline_cursor()) || now >= next_poll_at;
	want_claim = can_claim() && room > 0 && (wake_claim || claim_due);

	/*
	 * Linger: a claim that only commits ask for waits until cqrs_sync.linger
	 * after the previous claim.  A commit after a quiet spell goes at once;
	 * while commits come faster, those of one linger go out together, in one
	 * claim and one produce request: at 1,000 single-event commits a second,
	 * half the wake-ups of the relay and of librdkafka's broker thread, for
	 * at most a linger more latency.
	 */
	if (want_claim && !claim_due && cqrs_linger_ms > 0 &&
		now < TimestampTzPlusMilliseconds(last_claim_at, cqrs_linger_ms))
	{
		linger_until = TimestampTzPlusMilliseconds(last_claim_at, cqrs_linger_ms);
		want_claim = false;
	}

	/*
	 * Outcomes are recorded in batches: once the oldest waited RECORD_DELAY_MS,
	 * when the window fills, or with a claim that is due anyway.  A new event
	 * never waits for a recording's flush.
	 */
	record_urgent = pipeline_has_reports() &&
		(now >= pipeline_oldest_report() + RECORD_DELAY_MS * 1000 ||
		 room < pipeline_window() / 2);
	/* a claim for new commits goes first; one for a backlog takes them along */
	want_record = alerts_to_record() || record_urgent ||
		(pipeline_has_reports() && want_claim && !wake_claim);
	/* (also with a claim: it may find nothing, and record nothing) */
	if (pipeline_has_reports() && !want_record)
		next_record_at = pipeline_oldest_report() + RECORD_DELAY_MS * 1000;
	else
		next_record_at = 0;

	if (want_claim || want_record || (extension_missing && now >= next_poll_at))
	{
		if (want_claim || extension_missing)
		{
			/* commits from now on set the latch again (it may still be set) */
			if (wake_claim)
				ResetLatch(MyLatch);
			wake_claim = false;
			last_claim_at = now;
			next_poll_at = TimestampTzPlusMilliseconds(now, cqrs_poll_interval_ms);
		}
		relay_transaction(want_record, want_claim ? room : 0, now);
		if (extension_missing)
		{
			static bool said = false;

			if (!said)
				ereport(LOG,
						(errmsg("cqrs_sync relay: extension \"cqrs_sync\" does not exist in database \"%s\", waiting",
								cqrs_database),
						 errhint("Run CREATE EXTENSION cqrs_sync in database \"%s\".", cqrs_database)));
			said = true;
		}
	}

	if (pipeline_has_claimed() && relay_producer != NULL &&
		flush_before_producing())
	{
		pipeline_produce_claimed();
		pipeline_serve_reports();	/* those that failed before producing */
	}

	/*
	 * More to do at once?  Only what this relay can do now: without a
	 * producer (or while a new batch.size waits for the pipeline to drain) a
	 * rescan or a full claim waits, as alerts wait for the extension.
	 */
	if (alerts_to_record() ||
		(can_claim() && window_room() > 0 &&
		 (pipeline_more_ready() || order_revisit_pending(pipeline_cursor()))))
		return 0;

	/* timers the turn itself set (a retry recorded just now) count too */
	now = GetCurrentTimestamp();
	next_wake = pipeline_timers(now);
	if (can_claim() && order_revisit_pending(pipeline_cursor()) && window_room() > 0)
		return 0;
	/* the fallback scan is due only where a claim can follow it */
	sleep_ms = can_claim() ? Max(1, (next_poll_at - now) / 1000) : CHECK_MS;
	sleep_ms = Min(sleep_ms, CHECK_MS);
	if (next_wake != 0)
		sleep_ms = Min(sleep_ms, Max(1, (next_wake - now) / 1000 + 1));
	if (next_record_at != 0)
		sleep_ms = Min(sleep_ms, Max(1, (next_record_at - now) / 1000 + 1));
	if (relay_producer == NULL && producer_retry_at != 0)
		sleep_ms = Min(sleep_ms, Max(1, (producer_retry_at - now) / 1000 + 1));
	if (linger_until != 0)
		sleep_ms = Min(sleep_ms, Max(1, (linger_until - now + 999) / 1000));
	return sleep_ms;
}

/*
 * Wait for the latch, librdkafka's pipe, or the timeout.
 *
 * While the rows in flight change nothing urgent (pipeline_reports_may_wait())
 * their delivery reports do not wake the relay: it waits on its latch alone,
 * and serves them at its next wake-up, a commit's or RECORD_DELAY_MS after
 * the oldest row in flight was produced, whichever comes first (outcomes wait
 * that long to be recorded anyway).  At a steady rate of single-event
 * commits this halves the relay's wake-ups.  Once the oldest has waited that
 * long (a slow broker, an outage), the pipe wakes it again as reports come.
 * While it does not watch the pipe, librdkafka does not write to it either
 * (cqrs_kafka_main_wakeups()): at that rate, a system call fewer on each side
 * per event.
 */
static void
relay_wait(long timeout_ms, bool reports_may_wait)
{
	WaitEvent	events[3];
	WaitEventSet *set = wait_set;
	TimestampTz oldest = reports_may_wait ? pipeline_reports_may_wait() : 0;
	int			n;

	/*
	 * Lingering, the latch stays set: the commits that come meanwhile find
	 * it set and make no system call, and the relay's wake-up is its own.
	 * Reports and signals wait the linger too (a few milliseconds).
	 */
	if (linger_until != 0 && timeout_ms > 0)
	{
		(void) cqrs_kafka_main_wakeups(false);
		(void) WaitEventSetWait(wait_set_linger, timeout_ms, events,
								lengthof(events), PG_WAIT_EXTENSION);
		return;
	}
	if (oldest != 0)
	{
		long		left = (oldest + RECORD_DELAY_MS * 1000 - GetCurrentTimestamp()) / 1000 + 1;

		if (left > 1)
		{
			set = wait_set_latch;
			timeout_ms = Min(timeout_ms, left);
		}
	}
	/* reports queued before the pipe was watched again do not write to it */
	if (cqrs_kafka_main_wakeups(set == wait_set))
		timeout_ms = 0;
	n = WaitEventSetWait(set, timeout_ms, events, lengthof(events),
						 PG_WAIT_EXTENSION);
	for (int i = 0; i < n; i++)
	{
		if (events[i].events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			wake_claim = true;
		}
		if (events[i].events & WL_SOCKET_READABLE)
			cqrs_kafka_drain_events();
	}
}

/*
 * SIGTERM: record what came back within a second, then go.  If that
 * recording fails, the error comes back here through the loop's error
 * handler: then the relay goes without it (the rows stay PENDING and are sent
 * again after the next start) instead of trying again for ever.
 */
static void
relay_shutdown(void)
{
	static bool recording_tried = false;
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   SHUTDOWN_FLUSH_MS);

	/* only reports still to come are waited for; outcomes in hand are not */
	while (relay_producer != NULL && pipeline_awaiting_reports() &&
		   !pipeline_broker_waiting(GetCurrentTimestamp()) &&
		   GetCurrentTimestamp() < deadline)
	{
		relay_wait(50, false);
		serve_kafka();
		if (pipeline_has_claimed())
			break;
	}
	destroy_producer(RD_KAFKA_RESP_ERR__PURGE_QUEUE);
	if (!extension_missing && (pipeline_has_reports() || record_alerts_queued()))
	{
		if (!recording_tried)
		{
			recording_tried = true;
			relay_transaction(true, 0, GetCurrentTimestamp());
		}
		else
			ereport(LOG,
					(errmsg("cqrs_sync relay: shutting down without recording the outcomes that came back"),
					 errdetail("Recording them failed. Their rows stay PENDING and are sent again after the next start.")));
	}
	if (!XLogRecPtrIsInvalid(record_lsn))
		XLogFlush(record_lsn);
	ereport(LOG, (errmsg("cqrs_sync relay shutting down")));
}

void
cqrs_relay_main(Datum main_arg)
{
	sigjmp_buf	local_sigjmp_buf;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cqrs_database, NULL, 0);
	pin_settings();

	/*
	 * Which commits before this start were early (see shmem.c) is not known:
	 * the first rows produced wait until the WAL written so far is durable.
	 */
	rows_lsn = cqrs_wal_inserted_end();

	order_init(cqrs_shared->nslots);
	pipeline_init();
	CacheRegisterRelcacheCallback(relay_relcache_callback, (Datum) 0);

	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->relay_pid = MyProcPid;
	cqrs_shared->relay_dboid = MyDatabaseId;
	SpinLockRelease(&cqrs_shared->mutex);
	cqrs_shared->relay_latch = MyLatch;
	before_shmem_exit(relay_detach_shmem, (Datum) 0);

	ereport(LOG,
			(errmsg("cqrs_sync relay started in database \"%s\", brokers \"%s\"",
					cqrs_database, cqrs_brokers)));

	(void) create_producer(GetCurrentTimestamp());
	wait_set = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(wait_set, WL_SOCKET_READABLE, cqrs_kafka_event_fd(), NULL, NULL);
	wait_set_latch = CreateWaitEventSet(TopMemoryContext, 2);
	AddWaitEventToSet(wait_set_latch, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wait_set_latch, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	wait_set_linger = CreateWaitEventSet(TopMemoryContext, 1);
	AddWaitEventToSet(wait_set_linger, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);

	/*
	 * An error in the relay's transaction (a lock timeout, a full disk, a
	 * dropped table) comes back here: roll back, keep everything in memory,
	 * and try again after a pause.  Nothing is produced again.
	 */
	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		ErrorData  *edata;

		error_context_stack = NULL;
		HOLD_INTERRUPTS();
		edata = cqrs_report_and_abort(TopMemoryContext);
		pipeline_claim_abort();
		plans_valid = false;
		strlcpy(txn_error, edata->message ? edata->message : "error", sizeof(txn_error));
		FreeErrorData(edata);
		cqrs_relay_note_failure(txn_error, 0);
		txn_errors++;
		retry_txn_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												   Min(30000, 500 << Min(txn_errors, 6)));
		publish_state(GetCurrentTimestamp());
		RESUME_INTERRUPTS();
	}
	PG_exception_stack = &local_sigjmp_buf;

	while (!ShutdownRequestPending)
	{
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			reload_settings();

		sleep_ms = relay_turn();
		if (ShutdownRequestPending)
			break;
		if (sleep_ms > 0)
			relay_wait(sleep_ms, true);
		else
		{
			/* busy: still notice the latch without sleeping */
			relay_wait(0, false);
		}
	}

	relay_shutdown();
	proc_exit(1);
}
