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
#include "common/hashfn.h"
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
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cqrs_sync.h"
#include "dlt_depth.h"
#include "enqueue.h"
#include "kafka.h"
#include "relay_worker.h"
#include "shmem.h"
#include "topics.h"
#include "util.h"

PGDLLEXPORT void cqrs_relay_main(Datum main_arg);

/* How long a shutting-down relay waits for messages in flight. */
#define SHUTDOWN_FLUSH_MS	5000
/* A batch unacknowledged this long means Kafka is unreachable (state). */
#define WAITING_BROKER_MS	5000

typedef enum RowFate
{
	ROW_HELD,					/* not produced: an earlier row of its key waits */
	ROW_PRODUCED,				/* handed to the producer */
	ROW_SENT,					/* acknowledged, to be marked SENT */
	ROW_FAILED,					/* failure to record */
	ROW_REDO,					/* acknowledged, but an earlier row of its key
								 * failed: stays PENDING and is sent again
								 * after that row */
	ROW_TO_DLT,					/* retry budget spent: to the dead-letter topic */
	ROW_DEAD,					/* acknowledged by the dead-letter topic */
	ROW_DLT_FAILED				/* the dead-letter topic refused it too */
} RowFate;

typedef struct RelayRow
{
	CqrsMessage msg;
	uint64		keyhash;		/* the key's hash, as the in-flight registry has it */
	uint64		holdhash;		/* hash of (topic, key): the unit of ordering */
	int			retry_count;
	bool		waiting;		/* next_attempt_at is in the future */
	TimestampTz next_attempt_at;
	RowFate		fate;
	CqrsTopic  *topic;			/* the relay's state of msg.topic */
	char	   *error_text;		/* why it failed, when not librdkafka's text */
	char	   *dlt_error;		/* why the dead-letter publish failed */
	bool		newly_paused;	/* its failure paused its topic */
	struct RelayRow *source;	/* a dead-letter message: the row it carries */
} RelayRow;

/* SQLSTATEs of the relay's alerts (class CQ: cqrs_sync) */
#define CQRS_ERRCODE_DLT_FAILED		MAKE_SQLSTATE('C','Q','0','0','1')
#define CQRS_ERRCODE_TOPIC_PAUSED	MAKE_SQLSTATE('C','Q','0','0','2')

static rd_kafka_t *producer = NULL;
static int	producer_batch_bytes = 1000000; /* librdkafka's batch.size default */

