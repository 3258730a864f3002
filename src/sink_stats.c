/*-------------------------------------------------------------------------
 *
 * sink_stats.c
 *	  Shared memory of the sink workers: one slot per worker (its process,
 *	  latch, state and last error), one slot per partition assigned to a
 *	  worker (Kafka's watermarks as the worker last saw them, the time of the
 *	  oldest message it fetched and has not applied), and the generation of
 *	  the sink catalog, bumped when a transaction that changed it commits so
 *	  that the workers read it again at once.  The functions
 *	  cqrs_sink_workers() and cqrs_sink_partitions() show them in SQL.
 *
 *	  Positions and counters live in the database (cqrs_sink_offset), where
 *	  they are written with the events' effects; only what the database
 *	  cannot know (what Kafka holds, what a worker is doing) is kept here.
 *	  The memory has its own hooks, chained from _PG_init.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "shmem.h"
#include "sink.h"
#include "util.h"

/* row layouts of cqrs_sink_workers() and cqrs_sink_partitions() (0.2.0) */
#define SINK_WORKERS_COLS 10
#define SINK_PARTITIONS_COLS 9

PG_FUNCTION_INFO_V1(cqrs_sink_wake);
PG_FUNCTION_INFO_V1(cqrs_sink_changed);
PG_FUNCTION_INFO_V1(cqrs_sink_workers_sql);
PG_FUNCTION_INFO_V1(cqrs_sink_partitions);

/* Partitions whose state is shown; a worker beyond that still works. */
#define SINK_MAX_PARTS	4096

typedef struct SinkWorkerSlot
{
	pid_t		pid;			/* 0: not running */
	Latch	   *latch;
	int			state;			/* SinkWorkerState */
	int			nsinks;
	int			nparts;
	TimestampTz started_at;
	TimestampTz launched_at;	/* when worker 0 last asked for it */
	TimestampTz waiting_since;
	TimestampTz last_error_at;
	char		last_error[CQRS_ERROR_LEN];
} SinkWorkerSlot;

typedef struct SinkPartSlot
{
	slock_t		mutex;
	int			worker;			/* -1: free */
	char		sink[CQRS_SINK_NAMELEN];
	char		topic[CQRS_TOPIC_NAMELEN];
	int32		partition;
	int64		high;
	int64		low;
	int64		fetched;
	TimestampTz oldest_unapplied;
	TimestampTz updated_at;
} SinkPartSlot;

typedef struct SinkShared
{
	slock_t		mutex;			/* the worker slots */
	int			wanted;			/* cqrs_sync.sink_workers as worker 0 saw it */
	pg_atomic_uint64 catalog_gen;
	SinkWorkerSlot workers[CQRS_SINK_MAX_WORKERS];
	LWLock	   *parts_lock;		/* attach and detach of part slots */
	SinkPartSlot parts[SINK_MAX_PARTS];
} SinkShared;

static SinkShared *sink_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static bool wake_at_commit = false;
static bool xact_callback_registered = false;

static void
sink_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(sizeof(SinkShared));
	RequestNamedLWLockTranche("cqrs_sync sink", 1);
}

