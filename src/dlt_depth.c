/*-------------------------------------------------------------------------
 *
 * dlt_depth.c
 *	  Dead-letter topic depth: the monitor worker asks Kafka for the low and
 *	  high watermark offsets of every partition of the dead-letter topics it
 *	  knows of and publishes them in shared memory; cqrs_dlt_depth() (the
 *	  cqrs_dlt_depth view) reads them.  An operator sees from SQL, and an
 *	  exporter from there, whether any dead-letter topic holds messages.
 *
 *	  Figures that are not refreshed must not look like "no messages": a
 *	  round that Kafka does not answer changes nothing (the figures stay,
 *	  with their checked_at), a partition whose watermarks cannot be read
 *	  keeps its last figure, and the time of the last round Kafka answered
 *	  and the error of the last failure are kept too.  cqrs_dlt_depth_state()
 *	  (the cqrs_stats_dlt_depth view) shows how old the figures are, so that
 *	  an alert can say they are stale.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "postmaster/interrupt.h"
#include "storage/pmsignal.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "cqrs_sync.h"
#include "dlt_depth.h"
#include "shmem.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_dlt_depth);
PG_FUNCTION_INFO_V1(cqrs_dlt_depth_state);

/* Columns of cqrs_dlt_depth_state() */
#define DLT_DEPTH_STATE_COLS 7

/* A slow or absent broker delays only the monitor worker's next round. */
#define DEPTH_TIMEOUT_MS 1000

/*
 * Publish a round's figures (n of them, for ntopics topics), answered at
 * `at` (0: not answered in full, the time of the last round that was stays).
 */
static void
publish_round(CqrsDltPartition *found, int n, int ntopics, TimestampTz at,
			  const char *error)
{
	LWLockAcquire(cqrs_shared->dlt_lock, LW_EXCLUSIVE);
	memcpy(cqrs_shared->dlt, found, sizeof(CqrsDltPartition) * n);
	cqrs_shared->ndlt = n;
	cqrs_shared->dlt_topics = ntopics;
	if (at != 0)
		cqrs_shared->dlt_round_at = at;
	strlcpy(cqrs_shared->dlt_error, error ? error : "", CQRS_ERROR_LEN);
	LWLockRelease(cqrs_shared->dlt_lock);
}

/*
 * A round that Kafka did not answer (or that could not be made): the
 * figures stay as they are, older with every round; the error says why.
 */
void
cqrs_dlt_depth_failed(const char *error)
{
	LWLockAcquire(cqrs_shared->dlt_lock, LW_EXCLUSIVE);
	strlcpy(cqrs_shared->dlt_error, error, CQRS_ERROR_LEN);
	LWLockRelease(cqrs_shared->dlt_lock);
}

/*
 * Each watermark query may wait DEPTH_TIMEOUT_MS: with many partitions led by
 * a broker that does not answer, a round lasts minutes.  A stop, or the
 * postmaster's death, ends it between two queries.
 */
static bool
round_interrupted(void)
{
	return ShutdownRequestPending || !PostmasterIsAlive();
}

/*
 * Keep the previous figures of a topic's partitions (partition -1: all of
 * them) that this round could not read: they stay, and age.
 */
static void
keep_previous(CqrsDltPartition *prev, int nprev, const char *topic, int32 partition,
			  CqrsDltPartition *found, int *n)
{
	for (int i = 0; i < nprev && *n < CQRS_DLT_MAX; i++)
		if ((partition < 0 || prev[i].partition == partition) &&
			strcmp(prev[i].topic, topic) == 0)
			found[(*n)++] = prev[i];
}

/* Is name in list (of C strings)? */
static bool
listed(List *list, const char *name)
{
	ListCell   *lc;

	foreach(lc, list)
		if (strcmp(lfirst(lc), name) == 0)
			return true;
	return false;
}

/*
 * Ask Kafka for the watermarks of the partitions of the given topics (a
 * List of C strings, duplicates allowed) and publish them.  A partition
 * whose watermarks cannot be read keeps its previous figure (and its
 * checked_at); when the metadata request fails, nothing changes but the
 * error.  No topic to watch is a round too: there is nothing to be stale.
 * A round interrupted by a stop publishes nothing.
 *
 * A topic of required (the DLTs of the outbox's DEAD_LETTERED rows, and
 * those named in cqrs_sync.read_side_dlt_topics) that Kafka's metadata does
 * not show, or shows with an error, is not measured: its previous figures
 * stay and age, the error names it, and the round does not count as
 * answered, so that the figures go stale (CqrsSyncDltDepthStale) instead of
 * looking like "no messages".  So does a round with more partitions than
 * CQRS_DLT_MAX, or a partition whose watermarks were never read.  Other
 * topics (remembered from earlier rounds) shown with an error keep their
 * figures the same way; those Kafka no longer shows were deleted, with
 * their messages: they are left out.
 */