/* Plans, prepared once for the extension's schema. */
static Oid	plans_ext = InvalidOid;
static SPIPlanPtr hw_plan = NULL;
static SPIPlanPtr scan_plan = NULL;
static SPIPlanPtr sent_plan = NULL;
static SPIPlanPtr sent_delete_plan = NULL;
static SPIPlanPtr fail_plan = NULL;
static SPIPlanPtr dead_plan = NULL;
static SPIPlanPtr dltfail_plan = NULL;
static SPIPlanPtr pause_plan = NULL;
static SPIPlanPtr dlt_topics_plan = NULL;

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
	cqrs_register_worker("cqrs_relay_main", "cqrs_sync relay", 1);
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
	Oid			dead_types[3] = {INT8ARRAYOID, INT4ARRAYOID, TEXTARRAYOID};
	Oid			pause_types[3] = {TEXTOID, TEXTOID, INT4OID};

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
		SPI_freeplan(sent_delete_plan);
		SPI_freeplan(fail_plan);
		SPI_freeplan(dead_plan);
		SPI_freeplan(dltfail_plan);
		SPI_freeplan(pause_plan);
		SPI_freeplan(dlt_topics_plan);
	}
	hw_plan = cqrs_keep_plan(psprintf("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM %s",
								 seq), 0, NULL);
	scan_plan = cqrs_keep_plan(psprintf(
								   "SELECT id, event_id::text, topic, key, payload::text, headers,"
								   " retry_count, coalesce(next_attempt_at > now(), false),"
								   " next_attempt_at"
								   " FROM %s WHERE status = 'PENDING' AND id > $1 AND id <= $2"
								   " ORDER BY id LIMIT $3", outbox),
						  3, scan_types);
	sent_plan = cqrs_keep_plan(psprintf(
								   "UPDATE %s SET status = 'SENT', sent_at = $2,"
								   " next_attempt_at = NULL, last_error = NULL"
								   " WHERE id = ANY ($1) AND status = 'PENDING'", outbox),
						  2, sent_types);
	sent_delete_plan = cqrs_keep_plan(psprintf(
										  "DELETE FROM %s WHERE id = ANY ($1) AND status = 'PENDING'",
										  outbox),
								 1, sent_types);
	fail_plan = cqrs_keep_plan(psprintf(
								   "UPDATE %s o SET retry_count = o.retry_count + f.inc,"
								   " next_attempt_at = now() + f.delay_ms * interval '1 millisecond',"
								   " last_error = f.err"
								   " FROM unnest($1, $2, $3, $4) AS f(id, inc, delay_ms, err)"
								   " WHERE o.id = f.id AND o.status = 'PENDING'", outbox),
						  4, fail_types);
	dead_plan = cqrs_keep_plan(psprintf(
								   "UPDATE %s o SET status = 'DEAD_LETTERED', retry_count = f.cnt,"
								   " last_error = f.err, next_attempt_at = NULL"
								   " FROM unnest($1, $2, $3) AS f(id, cnt, err)"
								   " WHERE o.id = f.id AND o.status = 'PENDING'", outbox),
						  3, dead_types);
	dltfail_plan = cqrs_keep_plan(psprintf(
									  "WITH u AS (UPDATE %s o SET status = 'DLT_FAILED', retry_count = f.cnt,"
									  " dlt_retry_count = o.dlt_retry_count + 1,"
									  " last_error = f.err, next_attempt_at = NULL"
									  " FROM unnest($1, $2, $3) AS f(id, cnt, err)"
									  " WHERE o.id = f.id AND o.status = 'PENDING'"
									  " RETURNING o.id, o.event_id, o.topic, o.key, o.dlt_retry_count, f.err)"
									  " SELECT pg_catalog.pg_notify('cqrs_sync_alert',"
									  " pg_catalog.json_build_object('alert', 'dlt_failed', 'outbox_id', id,"
									  " 'event_id', event_id, 'topic', topic, 'key', key,"
									  " 'dlt_retry_count', dlt_retry_count,"
									  " 'error', pg_catalog.left(err, 2000))::text) FROM u", outbox),
							 3, dead_types);
	pause_plan = cqrs_keep_plan("SELECT pg_catalog.pg_notify('cqrs_sync_alert',"
						   " pg_catalog.json_build_object('alert', 'topic_paused', 'topic', $1,"
						   " 'error', pg_catalog.left($2, 2000), 'paused_for_ms', $3)::text)",
						   3, pause_types);
	dlt_topics_plan = cqrs_keep_plan(psprintf(
										 "SELECT DISTINCT topic || pg_catalog.current_setting('cqrs_sync.dlt_suffix')"
										 " FROM %s WHERE status = 'DEAD_LETTERED'", outbox),
								0, NULL);
	plans_ext = ext;
	return true;
}

