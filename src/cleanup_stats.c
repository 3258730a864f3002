/*-------------------------------------------------------------------------
 *
 * cleanup_stats.c
 *	  The cleanup's counters in shared memory, per database, and
 *	  cqrs_cleanup_counters() (behind the view cqrs_stats_cleanup).
 *
 * A pass counts once it is over: the worker's when it ends (each of its
 * statements committed on its own), a cqrs_cleanup() call's when the
 * caller's transaction commits, because only then are its deletions real;
 * one rolled back (whole, or to a savepoint around the call) does not count.
 * A pass that fails (an error in the worker, or raised by cqrs_cleanup())
 * counts as an error, with its message; one the worker stops because it is
 * shutting down counts as neither.  cqrs_prune_read_side() is not a pass.
 *
 * The counters live in shared memory, like the relay's: they survive a
 * restart of the worker, not one of the server.  Each database has its own
 * slot (the worker serves cqrs_sync.database; pg_cron or a person may call
 * cqrs_cleanup() in any database that has the extension).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "cleanup_stats.h"
#include "cleanup_worker.h"
#include "shmem.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_cleanup_counters);

/* Columns of cqrs_cleanup_counters() */
#define CLEANUP_STATE_COLS 15

/* Passes of cqrs_cleanup() waiting for their transaction's end */
typedef struct PendingPass
{
	SubTransactionId subid;		/* the (sub)transaction it ran in */
	TimestampTz start;
	TimestampTz end;
	CqrsCleanupCounts counts;
} PendingPass;

static PendingPass *pending = NULL;
static int	npending = 0;
static int	maxpending = 0;
static bool callbacks_registered = false;

/*
 * The slot of database dboid (cleanup_lock held exclusive).  A database
 * without one takes a free slot, or the one whose last pass is the oldest,
 * its counters starting from 0.
 */
static CqrsCleanupSlot *
slot_for(Oid dboid)
{
	CqrsCleanupSlot *victim = NULL;

	for (int i = 0; i < CQRS_CLEANUP_DBS; i++)
	{
		CqrsCleanupSlot *c = &cqrs_shared->cleanup[i];

		if (c->dboid == dboid)
			return c;
		if (c->dboid == InvalidOid)
		{
			if (victim == NULL || victim->dboid != InvalidOid)
				victim = c;
		}
		else if (victim == NULL ||
				 (victim->dboid != InvalidOid && c->last_pass_end < victim->last_pass_end))
			victim = c;
	}
	victim->dboid = dboid;
	pg_atomic_write_u64(&victim->passes, 0);
	pg_atomic_write_u64(&victim->errors, 0);
	pg_atomic_write_u64(&victim->deleted_sent, 0);
	pg_atomic_write_u64(&victim->deleted_dead_lettered, 0);
	pg_atomic_write_u64(&victim->deleted_dlt_failed, 0);
	pg_atomic_write_u64(&victim->deleted_read_side, 0);
	victim->last_pass_start = 0;
	victim->last_pass_end = 0;
	victim->last_success_at = 0;
	victim->last_error_at = 0;
	victim->last_error[0] = '\0';
	return victim;
}

/* A pass of this database ended: counts (success) or message (failure). */
static void
record_pass(TimestampTz start, TimestampTz end, const CqrsCleanupCounts *counts,
			const char *message)
{
	CqrsCleanupSlot *c;

	if (cqrs_shared == NULL)
		return;					/* not preloaded: nowhere to count */
	LWLockAcquire(cqrs_shared->cleanup_lock, LW_EXCLUSIVE);
	c = slot_for(MyDatabaseId);
	if (message)
	{
		pg_atomic_fetch_add_u64(&c->errors, 1);
		strlcpy(c->last_error, message, CQRS_ERROR_LEN);
		c->last_error_at = end;
	}
	else
	{
		pg_atomic_fetch_add_u64(&c->passes, 1);
		pg_atomic_fetch_add_u64(&c->deleted_sent, (uint64) counts->sent);
		pg_atomic_fetch_add_u64(&c->deleted_dead_lettered, (uint64) counts->dead_lettered);
		pg_atomic_fetch_add_u64(&c->deleted_dlt_failed, (uint64) counts->dlt_failed);
		pg_atomic_fetch_add_u64(&c->deleted_read_side, (uint64) counts->read_side);
		c->last_success_at = end;
	}
	c->last_pass_start = start;
	c->last_pass_end = end;
	LWLockRelease(cqrs_shared->cleanup_lock);
}

void
cqrs_cleanup_stats_pass(TimestampTz start, TimestampTz end, const CqrsCleanupCounts *counts)
{
	record_pass(start, end, counts, NULL);
}

void
cqrs_cleanup_stats_error(TimestampTz start, TimestampTz end, const char *message)
{
	record_pass(start, end, NULL, message ? message : "unknown error");
}

static void
worker_detach(int code, Datum arg)
{
	LWLockAcquire(cqrs_shared->cleanup_lock, LW_EXCLUSIVE);
	if (cqrs_shared->cleanup_pid == MyProcPid)
	{
		cqrs_shared->cleanup_pid = 0;
		cqrs_shared->cleanup_dboid = InvalidOid;
	}
	LWLockRelease(cqrs_shared->cleanup_lock);
}

void
cqrs_cleanup_stats_worker_started(void)
{
	LWLockAcquire(cqrs_shared->cleanup_lock, LW_EXCLUSIVE);
	cqrs_shared->cleanup_pid = MyProcPid;
	cqrs_shared->cleanup_dboid = MyDatabaseId;
	LWLockRelease(cqrs_shared->cleanup_lock);
	before_shmem_exit(worker_detach, (Datum) 0);
}

/* ---- passes of cqrs_cleanup(), counted at commit ------------------------ */

