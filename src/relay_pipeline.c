/*-------------------------------------------------------------------------
 *
 * relay_pipeline.c
 *	  The relay's pipeline: rows are claimed from the outbox, produced, and
 *	  their delivery reports turned into outcomes, continuously, with at most
 *	  a window of cqrs_sync.batch_size rows between the outbox and their
 *	  recorded outcome.
 *
 * A row's way through the pipeline:
 *
 *	 claim (in the relay's transaction, relay_worker.c)
 *	   -> "claimed": copied into the relay's memory
 *	   -> produce: published in shared memory as in flight (cqrs_discard()
 *		  reads that), handed to librdkafka ("in flight")
 *	   -> delivery report, served in the worker's thread ("reported")
 *	   -> outcome: SENT, REDO, RETRY, or a dead letter produced (back "in
 *		  flight"), then DEAD or DLT_FAILED ("done")
 *	   -> recorded in the next relay transaction (relay_record.c)
 *
 * Claiming the next rows does not wait for the reports of the previous
 * ones: the pipeline keeps producing while earlier rows are in flight, and
 * records their outcomes in the same transaction that claims the next rows.
 * Which rows may go is decided by relay_order.c.
 *
 * Sizes: a message spends retry budget for its size only when it alone
 * exceeds its topic's known max.message.bytes, or was alone in its record
 * batch (it is not smaller than the producer's batch.size).  Otherwise a
 * MSG_SIZE_TOO_LARGE is the batch's fault: batch.size is halved (the
 * producer re-created once nothing is in flight), the row is tried again at
 * once and spends nothing, and the topic's limit is asked again.
 *
 * Stalls: a partition whose oldest message waits longer than STALL_MS while
 * Kafka answered other messages within that time is stalled (e.g. below
 * min.insync.replicas: librdkafka retries for ever).  Its keys are held, the
 * state and an alert name it, and everything else keeps flowing; its first
 * answer (or its having nothing in flight any more) ends it.
 * Partitions of dead-letter topics count too.  When the whole window waits,
 * rows go past it now and then to find out (probe_due()).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relscan.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xlog.h"
#include "catalog/pg_enum.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "cqrs_sync.h"
#include "enqueue.h"
#include "event_id.h"
#include "jsonb_text.h"
#include "relay.h"
#include "shmem.h"
#include "util.h"

/* A partition is stalled when its oldest message waits this long. */
#define STALL_MS			5000

/* Rows produced past a full window to find stalls, until Kafka answers. */
#define PROBES_MAX			4

/*
 * A claim reads at most this many rows of the primary key (most of them not
 * PENDING when it goes back far); the next claim goes on from there.
 */
#define CLAIM_WALK_MAX		50000

/* How often the relay's mark (cqrs_relay_mark) may move up. */
#define MARK_MS				1000

/* How to put back the index the claim reads (pipeline_prepare()). */
#define PRIMARY_KEY_HINT \
	"Create it again: ALTER TABLE cqrs_outbox ADD PRIMARY KEY (id)."

static MemoryContext pipeline_cxt = NULL;

static dlist_head staged = DLIST_STATIC_INIT(staged);	/* claimed in the open
														 * transaction */
static dlist_head claimed = DLIST_STATIC_INIT(claimed); /* to be produced */
static dlist_head inflight = DLIST_STATIC_INIT(inflight);	/* awaiting report */
static dlist_head reported = DLIST_STATIC_INIT(reported);	/* report arrived */
static dlist_head done = DLIST_STATIC_INIT(done);	/* to be recorded */
static int	n_staged = 0;
static int	n_claimed = 0;
static int	n_inflight = 0;
static int	n_stalled_inflight = 0;
static int	n_pinned = 0;		/* rows of the claims still open (memory) */
static int	n_done = 0;
static TimestampTz first_done_at = 0;	/* pipeline_oldest_report() */

static int64 cursor = 0;		/* every id at or below it was judged */
static int64 staged_cursor = 0; /* the cursor once the open claim commits */
static int64 staged_from = 0;	/* where the open claim's scan started */
static bool last_claim_full = false;
static XLogRecPtr staged_lsn = InvalidXLogRecPtr;	/* the claimed rows' commits
													 * are durable up to it */
static RelayClaim *staged_claim = NULL;
static TimestampTz last_ack_at = 0;
static TimestampTz last_answer_at = 0;	/* last report from Kafka: an
										 * acknowledgement or its refusal */
static int	n_probes = 0;		/* rows produced past a full window since
								 * Kafka last answered */

static Oid	seq_oid = InvalidOid;
static Oid	outbox_oid = InvalidOid;
static Oid	pkey_index = InvalidOid;	/* the outbox's primary key, on (id) */
static char *mark_table = NULL; /* cqrs_relay_mark (NULL: version 0.1.0) */
static bool mark_known = false; /* was the mark read since the reset? */
static int64 mark_value = 1;	/* the mark as last read or written */
static bool mark_lower = false; /* the id sequence went back: mark to 1 */
static bool mark_lowering = false;	/* this transaction lowers it */
static TimestampTz next_mark_at = 0;
static Oid	pending_label = InvalidOid; /* the enum value PENDING */
static AttrNumber att_id,
			att_event_id,
			att_topic,
			att_key,
			att_payload,
			att_headers,
			att_status,
			att_retry,
			att_next;

static void handle_failure(RelayRow *row, bool was_inflight);
static void fact_checks_forget(void);
static void unpublish(RelayRow **rows, int n);
static bool batch_too_large(RelayRow *row, const char *what, char **error);

/* ---- set-up ------------------------------------------------------------------- */

static void
delivery_hook(CqrsMessage *msg)
{
	RelayRow   *row = (RelayRow *) msg;

	/* in rd_kafka_poll(), in this thread: list moves only */
	dlist_delete(&row->node);
	dlist_push_tail(&reported, &row->node);
	n_inflight--;
	if (row->stalled_counted)
	{
		row->stalled_counted = false;
		n_stalled_inflight--;
	}
}

void
pipeline_init(void)
{
	pipeline_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync relay pipeline",
										 ALLOCSET_DEFAULT_SIZES);
	cqrs_kafka_set_delivery_hook(delivery_hook);
	pipeline_reset();
}

/* The relay starts over: nothing claimed, nothing in flight. */
void
pipeline_reset(void)
{
	dlist_init(&staged);
	dlist_init(&claimed);
	dlist_init(&inflight);
	dlist_init(&reported);
	dlist_init(&done);
	n_staged = n_claimed = n_inflight = n_stalled_inflight = n_done = 0;
	n_pinned = 0;
	n_probes = 0;
	cursor = 0;
	mark_known = false;
	mark_lower = false;
	mark_lowering = false;
	last_claim_full = false;
	staged_claim = NULL;
	fact_checks_forget();
	MemoryContextReset(pipeline_cxt);
	cqrs_inflight_ids_reset();
}

/* The column of the outbox named name (it must exist). */
static AttrNumber
outbox_attnum(Oid outbox, const char *name)
{
	AttrNumber	att = get_attnum(outbox, name);

	if (att == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("cqrs_sync relay: column \"%s\" of the outbox does not exist", name)));
	return att;
}

/*
 * Prepare the claim for the extension's outbox (inside a transaction): find
 * its primary key, its columns, the enum value PENDING, and the relay's mark
 * (mark: its table's qualified name; NULL when the extension's version has
 * none).  The claim reads the index itself rather than through a query: it
 * runs once per wake, and an executor's start and end cost more than the few
 * rows it reads.
 */