static void
sink_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	sink_shared = ShmemInitStruct("cqrs_sync sink", sizeof(SinkShared), &found);
	if (!found)
	{
		memset(sink_shared, 0, sizeof(SinkShared));
		SpinLockInit(&sink_shared->mutex);
		pg_atomic_init_u64(&sink_shared->catalog_gen, 1);
		sink_shared->parts_lock = &(GetNamedLWLockTranche("cqrs_sync sink"))[0].lock;
		for (int i = 0; i < SINK_MAX_PARTS; i++)
		{
			SpinLockInit(&sink_shared->parts[i].mutex);
			sink_shared->parts[i].worker = -1;
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Install the hooks; called from _PG_init while preloading. */
void
cqrs_sink_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = sink_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = sink_shmem_startup;
}

bool
sink_shmem_ready(void)
{
	return sink_shared != NULL;
}

/* ---- waking the workers -------------------------------------------------- */

static void
wake_workers(void)
{
	if (sink_shared == NULL)
		return;
	pg_atomic_fetch_add_u64(&sink_shared->catalog_gen, 1);
	SpinLockAcquire(&sink_shared->mutex);
	for (int i = 0; i < CQRS_SINK_MAX_WORKERS; i++)
		if (sink_shared->workers[i].pid != 0 && sink_shared->workers[i].latch != NULL)
			SetLatch(sink_shared->workers[i].latch);
	SpinLockRelease(&sink_shared->mutex);
}

static void
sink_xact_callback(XactEvent event, void *arg)
{
	if (!wake_at_commit)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
	{
		wake_at_commit = false;
		wake_workers();
	}
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		wake_at_commit = false;
}

static void
wake_when_committed(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(sink_xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_at_commit = true;
}

/* cqrs_sink_wake() -> void: wake the sink workers when this commits */
Datum
cqrs_sink_wake(PG_FUNCTION_ARGS)
{
	wake_when_committed();
	PG_RETURN_VOID();
}

/* Statement trigger of cqrs_sink: the workers read the sinks at commit. */
Datum
cqrs_sink_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("cqrs_sink_changed() must be called as a trigger")));
	wake_when_committed();
	return PointerGetDatum(NULL);
}

uint64
sink_catalog_generation(void)
{
	return sink_shared ? pg_atomic_read_u64(&sink_shared->catalog_gen) : 0;
}

/* ---- worker slots ---------------------------------------------------------- */

/*
 * Take slot index for this process.  False if another live process has it
 * (a worker registered twice, say by worker 0 and by a crash restart).
 */
bool
sink_worker_claim(int index)
{
	SinkWorkerSlot *w = &sink_shared->workers[index];
	pid_t		other;
	bool		ok;

	SpinLockAcquire(&sink_shared->mutex);
	other = w->pid;
	SpinLockRelease(&sink_shared->mutex);
	/* (kill outside the spinlock: a system call) */
	if (other != 0 && other != MyProcPid && kill(other, 0) == 0)
		return false;

	SpinLockAcquire(&sink_shared->mutex);
	ok = (w->pid == other);
	if (ok)
	{
		w->pid = MyProcPid;
		w->latch = MyLatch;
		w->state = SINK_STATE_IDLE;
		w->nsinks = 0;
		w->nparts = 0;
		w->started_at = GetCurrentTimestamp();
		w->waiting_since = 0;
	}
	SpinLockRelease(&sink_shared->mutex);
	return ok;
}

void
sink_worker_release(int index)
{
	SinkWorkerSlot *w = &sink_shared->workers[index];

	SpinLockAcquire(&sink_shared->mutex);
	if (w->pid == MyProcPid)
	{
		w->pid = 0;
		w->latch = NULL;
		w->state = SINK_STATE_STOPPED;
		w->nsinks = 0;
		w->nparts = 0;
		w->waiting_since = 0;
	}
	SpinLockRelease(&sink_shared->mutex);

	/* its partitions are no longer shown */
	LWLockAcquire(sink_shared->parts_lock, LW_EXCLUSIVE);
	for (int i = 0; i < SINK_MAX_PARTS; i++)
		if (sink_shared->parts[i].worker == index)
			sink_shared->parts[i].worker = -1;
	LWLockRelease(sink_shared->parts_lock);
}

/* The worker's state; error (if not NULL) becomes its last error. */
void
sink_worker_set_state(int index, SinkWorkerState state, const char *error)
{
	SinkWorkerSlot *w = &sink_shared->workers[index];
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&sink_shared->mutex);
	if (state == SINK_STATE_WAITING_DATABASE || state == SINK_STATE_WAITING_BROKER ||
		state == SINK_STATE_NO_CONSUMER)
	{
		if (w->state != (int) state || w->waiting_since == 0)
			w->waiting_since = now;
	}
	else
		w->waiting_since = 0;
	w->state = state;
	if (error != NULL)
	{
		strlcpy(w->last_error, error, sizeof(w->last_error));
		w->last_error_at = now;
	}
	SpinLockRelease(&sink_shared->mutex);
}