/* A set of 64-bit hashes (held, refused or failed keys) in memory context cxt. */
static HTAB *
key_set_create(const char *name, MemoryContext cxt)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(uint64);
	ctl.hcxt = cxt;
	return hash_create(name, 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
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
	MemoryContextReset(round_ctx);
	held_keys = key_set_create("cqrs_sync held keys", round_ctx);
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
		row->holdhash = hash_combine64(cqrs_key_hash(msg->topic, strlen(msg->topic)),
									   row->keyhash);
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

			if (key_held(row->holdhash))
				row->fate = ROW_HELD;
			else if (row->waiting ||
					 cqrs_inflight_holds(inflight, ninflight, row->msg.id, row->keyhash))
			{
				row->fate = ROW_HELD;
				hold_key(row->holdhash);
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

/* The Kafka settings changed: what was learned of the topics may be wrong. */
static void
forget_kafka_state(void)
{
	cqrs_topics_forget_limits();
	producer_batch_bytes = 1000000;
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
	TimestampTz started = GetCurrentTimestamp();
	bool		said_waiting = false;

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
		{
			if (said_waiting)
				cqrs_relay_set_state(CQRS_RELAY_RUNNING, NULL, NULL);
			return;
		}
		if (!said_waiting &&
			TimestampDifferenceExceeds(started, GetCurrentTimestamp(), WAITING_BROKER_MS))
		{
			/* an outage: the batch waits, nothing fails */
			cqrs_relay_set_state(CQRS_RELAY_WAITING_BROKER, NULL,
								 cqrs_shared->last_error);
			said_waiting = true;
		}

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
				forget_kafka_state();
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

static char *
describe_error(RelayRow *row)
{
	if (row->error_text)
		return row->error_text;
	return psprintf("%s: %s", rd_kafka_err2name(row->msg.err),
					rd_kafka_err2str(row->msg.err));
}

/*
 * Fail a message before it reaches the producer (it alone exceeds its
 * topic's limit): the same outcome as the broker's MSG_SIZE_TOO_LARGE,
 * without poisoning a batch of other messages.
 */
static void
fail_locally(RelayRow *row, rd_kafka_resp_err_t err, char *text)
{
	row->msg.done = true;
	row->msg.err = err;
	row->error_text = text;
}

/*
 * Learn the limits of the batch's topics and keep the producer's batches
 * below the smallest.  No message is in flight between batches, so the
 * producer can be re-created here.
 */
static void
apply_topic_limits(RelayRow *rows, uint64 nrows)
{
	int			min_limit;

	for (uint64 i = 0; i < nrows; i++)
		if (rows[i].fate == ROW_PRODUCED && !rows[i].msg.done)
			rows[i].topic = cqrs_topic(rows[i].msg.topic);
	for (uint64 i = 0; i < nrows; i++)
		if (rows[i].fate == ROW_PRODUCED && !rows[i].msg.done)
			(void) cqrs_topic_limit(producer, rows[i].topic);

	min_limit = cqrs_topics_min_limit();
	if (min_limit > 0 && min_limit < producer_batch_bytes)
	{
		char		errbuf[1024];
		rd_kafka_t *rk;

		rk = cqrs_kafka_create(min_limit, errbuf, sizeof(errbuf));
		if (rk == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("cqrs_sync relay: %s", errbuf)));
		ereport(LOG,
				(errmsg("cqrs_sync relay: a topic accepts record batches of at most %d bytes; producer batch.size lowered to it",
						min_limit)));
		cqrs_kafka_destroy(producer, 0);
		producer = rk;
		producer_batch_bytes = min_limit;
	}
}

/*
 * Produce the rows whose fate is ROW_PRODUCED, in id order.  A row whose
 * key already failed in this batch is held; a paused topic's rows are held;
 * a message larger than its topic accepts fails without being produced.
 * Returns how many rows got an outcome to wait for.
 */
static int
produce_rows(RelayRow *rows, uint64 nrows)
{
	HTAB	   *refused_keys = key_set_create("cqrs_sync refused keys",
												  CurrentMemoryContext);
	int			nproduced = 0;
	TimestampTz now = GetCurrentTimestamp();

	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];
		rd_kafka_resp_err_t err;
		int			limit;
		int			size;

		if (row->fate != ROW_PRODUCED)
			continue;
		if (row->msg.done)
		{
			/* failed before it got here (e.g. no valid dead-letter topic) */
			nproduced++;
			continue;
		}
		if (row->topic == NULL)
			row->topic = cqrs_topic(row->msg.topic);
		if (hash_search(refused_keys, &row->holdhash, HASH_FIND, NULL))
		{
			/* an earlier row of this key could not even be queued */
			row->fate = ROW_HELD;
			continue;
		}
		if (cqrs_topic_paused(row->topic, now))
		{
			row->fate = ROW_HELD;
			hold_key(row->holdhash);
			if (round_wake_at == 0 || row->topic->paused_until < round_wake_at)
				round_wake_at = row->topic->paused_until;
			continue;
		}

		nproduced++;
		limit = row->topic->limit;
		size = cqrs_kafka_message_size(&row->msg);
		if (limit > 0 && size > limit)
			limit = cqrs_topic_refresh_limit(producer, row->topic);
		if (limit > 0 && size > limit)
		{
			fail_locally(row, RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
						 psprintf("MSG_SIZE_TOO_LARGE: message of %d bytes exceeds max.message.bytes %d of topic \"%s\"",
								  size, limit, row->msg.topic));
			hash_search(refused_keys, &row->holdhash, HASH_ENTER, NULL);
			continue;
		}
		while ((err = cqrs_kafka_produce(producer, &row->msg)) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(producer, 10);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			fail_locally(row, err, NULL);
			hash_search(refused_keys, &row->holdhash, HASH_ENTER, NULL);
		}
	}
	return nproduced;
}