void
pipeline_prepare(Oid outbox, Oid seq, const char *mark)
{
	HeapTuple	tup;
	Relation	rel;

	rel = table_open(outbox, AccessShareLock);
	pkey_index = RelationGetPrimaryKeyIndex(rel);
	table_close(rel, AccessShareLock);
	if (!OidIsValid(pkey_index))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cqrs_sync relay: the outbox has no primary key"),
				 errdetail("The relay walks the outbox's primary key to find PENDING rows."),
				 errhint(PRIMARY_KEY_HINT)));
	att_id = outbox_attnum(outbox, "id");
	att_event_id = outbox_attnum(outbox, "event_id");
	att_topic = outbox_attnum(outbox, "topic");
	att_key = outbox_attnum(outbox, "key");
	att_payload = outbox_attnum(outbox, "payload");
	att_headers = outbox_attnum(outbox, "headers");
	att_status = outbox_attnum(outbox, "status");
	att_retry = outbox_attnum(outbox, "retry_count");
	att_next = outbox_attnum(outbox, "next_attempt_at");

	tup = SearchSysCache2(ENUMTYPOIDNAME,
						  ObjectIdGetDatum(get_atttype(outbox, att_status)),
						  CStringGetDatum("PENDING"));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cqrs_sync relay: the outbox's status type has no value PENDING");
	pending_label = ((Form_pg_enum) GETSTRUCT(tup))->oid;
	ReleaseSysCache(tup);

	outbox_oid = outbox;
	seq_oid = seq;
	if (mark_table)
		pfree(mark_table);
	mark_table = mark ? MemoryContextStrdup(TopMemoryContext, mark) : NULL;
}

/* ---- the window ------------------------------------------------------------------ */

/* Rows in flight in partitions that are not stalled, and waiting to be recorded. */
int
pipeline_inflight(void)
{
	return n_inflight - n_stalled_inflight + n_done + n_claimed;
}

/* The window: the most rows between their claim and their recorded outcome. */
int
pipeline_window(void)
{
	return Min(cqrs_batch_size, CQRS_MAX_WINDOW);
}

StaticAssertDecl(CQRS_MAX_WINDOW <= CQRS_INFLIGHT_IDS / 2,
				 "the window must fit in half the table of ids in flight");

/*
 * May a row be produced past the full window, as a probe?  A stall is found
 * by Kafka's answer to another message after the stuck ones were produced
 * (pipeline_check_stalls()).  When everything in the window waits (dead
 * letters charged together can fill it at once), nothing else is produced,
 * and a sick partition cannot be told from a cluster that does not answer.
 * So once the youngest row in flight has waited STALL_MS with no answer
 * since, one more row goes; Kafka's answer to it (an acknowledgement, or a
 * refusal) shows the stall.  At most PROBES_MAX such rows until Kafka
 * answers something: a cluster that does not answer at all gets no more.
 */
static bool
probe_due(void)
{
	TimestampTz youngest;

	if (n_inflight == 0 || n_claimed > 0 || n_done > 0 ||
		!dlist_is_empty(&reported) || n_probes >= PROBES_MAX)
		return false;
	youngest = dlist_container(RelayRow, node, dlist_tail_node(&inflight))->produced_at;
	return last_answer_at < youngest &&
		youngest < GetCurrentTimestamp() - (TimestampTz) STALL_MS * 1000;
}

/*
 * How many more rows may be claimed now.  Rows waiting on a stalled partition
 * are outside the window, so that other partitions keep flowing, but they
 * still hold memory and a place among the ids in flight (shmem.c): rows
 * without a key, which the partitioner may send to the stalled partition,
 * would pile up there for as long as it stalls.  All rows between claim and
 * recording together never exceed half of that table, and neither do the
 * rows whose memory they keep: a claim's rows share its memory, which goes
 * only when the last of them is recorded, so one row stuck on a stalled
 * partition keeps all of its claim's.
 */
int
pipeline_room(void)
{
	int			room = pipeline_window() - pipeline_inflight();
	int			all = n_inflight + n_done + n_claimed;

	if (room <= 0 && probe_due())
		room = 1;

	room = Min(room, CQRS_INFLIGHT_IDS / 2 - Max(all, n_pinned));
	return Max(room, 0);
}

bool
pipeline_has_reports(void)
{
	return n_done > 0;
}

bool
pipeline_has_claimed(void)
{
	return n_claimed > 0;
}

/* Did the last claim stop at its limit (more rows are probably ready)? */
bool
pipeline_more_ready(void)
{
	return last_claim_full;
}

int64
pipeline_cursor(void)
{
	return cursor;
}

/*
 * Reasons to go back that ended: operator retries (back to the rows they
 * made PENDING), lapsed pauses, retries whose time came.  Returns when the
 * next one ends (0: none); order_revisit_pending() says whether a claim
 * should go back now.
 */
TimestampTz
pipeline_timers(TimestampTz now)
{
	TimestampTz next_pause;
	TimestampTz next;
	int64		resume;

	if (pg_atomic_read_u64(&cqrs_shared->rescan_from) != 0)
	{
		uint64		from = pg_atomic_exchange_u64(&cqrs_shared->rescan_from, 0);

		if (from != 0)
			order_revisit((int64) from);
	}
	resume = cqrs_topics_expire_pauses(now, &next_pause);
	if (resume != PG_INT64_MAX)
		order_revisit(resume);
	next = order_expire(now, cursor);
	if (next_pause != 0 && (next == 0 || next_pause < next))
		next = next_pause;
	return next;
}

/*
 * May the delivery reports of the rows in flight wait to be served until the
 * relay wakes up for something else (relay_wait())?  Only while they change
 * nothing urgent: everything claimed was produced, no report waits to be
 * served, and the window has room for at least half of it.  Returns when the
 * oldest row in flight was produced (0: they may not wait).
 */
TimestampTz
pipeline_reports_may_wait(void)
{
	if (n_inflight == 0 || n_claimed > 0 ||
		!dlist_is_empty(&reported) || pipeline_room() < pipeline_window() / 2)
		return 0;
	return dlist_container(RelayRow, node, dlist_head_node(&inflight))->produced_at;
}

/* Anything in flight at all (stalled partitions included)? */
bool
pipeline_idle(void)
{
	return n_inflight == 0 && n_done == 0 && n_claimed == 0 &&
		dlist_is_empty(&reported);
}

/* When Kafka last acknowledged a row (0: never since the start). */
TimestampTz
pipeline_last_ack(void)
{
	return last_ack_at;
}

/* Is all that is left rows in flight (nothing claimed, reported, to record)? */
bool
pipeline_only_inflight(void)
{
	return n_inflight > 0 && n_done == 0 && n_claimed == 0 &&
		dlist_is_empty(&reported);
}

/* Are delivery reports still to come (rows handed to librdkafka)? */
bool
pipeline_awaiting_reports(void)
{
	return n_inflight > 0;
}

/* The partition a produced row went to (NULL: not known yet). */
static CqrsPartition *
produced_partition(RelayRow *row)
{
	int32		p = (int32) pg_atomic_read_u32(&row->msg.partition) - 1;

	return cqrs_topic_partition(row->msg.tstate, p);
}

/*
 * Is all that is left in flight waiting on stalled partitions?  Such rows may
 * wait for as long as the partition is sick; they do not keep the producer
 * from being re-created (they go again with the new one).
 */
bool
pipeline_only_stalled(void)
{
	dlist_iter	it;

	if (n_inflight == 0 || n_claimed > 0 || n_done > 0 || !dlist_is_empty(&reported))
		return false;
	dlist_foreach(it, &inflight)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);
		CqrsPartition *part = produced_partition(row);

		if (part == NULL || !part->stalled)
			return false;
	}
	return true;
}

/* ---- claiming ---------------------------------------------------------------------- */

/* The sequence's last value: every id at or below it was handed out. */
static int64
high_water_mark(void)
{
	LOCAL_FCINFO(fcinfo, 1);
	Datum		d;

	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ObjectIdGetDatum(seq_oid);
	fcinfo->args[0].isnull = false;
	d = pg_sequence_last_value(fcinfo);
	return fcinfo->isnull ? 0 : DatumGetInt64(d);
}

