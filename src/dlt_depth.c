/*-------------------------------------------------------------------------
 *
 * dlt_depth.c
 *	  Dead-letter topic depth: the monitor worker asks Kafka for the low and
 *	  high watermark offsets of every partition of the dead-letter topics it
 *	  knows of and publishes them in shared memory; cqrs_dlt_depth() (the
 *	  cqrs_dlt_depth view) reads them.  An operator sees from SQL, and an
 *	  exporter from there, whether any dead-letter topic holds messages.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "dlt_depth.h"
#include "shmem.h"

PG_FUNCTION_INFO_V1(cqrs_dlt_depth);

/* A slow or absent broker delays only the monitor worker's next round. */
#define DEPTH_TIMEOUT_MS 1000

/*
 * Ask Kafka for the watermarks of the partitions of the given topics (a
 * List of C strings) and publish them.  Topics Kafka does not know are left
 * out; so is everything when the metadata request fails (the previous
 * figures stay, with their checked_at).
 */
void
cqrs_dlt_depth_refresh(rd_kafka_t *rk, List *topics)
{
	const struct rd_kafka_metadata *md = NULL;
	CqrsDltPartition *found;
	int			n = 0;
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;

	if (rk == NULL || topics == NIL)
		return;
	/* all topics: asking for one by name could auto-create it */
	if (rd_kafka_metadata(rk, 1, NULL, &md, DEPTH_TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return;

	found = palloc0(sizeof(CqrsDltPartition) * CQRS_DLT_MAX);
	foreach(lc, topics)
	{
		const char *name = lfirst(lc);

		for (int t = 0; t < md->topic_cnt; t++)
		{
			const struct rd_kafka_metadata_topic *mt = &md->topics[t];

			if (strcmp(mt->topic, name) != 0 || mt->err != RD_KAFKA_RESP_ERR_NO_ERROR)
				continue;
			for (int p = 0; p < mt->partition_cnt && n < CQRS_DLT_MAX; p++)
			{
				int64_t		low,
							high;

				if (rd_kafka_query_watermark_offsets(rk, name, mt->partitions[p].id,
													 &low, &high, DEPTH_TIMEOUT_MS) !=
					RD_KAFKA_RESP_ERR_NO_ERROR)
					continue;
				strlcpy(found[n].topic, name, CQRS_TOPIC_NAMELEN);
				found[n].partition = mt->partitions[p].id;
				found[n].low = low;
				found[n].high = high;
				found[n].checked_at = now;
				n++;
			}
		}
	}
	rd_kafka_metadata_destroy(md);

	LWLockAcquire(cqrs_shared->dlt_lock, LW_EXCLUSIVE);
	memcpy(cqrs_shared->dlt, found, sizeof(CqrsDltPartition) * n);
	cqrs_shared->ndlt = n;
	LWLockRelease(cqrs_shared->dlt_lock);
	pfree(found);
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
	if (rsinfo->setDesc->natts != DLT_DEPTH_COLS)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("cqrs_dlt_depth_partitions() returns %d columns, the library expected %d",
						rsinfo->setDesc->natts, DLT_DEPTH_COLS),
				 errhint("Run ALTER EXTENSION cqrs_sync UPDATE.")));
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
