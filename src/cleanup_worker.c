/*-------------------------------------------------------------------------
 *
 * cleanup_worker.c
 *	  Outbox retention: the cleanup pass, cqrs_cleanup() and the cleanup
 *	  background worker.
 *
 * One pass:
 *
 * 1. Purge: DEAD_LETTERED and DLT_FAILED rows an operator approved
 *	  (cqrs_approve_purge()) and enqueued more than cqrs_sync.dlt_retention
 *	  ago are deleted, each leaving a PURGE row in cqrs_outbox_audit, in the
 *	  same statement.  A partial index on approved rows finds them.
 * 2. SENT: rows acknowledged more than cqrs_sync.sent_retention ago are
 *	  deleted.  The pass walks the outbox in id order, one window of
 *	  cqrs_sync.cleanup_batch_size rows per statement, and deletes the
 *	  expired SENT rows of each window.  It stops after the window holding
 *	  the first row enqueued after the cutoff: ids are handed out in time order (the sequence has
 *	  CACHE 1) and a row is enqueued no earlier than its transaction started
 *	  (created_at) and sent no earlier than it was enqueued, so no row after
 *	  it can have been sent before the cutoff.  A pass therefore reads only
 *	  the old part of the table (expired rows, plus old PENDING or failed
 *	  rows), never the rows kept by the retention, and needs no index on
 *	  sent_at (which would slow down every UPDATE to SENT).
 * 3. Read side: cqrs_prune_read_side() (inbox and tombstones).
 *
 * PENDING rows are never deleted.  Failed rows locked by someone else (an
 * operator retrying or discarding them) are skipped (SKIP LOCKED) and left
 * for the next pass; a SENT row is checked again when it is deleted, and
 * left alone if it changed.
 *
 * The cleanup worker runs every statement of a pass in its own short
 * transaction.  cqrs_cleanup(), a function, runs in its caller's
 * transaction, which it cannot commit: it deletes in the same batches, but
 * stops after cqrs_sync.cleanup_max_rows_per_call rows so that transaction
 * stays bounded, and says whether it finished.  Both pause
 * cqrs_sync.cleanup_delay after each batch that deleted rows, so that a
 * long pass (a backlog of expired rows) takes only a share of the machine
 * from the relay: deleting writes WAL (a full-page image per page after a
 * checkpoint) that the relay's commits then wait for.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cleanup_worker.h"
#include "cqrs_sync.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_cleanup);
PGDLLEXPORT void cqrs_cleanup_main(Datum main_arg);

/* Settings */
int			cqrs_cleanup_interval_s = 60;
int			cqrs_sent_retention_s = 24 * 3600;
int			cqrs_dlt_retention_s = 7 * 24 * 3600;
int			cqrs_cleanup_batch_size = 2000;
int			cqrs_cleanup_max_rows_per_call = 500000;
int			cqrs_cleanup_delay_ms = 10;

/* What a pass deleted */
typedef struct CleanupResult
{
	int64		sent;
	int64		dead_lettered;
	int64		dlt_failed;
	int64		read_side;
	bool		complete;		/* false: stopped early, rows remain */
} CleanupResult;

/* Plans, prepared once per process for the extension's schema. */
static Oid	plans_ext = InvalidOid;
static SPIPlanPtr purge_plan = NULL;
static SPIPlanPtr sent_plan = NULL;
static SPIPlanPtr prune_plan = NULL;

/* The worker said once that the extension is missing. */
static bool said_missing = false;