static char *
slot_text(TupleTableSlot *slot, AttrNumber att)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, att, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* Fill the message's headers from the row's headers jsonb (an object of strings). */
static void
copy_headers(CqrsMessage *msg, Datum d)
{
	Jsonb	   *jb = DatumGetJsonbP(d);
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n = JB_ROOT_COUNT(jb);

	msg->header_names = palloc(sizeof(char *) * (n + 4));
	msg->header_values = palloc(sizeof(char *) * (n + 4));
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

static RelayClaim *
new_claim(void)
{
	RelayClaim *claim = MemoryContextAllocZero(pipeline_cxt, sizeof(RelayClaim));

	claim->cxt = AllocSetContextCreate(pipeline_cxt, "cqrs_sync relay claim",
									   ALLOCSET_DEFAULT_SIZES);
	return claim;
}

/* One row fewer keeps the claim's memory: the last one lets it go. */
static void
claim_unref(RelayClaim *claim)
{
	if (--claim->nopen == 0)
	{
		n_pinned -= claim->nrows;
		MemoryContextDelete(claim->cxt);
		pfree(claim);
	}
}

static void
release_claim_row(RelayRow *row)
{
	claim_unref(row->claim);
	pfree(row);
}

static char *
copy_bytes(const char *p, int len)
{
	char	   *c = palloc(len + 1);

	memcpy(c, p, len);
	c[len] = '\0';
	return c;
}

#define COPY_STR(s) ((s) ? pstrdup(s) : NULL)

/*
 * A row waiting on a stalled partition keeps all of its claim's memory: the
 * rows claimed together share one context, let go only when the last of
 * them is recorded, and the partition may be sick for hours.  With a few
 * such rows in every claim (a topic of many partitions, at a high rate,
 * before the stall is found), the claims kept reach the bound of
 * pipeline_room(), and then claims stop for every topic until the partition
 * recovers.  The row gets memory of its own instead, so that its claim goes
 * once its other rows are recorded.  Nothing else points into the claim's
 * memory: librdkafka has its own copy of the message (cqrs_kafka_produce()),
 * and the delivery report finds the row by its address, which does not
 * change (rows live outside their claim's memory).
 */
static void
detach_row(RelayRow *row)
{
	RelayClaim *own = MemoryContextAllocZero(pipeline_cxt, sizeof(RelayClaim));
	CqrsMessage *m = &row->msg;
	MemoryContext old;
	bool		same = (row->topic == m->topic);
	const char **names;
	const char **values;

	own->cxt = AllocSetContextCreate(pipeline_cxt, "cqrs_sync relay row",
									 ALLOCSET_SMALL_SIZES);
	own->discard_seq = row->claim->discard_seq;
	own->nopen = own->nrows = 1;
	old = MemoryContextSwitchTo(own->cxt);
	row->topic = pstrdup(row->topic);
	m->topic = same ? row->topic : pstrdup(m->topic);
	if (m->key)
		m->key = copy_bytes(m->key, m->keylen);
	if (m->value)
		m->value = copy_bytes(m->value, m->valuelen);
	m->event_id = COPY_STR(m->event_id);
	if (m->nheaders > 0)
	{
		names = palloc(sizeof(char *) * m->nheaders);
		values = palloc(sizeof(char *) * m->nheaders);
		for (int h = 0; h < m->nheaders; h++)
		{
			names[h] = pstrdup(m->header_names[h]);
			values[h] = m->header_values[h] == NULL ? NULL :
				m->header_sizes ? copy_bytes(m->header_values[h], m->header_sizes[h]) :
				pstrdup(m->header_values[h]);
		}
		m->header_names = names;
		m->header_values = values;
		if (m->header_sizes)
			m->header_sizes = (const int *) copy_bytes((const char *) m->header_sizes,
													   sizeof(int) * m->nheaders);
	}
	row->error = COPY_STR(row->error);
	row->dlt_error = COPY_STR(row->dlt_error);
	MemoryContextSwitchTo(old);
	n_pinned++;
	claim_unref(row->claim);
	row->claim = own;
}

/* Is the row's partition stalled?  (Keyed rows of topics whose count is known.) */
static CqrsPartition *
stalled_partition(RelayRow *row)
{
	CqrsTopic  *topic = row->msg.tstate;
	int32		cnt = (int32) pg_atomic_read_u32(&topic->partition_cnt);
	int32		p;
	CqrsPartition *part;

	if (topic->nparts == 0 || cnt <= 0)
		return NULL;
	p = cqrs_kafka_partition_of(&row->msg, cnt);
	part = cqrs_topic_partition(topic, p);
	return (part && part->stalled) ? part : NULL;
}

/* Is the topic one of the paused ones? */
static bool
topic_in(const char *topic, List *names)
{
	ListCell   *lc;

	foreach(lc, names)
		if (strcmp(topic, (char *) lfirst(lc)) == 0)
			return true;
	return false;
}

/*
 * Claimed rows that will not be produced go back to the outbox: out of the
 * claimed list, out of the shared table of ids in flight (those published),
 * and released.  Reorders rows.
 */
static void
return_claimed(RelayRow **rows, int n)
{
	int			npublished = 0;

	for (int i = 0; i < n; i++)
	{
		RelayRow   *row = rows[i];

		dlist_delete(&row->node);
		n_claimed--;
		/* the published ones first: those are in the shared table */
		if (row->published)
		{
			rows[i] = rows[npublished];
			rows[npublished++] = row;
		}
	}
	unpublish(rows, npublished);
	for (int i = 0; i < n; i++)
		release_claim_row(rows[i]);
}

/*
 * A rescan from above start: the rows left over from a full librdkafka queue
 * (still claimed, not produced) that it may walk go back to the outbox, to be
 * judged again in id order with the rows the rescan brings.  Otherwise the
 * scan would skip them as in flight while it forgets the holds that kept
 * them behind an earlier row of their key, and they would overtake that row.
 */
static void
give_back_claimed(int64 start)
{
	RelayRow  **rows;
	int			n = 0;
	dlist_iter	it;

	if (n_claimed == 0)
		return;
	rows = palloc(sizeof(RelayRow *) * n_claimed);
	dlist_foreach(it, &claimed)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);

		if (row->msg.id > start)
			rows[n++] = row;
	}
	return_claimed(rows, n);
	pfree(rows);
}

/*
 * The id sequence's last value is below the cursor: it went back (TRUNCATE
 * ... RESTART IDENTITY, ALTER SEQUENCE ... RESTART), and new rows take ids
 * the scan has passed, below the mark too.  The scan goes back to the start,
 * and the mark is lowered to 1 in the next transaction.
 */
static void
sequence_went_back(int64 hw)
{
	ereport(WARNING,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("cqrs_sync relay: the outbox's id sequence went back from " INT64_FORMAT " to " INT64_FORMAT,
					cursor, hw),
			 errdetail("New rows take ids the relay had passed (TRUNCATE ... RESTART IDENTITY or ALTER SEQUENCE ... RESTART). The relay scans the outbox again from its first row."),
			 errhint("Restart the outbox's ids only while the relay has no row in flight (window 0 in cqrs_stats_relay): it records outcomes by id.")));
	order_revisit(1);
	mark_lower = true;
}

/*
 * Claim up to limit rows: read the high-water mark, the in-flight registry,
 * then walk the primary key in id order with a snapshot taken after both (so
 * that no commit in between is missed), and judge each PENDING row.  The walk
 * reads at most CLAIM_WALK_MAX rows (a revisit far back reads mostly rows
 * already sent).  Inside the relay's transaction.  The rows that may go are
 * staged; pipeline_claim_commit() makes them the claimed rows once the
 * transaction committed.  Returns how many.
 */
