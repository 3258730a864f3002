/*-------------------------------------------------------------------------
 *
 * relay_worker.c
 *	  The outbox relay background worker.
 *
 * One batch: read the outbox sequence's high-water mark, then the in-flight
 * registry, then claim up to cqrs_sync.batch_size PENDING rows (id order)
 * at or below the mark, in a short transaction.  Decide which rows may go:
 * a row waits when an earlier row of its key waits (retry backoff, still
 * uncommitted, or failed in this round).  Produce the rest, wait for every
 * delivery report, then in a second short transaction mark SENT exactly the
 * rows Kafka acknowledged, and record failures.  A crash between the
 * acknowledgement and that commit re-sends at most one batch; nothing is
 * ever marked SENT without a successful delivery report.
 *
 * A "round" is a sequence of batches that walks the PENDING rows from the
 * lowest id upward; the keys held in a round stay held until it ends, so a
 * later row never overtakes an earlier row of its key.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "storage/proc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cqrs_sync.h"
#include "kafka.h"
#include "relay_worker.h"
#include "shmem.h"
#include "util.h"

PGDLLEXPORT void cqrs_relay_main(Datum main_arg);

/* How long a shutting-down relay waits for messages in flight. */
#define SHUTDOWN_FLUSH_MS	5000

typedef enum RowFate
{
	ROW_HELD,					/* not produced: an earlier row of its key waits */
	ROW_PRODUCED,				/* handed to the producer */
	ROW_SENT,					/* acknowledged, to be marked SENT */
	ROW_FAILED,					/* failure to record */
	ROW_REDO					/* acknowledged, but an earlier row of its key
								 * failed: stays PENDING and is sent again
								 * after that row */
} RowFate;

typedef struct RelayRow
{
	CqrsMessage msg;
	uint64		keyhash;
	int			retry_count;
	bool		waiting;		/* next_attempt_at is in the future */
	TimestampTz next_attempt_at;
	RowFate		fate;
} RelayRow;

static rd_kafka_t *producer = NULL;

/* Plans, prepared once for the extension's schema. */
static Oid	plans_ext = InvalidOid;
static SPIPlanPtr hw_plan = NULL;
static SPIPlanPtr scan_plan = NULL;
static SPIPlanPtr sent_plan = NULL;
static SPIPlanPtr fail_plan = NULL;

static MemoryContext batch_ctx = NULL;
static MemoryContext round_ctx = NULL;

/* Round state: where the next batch starts, and the keys held so far. */
static int64 round_after = 0;
static HTAB *held_keys = NULL;
static TimestampTz round_wake_at = 0;	/* earliest next_attempt_at held */

static CqrsInflight *inflight = NULL;

/*
 * Register the relay; called from _PG_init during shared_preload_libraries.
 */
