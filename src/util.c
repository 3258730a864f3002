/*-------------------------------------------------------------------------
 *
 * util.c
 *	  Catalog look-ups shared by the parts of cqrs_sync.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "commands/async.h"
#include "postmaster/bgworker.h"
#include "storage/proc.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "util.h"

/*
 * The schema an extension lives in (PostgreSQL 15 does not export
 * get_extension_schema()).
 */
Oid
cqrs_extension_namespace(Oid ext_oid)
{
	Relation	rel;
	SysScanDesc scan;
	ScanKeyData key;
	HeapTuple	tup;
	Oid			nsp = InvalidOid;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(ext_oid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		nsp = ((Form_pg_extension) GETSTRUCT(tup))->extnamespace;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);

	if (!OidIsValid(nsp))
		elog(ERROR, "cache lookup failed for extension %u", ext_oid);
	return nsp;
}

/* Name of the schema an extension lives in */
char *
cqrs_extension_schema(Oid ext_oid)
{
	return get_namespace_name(cqrs_extension_namespace(ext_oid));
}

/*
 * Prepare a statement and keep its plan for the life of the process (the
 * workers' and the helpers' plans are prepared once).
 */
SPIPlanPtr
cqrs_keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "cqrs_sync: could not prepare \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "cqrs_sync: could not keep the plan of \"%s\"", sql);
	return plan;
}

/*
 * Register one of cqrs_sync's background workers (from _PG_init while
 * preloading): connected to a database, started once recovery finished,
 * restarted restart_seconds after it exits with 1.  type is both its name
 * and its pg_stat_activity.backend_type.
 */
void
cqrs_register_worker(const char *function, const char *type, int restart_seconds)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = restart_seconds;
	strlcpy(worker.bgw_library_name, "cqrs_sync", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, function, BGW_MAXLEN);
	strlcpy(worker.bgw_name, type, BGW_MAXLEN);
	strlcpy(worker.bgw_type, type, BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * A C entry point that returns rows checks the row type its SQL definition
 * gives (as pg_stat_statements does): a definition of another layout (an
 * extension script older or newer than the library) gets an error, never a
 * row built with the wrong layout.  Each layout has its own symbol.
 */
void
cqrs_check_row_layout(const char *function, TupleDesc desc, int ncols)
{
	if (desc->natts != ncols)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("%s() returns %d columns, the library expected %d",
						function, desc->natts, ncols),
				 errhint("Run ALTER EXTENSION cqrs_sync UPDATE.")));
}

/*
 * In the PG_CATCH block of a worker's whole transaction: the error, copied
 * into cxt (which stays current), and the transaction rolled back.  The
 * caller reports the error and frees it.
 */
ErrorData *
cqrs_catch_and_abort(MemoryContext cxt)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	return edata;
}

/*
 * The same for a worker's error recovery (its sigsetjmp block, or a pass
 * that goes on after an error): the error also goes to the server log.
 * Interrupts are held by the caller.
 */
ErrorData *
cqrs_report_and_abort(MemoryContext cxt)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	EmitErrorReport();
	AbortCurrentTransaction();
	FlushErrorState();
	return edata;
}

/*
 * NOTIFY an alert on channel cqrs_sync_alert, in the current transaction.
 *
 * A session that listens but no longer reads (idle in a transaction, say)
 * holds the NOTIFY queue's tail; once the queue is full, every commit that
 * notifies fails.  The workers' alerts commit with what they record, which
 * would then fail for as long.  From half full on, alerts are logged
 * instead of sent (one WARNING per transaction): the rows, the audit and
 * the views still say what happened.  The queue is looked at once per
 * transaction.
 */
void
cqrs_notify_alert(const char *worker, const char *payload)
{
	static LocalTransactionId checked_lxid = InvalidLocalTransactionId;
	static double usage = 0;
	static bool warned = false;

	if (RecoveryInProgress())
		return;					/* nothing is recorded either */
	if (checked_lxid != MyProc->lxid)
	{
		LOCAL_FCINFO(fcinfo, 0);

		InitFunctionCallInfoData(*fcinfo, NULL, 0, InvalidOid, NULL, NULL);
		usage = DatumGetFloat8(pg_notification_queue_usage(fcinfo));
		checked_lxid = MyProc->lxid;
		warned = false;
	}
	if (usage >= 0.5)
	{
		if (!warned)
			ereport(WARNING,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("cqrs_sync %s: alerts not sent on channel \"%s\": the NOTIFY queue is %.0f%% full",
							worker, CQRS_ALERT_CHANNEL, usage * 100),
					 errdetail("The first alert of this transaction was %s.", payload),
					 errhint("A session that listens does not read its notifications, often one idle in a transaction: find it in pg_stat_activity.")));
		warned = true;
		return;
	}
	Async_Notify(CQRS_ALERT_CHANNEL, payload);
}
