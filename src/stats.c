/*-------------------------------------------------------------------------
 *
 * stats.c
 *	  SQL access to the relay's counters in shared memory.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "shmem.h"

PG_FUNCTION_INFO_V1(cqrs_relay_state);

#define RELAY_STATE_COLS 13

/*
 * cqrs_relay_state() -> (worker_pid, events_sent, events_failed, batches,
 *						  producer_restarts, dead_lettered, dlt_failed,
 *						  last_success_at, last_error, last_error_at, state,
 *						  paused_topic, paused_reason)
 */
Datum
cqrs_relay_state(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[RELAY_STATE_COLS];
	bool		nulls[RELAY_STATE_COLS];
	TimestampTz last_success_at;
	TimestampTz last_error_at;
	char		last_error[CQRS_ERROR_LEN];
	char		paused_topic[CQRS_TOPIC_NAMELEN];
	char		paused_reason[CQRS_ERROR_LEN];
	int			state;
	pid_t		pid;
	static const char *const state_names[] = {"running", "paused", "waiting for broker"};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	memset(nulls, 0, sizeof(nulls));
	if (cqrs_shared == NULL)
	{
		/* not preloaded: no relay, no counters */
		memset(nulls, 1, sizeof(nulls));
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
	}

	SpinLockAcquire(&cqrs_shared->mutex);
	pid = cqrs_shared->relay_pid;
	last_success_at = cqrs_shared->last_success_at;
	last_error_at = cqrs_shared->last_error_at;
	memcpy(last_error, cqrs_shared->last_error, CQRS_ERROR_LEN);
	state = cqrs_shared->relay_state;
	memcpy(paused_topic, cqrs_shared->paused_topic, CQRS_TOPIC_NAMELEN);
	memcpy(paused_reason, cqrs_shared->paused_reason, CQRS_ERROR_LEN);
	SpinLockRelease(&cqrs_shared->mutex);

	values[0] = Int32GetDatum(pid);
	nulls[0] = (pid == 0);
	values[1] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->events_sent));
	values[2] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->events_failed));
	values[3] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->batches));
	values[4] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->producer_restarts));
	values[5] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->dead_lettered));
	values[6] = Int64GetDatum(pg_atomic_read_u64(&cqrs_shared->dlt_failed));
	values[7] = TimestampTzGetDatum(last_success_at);
	nulls[7] = (last_success_at == 0);
	values[8] = CStringGetTextDatum(last_error);
	nulls[8] = (last_error[0] == '\0');
	values[9] = TimestampTzGetDatum(last_error_at);
	nulls[9] = (last_error_at == 0);
	if (pid == 0)
		values[10] = CStringGetTextDatum("stopped");
	else
		values[10] = CStringGetTextDatum(state_names[Min(Max(state, 0), 2)]);
	values[11] = CStringGetTextDatum(paused_topic);
	nulls[11] = (pid == 0 || paused_topic[0] == '\0');
	values[12] = CStringGetTextDatum(paused_reason);
	nulls[12] = (pid == 0 || paused_reason[0] == '\0');

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