void
cqrs_dlt_depth_refresh(rd_kafka_t *rk, List *topics, List *required)
{
	const struct rd_kafka_metadata *md = NULL;
	CqrsDltPartition *found;
	CqrsDltPartition *prev;
	int			nprev;
	int			n = 0;
	List	   *distinct = NIL;
	char	   *error = NULL;
	bool		incomplete = false;
	TimestampTz now = GetCurrentTimestamp();
	rd_kafka_resp_err_t err;
	ListCell   *lc;

	foreach(lc, topics)
		if (!listed(distinct, lfirst(lc)))
			distinct = lappend(distinct, lfirst(lc));
	if (distinct == NIL)
	{
		publish_round(NULL, 0, 0, now, NULL);
		return;
	}
	if (rk == NULL)
		return;

	/* all topics: asking for one by name could auto-create it */
	err = rd_kafka_metadata(rk, 1, NULL, &md, DEPTH_TIMEOUT_MS);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		cqrs_dlt_depth_failed(psprintf("Kafka did not answer the metadata request: %s",
									   rd_kafka_err2str(err)));
		return;
	}

	prev = palloc(sizeof(CqrsDltPartition) * CQRS_DLT_MAX);
	LWLockAcquire(cqrs_shared->dlt_lock, LW_SHARED);
	nprev = cqrs_shared->ndlt;
	memcpy(prev, cqrs_shared->dlt, sizeof(CqrsDltPartition) * nprev);
	LWLockRelease(cqrs_shared->dlt_lock);

	found = palloc0(sizeof(CqrsDltPartition) * CQRS_DLT_MAX);
	foreach(lc, distinct)
	{
		const char *name = lfirst(lc);
		const struct rd_kafka_metadata_topic *mt = NULL;

		for (int t = 0; t < md->topic_cnt && mt == NULL; t++)
			if (strcmp(md->topics[t].topic, name) == 0)
				mt = &md->topics[t];
		if (mt == NULL || mt->err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			/*
			 * A topic deleted since it was seen is not in the reply at all;
			 * one with an error (no leader yet, a broker away) is there, and
			 * keeps its figures like a required one.
			 */
			if (mt == NULL && !listed(required, name))
				continue;
			keep_previous(prev, nprev, name, -1, found, &n);
			if (error == NULL)
				error = mt == NULL ?
					psprintf("dead-letter topic \"%s\" is not in Kafka's metadata: it does not exist, or the monitor may not describe it",
							 name) :
					psprintf("Kafka reports an error for dead-letter topic \"%s\": %s",
							 name, rd_kafka_err2str(mt->err));
			incomplete = true;
			continue;
		}
		if (n + mt->partition_cnt > CQRS_DLT_MAX)
		{
			if (!incomplete)
				error = psprintf("the dead-letter topics have more than %d partitions: from \"%s\" on they are not measured",
								 CQRS_DLT_MAX, name);
			incomplete = true;
		}
		for (int p = 0; p < mt->partition_cnt && n < CQRS_DLT_MAX; p++)
		{
			int32		part = mt->partitions[p].id;
			int64_t		low,
						high;

			if (round_interrupted())
			{
				rd_kafka_metadata_destroy(md);
				pfree(found);
				pfree(prev);
				return;
			}
			err = rd_kafka_query_watermark_offsets(rk, name, part, &low, &high,
												   DEPTH_TIMEOUT_MS);
			if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			{
				int			before = n;

				keep_previous(prev, nprev, name, part, found, &n);
				if (error == NULL)
					error = psprintf("Kafka did not answer for the watermarks of %s[%d]: %s",
									 name, part, rd_kafka_err2str(err));
				/* never measured: its messages would not count anywhere */
				if (n == before)
					incomplete = true;
				continue;
			}
			strlcpy(found[n].topic, name, CQRS_TOPIC_NAMELEN);
			found[n].partition = part;
			found[n].low = low;
			found[n].high = high;
			found[n].checked_at = now;
			n++;
		}
	}
	rd_kafka_metadata_destroy(md);

	/* an incomplete round does not count as answered: its figures go stale */
	publish_round(found, n, list_length(distinct), incomplete ? 0 : now, error);
	pfree(found);
	pfree(prev);
}