void
cqrs_cleanup_init(void)
{
	DefineCustomIntVariable("cqrs_sync.cleanup_interval",
							"Time between two passes of the cleanup worker.",
							"0 turns the worker off (it then idles until the setting changes), for sites that schedule cqrs_cleanup() with pg_cron instead.",
							&cqrs_cleanup_interval_s,
							60, 0, INT_MAX / 1000,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.sent_retention",
							"How long SENT outbox rows are kept after Kafka acknowledged them (sent_at).",
							"The cleanup pass deletes older SENT rows. 0 deletes them at the next pass; -1 keeps them for ever.",
							&cqrs_sent_retention_s,
							24 * 3600, -1, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.dlt_retention",
							"Minimum age (since created_at) of a DEAD_LETTERED or DLT_FAILED outbox row before the cleanup pass purges it.",
							"Failed rows are purged only after an operator approved them with cqrs_approve_purge(); every purge leaves a PURGE row in cqrs_outbox_audit. 0 purges approved rows at the next pass; -1 never purges.",
							&cqrs_dlt_retention_s,
							7 * 24 * 3600, -1, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.cleanup_batch_size",
							"Outbox rows the cleanup pass reads and deletes per statement.",
							"The cleanup worker commits after every statement, so it holds row locks and a snapshot for one batch only; small batches also spread the write-ahead log the deletes produce.",
							&cqrs_cleanup_batch_size,
							2000, 1, 1000000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.cleanup_delay",
							"Pause of the cleanup pass after each batch that deleted rows.",
							"Bounds the share of CPU and write-ahead log a long pass (a backlog of expired rows) takes from the relay and the applications, as vacuum_cost_delay does for vacuum; 0 runs passes at full speed.",
							&cqrs_cleanup_delay_ms,
							10, 0, 10000,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.cleanup_max_rows_per_call",
							"Outbox rows one call of cqrs_cleanup() deletes at most.",
							"A function runs in its caller's transaction and cannot commit between batches; this bounds that transaction. A call that stops early returns complete = false and the next call continues. 0 means no limit. The cleanup worker commits after every batch and is not limited.",
							&cqrs_cleanup_max_rows_per_call,
							500000, 0, INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
}

/*
 * Register the cleanup worker; called from _PG_init during
 * shared_preload_libraries.
 */
void
cqrs_cleanup_register(void)
{
	cqrs_register_worker("cqrs_cleanup_main", "cqrs_sync cleanup", 5);
}

/*
 * Prepare the statements for the extension's current schema.  Returns false
 * when the extension does not exist in this database.  Inside a
 * transaction, SPI connected.  Every name is schema-qualified: the worker
 * and the SECURITY DEFINER function both run with search_path = pg_catalog.
 */
static bool
ensure_plans(void)
{
	Oid			ext = get_extension_oid("cqrs_sync", true);
	const char *s;
	Oid			types[3] = {INT8OID, TIMESTAMPTZOID, INT4OID};

	if (!OidIsValid(ext))
		return false;
	if (ext == plans_ext)
		return true;

	s = quote_identifier(cqrs_extension_schema(ext));
	plans_ext = InvalidOid;
	if (purge_plan)
	{
		SPI_freeplan(purge_plan);
		SPI_freeplan(sent_plan);
		SPI_freeplan(prune_plan);
		purge_plan = sent_plan = prune_plan = NULL;
	}

	/*
	 * Rows are joined through "id = ANY (ARRAY(...))": a pkey look-up per id
	 * whatever the estimates (a nested loop over a CTE is quadratic).
	 *
	 * $1: last id of the previous batch, $2: cutoff, $3: batch size. Returns
	 * the rows locked, the last of them, and the rows purged per status.
	 */
	purge_plan = cqrs_keep_plan(psprintf(
										 "WITH c AS ("
										 " SELECT id FROM %s.cqrs_outbox"
										 "  WHERE purge_approved_at IS NOT NULL AND id > $1"
										 "    AND status IN ('DEAD_LETTERED', 'DLT_FAILED') AND created_at < $2"
										 "  ORDER BY id LIMIT $3"
										 "  FOR UPDATE SKIP LOCKED),"
										 " d AS ("
										 " DELETE FROM %s.cqrs_outbox o"
										 "  WHERE o.id = ANY (ARRAY(SELECT id FROM c)) AND o.purge_approved_at IS NOT NULL"
										 "    AND o.status IN ('DEAD_LETTERED', 'DLT_FAILED') AND o.created_at < $2"
										 "  RETURNING o.id, o.event_id, o.topic, o.key, o.status, o.last_error,"
										 "            o.purge_approved_by, o.payload),"
										 " a AS ("
										 " INSERT INTO %s.cqrs_outbox_audit"
										 "        (action, outbox_id, event_id, topic, key, status, reason, approver, payload)"
										 " SELECT 'PURGE', id, event_id, topic, key, status, last_error, purge_approved_by, payload"
										 "   FROM d ORDER BY id"
										 " RETURNING status)"
										 " SELECT (SELECT count(*) FROM c), (SELECT max(id) FROM c),"
										 "        count(*) FILTER (WHERE status = 'DEAD_LETTERED'),"
										 "        count(*) FILTER (WHERE status = 'DLT_FAILED')"
										 "   FROM a", s, s, s),
								3, types);

	/*
	 * $1: last id of the previous window, $2: cutoff, $3: window size.
	 * Returns the rows deleted, the rows in the window, its last id, and
	 * whether it reached a row enqueued after the cutoff.  Rows are deleted
	 * by ctid (no second index look-up) and not locked first (a lock is one
	 * more WAL record per row): nobody else updates SENT rows.  A row changed
	 * since the window was read has a new ctid and is left alone.
	 */
	sent_plan = cqrs_keep_plan(psprintf(
										"WITH w AS MATERIALIZED ("
										" SELECT ctid, id, status, sent_at, created_at FROM %s.cqrs_outbox"
										"  WHERE id > $1 ORDER BY id LIMIT $3),"
										" d AS ("
										" DELETE FROM %s.cqrs_outbox o"
										"  WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM w WHERE status = 'SENT' AND sent_at < $2))"
										"    AND o.status = 'SENT' AND o.sent_at < $2"
										"  RETURNING 1)"
										" SELECT (SELECT count(*) FROM d), count(*), max(w.id),"
										"        coalesce(bool_or(w.created_at >= $2), false)"
										"   FROM w", s, s),
							   3, types);

	prune_plan = cqrs_keep_plan(psprintf("SELECT %s.cqrs_prune_read_side()", s), 0, NULL);
	plans_ext = ext;
	return true;
}

static int64
get_int8(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * A pass.  With own_xacts (the worker), every statement runs in its own
 * transaction, started here; else all run in the caller's transaction,
 * with SPI connected.  max_rows < 0: no limit on the outbox rows deleted.
 * Returns false when the extension does not exist in this database.
 */
typedef struct PassState
{
	bool		own_xacts;
	int64		budget;			/* outbox rows left to delete; < 0: no limit */
	bool		pause;			/* the last batch deleted rows */
} PassState;

static void
batch_begin(PassState *ps, const char *activity)
{
	if (!ps->own_xacts)
	{
		CHECK_FOR_INTERRUPTS();
		return;
	}
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
batch_end(PassState *ps)
{
	if (!ps->own_xacts)
		return;
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
}

/*
 * Before a batch: pause cqrs_sync.cleanup_delay if the previous batch
 * deleted rows (reading is cheap; deleting writes WAL the relay's commits
 * then wait for).  The worker stops when asked to shut down: returns true.
 */
static bool
stop_requested(PassState *ps)
{
	if (ps->pause && cqrs_cleanup_delay_ms > 0 &&
		!(ps->own_xacts && ShutdownRequestPending))
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 cqrs_cleanup_delay_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	ps->pause = false;
	if (!ps->own_xacts)
	{
		/* a cancel or statement_timeout stops cqrs_cleanup() here */
		CHECK_FOR_INTERRUPTS();
		return false;
	}
	if (!PostmasterIsAlive())
		proc_exit(1);
	return ShutdownRequestPending;
}

/* How many rows the next batch may touch; 0: the budget is spent. */
static int
batch_limit(PassState *ps)
{
	if (ps->budget < 0)
		return cqrs_cleanup_batch_size;
	return (int) Min((int64) cqrs_cleanup_batch_size, ps->budget);
}

static void
spend(PassState *ps, int64 n)
{
	if (ps->budget >= 0)
		ps->budget = Max(ps->budget - n, 0);
}

static void
purge_failed(PassState *ps, TimestampTz cutoff, CleanupResult *res)
{
	int64		after = 0;

	for (;;)
	{
		int			limit = batch_limit(ps);
		Datum		args[3];
		int			ret;
		int64		locked;

		if (limit == 0)
		{
			res->complete = false;
			return;
		}
		if (stop_requested(ps))
			return;

		batch_begin(ps, "cqrs_sync cleanup: purging approved failed rows");
		args[0] = Int64GetDatum(after);
		args[1] = TimestampTzGetDatum(cutoff);
		args[2] = Int32GetDatum(limit);
		ret = SPI_execute_plan(purge_plan, args, NULL, false, 0);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "cqrs_sync cleanup: purging failed rows failed: %s",
				 SPI_result_code_string(ret));
		locked = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		after = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		res->dead_lettered += get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
		res->dlt_failed += get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
		spend(ps, locked);
		batch_end(ps);
		ps->pause = (locked > 0);

		if (locked < limit)
			return;
	}
}

static void
delete_sent(PassState *ps, TimestampTz cutoff, CleanupResult *res)
{
	int64		after = 0;

	for (;;)
	{
		int			limit = batch_limit(ps);
		Datum		args[3];
		int			ret;
		int64		deleted;
		int64		visited;
		bool		isnull;
		bool		reached_cutoff;

		if (limit == 0)
		{
			res->complete = false;
			return;
		}
		if (stop_requested(ps))
			return;

		batch_begin(ps, "cqrs_sync cleanup: deleting expired SENT rows");
		args[0] = Int64GetDatum(after);
		args[1] = TimestampTzGetDatum(cutoff);
		args[2] = Int32GetDatum(limit);
		ret = SPI_execute_plan(sent_plan, args, NULL, false, 0);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "cqrs_sync cleanup: deleting SENT rows failed: %s",
				 SPI_result_code_string(ret));
		deleted = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		visited = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		after = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
		reached_cutoff = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
													SPI_tuptable->tupdesc, 4, &isnull));
		res->sent += deleted;
		spend(ps, deleted);
		batch_end(ps);
		ps->pause = (deleted > 0);

		if (visited < limit || reached_cutoff)
			return;
	}
}