/*
 * Publish the rows that spent their retry budget to their dead-letter
 * topics: same key and value, the row's headers plus x-original-topic,
 * x-failure-source, x-retry-count and x-last-error (and event_id).  Their
 * fate becomes ROW_DEAD (acknowledged), ROW_DLT_FAILED (the dead-letter
 * topic refused it too) or, when the attempt was interrupted (fatal producer
 * error, shutdown, reload), ROW_FAILED: the row stays PENDING.
 */
static void
dead_letter(RelayRow *rows, uint64 nrows)
{
	RelayRow   *dlt;
	int			ndlt = 0;
	int			nproduced;

	for (uint64 i = 0; i < nrows; i++)
		if (rows[i].fate == ROW_TO_DLT)
			ndlt++;
	if (ndlt == 0)
		return;

	dlt = palloc0(sizeof(RelayRow) * ndlt);
	ndlt = 0;
	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];
		RelayRow   *d;
		CqrsMessage *m;
		int			nh = row->msg.nheaders;

		if (row->fate != ROW_TO_DLT)
			continue;
		d = &dlt[ndlt++];
		d->source = row;
		d->fate = ROW_PRODUCED;
		d->keyhash = row->keyhash;
		d->holdhash = row->holdhash;
		m = &d->msg;
		*m = row->msg;
		m->done = false;
		m->err = RD_KAFKA_RESP_ERR_NO_ERROR;
		m->topic = psprintf("%s%s", row->msg.topic, cqrs_dlt_suffix);
		m->nheaders = nh + 4;
		m->header_names = palloc(sizeof(char *) * (nh + 4));
		m->header_values = palloc(sizeof(char *) * (nh + 4));
		for (int h = 0; h < nh; h++)
		{
			m->header_names[h] = row->msg.header_names[h];
			m->header_values[h] = row->msg.header_values[h];
		}
		m->header_names[nh] = "x-original-topic";
		m->header_values[nh] = row->msg.topic;
		m->header_names[nh + 1] = "x-failure-source";
		m->header_values[nh + 1] = "OUTBOX_RELAY";
		m->header_names[nh + 2] = "x-retry-count";
		m->header_values[nh + 2] = psprintf("%d", row->retry_count + 1);
		m->header_names[nh + 3] = "x-last-error";
		m->header_values[nh + 3] = describe_error(row);

		if (!cqrs_topic_name_valid(m->topic))
			fail_locally(d, RD_KAFKA_RESP_ERR__INVALID_ARG,
						 psprintf("invalid dead-letter topic name \"%s\"", m->topic));
		else
			d->topic = cqrs_topic(m->topic);
	}

	pgstat_report_activity(STATE_RUNNING, "cqrs_sync relay: dead-lettering");
	apply_topic_limits(dlt, ndlt);
	nproduced = produce_rows(dlt, ndlt);
	if (nproduced > 0 && producer != NULL)
		await_delivery(dlt, ndlt);

	for (int i = 0; i < ndlt; i++)
	{
		RelayRow   *d = &dlt[i];
		RelayRow   *row = d->source;
		CqrsFailureClass cls;

		if (d->fate == ROW_HELD)
		{
			/* its dead-letter topic is paused: try again later */
			row->fate = ROW_FAILED;
			row->dlt_error = psprintf("dead-letter topic \"%s\" is paused", d->msg.topic);
			continue;
		}
		if (d->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			row->fate = ROW_DEAD;
			cqrs_topic_resume(d->topic);
			d->topic->dlt_written = true;
			continue;
		}
		cls = cqrs_kafka_classify(d->msg.err);
		row->dlt_error = psprintf("dead-letter topic \"%s\": %s", d->msg.topic,
								  describe_error(d));
		if (cls == CQRS_FAIL_MESSAGE || cls == CQRS_FAIL_CONFIG)
			row->fate = ROW_DLT_FAILED;
		else
			row->fate = ROW_FAILED; /* interrupted: not the DLT's verdict */
	}
}

/*
 * Sort the batch's delivery reports into outcomes, in id order per key:
 * SENT; REDO (acknowledged, but an earlier row of its key failed, so it is
 * sent again after that one); FAILED (retry later); TO_DLT (budget spent).
 */