void
sink_worker_set_counts(int index, int nsinks, int nparts)
{
	SinkWorkerSlot *w = &sink_shared->workers[index];

	SpinLockAcquire(&sink_shared->mutex);
	w->nsinks = nsinks;
	w->nparts = nparts;
	SpinLockRelease(&sink_shared->mutex);
}

void
sink_worker_set_wanted(int wanted)
{
	SpinLockAcquire(&sink_shared->mutex);
	sink_shared->wanted = wanted;
	SpinLockRelease(&sink_shared->mutex);
}

/*
 * Worker 0 asks: should worker index be launched?  Yes if it does not run
 * and was not asked for within the last 10 seconds (then its start failed).
 */
bool
sink_worker_needs_launch(int index, TimestampTz now)
{
	SinkWorkerSlot *w = &sink_shared->workers[index];
	bool		launch;

	SpinLockAcquire(&sink_shared->mutex);
	launch = w->pid == 0 &&
		(w->launched_at == 0 || TimestampDifferenceExceeds(w->launched_at, now, 10000));
	if (launch)
		w->launched_at = now;
	SpinLockRelease(&sink_shared->mutex);
	return launch;
}

/* ---- partition slots -------------------------------------------------------- */

/* A slot for a partition the worker was assigned; -1 when all are taken. */
int
sink_part_attach(int worker, const char *sink, const char *topic, int32 partition)
{
	int			found = -1;

	LWLockAcquire(sink_shared->parts_lock, LW_EXCLUSIVE);
	for (int i = 0; i < SINK_MAX_PARTS; i++)
	{
		SinkPartSlot *p = &sink_shared->parts[i];

		if (p->worker >= 0)
			continue;
		SpinLockAcquire(&p->mutex);
		p->worker = worker;
		strlcpy(p->sink, sink, sizeof(p->sink));
		strlcpy(p->topic, topic, sizeof(p->topic));
		p->partition = partition;
		p->high = -1;
		p->low = -1;
		p->fetched = -1;
		p->oldest_unapplied = 0;
		p->updated_at = GetCurrentTimestamp();
		SpinLockRelease(&p->mutex);
		found = i;
		break;
	}
	LWLockRelease(sink_shared->parts_lock);
	return found;
}

void
sink_part_update(int slot, int64 high, int64 low, int64 fetched, TimestampTz oldest_unapplied)
{
	SinkPartSlot *p;

	if (slot < 0)
		return;
	p = &sink_shared->parts[slot];
	SpinLockAcquire(&p->mutex);
	if (high >= 0)
		p->high = high;
	if (low >= 0)
		p->low = low;
	if (fetched >= 0)
		p->fetched = fetched;
	p->oldest_unapplied = oldest_unapplied;
	p->updated_at = GetCurrentTimestamp();
	SpinLockRelease(&p->mutex);
}

void
sink_part_detach(int slot)
{
	if (slot < 0)
		return;
	LWLockAcquire(sink_shared->parts_lock, LW_EXCLUSIVE);
	sink_shared->parts[slot].worker = -1;
	LWLockRelease(sink_shared->parts_lock);
}

/* ---- SQL -------------------------------------------------------------------------- */

static const char *const state_names[] = {
	"stopped", "idle", "running", "waiting for database", "waiting for broker", "no consumer"
};

static Datum
timestamp_or_null(TimestampTz t, bool *isnull)
{
	*isnull = (t == 0);
	return TimestampTzGetDatum(t);
}

/*
 * cqrs_sink_workers(): one row per worker slot in use, and per worker
 * expected (index below cqrs_sync.sink_workers) that does not run.
 */