void
cqrs_relay_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	strlcpy(worker.bgw_library_name, "cqrs_sync", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "cqrs_relay_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "cqrs_sync relay", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "cqrs_sync relay", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

static void
relay_detach_shmem(int code, Datum arg)
{
	if (cqrs_shared && cqrs_shared->relay_pid == MyProcPid)
	{
		cqrs_shared->relay_latch = NULL;
		cqrs_shared->relay_pid = 0;
	}
}

static SPIPlanPtr
keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "cqrs_sync relay: could not prepare \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

/*
 * Prepare the statements for the extension's current schema.  Returns false
 * when the extension does not exist (yet) in this database.  Inside a
 * transaction, SPI connected.
 */
static bool
ensure_plans(void)
{
	Oid			ext = get_extension_oid("cqrs_sync", true);
	char	   *schema;
	char	   *outbox;
	char	   *seq;
	int			ret;
	Oid			scan_types[3] = {INT8OID, INT8OID, INT4OID};
	Oid			sent_types[2] = {INT8ARRAYOID, TIMESTAMPTZOID};
	Oid			fail_types[4] = {INT8ARRAYOID, INT4ARRAYOID, FLOAT8ARRAYOID, TEXTARRAYOID};

	if (!OidIsValid(ext))
		return false;
	if (ext == plans_ext)
		return true;

	schema = cqrs_extension_schema(ext);
	outbox = psprintf("%s.cqrs_outbox", quote_identifier(schema));

	ret = SPI_execute(psprintf("SELECT pg_catalog.pg_get_serial_sequence(%s, 'id')",
							   quote_literal_cstr(outbox)), true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cqrs_sync relay: could not find the sequence of %s", outbox);
	seq = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (seq == NULL)
		elog(ERROR, "cqrs_sync relay: %s.id has no sequence", outbox);

	if (hw_plan)
	{
		SPI_freeplan(hw_plan);
		SPI_freeplan(scan_plan);
		SPI_freeplan(sent_plan);
		SPI_freeplan(fail_plan);
	}
	hw_plan = keep_plan(psprintf("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM %s",
								 seq), 0, NULL);
	scan_plan = keep_plan(psprintf(
								   "SELECT id, event_id::text, topic, key, payload::text, headers,"
								   " retry_count, coalesce(next_attempt_at > now(), false),"
								   " next_attempt_at"
								   " FROM %s WHERE status = 'PENDING' AND id > $1 AND id <= $2"
								   " ORDER BY id LIMIT $3", outbox),
						  3, scan_types);
	sent_plan = keep_plan(psprintf(
								   "UPDATE %s SET status = 'SENT', sent_at = $2,"
								   " next_attempt_at = NULL, last_error = NULL"
								   " WHERE id = ANY ($1) AND status = 'PENDING'", outbox),
						  2, sent_types);
	fail_plan = keep_plan(psprintf(
								   "UPDATE %s o SET retry_count = o.retry_count + f.inc,"
								   " next_attempt_at = now() + f.delay_ms * interval '1 millisecond',"
								   " last_error = f.err"
								   " FROM unnest($1, $2, $3, $4) AS f(id, inc, delay_ms, err)"
								   " WHERE o.id = f.id AND o.status = 'PENDING'", outbox),
						  4, fail_types);
	plans_ext = ext;
	return true;
}

static bool
key_held(uint64 keyhash)
{
	bool		found;

	hash_search(held_keys, &keyhash, HASH_FIND, &found);
	return found;
}

static void
hold_key(uint64 keyhash)
{
	bool		found;

	hash_search(held_keys, &keyhash, HASH_ENTER, &found);
}

static void
start_round(void)
{
	HASHCTL		ctl;

	MemoryContextReset(round_ctx);
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(uint64);
	ctl.hcxt = round_ctx;
	held_keys = hash_create("cqrs_sync held keys", 256, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	round_after = 0;
	round_wake_at = 0;
}

static char *
datum_text(HeapTuple tup, TupleDesc desc, int col, bool *isnull)
{
	Datum		d = SPI_getbinval(tup, desc, col, isnull);

	return *isnull ? NULL : TextDatumGetCString(d);
}

/* Copy the scanned rows into batch memory. */
static RelayRow *
copy_rows(uint64 nrows)
{
	RelayRow   *rows = palloc0(sizeof(RelayRow) * nrows);
	TupleDesc	desc = SPI_tuptable->tupdesc;

	for (uint64 i = 0; i < nrows; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		RelayRow   *row = &rows[i];
		CqrsMessage *msg = &row->msg;
		bool		isnull;
		Datum		d;

		msg->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		msg->event_id = datum_text(tup, desc, 2, &isnull);
		msg->topic = datum_text(tup, desc, 3, &isnull);
		msg->key = datum_text(tup, desc, 4, &isnull);
		msg->keylen = msg->key ? strlen(msg->key) : 0;
		row->keyhash = cqrs_key_hash(msg->key, msg->keylen);
		msg->value = datum_text(tup, desc, 5, &isnull);
		msg->valuelen = strlen(msg->value);

		d = SPI_getbinval(tup, desc, 6, &isnull);
		if (!isnull)
		{
			Jsonb	   *jb = DatumGetJsonbPCopy(d);
			JsonbIterator *it = JsonbIteratorInit(&jb->root);
			JsonbValue	v;
			JsonbIteratorToken tok;
			int			n = JB_ROOT_COUNT(jb);

			msg->header_names = palloc(sizeof(char *) * n);
			msg->header_values = palloc(sizeof(char *) * n);
			while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
			{
				if (tok == WJB_KEY)
					msg->header_names[msg->nheaders] =
						pnstrdup(v.val.string.val, v.val.string.len);
				else if (tok == WJB_VALUE)
					msg->header_values[msg->nheaders++] =
						(v.type == jbvString) ?
						pnstrdup(v.val.string.val, v.val.string.len) : "";
			}
		}

		row->retry_count = DatumGetInt32(SPI_getbinval(tup, desc, 7, &isnull));
		row->waiting = DatumGetBool(SPI_getbinval(tup, desc, 8, &isnull));
		d = SPI_getbinval(tup, desc, 9, &isnull);
		row->next_attempt_at = isnull ? 0 : DatumGetTimestampTz(d);
	}
	return rows;
}

/*
 * Claim the next batch of the round.  Returns the rows (in batch memory)
 * and their count; *ninflight_out is the number of in-flight slots seen.
 */
static RelayRow *
claim_batch(uint64 *nrows_out, bool *ext_missing)
{
	RelayRow   *rows = NULL;
	int64		hw;
	bool		isnull;
	int			ninflight;
	Datum		args[3];
	int			ret;

	*nrows_out = 0;
	*ext_missing = false;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "cqrs_sync relay: claiming a batch");

	if (!ensure_plans())
	{
		*ext_missing = true;
		goto done;
	}

	/* 1. the high-water mark: every id at or below it was handed out */
	ret = SPI_execute_plan(hw_plan, NULL, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cqrs_sync relay: could not read the outbox sequence");
	hw = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1, &isnull));

	/* 2. who may still commit an id at or below it */
	ninflight = cqrs_inflight_snapshot(inflight, cqrs_shared->nslots);

	/* 3. the rows visible now (a new snapshot, taken after step 2) */
	args[0] = Int64GetDatum(round_after);
	args[1] = Int64GetDatum(hw);
	args[2] = Int32GetDatum(cqrs_batch_size);
	ret = SPI_execute_plan(scan_plan, args, NULL, false, cqrs_batch_size);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync relay: outbox scan failed: %s",
			 SPI_result_code_string(ret));

	if (SPI_processed > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(batch_ctx);
		TimestampTz now = GetCurrentTimestamp();

		rows = copy_rows(SPI_processed);
		*nrows_out = SPI_processed;
		MemoryContextSwitchTo(old);

		/* decide, in id order, which rows may go now */
		for (uint64 i = 0; i < *nrows_out; i++)
		{
			RelayRow   *row = &rows[i];

			if (key_held(row->keyhash))
				row->fate = ROW_HELD;
			else if (row->waiting ||
					 cqrs_inflight_holds(inflight, ninflight, row->msg.id, row->keyhash))
			{
				row->fate = ROW_HELD;
				hold_key(row->keyhash);
				if (row->waiting && row->next_attempt_at > now &&
					(round_wake_at == 0 || row->next_attempt_at < round_wake_at))
					round_wake_at = row->next_attempt_at;
			}
			else
				row->fate = ROW_PRODUCED;
		}
	}

done:
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	return rows;
}

