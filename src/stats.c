/*-------------------------------------------------------------------------
 *
 * stats.c
 *	  SQL access to the relay's counters, timers and state in shared memory.
 *
 * The result's layout is versioned the way pg_stat_statements does it: one
 * C symbol per layout, so that the SQL definition of an older extension
 * version (before ALTER EXTENSION ... UPDATE) never reads a newer row.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "shmem.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_relay_state);
PG_FUNCTION_INFO_V1(cqrs_relay_state_0_2);

typedef enum RelayStateVersion
{
	RELAY_STATE_V0_1,
	RELAY_STATE_V0_2
} RelayStateVersion;

#define RELAY_STATE_COLS_V0_1	13
#define RELAY_STATE_COLS_V0_2	27
#define RELAY_STATE_COLS		27	/* the most of any version */

static const char *const state_names[CQRS_RELAY_NSTATES] = {
	"running", "paused", "waiting for broker", "partition stalled",
	"recording failed", "no producer", "waiting for standby"
};

static Datum
relay_state(FunctionCallInfo fcinfo, RelayStateVersion version)
{
	TupleDesc	tupdesc;
	Datum		values[RELAY_STATE_COLS];
	bool		nulls[RELAY_STATE_COLS];
	int			ncols = (version == RELAY_STATE_V0_1) ?
		RELAY_STATE_COLS_V0_1 : RELAY_STATE_COLS_V0_2;
	TimestampTz last_success_at;
	TimestampTz last_error_at;
	char		last_error[CQRS_ERROR_LEN];
	char		paused_topic[CQRS_TOPIC_NAMELEN];
	char		paused_reason[CQRS_ERROR_LEN];
	char		stalled[CQRS_STALLED_LEN];
	int			stalled_count;
	int64		ack_wait_max_us;
	int64		window;
	int			state;
	pid_t		pid;
	Oid			dboid;
	char	   *dbname;
	int			i = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	cqrs_check_row_layout("cqrs_relay_state", tupdesc, ncols);

	memset(nulls, 0, sizeof(nulls));
	if (cqrs_shared == NULL)
	{
		/* not preloaded: no relay, no counters */
		memset(nulls, 1, sizeof(nulls));
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
	}

	SpinLockAcquire(&cqrs_shared->mutex);
	pid = cqrs_shared->relay_pid;
	dboid = cqrs_shared->relay_dboid;
	last_success_at = cqrs_shared->last_success_at;
	last_error_at = cqrs_shared->last_error_at;
	memcpy(last_error, cqrs_shared->last_error, CQRS_ERROR_LEN);
	state = cqrs_shared->relay_state;
	memcpy(paused_topic, cqrs_shared->paused_topic, CQRS_TOPIC_NAMELEN);
	memcpy(paused_reason, cqrs_shared->paused_reason, CQRS_ERROR_LEN);
	memcpy(stalled, cqrs_shared->stalled, CQRS_STALLED_LEN);
	stalled_count = cqrs_shared->stalled_count;
	ack_wait_max_us = cqrs_shared->ack_wait_max_us;
	window = cqrs_shared->window;
	SpinLockRelease(&cqrs_shared->mutex);

	values[i] = Int32GetDatum(pid);
	nulls[i++] = (pid == 0);
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->events_sent));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->events_failed));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->batches));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->producer_restarts));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->dead_lettered));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->dlt_failed));
	values[i] = TimestampTzGetDatum(last_success_at);
	nulls[i++] = (last_success_at == 0);
	values[i] = CStringGetTextDatum(last_error);
	nulls[i++] = (last_error[0] == '\0');
	values[i] = TimestampTzGetDatum(last_error_at);
	nulls[i++] = (last_error_at == 0);
	if (pid == 0)
		values[i++] = CStringGetTextDatum("stopped");
	else
		values[i++] = CStringGetTextDatum(state_names[Min(Max(state, 0), CQRS_RELAY_NSTATES - 1)]);
	values[i] = CStringGetTextDatum(paused_topic);
	nulls[i++] = (pid == 0 || paused_topic[0] == '\0');
	values[i] = CStringGetTextDatum(paused_reason);
	nulls[i++] = (pid == 0 || paused_reason[0] == '\0');

	if (version >= RELAY_STATE_V0_2)
	{
		uint64		acks = pg_atomic_read_u64(&cqrs_shared->acks);

		values[i] = CStringGetTextDatum(stalled);
		nulls[i++] = (pid == 0 || stalled[0] == '\0');
		values[i] = Int32GetDatum(stalled_count);
		nulls[i++] = (pid == 0);
		values[i] = Int64GetDatum(window);
		nulls[i++] = (pid == 0);
		values[i++] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->transactions));
		values[i++] = Int64GetDatum(acks);
		values[i++] = Float8GetDatum(pg_atomic_read_u64(&cqrs_shared->ack_wait_us) / 1e6);
		values[i++] = Float8GetDatum(ack_wait_max_us / 1e3);
		for (int p = 0; p < CQRS_NPHASES; p++)
			values[i++] = Float8GetDatum(pg_atomic_read_u64(&cqrs_shared->phase_us[p]) / 1e6);
		dbname = (pid != 0 && OidIsValid(dboid)) ? get_database_name(dboid) : NULL;
		values[i] = dbname ? CStringGetTextDatum(dbname) : (Datum) 0;
		nulls[i++] = (dbname == NULL);
	}
	Assert(i == ncols);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* The layout of version 0.1.0 (13 columns). */
Datum
cqrs_relay_state(PG_FUNCTION_ARGS)
{
	return relay_state(fcinfo, RELAY_STATE_V0_1);
}

/*
 * Version 0.2.0: also stalled_partitions and their count, window,
 * transactions, acks, ack_wait_seconds, ack_wait_max_ms, the seconds spent
 * per phase (record, claim, commit, flush, produce, poll) and the database
 * the relay runs in.
 */
Datum
cqrs_relay_state_0_2(PG_FUNCTION_ARGS)
{
	return relay_state(fcinfo, RELAY_STATE_V0_2);
}
