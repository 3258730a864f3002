/*-------------------------------------------------------------------------
 *
 * sink_catalog.c
 *	  The sinks declared in SQL (table cqrs_sink, written by
 *	  cqrs_sink_create() and the operator functions), as the sink workers
 *	  read them: a worker reads the table again when a transaction that
 *	  changed it commits (its trigger wakes the workers, sink_stats.c) and
 *	  every few seconds, and starts, changes or stops its consumers to match
 *	  (sink_worker.c).  Defaults of the options are the settings' values at
 *	  the time of reading.  cqrs_sink_kafka_offsets() finds the offsets a
 *	  rewind to a time moves the positions to.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "cqrs_sync.h"
#include "kafka.h"
#include "sink.h"
#include "util.h"

/* The extension whose schema was looked up, and the schema, quoted. */
static Oid	schema_ext = InvalidOid;
static char *schema_quoted = NULL;

/*
 * Whether the extension exists in this database (inside a transaction).
 * Forgets the schema when it was dropped or created again.
 */
bool
sink_extension_ready(void)
{
	Oid			ext = get_extension_oid("cqrs_sync", true);

	if (ext != schema_ext)
	{
		schema_ext = ext;
		if (schema_quoted)
			pfree(schema_quoted);
		schema_quoted = NULL;
		sink_apply_reset();
	}
	return OidIsValid(ext);
}

/* The extension's schema, quoted (inside a transaction, extension ready). */
char *
sink_ext_schema(void)
{
	if (schema_quoted == NULL)
		schema_quoted = MemoryContextStrdup(TopMemoryContext,
											quote_identifier(cqrs_extension_schema(schema_ext)));
	return schema_quoted;
}

void
sink_catalog_forget(void)
{
	schema_ext = InvalidOid;
	if (schema_quoted)
		pfree(schema_quoted);
	schema_quoted = NULL;
}

static char *
col_text(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

static int
col_int(HeapTuple tup, TupleDesc desc, int col, int dflt)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? dflt : DatumGetInt32(d);
}

/* The sink of that name in a list of Sink, or NULL. */
Sink *
sink_find(List *sinks, const char *name)
{
	ListCell   *lc;

	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		if (strcmp(s->name, name) == 0)
			return s;
	}
	return NULL;
}

/*
 * The sinks of the catalog, in name order, as Sink structs allocated in cxt
 * with only their definition filled in.  Inside a transaction, SPI
 * connected, extension ready.
 */