/*
 * Give up on the messages of the batch still in flight: destroy the
 * producer (purging its queues fires their delivery reports with _PURGE_*
 * errors) and count any report still missing as failed with err.  Nothing
 * without a successful report becomes SENT; the rows stay PENDING.
 */
static void
abandon_inflight(RelayRow *rows, uint64 nrows, rd_kafka_resp_err_t err)
{
	cqrs_kafka_destroy(producer, 0);
	producer = NULL;
	for (uint64 i = 0; i < nrows; i++)
		if (rows[i].fate == ROW_PRODUCED && !rows[i].msg.done)
		{
			rows[i].msg.done = true;
			rows[i].msg.err = err;
		}
}

/*
 * Wait for every delivery report of the batch.  While Kafka is unreachable
 * this waits (message.timeout.ms is infinite by default): an outage pauses
 * the relay, it never fails messages.  It stops waiting on a fatal producer
 * error, on SIGTERM after SHUTDOWN_FLUSH_MS, and on a reload that changes
 * the Kafka settings.
 */
static void
await_delivery(RelayRow *rows, uint64 nrows)
{
	TimestampTz shutdown_deadline = 0;

	pgstat_report_activity(STATE_RUNNING, "cqrs_sync relay: awaiting delivery reports");
	for (;;)
	{
		bool		pending = false;
		char		errbuf[512];

		rd_kafka_flush(producer, 100);

		for (uint64 i = 0; i < nrows && !pending; i++)
			if (rows[i].fate == ROW_PRODUCED && !rows[i].msg.done)
				pending = true;
		if (!pending)
			return;

		if (cqrs_kafka_fatal(producer, errbuf, sizeof(errbuf)))
		{
			ereport(WARNING,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("cqrs_sync relay: fatal Kafka producer error: %s", errbuf),
					 errdetail("The producer is re-created; unacknowledged rows stay PENDING and are sent again.")));
			cqrs_relay_note_failure(errbuf, 0);
			pg_atomic_fetch_add_u64(&cqrs_shared->producer_restarts, 1);
			abandon_inflight(rows, nrows, RD_KAFKA_RESP_ERR__FATAL);
			return;
		}

		if (!PostmasterIsAlive())
			proc_exit(1);

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (cqrs_kafka_config_changed())
			{
				ereport(LOG,
						(errmsg("cqrs_sync relay: Kafka settings changed, re-creating the producer"),
						 errdetail("Unacknowledged rows stay PENDING and are sent again.")));
				abandon_inflight(rows, nrows, RD_KAFKA_RESP_ERR__PURGE_QUEUE);
				return;
			}
		}

		if (ShutdownRequestPending)
		{
			TimestampTz now = GetCurrentTimestamp();

			if (shutdown_deadline == 0)
				shutdown_deadline = TimestampTzPlusMilliseconds(now, SHUTDOWN_FLUSH_MS);
			else if (now >= shutdown_deadline)
			{
				abandon_inflight(rows, nrows, RD_KAFKA_RESP_ERR__PURGE_QUEUE);
				return;
			}
		}
	}
}