static void
prune_read_side(PassState *ps, CleanupResult *res)
{
	int			ret;

	if (stop_requested(ps))
		return;
	batch_begin(ps, "cqrs_sync cleanup: pruning the inbox and tombstones");
	ret = SPI_execute_plan(prune_plan, NULL, NULL, false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cqrs_sync cleanup: pruning the read side failed: %s",
			 SPI_result_code_string(ret));
	res->read_side += get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	batch_end(ps);
}

static TimestampTz
cutoff_for(TimestampTz now, int retention_s)
{
	return now - (TimestampTz) retention_s * USECS_PER_SEC;
}

/*
 * Run a pass; plans must be ready.  Settings are read once, at the start.
 */
static void
run_pass(PassState *ps, CleanupResult *res)
{
	TimestampTz now = GetCurrentTimestamp();
	int			sent_retention = cqrs_sent_retention_s;
	int			dlt_retention = cqrs_dlt_retention_s;

	memset(res, 0, sizeof(*res));
	res->complete = true;

	if (dlt_retention >= 0)
		purge_failed(ps, cutoff_for(now, dlt_retention), res);
	if (sent_retention >= 0)
		delete_sent(ps, cutoff_for(now, sent_retention), res);
	prune_read_side(ps, res);
}

/*
 * cqrs_cleanup(OUT sent bigint, OUT dead_lettered bigint, OUT dlt_failed
 * bigint, OUT read_side bigint, OUT complete boolean) RETURNS record
 *
 * One cleanup pass in the caller's transaction (SECURITY DEFINER).
 */