List *
sink_catalog_load(MemoryContext cxt)
{
	char	   *sql;
	List	   *result = NIL;
	MemoryContext old;

	sql = psprintf("SELECT name, topics, pg_catalog.to_regprocedure(handler)::pg_catalog.oid, run_as, consumer, group_id, paused,"
				   " (options->>'max_retries')::pg_catalog.int4,"
				   " (options->>'retry_backoff')::pg_catalog.int4,"
				   " options->>'dlt_topic', options->>'dlt_suffix', options->>'start',"
				   " options->>'search_path', options->>'version_column',"
				   " options->'route'->>'target', options->'route'->>'version',"
				   " (options->'route'->'delete')::pg_catalog.text, changed_at, created_at, handler"
				   " FROM %s.cqrs_sink ORDER BY name",
				   sink_ext_schema());
	if (SPI_execute(sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync sink: could not read the sinks");

	old = MemoryContextSwitchTo(cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Sink	   *s = palloc0(sizeof(Sink));
		bool		isnull;
		Datum		d;
		Datum	   *elems;
		int			nelems;
		uint32		shape;

		strlcpy(s->name, col_text(tup, desc, 1), sizeof(s->name));
		d = SPI_getbinval(tup, desc, 2, &isnull);
		deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, NULL, &nelems);
		s->ntopics = nelems;
		s->topics = palloc(sizeof(char *) * nelems);
		for (int t = 0; t < nelems; t++)
			s->topics[t] = TextDatumGetCString(elems[t]);
		d = SPI_getbinval(tup, desc, 3, &isnull);
		s->handler = isnull ? InvalidOid : DatumGetObjectId(d);
		s->run_as_name = col_text(tup, desc, 4);
		s->consumer = col_text(tup, desc, 5);
		s->group_id = col_text(tup, desc, 6);
		s->paused = DatumGetBool(SPI_getbinval(tup, desc, 7, &isnull));
		s->max_retries = col_int(tup, desc, 8, cqrs_max_retries);
		s->retry_backoff_ms = col_int(tup, desc, 9, cqrs_retry_backoff_ms);
		s->dlt_topic = col_text(tup, desc, 10);
		s->dlt_suffix = col_text(tup, desc, 11);
		if (s->dlt_suffix == NULL)
			s->dlt_suffix = psprintf(".%s.DLT", s->name);
		s->start_latest = (col_text(tup, desc, 12) != NULL &&
						   strcmp(col_text(tup, desc, 12), "latest") == 0);
		s->search_path = col_text(tup, desc, 13);
		if (s->search_path == NULL)
			s->search_path = pstrdup("\"$user\", public");
		s->version_column = col_text(tup, desc, 14);
		s->route_target = col_text(tup, desc, 15);
		s->route_version = col_text(tup, desc, 16);
		if (s->route_version == NULL)
			s->route_version = pstrdup("version");
		s->route_delete = col_text(tup, desc, 17);
		s->changed_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 18, &isnull));
		s->created_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 19, &isnull));
		s->handler_name = col_text(tup, desc, 20);

		/* what the consumer depends on: its group and its subscription */
		shape = hash_bytes((const unsigned char *) s->group_id, strlen(s->group_id));
		for (int t = 0; t < s->ntopics; t++)
			shape = hash_combine(shape, hash_bytes((const unsigned char *) s->topics[t],
												   strlen(s->topics[t])));
		s->shape = shape;
		result = lappend(result, s);
	}
	MemoryContextSwitchTo(old);
	return result;
}

/*
 * cqrs_sink_kafka_offsets(topics text[], at timestamptz) -> (topic,
 * partition, offset): for cqrs_sink_rewind().  Every partition of the
 * topics and the first offset whose timestamp is at or after "at" (the end
 * of the partition if there is none; 0 for -infinity), asked of Kafka by a
 * short-lived client of this backend (cqrs_sync.brokers and the properties
 * file, as the workers use them).
 */
PG_FUNCTION_INFO_V1(cqrs_sink_kafka_offsets);

Datum
cqrs_sink_kafka_offsets(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *arr;
	TimestampTz at;
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	char	  **topics;
	CqrsPartitionOffset *offsets = NULL;
	char		errbuf[1024];
	int			n;
	bool		beginning;
	int64		at_ms;

	InitMaterializedSRF(fcinfo, 0);
	cqrs_check_row_layout("cqrs_sink_kafka_offsets", rsinfo->setDesc, 3);
	arr = PG_GETARG_ARRAYTYPE_P(0);
	at = PG_GETARG_TIMESTAMPTZ(1);
	beginning = TIMESTAMP_IS_NOBEGIN(at);
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &nelems);
	topics = palloc(sizeof(char *) * Max(nelems, 1));
	for (int i = 0; i < nelems; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("topics must not contain nulls")));
		topics[i] = TextDatumGetCString(elems[i]);
	}
	if (TIMESTAMP_IS_NOEND(at))
		at_ms = PG_INT64_MAX;
	else if (beginning)
		at_ms = 0;
	else
		at_ms = (at / 1000) + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;

	n = cqrs_kafka_offsets_for_time(topics, nelems, at_ms, beginning, 10000, &offsets,
									errbuf, sizeof(errbuf));
	if (n < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not ask Kafka for the offsets of the sink's topics: %s", errbuf),
				 errhint("Check cqrs_sync.brokers and that the topics exist.")));
	for (int i = 0; i < n; i++)
	{
		Datum		values[3];
		bool		isnull[3] = {false, false, false};

		values[0] = CStringGetTextDatum(offsets[i].topic);
		values[1] = Int32GetDatum(offsets[i].partition);
		values[2] = Int64GetDatum(offsets[i].offset);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, isnull);
	}
	return (Datum) 0;
}