static void
classify_outcomes(RelayRow *rows, uint64 nrows)
{
	HTAB	   *failed_keys = key_set_create("cqrs_sync failed keys",
												 CurrentMemoryContext);

	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];
		bool		found;
		CqrsFailureClass cls;

		if (row->fate != ROW_PRODUCED)
			continue;
		hash_search(failed_keys, &row->holdhash, HASH_FIND, &found);
		if (row->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			row->fate = found ? ROW_REDO : ROW_SENT;
			if (!found && row->topic)
				cqrs_topic_resume(row->topic);
			continue;
		}

		hash_search(failed_keys, &row->holdhash, HASH_ENTER, &found);
		hold_key(row->holdhash);
		cls = cqrs_kafka_classify(row->msg.err);
		row->fate = ROW_FAILED;
		if (cls == CQRS_FAIL_MESSAGE && row->retry_count + 1 > cqrs_max_retries)
			row->fate = ROW_TO_DLT;
		else if (cls == CQRS_FAIL_CONFIG && row->topic &&
				 !cqrs_topic_paused(row->topic, GetCurrentTimestamp()) &&
				 cqrs_topic_pause(row->topic, cqrs_retry_backoff_ms, describe_error(row)))
			row->newly_paused = true;	/* once per batch, not per row */
	}
}

/* Execute a kept plan whose outcome must be expected. */
static void
run_plan(SPIPlanPtr plan, Datum *args, int expected, const char *what)
{
	int			ret = SPI_execute_plan(plan, args, NULL, false, 0);

	if (ret != expected)
		elog(ERROR, "cqrs_sync relay: %s failed: %s", what, SPI_result_code_string(ret));
}

/* Build an array of the given element type from n datums. */
static Datum
make_array(Datum *elems, int n, Oid elemtype)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_array(elems, n, elemtype, typlen, typbyval, typalign));
}

/*
 * Record the batch's outcome in one short transaction: SENT rows, retries,
 * dead-lettered rows, DLT_FAILED rows (with a NOTIFY on cqrs_sync_alert),
 * and alerts for topics newly paused.
 */