int
pipeline_claim(int limit, TimestampTz now)
{
	int64		hw;
	int64		start;
	int64		last_id = 0;
	int			nwalked = 0;
	List	   *paused;
	MemoryContext old;
	uint64		discard_seq;
	int			nread = 0;
	int			nskipped = 0;
	Relation	heap;
	Relation	index;
	Snapshot	snap;
	ScanKeyData keys[2];
	IndexScanDesc scan;
	TupleTableSlot *slot;
	uint64		early_mark;
	XLogRecPtr	early_lsn;
	XLogRecPtr	durable_lsn;

	Assert(dlist_is_empty(&staged));
	staged_lsn = InvalidXLogRecPtr;

	/* 1. every id at or below the mark was handed out */
	hw = high_water_mark();
	if (hw < cursor)
		sequence_went_back(hw);

	/* 2. who may still commit an id at or below it (discards too) */
	discard_seq = pg_atomic_read_u64(&cqrs_shared->discard_seq);
	pg_memory_barrier();
	order_read_registry(hw, cursor);

	/* reasons to go back that ended */
	(void) pipeline_timers(now);
	start = order_scan_start(cursor);
	/* from here on a failed claim must go back to start (it took the revisit) */
	staged_from = start;
	if (start < cursor)
		give_back_claimed(start);

	paused = cqrs_topics_paused_names(now);
	if (paused != NIL)
		cqrs_topics_note_skipped(now, start + 1);

	/* 3. the rows visible now: ids in (start, hw], in id order; the PENDING ones */
	heap = table_open(outbox_oid, AccessShareLock);
	index = index_open(pkey_index, AccessShareLock);
	if (index->rd_index->indrelid != outbox_oid ||
		index->rd_index->indnatts != 1 ||
		index->rd_index->indkey.values[0] != att_id)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cqrs_sync relay: the outbox's primary key \"%s\" is not on its id",
						RelationGetRelationName(index)),
				 errhint(PRIMARY_KEY_HINT)));
	early_mark = cqrs_early_commits_mark(&early_lsn);
	snap = RegisterSnapshot(GetLatestSnapshot());
	durable_lsn = cqrs_early_commits_bound(early_mark, early_lsn);
	ScanKeyInit(&keys[0], 1, BTGreaterStrategyNumber, F_INT8GT, Int64GetDatum(start));
	ScanKeyInit(&keys[1], 1, BTLessEqualStrategyNumber, F_INT8LE, Int64GetDatum(hw));
	scan = index_beginscan(heap, index, snap, 2, 0);
	index_rescan(scan, keys, 2, NULL, 0);
	slot = table_slot_create(heap, NULL);

	staged_claim = new_claim();
	staged_claim->discard_seq = discard_seq;
	old = MemoryContextSwitchTo(staged_claim->cxt);
	while (nread < limit && nwalked < CLAIM_WALK_MAX &&
		   index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		RelayRow	probe;
		RelayRow   *row;
		bool		isnull;
		bool		waiting;
		Datum		d;
		TimestampTz next_at;
		OrderVerdict verdict;
		char	   *topic;
		char	   *key;

		nwalked++;
		last_id = DatumGetInt64(slot_getattr(slot, att_id, &isnull));
		d = slot_getattr(slot, att_status, &isnull);
		if (isnull || DatumGetObjectId(d) != pending_label)
			continue;
		topic = slot_text(slot, att_topic);
		if (topic_in(topic, paused))
		{
			pfree(topic);
			continue;
		}
		nread++;

		memset(&probe, 0, sizeof(probe));
		probe.msg.id = last_id;
		key = slot_text(slot, att_key);
		probe.msg.key = key;
		probe.msg.keylen = key ? strlen(key) : 0;
		probe.msg.topic = topic;
		probe.msg.tstate = cqrs_topic(topic);
		probe.keyhash = cqrs_key_hash(key, probe.msg.keylen);
		probe.holdhash = hash_combine64(cqrs_key_hash(topic, strlen(topic)), probe.keyhash);
		d = slot_getattr(slot, att_next, &isnull);
		next_at = isnull ? 0 : DatumGetTimestampTz(d);
		waiting = (next_at != 0 && next_at > now);

		verdict = order_judge(&probe, waiting, next_at);
		if (verdict == ORDER_SKIP)
			nskipped++;
		if (verdict == ORDER_GO)
		{
			CqrsTopic  *t = probe.msg.tstate;
			CqrsPartition *part;

			/* a new topic: its rows wait (briefly) for its limit */
			cqrs_topic_want_limit(relay_producer, t, false);
			if (cqrs_topic_paused(t, now))
			{
				order_hold(&probe);
				t->resume_from = Min(t->resume_from, probe.msg.id);
				verdict = ORDER_HOLD;
			}
			else if ((part = stalled_partition(&probe)) != NULL)
			{
				order_hold(&probe);
				part->resume_from = Min(part->resume_from, probe.msg.id);
				verdict = ORDER_HOLD;
			}
		}
		if (verdict != ORDER_GO)
		{
			pfree(topic);
			if (key)
				pfree(key);
			continue;
		}

		/* (outside the claim's memory: see detach_row()) */
		row = MemoryContextAlloc(pipeline_cxt, sizeof(RelayRow));
		*row = probe;
		pg_atomic_init_u32(&row->msg.partition, 0);
		row->claim = staged_claim;
		/* staged at once: an error below lets it go with the claim's abort */
		staged_claim->nopen++;
		dlist_push_tail(&staged, &row->node);
		n_staged++;
		row->topic = row->msg.topic;
		row->msg.event_id = cqrs_uuid_text(DatumGetUUIDP(slot_getattr(slot, att_event_id, &isnull)));
		row->msg.value = cqrs_jsonb_text(DatumGetJsonbP(slot_getattr(slot, att_payload, &isnull)),
										 &row->msg.valuelen);
		d = slot_getattr(slot, att_headers, &isnull);
		if (!isnull)
			copy_headers(&row->msg, d);
		row->retry_count = DatumGetInt32(slot_getattr(slot, att_retry, &isnull));
	}
	MemoryContextSwitchTo(old);
	/* the commits that made them visible must be durable before they go */
	if (n_staged > 0)
		staged_lsn = durable_lsn;
	ExecDropSingleTupleTableSlot(slot);
	index_endscan(scan);
	UnregisterSnapshot(snap);
	index_close(index, NoLock);
	table_close(heap, NoLock);

	/*
	 * a full claim, or a walk that stopped at its bound, ends at its last row;
	 * otherwise every id up to the high-water mark was seen
	 */
	last_claim_full = (nread == limit || nwalked == CLAIM_WALK_MAX);
	staged_cursor = last_claim_full ? last_id : Max(hw, start);
	if (staged_claim->nopen == 0)
	{
		MemoryContextDelete(staged_claim->cxt);
		pfree(staged_claim);
		staged_claim = NULL;
	}
	ereport(DEBUG1,
			(errmsg_internal("cqrs_sync relay: claim of ids " INT64_FORMAT " to " INT64_FORMAT " (cursor " INT64_FORMAT "): %d rows walked, %d PENDING, %d to produce, %d in flight already, %d held",
							 start + 1, hw, cursor, nwalked, nread, n_staged, nskipped,
							 nread - n_staged - nskipped)));
	return n_staged;
}

/* The highest commit LSN of the rows just claimed (flush before producing). */
XLogRecPtr
pipeline_claimed_lsn(void)
{
	return staged_lsn;
}

/* The claim's transaction committed: its rows are ours. */
void
pipeline_claim_commit(void)
{
	dlist_node *pos;

	cursor = Max(staged_cursor, staged_from);

	/*
	 * Into the claimed rows in id order.  Usually there are none; rows left
	 * over from an earlier claim (librdkafka's queue was full) may be
	 * followed by a rescan's rows, which can bring an earlier row of a key
	 * whose later row is still waiting there.
	 */
	pos = dlist_is_empty(&claimed) ? NULL : dlist_head_node(&claimed);
	while (!dlist_is_empty(&staged))
	{
		dlist_node *n = dlist_pop_head_node(&staged);
		int64		id = dlist_container(RelayRow, node, n)->msg.id;

		while (pos != NULL && dlist_container(RelayRow, node, pos)->msg.id < id)
			pos = dlist_has_next(&claimed, pos) ? dlist_next_node(&claimed, pos) : NULL;
		if (pos != NULL)
			dlist_insert_before(pos, n);
		else
			dlist_push_tail(&claimed, n);
	}
	n_claimed += n_staged;
	n_staged = 0;
	if (staged_claim)
	{
		staged_claim->nrows = staged_claim->nopen;
		n_pinned += staged_claim->nrows;
	}
	staged_claim = NULL;
}