Datum
cqrs_cleanup(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	PassState	ps;
	CleanupResult res;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};
	int64		limit = cqrs_cleanup_max_rows_per_call;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	SPI_connect();
	if (!ensure_plans())
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"cqrs_sync\" does not exist")));
	ps.own_xacts = false;
	ps.budget = (limit > 0) ? limit : -1;
	ps.pause = false;
	run_pass(&ps, &res);
	SPI_finish();

	if (!res.complete)
		ereport(NOTICE,
				(errmsg("cqrs_cleanup stopped after " INT64_FORMAT " rows, more expired rows may remain",
						limit),
				 errdetail("cqrs_sync.cleanup_max_rows_per_call limits the rows one call deletes, so that the caller's transaction stays short."),
				 errhint("Call cqrs_cleanup() again, or let the cleanup worker (cqrs_sync.cleanup_interval) catch up; it commits after every batch.")));

	values[0] = Int64GetDatum(res.sent);
	values[1] = Int64GetDatum(res.dead_lettered);
	values[2] = Int64GetDatum(res.dlt_failed);
	values[3] = Int64GetDatum(res.read_side);
	values[4] = BoolGetDatum(res.complete);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc),
													  values, nulls)));
}

/*
 * The worker's pass: plans checked in a transaction of their own, then one
 * transaction per statement.  Returns false when the extension is missing.
 */