static void
record_outcome(RelayRow *rows, uint64 nrows, TimestampTz acked_at)
{
	Datum	   *sent_ids = palloc(sizeof(Datum) * nrows);
	Datum	   *f_ids = palloc(sizeof(Datum) * nrows);
	Datum	   *f_inc = palloc(sizeof(Datum) * nrows);
	Datum	   *f_delay = palloc(sizeof(Datum) * nrows);
	Datum	   *f_err = palloc(sizeof(Datum) * nrows);
	Datum	   *d_ids = palloc(sizeof(Datum) * nrows);
	Datum	   *d_cnt = palloc(sizeof(Datum) * nrows);
	Datum	   *d_err = palloc(sizeof(Datum) * nrows);
	Datum	   *x_ids = palloc(sizeof(Datum) * nrows);
	Datum	   *x_cnt = palloc(sizeof(Datum) * nrows);
	Datum	   *x_err = palloc(sizeof(Datum) * nrows);
	int			nsent = 0,
				nfail = 0,
				ndead = 0,
				nxfail = 0;
	char	   *first_error = NULL;

	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];
		char	   *err;

		switch (row->fate)
		{
			case ROW_SENT:
				sent_ids[nsent++] = Int64GetDatum(row->msg.id);
				break;
			case ROW_FAILED:
				{
					CqrsFailureClass cls = cqrs_kafka_classify(row->msg.err);

					err = describe_error(row);
					if (row->dlt_error)
						err = psprintf("%s; %s", err, row->dlt_error);
					f_ids[nfail] = Int64GetDatum(row->msg.id);
					f_inc[nfail] = Int32GetDatum(cls == CQRS_FAIL_MESSAGE ? 1 : 0);
					f_delay[nfail] = Float8GetDatum((cls == CQRS_FAIL_CONFIG && row->topic) ?
													(double) row->topic->pause_ms :
													(double) backoff_ms(row->msg.err, cls, row->retry_count));
					f_err[nfail] = CStringGetTextDatum(err);
					nfail++;
					if (first_error == NULL)
						first_error = psprintf("outbox id " INT64_FORMAT " (topic \"%s\"): %s",
											   row->msg.id, row->msg.topic, err);
					break;
				}
			case ROW_DEAD:
				d_ids[ndead] = Int64GetDatum(row->msg.id);
				d_cnt[ndead] = Int32GetDatum(row->retry_count + 1);
				d_err[ndead] = CStringGetTextDatum(describe_error(row));
				ndead++;
				break;
			case ROW_DLT_FAILED:
				err = psprintf("%s; %s", describe_error(row), row->dlt_error);
				x_ids[nxfail] = Int64GetDatum(row->msg.id);
				x_cnt[nxfail] = Int32GetDatum(row->retry_count + 1);
				x_err[nxfail] = CStringGetTextDatum(err);
				nxfail++;
				break;
			default:
				break;
		}
	}

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "cqrs_sync relay: recording deliveries");

	if (nsent > 0)
	{
		Datum		args[2] = {make_array(sent_ids, nsent, INT8OID),
		TimestampTzGetDatum(acked_at)};

		/* cqrs_sync.delete_on_sent: a delivered row is not kept at all */
		if (cqrs_delete_on_sent)
			run_plan(sent_delete_plan, args, SPI_OK_DELETE, "deleting SENT rows");
		else
			run_plan(sent_plan, args, SPI_OK_UPDATE, "marking rows SENT");
	}
	if (nfail > 0)
	{
		Datum		args[4] = {make_array(f_ids, nfail, INT8OID),
			make_array(f_inc, nfail, INT4OID),
			make_array(f_delay, nfail, FLOAT8OID),
		make_array(f_err, nfail, TEXTOID)};

		run_plan(fail_plan, args, SPI_OK_UPDATE, "recording failures");
	}
	if (ndead > 0)
	{
		Datum		args[3] = {make_array(d_ids, ndead, INT8OID),
			make_array(d_cnt, ndead, INT4OID),
		make_array(d_err, ndead, TEXTOID)};

		run_plan(dead_plan, args, SPI_OK_UPDATE, "recording dead-lettered rows");
	}
	if (nxfail > 0)
	{
		Datum		args[3] = {make_array(x_ids, nxfail, INT8OID),
			make_array(x_cnt, nxfail, INT4OID),
		make_array(x_err, nxfail, TEXTOID)};

		run_plan(dltfail_plan, args, SPI_OK_SELECT, "recording DLT_FAILED rows");
	}
	for (uint64 i = 0; i < nrows; i++)
	{
		Datum		args[3];

		if (!rows[i].newly_paused)
			continue;
		args[0] = CStringGetTextDatum(rows[i].msg.topic);
		args[1] = CStringGetTextDatum(describe_error(&rows[i]));
		args[2] = Int32GetDatum(rows[i].topic->pause_ms);
		run_plan(pause_plan, args, SPI_OK_SELECT, "sending the topic alert");
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	/* let autovacuum see the relay's updates (the outbox is a queue) */
	pgstat_report_stat(false);

	/* counters and log lines, after the outcome is durable */
	if (nsent > 0)
		cqrs_relay_note_success(nsent);
	if (ndead > 0)
	{
		pg_atomic_fetch_add_u64(&cqrs_shared->dead_lettered, ndead);
		ereport(LOG,
				(errmsg("cqrs_sync relay: %d message(s) dead-lettered after %d failed attempts or more",
						ndead, cqrs_max_retries + 1)));
	}
	for (uint64 i = 0; i < nrows; i++)
	{
		RelayRow   *row = &rows[i];

		if (row->fate == ROW_DLT_FAILED)
		{
			char	   *err = psprintf("%s; %s", describe_error(row), row->dlt_error);

			cqrs_relay_note_failure(err, 1);
			pg_atomic_fetch_add_u64(&cqrs_shared->dlt_failed, 1);
			ereport(WARNING,
					(errcode(CQRS_ERRCODE_DLT_FAILED),
					 errmsg("cqrs_sync relay: outbox row " INT64_FORMAT " could not be dead-lettered; it is DLT_FAILED",
							row->msg.id),
					 errdetail("Topic \"%s\", key \"%s\": %s", row->msg.topic,
							   row->msg.key ? row->msg.key : "", err),
					 errhint("Remove the cause, then call cqrs_retry(" INT64_FORMAT ") or cqrs_retry_dlt_failed(); cqrs_discard() drops it with a reason.",
							 row->msg.id)));
		}
		else if (row->newly_paused)
			ereport(WARNING,
					(errcode(CQRS_ERRCODE_TOPIC_PAUSED),
					 errmsg("cqrs_sync relay: topic \"%s\" is paused: %s",
							row->msg.topic, describe_error(row)),
					 errdetail("Its rows stay PENDING without spending their retry budget; the relay tries again with a growing pause of up to a minute."),
					 errhint("Check that the topic exists and that the relay's Kafka principal may write to it.")));
	}
	if (nfail > 0)
	{
		cqrs_relay_note_failure(first_error, nfail);
		ereport(LOG,
				(errmsg("cqrs_sync relay: %d message(s) failed, first %s", nfail, first_error),
				 errdetail("The rows stay PENDING and are tried again after a backoff; later rows of their keys wait.")));
	}
}