/* The relay's transaction committed (a lowering of the mark with it). */
void
pipeline_committed(void)
{
	mark_lowering = false;
}

/*
 * The claim's transaction failed: forget its rows.  Holds it recorded stay;
 * the scan goes back to where it started, so nothing is skipped.
 */
void
pipeline_claim_abort(void)
{
	if (staged_claim)
	{
		MemoryContextDelete(staged_claim->cxt);
		pfree(staged_claim);
		staged_claim = NULL;
	}
	while (!dlist_is_empty(&staged))
		pfree(dlist_container(RelayRow, node, dlist_pop_head_node(&staged)));
	n_staged = 0;
	order_revisit(staged_from + 1);
	last_claim_full = false;
	/* a lowering of the mark rolled back is done again */
	if (mark_lowering)
		mark_lower = true;
	mark_lowering = false;
}

/* ---- the relay's mark --------------------------------------------------------------- */

/*
 * cqrs_relay_mark.scan_from: no committed row below it is PENDING.  The scan
 * starts there after a restart instead of at id 1, and the stats count
 * PENDING rows from there.  The relay moves it up (pipeline_write_mark());
 * cqrs_retry(), cqrs_retry_dlt_failed() and cqrs_wake_relay() move it down,
 * always locking its row, in the transaction that makes rows PENDING again.
 */

/* Must the mark be read (in a transaction with SPI) before the next claim? */
bool
pipeline_needs_mark(void)
{
	return !mark_known || mark_lower;
}

/*
 * Read the mark after a reset: the scan starts there.  After the id
 * sequence went back (sequence_went_back()), lower it to 1 instead.  SPI
 * connected.
 */
void
pipeline_read_mark(void)
{
	int64		from = 1;

	if (mark_lower && mark_known)
	{
		/* (until the transaction commits: pipeline_claim_abort()) */
		mark_lowering = true;
		if (mark_table != NULL &&
			SPI_execute(psprintf("UPDATE %s SET scan_from = 1", mark_table), false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "cqrs_sync relay: could not update %s", mark_table);
		mark_value = 1;
		mark_lower = false;
		next_mark_at = 0;
		return;
	}
	if (mark_known)
		return;
	if (mark_table != NULL)
	{
		bool		isnull;

		if (SPI_execute(psprintf("SELECT scan_from FROM %s", mark_table), true, 1) != SPI_OK_SELECT)
			elog(ERROR, "cqrs_sync relay: could not read %s", mark_table);
		if (SPI_processed == 1)
		{
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull)
				from = Max(DatumGetInt64(d), 1);
		}
	}
	mark_value = from;
	cursor = Max(cursor, from - 1);
	order_start_at(from);
	mark_known = true;
	next_mark_at = 0;
}

/* The lowest id among the rows between their claim and their recorded outcome. */
static int64
rows_floor(dlist_head *list, int64 floor)
{
	dlist_iter	it;

	dlist_foreach(it, list)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);

		floor = Min(floor, row->msg.id);
	}
	return floor;
}

/*
 * Move the mark up to the lowest id the scan may still need: the cursor, the
 * order's holds, revisits and watched transactions, the rows in the
 * pipeline, the rows of paused topics and stalled partitions.  At most once
 * per MARK_MS, in a transaction that writes anyway (recording outcomes),
 * before the outcomes are recorded.  SPI connected.
 *
 * The mark's row is locked with SKIP LOCKED: an operator's transaction that
 * holds it (it lowers the mark) never makes the relay wait, and one that
 * lowered it since the relay last looked makes the relay go back there
 * instead (its rows may be PENDING below the relay's cursor).
 */