static void
cleanup_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			for (int i = 0; i < npending; i++)
				record_pass(pending[i].start, pending[i].end, &pending[i].counts, NULL);
			npending = 0;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			/* rolled back, or its fate decided elsewhere: not counted */
			npending = 0;
			break;
		default:
			break;
	}
}

static void
cleanup_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	int			kept = 0;

	if (npending == 0)
		return;
	switch (event)
	{
		case SUBXACT_EVENT_COMMIT_SUB:
			for (int i = 0; i < npending; i++)
				if (pending[i].subid == mySubid)
					pending[i].subid = parentSubid;
			break;
		case SUBXACT_EVENT_ABORT_SUB:
			for (int i = 0; i < npending; i++)
				if (pending[i].subid != mySubid)
					pending[kept++] = pending[i];
			npending = kept;
			break;
		default:
			break;
	}
}

void
cqrs_cleanup_stats_pass_at_commit(TimestampTz start, TimestampTz end,
								  const CqrsCleanupCounts *counts)
{
	if (cqrs_shared == NULL)
		return;
	if (!callbacks_registered)
	{
		RegisterXactCallback(cleanup_xact_callback, NULL);
		RegisterSubXactCallback(cleanup_subxact_callback, NULL);
		callbacks_registered = true;
	}
	if (npending == maxpending)
	{
		int			newmax = Max(4, maxpending * 2);

		pending = pending ?
			repalloc(pending, sizeof(PendingPass) * newmax) :
			MemoryContextAlloc(TopMemoryContext, sizeof(PendingPass) * newmax);
		maxpending = newmax;
	}
	pending[npending].subid = GetCurrentSubTransactionId();
	pending[npending].start = start;
	pending[npending].end = end;
	pending[npending].counts = *counts;
	npending++;
}

/* ---- SQL ---------------------------------------------------------------- */

static double
retention_seconds(int setting)
{
	return setting < 0 ? -1.0 : (double) setting;
}

/*
 * cqrs_cleanup_counters() -> (worker_pid, interval_seconds,
 *		sent_retention_seconds, dlt_retention_seconds, passes, errors,
 *		deleted_sent, deleted_dead_lettered, deleted_dlt_failed,
 *		deleted_read_side, last_pass_start, last_pass_end, last_success_at,
 *		last_error, last_error_at)
 *
 * This database's cleanup: the worker if it runs here, the settings the
 * passes use, and the counters since the server started (NULL counters
 * when the library is not preloaded).
 */
Datum
cqrs_cleanup_counters(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[CLEANUP_STATE_COLS];
	bool		nulls[CLEANUP_STATE_COLS];
	int64		counters[6] = {0, 0, 0, 0, 0, 0};
	TimestampTz last_pass_start = 0;
	TimestampTz last_pass_end = 0;
	TimestampTz last_success_at = 0;
	TimestampTz last_error_at = 0;
	char		last_error[CQRS_ERROR_LEN];
	pid_t		pid = 0;
	int			i = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	cqrs_check_row_layout("cqrs_cleanup_counters", tupdesc, CLEANUP_STATE_COLS);

	last_error[0] = '\0';
	if (cqrs_shared != NULL)
	{
		LWLockAcquire(cqrs_shared->cleanup_lock, LW_SHARED);
		if (cqrs_shared->cleanup_dboid == MyDatabaseId)
			pid = cqrs_shared->cleanup_pid;
		for (int s = 0; s < CQRS_CLEANUP_DBS; s++)
		{
			CqrsCleanupSlot *c = &cqrs_shared->cleanup[s];

			if (c->dboid != MyDatabaseId)
				continue;
			counters[0] = (int64) pg_atomic_read_u64(&c->passes);
			counters[1] = (int64) pg_atomic_read_u64(&c->errors);
			counters[2] = (int64) pg_atomic_read_u64(&c->deleted_sent);
			counters[3] = (int64) pg_atomic_read_u64(&c->deleted_dead_lettered);
			counters[4] = (int64) pg_atomic_read_u64(&c->deleted_dlt_failed);
			counters[5] = (int64) pg_atomic_read_u64(&c->deleted_read_side);
			last_pass_start = c->last_pass_start;
			last_pass_end = c->last_pass_end;
			last_success_at = c->last_success_at;
			last_error_at = c->last_error_at;
			memcpy(last_error, c->last_error, CQRS_ERROR_LEN);
			break;
		}
		LWLockRelease(cqrs_shared->cleanup_lock);
	}

	memset(nulls, 0, sizeof(nulls));
	values[i] = Int32GetDatum(pid);
	nulls[i++] = (pid == 0);
	values[i++] = Float8GetDatum((double) cqrs_cleanup_interval_s);
	values[i++] = Float8GetDatum(retention_seconds(cqrs_sent_retention_s));
	values[i++] = Float8GetDatum(retention_seconds(cqrs_dlt_retention_s));
	/* the counters: NULL without shared memory, 0 before the first pass */
	for (int c = 0; c < lengthof(counters); c++)
	{
		values[i] = Int64GetDatum(counters[c]);
		nulls[i++] = (cqrs_shared == NULL);
	}
	values[i] = TimestampTzGetDatum(last_pass_start);
	nulls[i++] = (last_pass_start == 0);
	values[i] = TimestampTzGetDatum(last_pass_end);
	nulls[i++] = (last_pass_end == 0);
	values[i] = TimestampTzGetDatum(last_success_at);
	nulls[i++] = (last_success_at == 0);
	values[i] = CStringGetTextDatum(last_error);
	nulls[i++] = (last_error[0] == '\0');
	values[i] = TimestampTzGetDatum(last_error_at);
	nulls[i++] = (last_error_at == 0);
	Assert(i == CLEANUP_STATE_COLS);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