/*
 * cqrs_dlt_depth() -> setof (topic, partition, low_offset, high_offset,
 *							  messages, checked_at)
 */
#define DLT_DEPTH_COLS 6

Datum
cqrs_dlt_depth(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	CqrsDltPartition *copy;
	int			n;

	InitMaterializedSRF(fcinfo, 0);
	/* the layout of 0.1.0 and 0.2.0; a new one gets a new symbol */
	cqrs_check_row_layout("cqrs_dlt_depth_partitions", rsinfo->setDesc, DLT_DEPTH_COLS);
	if (cqrs_shared == NULL)
		PG_RETURN_VOID();

	copy = palloc(sizeof(CqrsDltPartition) * CQRS_DLT_MAX);
	LWLockAcquire(cqrs_shared->dlt_lock, LW_SHARED);
	n = cqrs_shared->ndlt;
	memcpy(copy, cqrs_shared->dlt, sizeof(CqrsDltPartition) * n);
	LWLockRelease(cqrs_shared->dlt_lock);

	for (int i = 0; i < n; i++)
	{
		Datum		values[DLT_DEPTH_COLS];
		bool		nulls[DLT_DEPTH_COLS] = {0};

		values[0] = CStringGetTextDatum(copy[i].topic);
		values[1] = Int32GetDatum(copy[i].partition);
		values[2] = Int64GetDatum(copy[i].low);
		values[3] = Int64GetDatum(copy[i].high);
		values[4] = Int64GetDatum(copy[i].high - copy[i].low);
		values[5] = TimestampTzGetDatum(copy[i].checked_at);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}

/*
 * cqrs_dlt_depth_state() -> (checked_at, oldest_checked_at, interval_seconds,
 *							  topics, partitions, monitor_pid, last_error)
 *
 * How fresh the dead-letter topic depths are: when Kafka last answered a
 * round (NULL: not since the server started), the oldest figure, the poll
 * interval, what is watched, whether the monitor worker runs, and why the
 * last round or a partition failed.
 */
Datum
cqrs_dlt_depth_state(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[DLT_DEPTH_STATE_COLS];
	bool		nulls[DLT_DEPTH_STATE_COLS];
	TimestampTz round_at;
	TimestampTz oldest = 0;
	int			ntopics;
	int			n;
	pid_t		pid;
	char		error[CQRS_ERROR_LEN];

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	cqrs_check_row_layout("cqrs_dlt_depth_state", tupdesc, DLT_DEPTH_STATE_COLS);

	memset(nulls, 0, sizeof(nulls));
	if (cqrs_shared == NULL)
	{
		/* not preloaded: no monitor worker, no figures */
		memset(nulls, 1, sizeof(nulls));
		values[2] = Float8GetDatum(cqrs_dlt_depth_interval_ms / 1000.0);
		nulls[2] = false;
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
	}

	LWLockAcquire(cqrs_shared->dlt_lock, LW_SHARED);
	round_at = cqrs_shared->dlt_round_at;
	ntopics = cqrs_shared->dlt_topics;
	n = cqrs_shared->ndlt;
	for (int i = 0; i < n; i++)
		if (oldest == 0 || cqrs_shared->dlt[i].checked_at < oldest)
			oldest = cqrs_shared->dlt[i].checked_at;
	pid = cqrs_shared->monitor_pid;
	memcpy(error, cqrs_shared->dlt_error, CQRS_ERROR_LEN);
	LWLockRelease(cqrs_shared->dlt_lock);

	values[0] = TimestampTzGetDatum(round_at);
	nulls[0] = (round_at == 0);
	values[1] = TimestampTzGetDatum(oldest);
	nulls[1] = (oldest == 0);
	values[2] = Float8GetDatum(cqrs_dlt_depth_interval_ms / 1000.0);
	values[3] = Int32GetDatum(ntopics);
	values[4] = Int32GetDatum(n);
	values[5] = Int32GetDatum(pid);
	nulls[5] = (pid == 0);
	values[6] = CStringGetTextDatum(error);
	nulls[6] = (error[0] == '\0');
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