static int
backoff_ms(rd_kafka_resp_err_t err, CqrsFailureClass cls, int retry_count)
{
	int			shift;

	/* we withdrew it ourselves (reload, shutdown): try again at once */
	if (err == RD_KAFKA_RESP_ERR__PURGE_QUEUE || err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
		return 0;
	if (cls != CQRS_FAIL_MESSAGE)
		return cqrs_retry_backoff_ms;
	shift = Min(retry_count, 6);
	return (int) Min((int64) cqrs_retry_backoff_ms << shift, (int64) PG_INT32_MAX);
}

/* Record the batch's outcome in one short transaction. */
static void
record_outcome(RelayRow *rows, uint64 nrows, TimestampTz acked_at)
{
	Datum	   *sent_ids = palloc(sizeof(Datum) * nrows);
	Datum	   *fail_ids = palloc(sizeof(Datum) * nrows);
	Datum	   *fail_inc = palloc(sizeof(Datum) * nrows);
	Datum	   *fail_delay = palloc(sizeof(Datum) * nrows);
	Datum	   *fail_err = palloc(sizeof(Datum) * nrows);
	int			nsent = 0;
	int			nfail = 0;
	char	   *first_error = NULL;
	HASHCTL		ctl;
	HTAB	   *failed_keys;

	/* keys that failed in this batch: their later rows are sent again */
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(uint64);
	ctl.hcxt = CurrentMemoryContext;
	failed_keys = hash_create("cqrs_sync failed keys", 64, &ctl,
							  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];
		bool		found;

		if (row->fate != ROW_PRODUCED)
			continue;
		hash_search(failed_keys, &row->keyhash, HASH_FIND, &found);
		if (row->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			if (found)
			{
				row->fate = ROW_REDO;
				continue;
			}
			row->fate = ROW_SENT;
			sent_ids[nsent++] = Int64GetDatum(row->msg.id);
		}
		else
		{
			CqrsFailureClass cls = cqrs_kafka_classify(row->msg.err);
			char	   *err = psprintf("%s: %s",
									   rd_kafka_err2name(row->msg.err),
									   rd_kafka_err2str(row->msg.err));

			row->fate = ROW_FAILED;
			hash_search(failed_keys, &row->keyhash, HASH_ENTER, &found);
			hold_key(row->keyhash);
			fail_ids[nfail] = Int64GetDatum(row->msg.id);
			fail_inc[nfail] = Int32GetDatum(cls == CQRS_FAIL_MESSAGE ? 1 : 0);
			fail_delay[nfail] = Float8GetDatum((double) backoff_ms(row->msg.err, cls, row->retry_count));
			fail_err[nfail] = CStringGetTextDatum(err);
			nfail++;
			if (first_error == NULL)
				first_error = psprintf("outbox id " INT64_FORMAT " (topic \"%s\"): %s",
									   row->msg.id, row->msg.topic, err);
		}
	}

	if (nsent == 0 && nfail == 0)
		return;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "cqrs_sync relay: recording deliveries");

	if (nsent > 0)
	{
		Datum		args[2];
		int			ret;

		args[0] = PointerGetDatum(construct_array(sent_ids, nsent, INT8OID,
												  8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		args[1] = TimestampTzGetDatum(acked_at);
		ret = SPI_execute_plan(sent_plan, args, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "cqrs_sync relay: marking rows SENT failed: %s",
				 SPI_result_code_string(ret));
	}
	if (nfail > 0)
	{
		Datum		args[4];
		int			ret;

		args[0] = PointerGetDatum(construct_array(fail_ids, nfail, INT8OID,
												  8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		args[1] = PointerGetDatum(construct_array(fail_inc, nfail, INT4OID,
												  4, true, TYPALIGN_INT));
		args[2] = PointerGetDatum(construct_array(fail_delay, nfail, FLOAT8OID,
												  8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		args[3] = PointerGetDatum(construct_array(fail_err, nfail, TEXTOID,
												  -1, false, TYPALIGN_INT));
		ret = SPI_execute_plan(fail_plan, args, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "cqrs_sync relay: recording failures failed: %s",
				 SPI_result_code_string(ret));
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();

	if (nsent > 0)
		cqrs_relay_note_success(nsent);
	if (nfail > 0)
	{
		cqrs_relay_note_failure(first_error, nfail);
		ereport(LOG,
				(errmsg("cqrs_sync relay: %d message(s) failed, first %s", nfail, first_error),
				 errdetail("The rows stay PENDING and are tried again after a backoff; later rows of their keys wait.")));
	}
}

/*
 * One batch.  Returns true when more work is ready at once.
 */
static bool
relay_batch(void)
{
	RelayRow   *rows;
	uint64		nrows;
	bool		ext_missing;
	bool		full;
	int			nproduced = 0;
	HTAB	   *refused_keys = NULL;

	MemoryContextReset(batch_ctx);
	rows = claim_batch(&nrows, &ext_missing);
	if (ext_missing)
	{
		static bool said = false;

		if (!said)
			ereport(LOG,
					(errmsg("cqrs_sync relay: extension \"cqrs_sync\" does not exist in database \"%s\", waiting",
							cqrs_database),
					 errhint("Run CREATE EXTENSION cqrs_sync in database \"%s\".", cqrs_database)));
		said = true;
		return false;
	}

	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];
		rd_kafka_resp_err_t err;

		if (row->fate != ROW_PRODUCED)
			continue;
		/* an earlier row of this key could not even be queued */
		if (refused_keys && hash_search(refused_keys, &row->keyhash, HASH_FIND, NULL))
		{
			row->fate = ROW_HELD;
			continue;
		}
		while ((err = cqrs_kafka_produce(producer, &row->msg)) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(producer, 10);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			row->msg.done = true;
			row->msg.err = err;
			if (refused_keys == NULL)
			{
				HASHCTL		ctl;

				ctl.keysize = sizeof(uint64);
				ctl.entrysize = sizeof(uint64);
				ctl.hcxt = batch_ctx;
				refused_keys = hash_create("cqrs_sync refused keys", 64, &ctl,
										   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
			}
			hash_search(refused_keys, &row->keyhash, HASH_ENTER, NULL);
		}
		nproduced++;
	}

	if (nproduced > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(batch_ctx);

		await_delivery(rows, nrows);
		record_outcome(rows, nrows, GetCurrentTimestamp());
		MemoryContextSwitchTo(old);
	}

	full = (nrows == (uint64) cqrs_batch_size);
	if (full)
	{
		round_after = rows[nrows - 1].msg.id;
		return true;
	}
	start_round();
	return false;
}

static long
sleep_ms(void)
{
	long		ms = cqrs_poll_interval_ms;

	if (round_wake_at != 0)
	{
		long		secs;
		int			usecs;

		TimestampDifference(GetCurrentTimestamp(), round_wake_at, &secs, &usecs);
		ms = Min(ms, secs * 1000 + usecs / 1000 + 1);
	}
	return ms;
}

void
cqrs_relay_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cqrs_database, NULL, 0);

	batch_ctx = AllocSetContextCreate(TopMemoryContext, "cqrs_sync relay batch",
									  ALLOCSET_DEFAULT_SIZES);
	round_ctx = AllocSetContextCreate(TopMemoryContext, "cqrs_sync relay round",
									  ALLOCSET_DEFAULT_SIZES);
	inflight = MemoryContextAlloc(TopMemoryContext,
								  sizeof(CqrsInflight) * cqrs_shared->nslots);
	start_round();

	cqrs_shared->relay_pid = MyProcPid;
	cqrs_shared->relay_latch = MyLatch;
	before_shmem_exit(relay_detach_shmem, (Datum) 0);

	ereport(LOG,
			(errmsg("cqrs_sync relay started in database \"%s\", brokers \"%s\"",
					cqrs_database, cqrs_brokers)));

	while (!ShutdownRequestPending)
	{
		bool		more = false;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (producer && cqrs_kafka_config_changed())
			{
				ereport(LOG,
						(errmsg("cqrs_sync relay: Kafka settings changed, re-creating the producer")));
				cqrs_kafka_destroy(producer, SHUTDOWN_FLUSH_MS);
				producer = NULL;
			}
		}

		if (producer == NULL)
		{
			char		errbuf[1024];

			producer = cqrs_kafka_create(0, errbuf, sizeof(errbuf));
			if (producer == NULL)
			{
				ereport(WARNING,
						(errcode(ERRCODE_CONFIG_FILE_ERROR),
						 errmsg("cqrs_sync relay: %s", errbuf),
						 errhint("Fix cqrs_sync.brokers or cqrs_sync.kafka_config_file and reload the configuration.")));
				cqrs_relay_note_failure(errbuf, 0);
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 5000L, PG_WAIT_EXTENSION);
				continue;
			}
		}

		more = relay_batch();
		if (!more)
		{
			pgstat_report_activity(STATE_IDLE, NULL);
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms(), PG_WAIT_EXTENSION);
		}
	}

	/* SIGTERM: what is in flight was flushed by await_delivery */
	cqrs_kafka_destroy(producer, SHUTDOWN_FLUSH_MS);
	producer = NULL;
	ereport(LOG, (errmsg("cqrs_sync relay shutting down")));
	proc_exit(1);
}