void
pipeline_write_mark(TimestampTz now)
{
	int64		floor;
	int64		cur;
	bool		isnull;
	Datum		arg[1];
	Oid			argtype[1] = {INT8OID};

	if (mark_table == NULL || !mark_known || now < next_mark_at)
		return;
	next_mark_at = TimestampTzPlusMilliseconds(now, MARK_MS);

	floor = Min(cursor + 1, order_floor());
	floor = rows_floor(&claimed, floor);
	floor = rows_floor(&inflight, floor);
	floor = rows_floor(&reported, floor);
	floor = rows_floor(&done, floor);
	floor = Min(floor, cqrs_topics_resume_floor());
	if (floor <= mark_value)
		return;

	if (SPI_execute(psprintf("SELECT scan_from FROM %s FOR UPDATE SKIP LOCKED", mark_table),
					false, 1) != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync relay: could not lock %s", mark_table);
	if (SPI_processed != 1)
		return;					/* an operator is lowering it: next time */
	cur = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (cur > mark_value)
		floor = mark_value;		/* the relay's own lowering was lost: again */
	else if (cur != mark_value)
	{
		/* lowered meanwhile: rows from there on may be PENDING again */
		order_revisit(cur);
		mark_value = cur;
		return;
	}
	arg[0] = Int64GetDatum(floor);
	if (SPI_execute_with_args(psprintf("UPDATE %s SET scan_from = $1", mark_table),
							  1, argtype, arg, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync relay: could not update %s", mark_table);
	mark_value = floor;
}

/* ---- producing --------------------------------------------------------------------- */

/*
 * Fail a row before it reaches the producer.  Its key is blocked at once, so
 * that later rows of the key in the same claim are not produced behind it.
 */
static char *row_text(RelayRow *row, const char *fmt,...) pg_attribute_printf(2, 3);

static void
fail_locally(RelayRow *row, rd_kafka_resp_err_t err, char *text)
{
	row->msg.done = true;
	row->msg.err = err;
	if (text)
		row->error = text;
	(void) order_failed(row, false);
	row->failure_noted = true;
	dlist_push_tail(&reported, &row->node);
}

/*
 * Rows refused for what the relay knows of their topic (larger than its
 * limit, or without a key for a compacted topic), and when: such a row is
 * charged only on a later attempt, once a question about the topic asked
 * after that came back (an operator may have raised the limit or changed
 * the policy meanwhile).  Forgotten at a restart: at most one more free
 * attempt per row.
 */
typedef struct FactCheck
{
	int64		id;
	char		status;
	TimestampTz asked_at;
} FactCheck;

#define SH_PREFIX		factchecks
#define SH_ELEMENT_TYPE FactCheck
#define SH_KEY_TYPE		int64
#define SH_KEY			id
#define SH_HASH_KEY(tb, key) ((uint32) ((key) ^ ((key) >> 32)))
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE		static inline
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

static factchecks_hash *fact_checks = NULL;

#define FACT_CHECKS_MAX		65536

static void
fact_checks_forget(void)
{
	fact_checks = NULL;			/* its memory goes with pipeline_cxt */
}

/*
 * May the row be charged for a refusal by what is known of its topic?  Only
 * when a question about the topic asked after the row was first refused came
 * back; otherwise note the refusal (the caller asks Kafka again).  An answer
 * renewed what is known; an answer with an error forgot the limit, no answer
 * kept it, and either kept the compaction Kafka last told, for at most 30
 * minutes (topics.c): a row is not refused free for as long as Kafka cannot
 * be asked.
 * A confirmed refusal is charged and forgotten: the next one is free again.
 * Past FACT_CHECKS_MAX rows noted (rows an operator dropped leave theirs), a
 * new one is charged at once.
 */
static bool
refusal_confirmed(RelayRow *row, CqrsTopic *topic)
{
	FactCheck  *sc;
	bool		found;

	if (fact_checks == NULL)
		fact_checks = factchecks_create(pipeline_cxt, 64, NULL);
	sc = factchecks_lookup(fact_checks, row->msg.id);
	if (sc == NULL && fact_checks->members >= FACT_CHECKS_MAX)
		return true;
	sc = factchecks_insert(fact_checks, row->msg.id, &found);
	if (!found)
	{
		sc->asked_at = GetCurrentTimestamp();
		return false;
	}
	if (topic->back_asked_at >= sc->asked_at)
	{
		factchecks_delete_item(fact_checks, sc);
		return true;
	}
	return false;
}

/* Remove rows from the shared table of ids in flight. */
static void
unpublish(RelayRow **rows, int n)
{
	int64	   *ids = palloc(sizeof(int64) * Max(n, 1));

	for (int i = 0; i < n; i++)
		ids[i] = rows[i]->msg.id;
	cqrs_inflight_ids_remove(ids, n);
	pfree(ids);
}

/*
 * Produce the claimed rows, in id order.  Their ids are published as in
 * flight first, then discards registered meanwhile are checked (see
 * shmem.c).  A row whose topic got paused meanwhile, or whose partition
 * stalled, is held; one that alone exceeds its topic's known limit fails
 * without being produced.  On QUEUE_FULL the rest stays claimed and is
 * produced after the next delivery reports, unless a rescan that may walk
 * them comes first (give_back_claimed()).
 */
void
pipeline_produce_claimed(void)
{
	RelayRow  **rows;
	int64	   *ids;
	int			n = 0;
	int			nids = 0;
	uint64		seq;
	bool		stale;
	dlist_iter	it;
	TimestampTz now = GetCurrentTimestamp();
	instr_time	t0,
				t1;

	if (n_claimed == 0 || relay_producer == NULL)
		return;

	INSTR_TIME_SET_CURRENT(t0);
	rows = palloc(sizeof(RelayRow *) * n_claimed);
	ids = palloc(sizeof(int64) * n_claimed);
	dlist_foreach(it, &claimed)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);

		rows[n] = row;
		if (!row->published)	/* not already (QUEUE_FULL earlier) */
			ids[nids++] = row->msg.id;
		row->published = true;
		n++;
	}
	cqrs_inflight_ids_add(ids, nids);

	/*
	 * A discard registered since a row's claim read the registry: the row may
	 * be being deleted, or deleted already.  The claim's rows go back to the
	 * outbox and are scanned again (see shmem.c).
	 */
	pg_memory_barrier();
	seq = pg_atomic_read_u64(&cqrs_shared->discard_seq);
	stale = false;
	for (int i = 0; i < n && !stale; i++)
		stale = (rows[i]->claim->discard_seq != seq);
	if (stale)
	{
		int			nheld = 0;
		int64		from = PG_INT64_MAX;

		for (int i = 0; i < n; i++)
			if (rows[i]->claim->discard_seq != seq)
			{
				order_hold(rows[i]);
				from = Min(from, rows[i]->msg.id);
				rows[nheld++] = rows[i];
			}
		return_claimed(rows, nheld);
		order_revisit(from);
		n = 0;
		dlist_foreach(it, &claimed)
			rows[n++] = dlist_container(RelayRow, node, it.cur);
	}

	for (int i = 0; i < n; i++)
	{
		RelayRow   *row = rows[i];
		CqrsTopic  *topic = row->msg.tstate;
		bool		paused = cqrs_topic_paused(topic, now);
		CqrsPartition *part = paused ? NULL : stalled_partition(row);
		rd_kafka_resp_err_t err;
		int			size;

		if (paused || part != NULL || order_blocked(row))
		{
			/*
			 * paused or stalled since the claim, or an earlier row of its key
			 * failed meanwhile: the row waits
			 */
			dlist_delete(&row->node);
			n_claimed--;
			order_hold(row);
			if (paused)
				topic->resume_from = Min(topic->resume_from, row->msg.id);
			else if (part != NULL)
				part->resume_from = Min(part->resume_from, row->msg.id);
			unpublish(&row, 1);
			release_claim_row(row);
			continue;
		}

		cqrs_topic_want_limit(relay_producer, topic, false);
		size = cqrs_kafka_message_size(&row->msg);
		if (topic->limit > 0 && size > topic->limit)
		{
			dlist_delete(&row->node);
			n_claimed--;
			if (refusal_confirmed(row, topic))
				fail_locally(row, RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
							 row_text(row, "MSG_SIZE_TOO_LARGE: message of %d bytes exceeds max.message.bytes %d of topic \"%s\"",
									  size, topic->limit, row->msg.topic));
			else
			{
				/* the limit may have been raised: ask, and try again, free */
				cqrs_topic_want_limit(relay_producer, topic, true);
				fail_locally(row, RD_KAFKA_RESP_ERR__RETRY,
							 row_text(row, "message of %d bytes exceeds the max.message.bytes %d last known of topic \"%s\"; asking Kafka again",
									  size, topic->limit, row->msg.topic));
			}
			continue;
		}

		/* it fails here, alone, and spends its own retry budget only */
		if (cqrs_topic_refuses_keyless(topic, row->msg.key))
		{
			dlist_delete(&row->node);
			n_claimed--;
			if (refusal_confirmed(row, topic))
				fail_locally(row, RD_KAFKA_RESP_ERR_INVALID_RECORD,
							 row_text(row, "topic \"%s\": " CQRS_KEYLESS_TO_COMPACTED,
									  row->msg.topic));
			else
			{
				/* the policy may have changed: ask, and try again, free */
				cqrs_topic_want_limit(relay_producer, topic, true);
				fail_locally(row, RD_KAFKA_RESP_ERR__RETRY,
							 row_text(row, "topic \"%s\" was last known compacted and the message has no key; asking Kafka again",
									  row->msg.topic));
			}
			continue;
		}

		err = cqrs_kafka_produce(relay_producer, &row->msg);
		if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;				/* the rest waits for room in librdkafka's queue */
		dlist_delete(&row->node);
		n_claimed--;
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			fail_locally(row, err, NULL);
			continue;
		}
		row->produced_at = now;
		if (n_inflight - n_stalled_inflight >= pipeline_window())
			n_probes++;			/* past a full window (probe_due()) */
		/* a row refused before that goes now (see refusal_confirmed()) */
		if (fact_checks != NULL && fact_checks->members > 0)
			(void) factchecks_delete(fact_checks, row->msg.id);
		order_produced(row);
		dlist_push_tail(&inflight, &row->node);
		n_inflight++;
	}
	INSTR_TIME_SET_CURRENT(t1);
	INSTR_TIME_SUBTRACT(t1, t0);
	cqrs_relay_add_phase(CQRS_PHASE_PRODUCE, INSTR_TIME_GET_MICROSEC(t1));
	pfree(rows);
	pfree(ids);
}

/*
 * The producer is gone (fatal error, new settings, shutdown): rows without a
 * report failed with err; they stay PENDING and go again.
 */
void
pipeline_abandon_inflight(rd_kafka_resp_err_t err)
{
	while (!dlist_is_empty(&inflight))
	{
		RelayRow   *row = dlist_container(RelayRow, node, dlist_pop_head_node(&inflight));

		row->msg.done = true;
		row->msg.err = err;
		row->stalled_counted = false;
		dlist_push_tail(&reported, &row->node);
		n_inflight--;
	}
	n_stalled_inflight = 0;
	n_probes = 0;
}

/* ---- reports ------------------------------------------------------------------------ */

static void
finish(RelayRow *row, RelayOutcome outcome)
{
	row->outcome = outcome;
	dlist_push_tail(&done, &row->node);
	if (n_done++ == 0)
		first_done_at = row->produced_at != 0 ? row->produced_at : GetCurrentTimestamp();
}

/*
 * Since when the oldest outcome waits to be recorded: since its row was
 * produced (its report may have been served late, relay_wait()), or for a
 * row that failed before that, since it failed.
 */
TimestampTz
pipeline_oldest_report(void)
{
	return first_done_at;
}

static int
backoff_ms(int retry_count)
{
	int			shift = Min(retry_count, 6);

	return (int) Min((int64) cqrs_retry_backoff_ms << shift, (int64) PG_INT32_MAX);
}

/*
 * A text that goes with the row (its error), in its claim's memory: reports
 * are served outside any transaction, where palloc() would allocate in
 * TopMemoryContext for ever.
 */
static char *
row_text(RelayRow *row, const char *fmt,...)
{
	MemoryContext old = MemoryContextSwitchTo(row->claim->cxt);
	size_t		len = 128;
	char	   *result;

	for (;;)
	{
		va_list		args;
		size_t		needed;

		result = palloc(len);
		va_start(args, fmt);
		needed = pvsnprintf(result, len, fmt, args);
		va_end(args);
		if (needed < len)
			break;
		pfree(result);
		len = needed;
	}
	MemoryContextSwitchTo(old);
	return result;
}