static bool
worker_pass(CleanupResult *res)
{
	PassState	ps;
	bool		ready;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	ready = ensure_plans();
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	if (!ready)
		return false;

	ps.own_xacts = true;
	ps.budget = -1;
	ps.pause = false;
	run_pass(&ps, res);
	pgstat_report_stat(true);
	return true;
}

/*
 * A worker pass; an error is reported and rolled back, and the next pass
 * comes at the next interval.
 */
static void
guarded_pass(MemoryContext pass_ctx)
{
	CleanupResult res;
	MemoryContext old = MemoryContextSwitchTo(pass_ctx);

	PG_TRY();
	{
		if (!worker_pass(&res))
		{
			if (!said_missing)
				ereport(LOG,
						(errmsg("cqrs_sync cleanup: extension \"cqrs_sync\" does not exist in database \"%s\", waiting",
								cqrs_database),
						 errhint("Run CREATE EXTENSION cqrs_sync in database \"%s\".",
								 cqrs_database)));
			said_missing = true;
		}
		else
		{
			said_missing = false;
			if (res.dead_lettered + res.dlt_failed > 0)
				ereport(LOG,
						(errmsg("cqrs_sync cleanup: purged " INT64_FORMAT " approved DEAD_LETTERED and " INT64_FORMAT " approved DLT_FAILED rows",
								res.dead_lettered, res.dlt_failed),
						 errdetail("Each purge is recorded in cqrs_outbox_audit.")));
			ereport(DEBUG1,
					(errmsg("cqrs_sync cleanup: deleted " INT64_FORMAT " SENT rows, pruned " INT64_FORMAT " inbox entries and tombstones",
							res.sent, res.read_side)));
		}
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		EmitErrorReport();
		AbortCurrentTransaction();
		FlushErrorState();
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	MemoryContextReset(pass_ctx);
}

void
cqrs_cleanup_main(Datum main_arg)
{
	MemoryContext pass_ctx;
	TimestampTz last_start = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cqrs_database, NULL, 0);

	/* every name in the plans is qualified; operators come from here */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);

	pass_ctx = AllocSetContextCreate(TopMemoryContext, "cqrs_sync cleanup pass",
									 ALLOCSET_DEFAULT_SIZES);

	ereport(LOG,
			(errmsg("cqrs_sync cleanup worker started in database \"%s\", interval %d s",
					cqrs_database, cqrs_cleanup_interval_s)));

	while (!ShutdownRequestPending)
	{
		long		timeout = -1;
		int			events = WL_LATCH_SET | WL_EXIT_ON_PM_DEATH;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (cqrs_cleanup_interval_s > 0)
		{
			TimestampTz now = GetCurrentTimestamp();
			TimestampTz due = TimestampTzPlusMilliseconds(last_start,
														  cqrs_cleanup_interval_s * 1000);

			if (last_start == 0 || now >= due)
			{
				last_start = now;
				guarded_pass(pass_ctx);
				pgstat_report_activity(STATE_IDLE, NULL);
				continue;		/* re-check signals and the schedule */
			}
			timeout = (long) ((due - now + 999) / 1000);
			events |= WL_TIMEOUT;
		}

		(void) WaitLatch(MyLatch, events, timeout, PG_WAIT_EXTENSION);
	}

	ereport(LOG, (errmsg("cqrs_sync cleanup worker shutting down")));
	proc_exit(1);
}