Datum
cqrs_sink_workers_sql(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			wanted;

	InitMaterializedSRF(fcinfo, 0);
	cqrs_check_row_layout("cqrs_sink_workers", rsinfo->setDesc, SINK_WORKERS_COLS);
	if (sink_shared == NULL)
		return (Datum) 0;

	SpinLockAcquire(&sink_shared->mutex);
	wanted = sink_shared->wanted;
	SpinLockRelease(&sink_shared->mutex);

	for (int i = 0; i < CQRS_SINK_MAX_WORKERS; i++)
	{
		SinkWorkerSlot w;
		Datum		values[SINK_WORKERS_COLS];
		bool		nulls[SINK_WORKERS_COLS];

		SpinLockAcquire(&sink_shared->mutex);
		w = sink_shared->workers[i];
		SpinLockRelease(&sink_shared->mutex);
		if (w.pid == 0 && i >= wanted)
			continue;
		if (w.pid != 0 && kill(w.pid, 0) != 0)
			w.pid = 0;			/* gone without releasing (killed) */

		memset(nulls, 0, sizeof(nulls));
		values[0] = Int32GetDatum(i);
		values[1] = Int32GetDatum(w.pid);
		nulls[1] = (w.pid == 0);
		values[2] = CStringGetTextDatum(state_names[w.pid == 0 ? SINK_STATE_STOPPED : w.state]);
		values[3] = Int32GetDatum(w.pid == 0 ? 0 : w.nsinks);
		values[4] = Int32GetDatum(w.pid == 0 ? 0 : w.nparts);
		values[5] = timestamp_or_null(w.pid == 0 ? 0 : w.started_at, &nulls[5]);
		values[6] = timestamp_or_null(w.pid == 0 ? 0 : w.waiting_since, &nulls[6]);
		values[7] = CStringGetTextDatum(w.last_error);
		nulls[7] = (w.last_error[0] == '\0');
		values[8] = timestamp_or_null(w.last_error_at, &nulls[8]);
		values[9] = Int32GetDatum(wanted);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* cqrs_sink_partitions(): the partitions this server's workers consume. */
Datum
cqrs_sink_partitions(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	cqrs_check_row_layout("cqrs_sink_partitions", rsinfo->setDesc, SINK_PARTITIONS_COLS);
	if (sink_shared == NULL)
		return (Datum) 0;

	LWLockAcquire(sink_shared->parts_lock, LW_SHARED);
	for (int i = 0; i < SINK_MAX_PARTS; i++)
	{
		SinkPartSlot p;
		pid_t		pid;
		Datum		values[SINK_PARTITIONS_COLS];
		bool		nulls[SINK_PARTITIONS_COLS];

		if (sink_shared->parts[i].worker < 0)
			continue;
		SpinLockAcquire(&sink_shared->parts[i].mutex);
		p = sink_shared->parts[i];
		SpinLockRelease(&sink_shared->parts[i].mutex);
		SpinLockAcquire(&sink_shared->mutex);
		pid = sink_shared->workers[p.worker].pid;
		SpinLockRelease(&sink_shared->mutex);

		memset(nulls, 0, sizeof(nulls));
		values[0] = CStringGetTextDatum(p.sink);
		values[1] = CStringGetTextDatum(p.topic);
		values[2] = Int32GetDatum(p.partition);
		values[3] = Int32GetDatum(pid);
		nulls[3] = (pid == 0);
		values[4] = Int64GetDatum(p.high);
		nulls[4] = (p.high < 0);
		values[5] = Int64GetDatum(p.low);
		nulls[5] = (p.low < 0);
		values[6] = Int64GetDatum(p.fetched);
		nulls[6] = (p.fetched < 0);
		values[7] = timestamp_or_null(p.oldest_unapplied, &nulls[7]);
		values[8] = timestamp_or_null(p.updated_at, &nulls[8]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(sink_shared->parts_lock);
	return (Datum) 0;
}