static char *
error_of(RelayRow *row)
{
	char		buf[512];

	if (row->error)
		return row->error;
	return row_text(row, "%s", cqrs_kafka_error_text(row->msg.err, buf, sizeof(buf)));
}

/*
 * A dead letter stopped on the relay's side (its queue full, its producer
 * purged at a stop or a re-creation, or gone after a fatal error) is no
 * verdict of the dead-letter topic: it is not counted, nor audited, as a
 * failed dead-letter publish.
 */
static bool
interrupted_here(rd_kafka_resp_err_t err)
{
	return err == RD_KAFKA_RESP_ERR__QUEUE_FULL ||
		err == RD_KAFKA_RESP_ERR__FATAL ||
		err == RD_KAFKA_RESP_ERR__PURGE_QUEUE ||
		err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT;
}

/*
 * Publish a row that spent its retry budget to its dead-letter topic: same
 * key and value, the row's headers plus x-original-topic, x-failure-source,
 * x-retry-count and x-last-error (and event_id).
 */
static void
produce_dead_letter(RelayRow *row)
{
	MemoryContext old = MemoryContextSwitchTo(row->claim->cxt);
	CqrsMessage *m = &row->msg;
	int			nh = m->nheaders;
	const char **names;
	const char **values;
	char	   *dlt_topic = psprintf("%s%s", m->topic, cqrs_dlt_suffix);
	CqrsPartition *part;
	rd_kafka_resp_err_t err;

	row->error = error_of(row);
	names = palloc(sizeof(char *) * (nh + 4));
	values = palloc(sizeof(char *) * (nh + 4));
	for (int h = 0; h < nh; h++)
	{
		names[h] = m->header_names[h];
		values[h] = m->header_values[h];
	}
	names[nh] = "x-original-topic";
	values[nh] = m->topic;
	names[nh + 1] = "x-failure-source";
	values[nh + 1] = "OUTBOX_RELAY";
	names[nh + 2] = "x-retry-count";
	values[nh + 2] = psprintf("%d", row->retry_count + 1);
	names[nh + 3] = "x-last-error";
	values[nh + 3] = row->error;
	m->header_names = names;
	m->header_values = values;
	m->nheaders = nh + 4;
	row->dlt = true;
	MemoryContextSwitchTo(old);

	if (!cqrs_topic_name_valid(dlt_topic) || relay_producer == NULL)
	{
		row->dlt_error = relay_producer == NULL ? "the producer is being re-created" :
			row_text(row, "invalid dead-letter topic name \"%s\"", dlt_topic);
		finish(row, relay_producer == NULL ? RO_RETRY : RO_DLT_FAILED);
		return;
	}
	m->topic = dlt_topic;
	m->tstate = cqrs_topic(dlt_topic);
	/* its limit counts for batch.size too (topics.c) */
	cqrs_topic_want_limit(relay_producer, m->tstate, false);
	if (cqrs_topic_refuses_keyless(m->tstate, m->key))
	{
		row->dlt_error = row_text(row, "dead-letter topic \"%s\": " CQRS_KEYLESS_TO_COMPACTED,
								  dlt_topic);
		row->dlt_attempt_failed = true;
		finish(row, RO_DLT_FAILED);
		return;
	}

	/*
	 * its partition stalled: the row waits (PENDING, its budget untouched),
	 * as rows of a stalled partition's keys do, instead of adding a message
	 * outside the window for as long as the partition is sick; it is tried
	 * again within STALL_MS of the stall's end, not after its last backoff
	 * (32 s with the defaults)
	 */
	if ((part = stalled_partition(row)) != NULL)
	{
		row->dlt_error = row_text(row, "dead-letter topic \"%s\": partition %d is stalled; the row is tried again later",
								  dlt_topic, (int) (part - m->tstate->parts));
		row->delay_ms = Min(backoff_ms(row->retry_count), STALL_MS);
		finish(row, RO_RETRY);
		return;
	}
	err = cqrs_kafka_produce(relay_producer, m);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		char		buf[512];
		CqrsFailureClass cls = cqrs_kafka_classify(err);

		row->dlt_error = row_text(row, "dead-letter topic \"%s\": %s", dlt_topic,
								  cqrs_kafka_error_text(err, buf, sizeof(buf)));
		row->dlt_attempt_failed = !interrupted_here(err);
		row->delay_ms = backoff_ms(row->retry_count);
		finish(row, (cls == CQRS_FAIL_MESSAGE || cls == CQRS_FAIL_CONFIG) ?
			   RO_DLT_FAILED : RO_RETRY);
		return;
	}
	row->produced_at = GetCurrentTimestamp();
	dlist_push_tail(&inflight, &row->node);
	n_inflight++;
}

/* The report of a dead letter. */
static void
dead_letter_report(RelayRow *row)
{
	CqrsFailureClass cls;
	char		buf[512];

	if (row->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		cqrs_topic_resume(row->msg.tstate);
		finish(row, RO_DEAD);
		return;
	}
	/* its batch too large for the dead-letter topic, not the dead letter */
	if (batch_too_large(row, "dead-letter topic", &row->dlt_error))
		return;
	cls = cqrs_kafka_classify(row->msg.err);
	row->dlt_error = row_text(row, "dead-letter topic \"%s\": %s", row->msg.topic,
							  cqrs_kafka_error_text(row->msg.err, buf, sizeof(buf)));
	row->dlt_attempt_failed = !interrupted_here(row->msg.err);
	if (cls == CQRS_FAIL_MESSAGE || cls == CQRS_FAIL_CONFIG)
		finish(row, RO_DLT_FAILED);
	else
	{
		/* interrupted (outage, purge): not the dead-letter topic's verdict */
		row->delay_ms = (cls == CQRS_FAIL_TRANSIENT) ? cqrs_retry_backoff_ms : 0;
		finish(row, RO_RETRY);
	}
}

/*
 * A size error: Kafka refused the row's record batch, or the row alone.  The
 * topic's limit is asked again.  When the batch was at fault (the message
 * fits alone and the batch can get smaller), batch.size is lowered and the
 * row goes again at once without spending its retry budget, its error text
 * in *error (the row's own, or its dead letter's): returns true.  what names
 * the topic in that text.
 */
static bool
batch_too_large(RelayRow *row, const char *what, char **error)
{
	int			size;

	if (row->msg.err != RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE &&
		row->msg.err != RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE)
		return false;
	cqrs_topic_want_limit(relay_producer, row->msg.tstate, true);
	size = cqrs_kafka_message_size(&row->msg);
	if (!relay_batch_refused(size, row->msg.tstate->limit))
		return false;
	*error = row_text(row, "record batch too large for %s \"%s\" (message of %d bytes, batch.size %d); batch.size lowered, tried again without spending the retry budget",
					  what, row->msg.topic, size, relay_producer_batch_bytes);
	row->delay_ms = 0;
	finish(row, RO_RETRY);
	return true;
}