/* Publish whether the relay holds a topic (cqrs_stats_relay.state). */
static void
publish_state(void)
{
	CqrsTopic  *paused = cqrs_topics_first_paused(GetCurrentTimestamp());

	if (paused)
		cqrs_relay_set_state(CQRS_RELAY_PAUSED, paused->name, paused->pause_reason);
	else
		cqrs_relay_set_state(CQRS_RELAY_RUNNING, NULL, NULL);
}

static List *
add_topic_name(List *names, const char *name)
{
	ListCell   *lc;

	foreach(lc, names)
		if (strcmp((char *) lfirst(lc), name) == 0)
			return names;
	return lappend(names, pstrdup(name));
}

/*
 * The dead-letter topics whose depth is watched: those the relay wrote to,
 * those of the outbox's DEAD_LETTERED rows, and the read side's
 * (cqrs_sync.read_side_dlt_topics).
 */
static void
refresh_dlt_depth(void)
{
	List	   *topics = cqrs_topics_dlt_written();
	char	   *list;
	char	   *tok;
	char	   *save;
	int			ret;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (ensure_plans())
	{
		ret = SPI_execute_plan(dlt_topics_plan, NULL, NULL, true, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "cqrs_sync relay: could not list dead-letter topics: %s",
				 SPI_result_code_string(ret));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
			MemoryContext old = MemoryContextSwitchTo(batch_ctx);

			topics = add_topic_name(topics, name);
			MemoryContextSwitchTo(old);
		}
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();

	list = pstrdup(cqrs_read_side_dlt_topics ? cqrs_read_side_dlt_topics : "");
	for (tok = strtok_r(list, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save))
		topics = add_topic_name(topics, tok);
	cqrs_dlt_depth_refresh(producer, topics);
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

	if (nrows > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(batch_ctx);

		apply_topic_limits(rows, nrows);
		if (produce_rows(rows, nrows) > 0)
		{
			TimestampTz acked_at;

			await_delivery(rows, nrows);
			acked_at = GetCurrentTimestamp();
			classify_outcomes(rows, nrows);
			if (producer != NULL)
				dead_letter(rows, nrows);
			else
			{
				/* the producer is gone (fatal, reload): no DLT attempt now */
				for (uint64 i = 0; i < nrows; i++)
					if (rows[i].fate == ROW_TO_DLT)
						rows[i].fate = ROW_FAILED;
			}
			record_outcome(rows, nrows, acked_at);
		}
		MemoryContextSwitchTo(old);
		publish_state();
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

	if (cqrs_dlt_depth_interval_ms > 0)
		ms = Min(ms, cqrs_dlt_depth_interval_ms);

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
	TimestampTz last_depth_at = 0;

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
				forget_kafka_state();
			}
		}

		if (producer == NULL)
		{
			char		errbuf[1024];

			producer = cqrs_kafka_create(producer_batch_bytes, errbuf, sizeof(errbuf));
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

		if (cqrs_dlt_depth_interval_ms > 0 && producer != NULL &&
			TimestampDifferenceExceeds(last_depth_at, GetCurrentTimestamp(),
									   cqrs_dlt_depth_interval_ms))
		{
			MemoryContext old = MemoryContextSwitchTo(batch_ctx);

			refresh_dlt_depth();
			MemoryContextSwitchTo(old);
			last_depth_at = GetCurrentTimestamp();
		}

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