/* A row failed (a report, or before it was produced). */
static void
handle_failure(RelayRow *row, bool was_inflight)
{
	rd_kafka_resp_err_t err = row->msg.err;
	CqrsFailureClass cls = cqrs_kafka_classify(err);
	bool		first;

	if (row->failure_noted)
		first = order_failed_first(row);
	else
		first = order_failed(row, was_inflight);

	row->inc = 0;
	row->delay_ms = 0;

	/* (a row that failed here, before Kafka, has its error already) */
	if (row->error == NULL && batch_too_large(row, "topic", &row->error))
		return;

	switch (cls)
	{
		case CQRS_FAIL_MESSAGE:
			if (row->retry_count + 1 > cqrs_max_retries)
			{
				produce_dead_letter(row);
				return;
			}
			row->inc = 1;
			row->delay_ms = first ? backoff_ms(row->retry_count) : 0;
			break;
		case CQRS_FAIL_CONFIG:
			if (cqrs_topic_pause(row->msg.tstate, cqrs_retry_backoff_ms, error_of(row)))
				row->newly_paused = true;
			row->msg.tstate->resume_from = Min(row->msg.tstate->resume_from, row->msg.id);
			row->delay_ms = row->msg.tstate->pause_ms;
			break;
		case CQRS_FAIL_FATAL:
			row->delay_ms = 0;
			break;
		case CQRS_FAIL_TRANSIENT:
			/* withdrawn by us (re-created producer, shutdown): at once */
			if (err == RD_KAFKA_RESP_ERR__PURGE_QUEUE || err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
				row->delay_ms = 0;
			else
				row->delay_ms = first ? cqrs_retry_backoff_ms : 0;
			break;
	}
	finish(row, RO_RETRY);
}

/*
 * Partition p of the topic is not stalled any more: its rows in flight count
 * in the window again at once, not only at the next stall check.  (By index:
 * cqrs_topic_partition() may move the topic's partitions when their number
 * grew.)
 */
static void
unstall(CqrsTopic *topic, int32 p)
{
	CqrsPartition *part = cqrs_topic_partition(topic, p);
	dlist_iter	it;

	part->stalled = false;
	if (part->resume_from != PG_INT64_MAX)
		order_revisit(part->resume_from);
	part->resume_from = PG_INT64_MAX;
	dlist_foreach(it, &inflight)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);

		if (row->stalled_counted && row->msg.tstate == topic &&
			(int32) pg_atomic_read_u32(&row->msg.partition) - 1 == p)
		{
			row->stalled_counted = false;
			n_stalled_inflight--;
		}
	}
}

/* Turn the delivery reports that arrived into outcomes. */
void
pipeline_serve_reports(void)
{
	TimestampTz now = 0;
	uint64		nacks = 0;
	int64		wait_us = 0;
	int64		wait_max = 0;

	while (!dlist_is_empty(&reported))
	{
		RelayRow   *row = dlist_container(RelayRow, node, dlist_pop_head_node(&reported));
		bool		was_inflight = (row->produced_at != 0);

		if (now == 0)
			now = GetCurrentTimestamp();
		if (was_inflight)
		{
			int64		us = now - row->produced_at;

			nacks++;
			wait_us += us;
			wait_max = Max(wait_max, us);
		}

		/*
		 * Kafka answered (librdkafka's own errors are negative): the
		 * partition is not stalled, and the cluster is not silent.  A
		 * refusal counts too: a row that fails, such as one whose dead
		 * letter then waits on a sick partition, shows the stall as well as
		 * an acknowledgement would.  A dead letter's partition counts as any
		 * other.
		 */
		if (was_inflight && row->msg.err >= RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			CqrsPartition *part = produced_partition(row);

			last_answer_at = now;
			n_probes = 0;

			/*
			 * the partition itself answered (a topic's configuration error
			 * may come from any broker's metadata)
			 */
			if (part && (row->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR ||
						 cqrs_kafka_classify(row->msg.err) != CQRS_FAIL_CONFIG))
			{
				part->last_ack_at = now;
				if (part->stalled)
					unstall(row->msg.tstate,
							 (int32) pg_atomic_read_u32(&row->msg.partition) - 1);
			}
		}
		if (row->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			last_ack_at = now;
			if (!row->dlt)
			{
				cqrs_topic_resume(row->msg.tstate);
				finish(row, order_acked(row));
				continue;
			}
		}
		if (row->dlt && was_inflight)
			dead_letter_report(row);
		else
			handle_failure(row, was_inflight);
	}
	if (nacks > 0)
	{
		pg_atomic_fetch_add_u64(&cqrs_shared->acks, nacks);
		pg_atomic_fetch_add_u64(&cqrs_shared->ack_wait_us, (uint64) wait_us);
		SpinLockAcquire(&cqrs_shared->mutex);
		cqrs_shared->ack_wait_max_us = Max(cqrs_shared->ack_wait_max_us, wait_max);
		SpinLockRelease(&cqrs_shared->mutex);
	}
}

/* The rows whose outcome is to be recorded. */
dlist_head *
pipeline_done_rows(void)
{
	return &done;
}

/* Their outcome is recorded and durable enough: let them go. */
void
pipeline_recorded(void)
{
	int64	   *ids = palloc(sizeof(int64) * Max(n_done, 1));
	int			n = 0;

	while (!dlist_is_empty(&done))
	{
		RelayRow   *row = dlist_container(RelayRow, node, dlist_pop_head_node(&done));

		order_recorded(row);
		ids[n++] = row->msg.id;
		release_claim_row(row);
	}
	cqrs_inflight_ids_remove(ids, n);
	n_done = 0;
	pfree(ids);
}

/* ---- stalls ---------------------------------------------------------------------------- */

static void
clear_oldest(CqrsTopic *topic, void *arg)
{
	for (int p = 0; p < topic->nparts; p++)
		topic->parts[p].oldest = 0;
}

static void
end_empty_stalls(CqrsTopic *topic, void *arg)
{
	for (int p = 0; p < topic->nparts; p++)
	{
		CqrsPartition *part = &topic->parts[p];

		/* a stalled partition with nothing in flight any more: try it again */
		if (part->stalled && part->oldest == 0)
			unstall(topic, p);
	}
}

/*
 * Find partitions whose oldest message waits longer than STALL_MS, without
 * an answer of theirs for that long, while Kafka answered (acknowledged or
 * refused) another message after that one was produced; end stalls with
 * nothing in flight.  Each newly stalled partition ("topic[p]", palloc'd)
 * is appended to *newly.
 */
void
pipeline_check_stalls(TimestampTz now, List **newly)
{
	dlist_iter	it;
	TimestampTz limit = now - (TimestampTz) STALL_MS * 1000;

	cqrs_topics_visit(clear_oldest, NULL);
	n_stalled_inflight = 0;
	dlist_foreach(it, &inflight)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);
		int32		p = (int32) pg_atomic_read_u32(&row->msg.partition) - 1;
		CqrsPartition *part;

		row->stalled_counted = false;
		if (p < 0)
			continue;
		part = cqrs_topic_partition(row->msg.tstate, p);
		if (part->oldest == 0 || row->produced_at < part->oldest)
			part->oldest = row->produced_at;
		/*
		 * waiting long, no answer from its partition for as long, while
		 * Kafka answered after it was produced: not an outage of the whole
		 * cluster
		 */
		if (!part->stalled && row->produced_at < limit &&
			part->last_ack_at < limit && last_answer_at > row->produced_at)
		{
			part->stalled = true;
			part->resume_from = PG_INT64_MAX;
			*newly = lappend(*newly, psprintf("%s[%d]", row->msg.topic, p));
		}
		row->stalled_counted = part->stalled;
		if (part->stalled)
		{
			n_stalled_inflight++;
			if (row->claim->nrows > 1)
				detach_row(row);
		}
	}
	cqrs_topics_visit(end_empty_stalls, NULL);
}

/*
 * Is the relay waiting for Kafka as a whole: a message of a partition that is
 * not stalled has waited longer than STALL_MS, and nothing was acknowledged
 * since it was produced?
 */
bool
pipeline_broker_waiting(TimestampTz now)
{
	dlist_iter	it;
	TimestampTz limit = now - (TimestampTz) STALL_MS * 1000;

	if (n_inflight == 0)
		return false;
	dlist_foreach(it, &inflight)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);
		CqrsPartition *part;

		/* the list is in the order of production: the rest is younger */
		if (row->produced_at >= limit)
			break;
		part = produced_partition(row);
		if (part && part->stalled)
			continue;
		if (last_answer_at < row->produced_at)
			return true;
	}
	return false;
}

/* An answer about a topic's limit (a hook of cqrs_kafka_collect_limits). */
void
pipeline_learn_limit(const char *topic, CqrsAnswer answer, int limit, int compacted)
{
	int64		resume = cqrs_topic_learn_limit(topic, answer, limit, compacted);

	if (resume != PG_INT64_MAX)
		order_revisit(resume);
}
