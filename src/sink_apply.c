/*-------------------------------------------------------------------------
 *
 * sink_apply.c
 *	  The sink's transactions: a batch of fetched messages applied in one
 *	  transaction, held events tried again, dead letters and replays
 *	  recorded.
 *
 *	  A batch.  The transaction first locks the sink's row (FOR SHARE: a
 *	  pause, rewind or drop waits for it, and once they commit no batch
 *	  applies anything) and then the position rows of the batch's partitions
 *	  (FOR UPDATE, in topic and partition order).  A message below its
 *	  partition's stored position was applied already (by another worker
 *	  before a rebalance, say) and is skipped; a partition whose position
 *	  was rewound since the worker read it (its epoch moved) is dropped from
 *	  the batch and fetched again from the new position.  The database, not
 *	  Kafka's group state, decides: two workers that both believe they own a
 *	  partition for a moment are serialized by the position's row lock, and
 *	  the second skips what the first applied.  Each event's event_id goes
 *	  into the inbox (cqrs_inbox) under the sink's consumer: an event seen
 *	  before (the relay sent it twice) is skipped.  The handler, or the
 *	  route, runs once per remaining event, as the sink's role, with the
 *	  sink's search_path.  The new positions and the counters are written
 *	  last, in the same transaction: the effects and the position commit
 *	  together or not at all.
 *
 *	  Many events per transaction, one failing event rolled back alone.
 *	  The batch runs without savepoints (a subtransaction per event would
 *	  cost a subtransaction id each and overflow every snapshot's cache
 *	  beyond 64).  When a handler raises, the transaction is rolled back and
 *	  applied again at once, with the events before the failing one as
 *	  before and a savepoint around each event from it on: the failing
 *	  event's own effects are rolled back alone, it is held (RETRY, in
 *	  cqrs_sink_held) and the partition goes on.  Later events of its key
 *	  are held behind it (BLOCKED), so that a key's events are applied in
 *	  order; other keys are not held.
 *
 *	  Failures.  A transient problem (serialization failure, deadlock, lock
 *	  or statement timeout, a read-only database or one in recovery, no
 *	  space, a lost connection, a permission or a missing object that an
 *	  operator must fix) rolls the whole transaction back: the worker waits
 *	  and tries again, nothing is held and no budget is spent.  Any other
 *	  error of a handler is the event's: it spends the event's retry budget.
 *
 *	  Held events are tried again in their own transactions: the first held
 *	  event of each key (and every replayed one) when it is due, with a
 *	  savepoint each.  Once applied, the next one of its key follows.  An
 *	  event over its budget goes to the dead-letter topic (the worker
 *	  produces it after the commit); its delivery report makes it
 *	  DEAD_LETTERED, or DLT_FAILED if the dead-letter topic refused it too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "common/base64.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "shmem.h"
#include "sink.h"
#include "util.h"

/* How long an assignment may wait for Kafka's latest offsets (ms). */
#define LATEST_OFFSETS_TIMEOUT_MS	5000
/* Held events tried again per transaction, at most. */
#define RETRY_PER_TXN	100
/*
 * An event_id longer than this (bytes) is the event's error: the inbox's
 * B-tree could not take it, and no real id is that long.
 */
#define EVENT_ID_MAX	1024
/* A dead letter in flight is not tried again before this (ms). */
#define DEAD_LETTER_GUARD_MS	600000
/* x-last-error is cut to this many bytes. */
#define LAST_ERROR_MAX	1000

/* Plans, prepared for the extension's current schema. */
static Oid	plans_ext = InvalidOid;
static Oid	event_type = InvalidOid;
static TupleDesc event_desc = NULL;
static SPIPlanPtr plan_lock_sink;
static SPIPlanPtr plan_ensure_offsets;
static SPIPlanPtr plan_lock_offsets;
static SPIPlanPtr plan_held_keys;
static SPIPlanPtr plan_inbox_many;
static SPIPlanPtr plan_inbox_new;
static SPIPlanPtr plan_inbox_one;
static SPIPlanPtr plan_hold;
static SPIPlanPtr plan_positions;
static SPIPlanPtr plan_due;
static SPIPlanPtr plan_next_due;
static SPIPlanPtr plan_lock_held;
static SPIPlanPtr plan_lock_offset_one;
static SPIPlanPtr plan_delete_held;
static SPIPlanPtr plan_held_failed;
static SPIPlanPtr plan_counters;
static SPIPlanPtr plan_dead_lettered;
static SPIPlanPtr plan_fetch_requests;
static SPIPlanPtr plan_fetched;
static SPIPlanPtr plan_fetch_failed;

/* Work memory of one transaction, and of one event. */
static MemoryContext txn_cxt = NULL;
static MemoryContext event_cxt = NULL;

/* Held event ids whose dead letter is in flight (this worker's). */
static List *dead_letters_in_flight = NIL;

/* One event, from a fetched message or a held row. */
typedef struct SinkEvent
{
	const char *topic;
	int32		partition;
	int64		offset;
	char	   *key;			/* NULL: no key */
	const char *value;			/* NULL: a null value */
	size_t		valuelen;
	char	   *headers;		/* JSON object text (NULL: see headers_jsonb) */
	Jsonb	   *headers_jsonb;	/* the same as jsonb (NULL: see headers) */
	rd_kafka_message_t *rkm;	/* a fetched message's own (else NULL) */
	bytea	   *raw_key;		/* a held event's: cqrs_sink_held.raw_key */
	char	   *raw_headers;	/* a held event's: cqrs_sink_held.raw_headers */
	char	   *event_id;		/* NULL: no event_id header */
	TimestampTz ts;
	bool		ts_null;
	int			part;			/* batch: index in Sink.parts */
	int			batch_index;	/* batch: index in Sink.batch */
} SinkEvent;

static inline bool
event_id_too_long(const SinkEvent *ev)
{
	return ev->event_id != NULL && strlen(ev->event_id) > EVENT_ID_MAX;
}

/* The identity and settings of the handler while it runs. */
typedef struct HandlerEnv
{
	Oid			save_user;
	int			save_sec;
	int			nestlevel;
} HandlerEnv;

/* ---- plans ---------------------------------------------------------------- */

static void
forget_plans(void)
{
	SPIPlanPtr *plans[] = {
		&plan_lock_sink, &plan_ensure_offsets, &plan_lock_offsets, &plan_held_keys,
		&plan_inbox_many, &plan_inbox_new, &plan_inbox_one, &plan_hold, &plan_positions, &plan_due,
		&plan_next_due, &plan_lock_held, &plan_lock_offset_one, &plan_delete_held,
		&plan_held_failed, &plan_counters, &plan_dead_lettered, &plan_fetch_requests,
		&plan_fetched, &plan_fetch_failed
	};

	for (int i = 0; i < lengthof(plans); i++)
	{
		if (*plans[i] != NULL)
			SPI_freeplan(*plans[i]);
		*plans[i] = NULL;
	}
	if (event_desc)
		FreeTupleDesc(event_desc);
	event_desc = NULL;
	event_type = InvalidOid;
	plans_ext = InvalidOid;
}

/*
 * The dead letters in flight were dropped unreported (their producer went):
 * their events are tried again when next due.
 */
void
sink_forget_dead_letters(void)
{
	list_free_deep(dead_letters_in_flight);
	dead_letters_in_flight = NIL;
}

/* The extension was dropped or created again: prepare everything anew. */
void
sink_apply_reset(void)
{
	forget_plans();
	sink_forget_dead_letters();
}

static SPIPlanPtr
keep(const char *fmt, int nargs, Oid *types)
{
	return cqrs_keep_plan(psprintf(fmt, sink_ext_schema(), sink_ext_schema()), nargs, types);
}

/* Inside a transaction, SPI connected, extension ready. */
static void
ensure_plans(void)
{
	Oid			ext = get_extension_oid("cqrs_sync", false);
	Oid			t1[] = {TEXTOID};
	Oid			t_sink_parts[] = {TEXTOID, TEXTARRAYOID, INT4ARRAYOID};
	Oid			t_ensure[] = {TEXTOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID};
	Oid			t_inbox_many[] = {TEXTOID, TEXTARRAYOID};
	Oid			t_inbox_one[] = {TEXTOID, TEXTOID};
	Oid			t_hold[] = {TEXTOID, TEXTOID, INT4OID, INT8OID, TEXTOID, BYTEAOID, TEXTOID,
	TEXTOID, TIMESTAMPTZOID, TEXTOID, INT4OID, TIMESTAMPTZOID, TEXTOID, BYTEAOID, TEXTOID};
	Oid			t_positions[] = {TEXTOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
	INT8ARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID};
	Oid			t_sinks[] = {TEXTARRAYOID};
	Oid			t_id[] = {INT8OID};
	Oid			t_part[] = {TEXTOID, TEXTOID, INT4OID};
	Oid			t_failed[] = {INT8OID, INT4OID, TIMESTAMPTZOID, TEXTOID};
	Oid			t_counters[] = {TEXTOID, TEXTOID, INT4OID, INT8OID, INT8OID, INT8OID,
	INT8OID, INT8OID};
	Oid			t_dl[] = {INT8OID, TEXTOID, TEXTOID, INT4OID, INT8OID, TEXTOID};
	Oid			t_fetched[] = {INT8OID, TEXTOID, INT4OID, INT8OID, TEXTOID, BYTEAOID,
	TEXTOID, TEXTOID, TIMESTAMPTZOID, BYTEAOID, TEXTOID};
	Oid			t_fetch_failed[] = {INT8OID, TEXTOID};
	MemoryContext old;

	if (ext == plans_ext)
		return;
	forget_plans();

	/* the type of the extension's schema, whatever the search_path */
	event_type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid, CStringGetDatum("cqrs_event"),
								 ObjectIdGetDatum(cqrs_extension_namespace(ext)));
	if (!OidIsValid(event_type))
		elog(ERROR, "cqrs_sync sink: type cqrs_event does not exist");
	old = MemoryContextSwitchTo(TopMemoryContext);
	event_desc = lookup_rowtype_tupdesc_copy(event_type, -1);
	MemoryContextSwitchTo(old);

	plan_lock_sink = keep("SELECT paused FROM %s.cqrs_sink WHERE name = $1 FOR SHARE", 1, t1);
	plan_ensure_offsets =
		keep("INSERT INTO %s.cqrs_sink_offset (sink, topic, \"partition\", next_offset)"
			 " SELECT $1, u.t, u.p, u.o FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3),"
			 " pg_catalog.unnest($4)) AS u(t, p, o)"
			 " ON CONFLICT DO NOTHING", 4, t_ensure);
	plan_lock_offsets =
		keep("SELECT o.topic, o.\"partition\", o.next_offset, o.epoch FROM %s.cqrs_sink_offset o"
			 " WHERE o.sink = $1 AND (o.topic, o.\"partition\") IN"
			 " (SELECT u.t COLLATE \"C\", u.p FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3)) AS u(t, p))"
			 " ORDER BY o.topic, o.\"partition\" FOR UPDATE OF o", 3, t_sink_parts);
	plan_held_keys =
		keep("SELECT DISTINCT h.topic, h.\"partition\", h.key FROM %s.cqrs_sink_held h"
			 " WHERE h.sink = $1 AND h.status IN ('RETRY', 'BLOCKED') AND NOT h.replay"
			 " AND h.key IS NOT NULL", 1, t1);
	/* $2: distinct ids, sorted (see record_in_inbox) */
	plan_inbox_many =
		keep("INSERT INTO %s.cqrs_inbox AS i (consumer, event_id)"
			 " SELECT $1, u.e FROM pg_catalog.unnest($2) AS u(e)"
			 " ON CONFLICT DO NOTHING RETURNING i.event_id", 2, t_inbox_many);
	/* the same, for ids expected new: a unique violation if one is not */
	plan_inbox_new =
		keep("INSERT INTO %s.cqrs_inbox (consumer, event_id)"
			 " SELECT $1, u.e FROM pg_catalog.unnest($2) AS u(e)", 2, t_inbox_many);
	plan_inbox_one =
		keep("INSERT INTO %s.cqrs_inbox (consumer, event_id) VALUES ($1, $2)"
			 " ON CONFLICT DO NOTHING", 2, t_inbox_one);
	plan_hold =
		keep("INSERT INTO %s.cqrs_sink_held (sink, topic, \"partition\", \"offset\", key, value, headers,"
			 " event_id, ts, status, attempts, next_attempt_at, last_error, raw_key, raw_headers)"
			 " VALUES ($1, $2, $3, $4, $5, $6, $7::pg_catalog.jsonb, $8, $9, $10, $11, $12, $13,"
			 " $14, $15::pg_catalog.jsonb)",
			 15, t_hold);
	plan_positions =
		keep("UPDATE %s.cqrs_sink_offset o"
			 " SET next_offset = GREATEST(o.next_offset, u.n),"
			 " applied = o.applied + u.a, duplicates = o.duplicates + u.d,"
			 " last_event_at = COALESCE(u.ts, o.last_event_at),"
			 " updated_at = pg_catalog.now()"
			 " FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6), pg_catalog.unnest($7)) AS u(t, p, n, a, d, ts)"
			 " WHERE o.sink = $1 AND o.topic = u.t COLLATE \"C\" AND o.\"partition\" = u.p",
			 7, t_positions);
	plan_due =
		keep("SELECT h.id, h.sink, h.topic, h.\"partition\", h.\"offset\", h.key, h.value,"
			 " h.headers::pg_catalog.text, h.event_id, h.ts, h.attempts, h.replay, h.last_error,"
			 " h.raw_key, h.raw_headers::pg_catalog.text"
			 " FROM %s.cqrs_sink_held h"
			 " WHERE h.sink = ANY ($1) AND h.status IN ('RETRY', 'BLOCKED')"
			 " AND (h.next_attempt_at IS NULL OR h.next_attempt_at <= pg_catalog.now())"
			 " AND (h.replay OR h.key IS NULL OR NOT EXISTS (SELECT 1 FROM %s.cqrs_sink_held e"
			 "  WHERE e.sink = h.sink AND e.topic = h.topic AND e.\"partition\" = h.\"partition\""
			 "  AND pg_catalog.hashtextextended(e.key, 0) = pg_catalog.hashtextextended(h.key, 0)"
			 "  AND e.key = h.key AND e.\"offset\" < h.\"offset\""
			 "  AND e.status IN ('RETRY', 'BLOCKED') AND NOT e.replay))"
			 " ORDER BY h.sink, h.topic, h.\"partition\", h.id LIMIT " CppAsString2(RETRY_PER_TXN),
			 1, t_sinks);
	plan_next_due =
		keep("SELECT pg_catalog.min(h.next_attempt_at), pg_catalog.count(*)"
			 " FROM %s.cqrs_sink_held h"
			 " WHERE h.sink = ANY ($1) AND h.status IN ('RETRY', 'BLOCKED', 'FETCH')", 1, t_sinks);
	/*
	 * Due still: another worker that found it due too may have tried it
	 * meanwhile (every worker retries every sink's held events), and set
	 * its next attempt (or, deciding to dead-letter it, a guard) since.
	 */
	plan_lock_held =
		keep("SELECT h.status, h.attempts FROM %s.cqrs_sink_held h WHERE h.id = $1"
			 " AND h.status IN ('RETRY', 'BLOCKED')"
			 " AND (h.next_attempt_at IS NULL OR h.next_attempt_at <= pg_catalog.now())"
			 " FOR UPDATE SKIP LOCKED", 1, t_id);
	plan_lock_offset_one =
		keep("SELECT o.next_offset FROM %s.cqrs_sink_offset o"
			 " WHERE o.sink = $1 AND o.topic = $2 AND o.\"partition\" = $3 FOR UPDATE", 3, t_part);
	plan_delete_held = keep("DELETE FROM %s.cqrs_sink_held WHERE id = $1", 1, t_id);
	plan_held_failed =
		keep("UPDATE %s.cqrs_sink_held SET status = 'RETRY', attempts = $2,"
			 " next_attempt_at = $3, last_error = $4 WHERE id = $1", 4, t_failed);
	plan_counters =
		keep("UPDATE %s.cqrs_sink_offset SET applied = applied + $4, duplicates = duplicates + $5,"
			 " retried = retried + $6, dead_lettered = dead_lettered + $7, dlt_failed = dlt_failed + $8"
			 " WHERE sink = $1 AND topic = $2 AND \"partition\" = $3", 8, t_counters);
	plan_dead_lettered =
		keep("UPDATE %s.cqrs_sink_held SET status = $2, dlt_topic = $3, dlt_partition = $4,"
			 " dlt_offset = $5, last_error = $6, dead_lettered_at = pg_catalog.now(),"
			 " next_attempt_at = NULL"
			 " WHERE id = $1 AND status IN ('RETRY', 'BLOCKED')"
			 " RETURNING sink, topic, \"partition\"", 6, t_dl);
	plan_fetch_requests =
		keep("SELECT h.id, h.sink, h.dlt_topic, h.dlt_partition, h.dlt_offset FROM %s.cqrs_sink_held h"
			 " WHERE h.sink = ANY ($1) AND h.status = 'FETCH'"
			 " AND (h.next_attempt_at IS NULL OR h.next_attempt_at <= pg_catalog.now())"
			 " ORDER BY h.id LIMIT 1", 1, t_sinks);
	plan_fetched =
		keep("UPDATE %s.cqrs_sink_held SET topic = $2, \"partition\" = $3, \"offset\" = $4, key = $5,"
			 " value = $6, headers = $7::pg_catalog.jsonb, event_id = $8, ts = $9, status = 'RETRY',"
			 " attempts = 0, next_attempt_at = pg_catalog.now(), last_error = NULL,"
			 " raw_key = $10, raw_headers = $11::pg_catalog.jsonb"
			 " WHERE id = $1 AND status = 'FETCH'", 11, t_fetched);
	plan_fetch_failed =
		keep("UPDATE %s.cqrs_sink_held SET last_error = $2,"
			 " next_attempt_at = pg_catalog.now() + interval '1 minute'"
			 " WHERE id = $1 AND status = 'FETCH'", 2, t_fetch_failed);
	plans_ext = ext;
}

/* ---- values ------------------------------------------------------------------ */

/*
 * Bytes as text: as they are when they are valid in the database encoding
 * and hold no NUL, else "\x" and their hex digits.
 */
static bool
bytes_are_text(const char *bytes, size_t len)
{
	return memchr(bytes, '\0', len) == NULL && pg_verifymbstr(bytes, len, true);
}

static char *
sink_text(const char *bytes, size_t len)
{
	StringInfoData s;

	if (bytes_are_text(bytes, len))
		return pnstrdup(bytes, len);
	initStringInfo(&s);
	appendStringInfoString(&s, "\\x");
	for (size_t i = 0; i < len; i++)
		appendStringInfo(&s, "%02x", (unsigned char) bytes[i]);
	return s.data;
}

static Datum
bytea_datum(const void *bytes, size_t len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), bytes, len);
	return PointerGetDatum(b);
}

static void
append_base64(StringInfo s, const void *bytes, size_t len)
{
	int			room = pg_b64_enc_len(len) + 1;
	int			n;

	enlargeStringInfo(s, room);
	n = pg_b64_encode(bytes, len, s->data + s->len, room);
	if (n < 0)
		elog(ERROR, "cqrs_sync sink: could not encode a header in base64");
	s->len += n;
	s->data[s->len] = '\0';
}

static bool dead_letter_header(const char *name);

/*
 * A message's headers exactly as Kafka holds them (cqrs_sink_held's
 * raw_headers): a JSON array of [name, value] pairs in base64, the value
 * null for a null header, in their order.  NULL if there are none.
 * skip_dead_letter: without the headers a dead letter adds.
 */
static char *
raw_headers_json(rd_kafka_headers_t *hdrs, bool skip_dead_letter)
{
	StringInfoData s;
	const char *name;
	const void *val;
	size_t		size;
	int			n = 0;

	if (hdrs == NULL)
		return NULL;
	initStringInfo(&s);
	appendStringInfoChar(&s, '[');
	for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
	{
		if (skip_dead_letter && dead_letter_header(name))
			continue;
		appendStringInfoString(&s, n++ > 0 ? ",[\"" : "[\"");
		append_base64(&s, name, strlen(name));
		appendStringInfoString(&s, "\",");
		if (val)
		{
			appendStringInfoChar(&s, '"');
			append_base64(&s, val, size);
			appendStringInfoChar(&s, '"');
		}
		else
			appendStringInfoString(&s, "null");
		appendStringInfoChar(&s, ']');
	}
	appendStringInfoChar(&s, ']');
	return n > 0 ? s.data : NULL;
}

/* A fetched message's raw_key and raw_headers, as SPI arguments. */
static void
message_raw_args(rd_kafka_message_t *rkm, bool skip_dead_letter, Datum *args, char *nulls)
{
	rd_kafka_headers_t *hdrs = NULL;
	char	   *raw_headers;

	if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
		hdrs = NULL;
	raw_headers = raw_headers_json(hdrs, skip_dead_letter);

	if (rkm->key && !bytes_are_text(rkm->key, rkm->key_len))
		args[0] = bytea_datum(rkm->key, rkm->key_len);
	else
		nulls[0] = 'n';
	if (raw_headers)
		args[1] = CStringGetTextDatum(raw_headers);
	else
		nulls[1] = 'n';
}

static Datum
text_array(char **items, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = CStringGetTextDatum(items[i]);
	return PointerGetDatum(construct_array(d, n, TEXTOID, -1, false, TYPALIGN_INT));
}

static Datum
int4_array(int32 *items, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int32GetDatum(items[i]);
	return PointerGetDatum(construct_array(d, n, INT4OID, 4, true, TYPALIGN_INT));
}

static Datum
int8_array(int64 *items, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(items[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

static Datum
timestamptz_array(TimestampTz *items, bool *nulls, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
		d[i] = TimestampTzGetDatum(items[i]);
	return PointerGetDatum(construct_md_array(d, nulls, 1, dims, lbs, TIMESTAMPTZOID, 8,
											  FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

static char *
col_text(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* The event of a fetched message (in the current memory context). */
static void
event_from_message(SinkEvent *ev, rd_kafka_message_t *rkm, int part, int batch_index)
{
	rd_kafka_headers_t *hdrs = NULL;
	JsonbParseState *state = NULL;
	JsonbValue *obj;
	rd_kafka_timestamp_type_t tstype;
	int64		ts;

	memset(ev, 0, sizeof(*ev));
	ev->topic = rd_kafka_topic_name(rkm->rkt);
	ev->partition = rkm->partition;
	ev->offset = rkm->offset;
	ev->key = rkm->key ? sink_text(rkm->key, rkm->key_len) : NULL;
	ev->rkm = rkm;
	ev->value = rkm->payload;
	ev->valuelen = rkm->len;
	ev->part = part;
	ev->batch_index = batch_index;

	/* the headers as jsonb at once: the handler's cqrs_event takes them so */
	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	if (rd_kafka_message_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		const char *name;
		const void *val;
		size_t		size;

		for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
		{
			char	   *v = val ? sink_text(val, size) : NULL;
			JsonbValue	jk;
			JsonbValue	jv;

			jk.type = jbvString;
			jk.val.string.val = sink_text(name, strlen(name));
			jk.val.string.len = strlen(jk.val.string.val);
			(void) pushJsonbValue(&state, WJB_KEY, &jk);
			if (v)
			{
				jv.type = jbvString;
				jv.val.string.val = v;
				jv.val.string.len = strlen(v);
			}
			else
				jv.type = jbvNull;
			(void) pushJsonbValue(&state, WJB_VALUE, &jv);
			if (strcmp(name, "event_id") == 0 && v != NULL && v[0] != '\0')
				ev->event_id = v;
		}
	}
	obj = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	ev->headers_jsonb = JsonbValueToJsonb(obj);
	ev->headers = NULL;			/* made when needed (event_headers_text) */

	ts = rd_kafka_message_timestamp(rkm, &tstype);
	ev->ts_null = (tstype == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE || ts < 0);
	if (!ev->ts_null)
		ev->ts = time_t_to_timestamptz(ts / 1000) + (ts % 1000) * 1000;
}

static Datum
jsonb_from_text(const char *s, size_t len)
{
	return DirectFunctionCall1(jsonb_in, CStringGetDatum(pnstrdup(s, len)));
}

/* The headers of an event as JSON text, made from the jsonb if needed. */
static char *
event_headers_text(SinkEvent *ev)
{
	if (ev->headers == NULL)
		ev->headers = JsonbToCString(NULL, &ev->headers_jsonb->root,
									 VARSIZE(ev->headers_jsonb));
	return ev->headers;
}

/* The headers of an event as jsonb. */
static Datum
event_headers_jsonb(SinkEvent *ev)
{
	if (ev->headers_jsonb)
		return JsonbPGetDatum(ev->headers_jsonb);
	return jsonb_from_text(ev->headers, strlen(ev->headers));
}

/* ---- the handler ---------------------------------------------------------------- */

/*
 * SET CONSTRAINTS ALL IMMEDIATE.  A handler runs as a security-restricted
 * operation, in which PostgreSQL refuses to queue a deferred trigger (it
 * would fire at COMMIT, outside the operation, as the worker): a target with
 * a DEFERRABLE INITIALLY DEFERRED foreign key failed every event with 42501,
 * and the sink waited for good.  Checked at once, such a constraint is
 * checked after each statement of the handler, as the sink's role, and a
 * violation is the event's own failure.
 */
static void
constraints_immediate(void)
{
	ConstraintsSetStmt stmt;

	memset(&stmt, 0, sizeof(stmt));
	stmt.type = T_ConstraintsSetStmt;
	stmt.constraints = NIL;
	stmt.deferred = false;
	AfterTriggerSetState(&stmt);
}

static void
enter_handler(Sink *sink, HandlerEnv *env)
{
	constraints_immediate();
	GetUserIdAndSecContext(&env->save_user, &env->save_sec);
	env->nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", sink->search_path, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (sink->version_column)
		(void) set_config_option("cqrs_sync.version_column", sink->version_column,
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	SetUserIdAndSecContext(sink->run_as,
						   env->save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
}

/* The worker's own settings again, whatever the handler set. */
static void
leave_handler(HandlerEnv *env)
{
	SetUserIdAndSecContext(env->save_user, env->save_sec);
	AtEOXact_GUC(false, env->nestlevel);
}

/*
 * While user code runs (a handler, a route), a shutdown request interrupts
 * it (sink_worker.c's SIGTERM handler): its transaction is rolled back, and
 * the events are applied again from the stored positions.
 */
volatile sig_atomic_t sink_in_user_code = false;

/*
 * Whether the sink can run: its role, its handler (and the role's right to
 * execute it) or its route.  Fills sink->problem otherwise.  Inside a
 * transaction, SPI connected.
 */
static bool
sink_check(Sink *sink)
{
	if (sink->usable)
	{
		/* what can change under a resolved sink */
		if (OidIsValid(sink->handler) &&
			(!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(sink->handler)) ||
			 pg_proc_aclcheck(sink->handler, sink->run_as, ACL_EXECUTE) != ACLCHECK_OK))
			sink->usable = false;
		else if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(sink->run_as)))
			sink->usable = false;
		else if (sink->route && !sink_route_valid(sink->route))
			sink->usable = false;
		else
			return true;
	}
	sink_resolve(sink);
	return sink->usable;
}

/* Resolve the role, handler and route of a sink (see sink_check). */
void
sink_resolve(Sink *sink)
{
	HeapTuple	proc;

	sink->usable = false;
	sink_route_free(sink->route);
	sink->route = NULL;
	sink->run_as = get_role_oid(sink->run_as_name, true);
	if (!OidIsValid(sink->run_as))
	{
		snprintf(sink->problem, sizeof(sink->problem), "role \"%s\" of sink \"%s\" does not exist",
				 sink->run_as_name, sink->name);
		return;
	}
	if (sink->handler_name != NULL && !OidIsValid(sink->handler))
	{
		/* dropped, or renamed: its name is what the sink keeps */
		snprintf(sink->problem, sizeof(sink->problem),
				 "the handler %s of sink \"%s\" does not exist", sink->handler_name, sink->name);
		return;
	}
	if (OidIsValid(sink->handler))
	{
		Form_pg_proc p;

		proc = SearchSysCache1(PROCOID, ObjectIdGetDatum(sink->handler));
		if (!HeapTupleIsValid(proc))
		{
			snprintf(sink->problem, sizeof(sink->problem),
					 "the handler %s of sink \"%s\" does not exist", sink->handler_name, sink->name);
			return;
		}
		p = (Form_pg_proc) GETSTRUCT(proc);
		if (p->pronargs != 1 || p->proargtypes.values[0] != event_type || p->prorettype != VOIDOID)
		{
			ReleaseSysCache(proc);
			snprintf(sink->problem, sizeof(sink->problem),
					 "the handler of sink \"%s\" is no longer a function f(e cqrs_event) RETURNS void",
					 sink->name);
			return;
		}
		ReleaseSysCache(proc);
		if (pg_proc_aclcheck(sink->handler, sink->run_as, ACL_EXECUTE) != ACLCHECK_OK)
		{
			snprintf(sink->problem, sizeof(sink->problem),
					 "role \"%s\" may not execute the handler of sink \"%s\"",
					 sink->run_as_name, sink->name);
			return;
		}
		fmgr_info_cxt(sink->handler, &sink->handler_finfo, sink->cxt);
	}
	else
	{
		Oid			relid;
		HandlerEnv	env;

		relid = DatumGetObjectId(DirectFunctionCall1(regclassin,
													 CStringGetDatum(sink->route_target)));
		/* prepared as it runs: as the sink's role, with its search_path */
		enter_handler(sink, &env);
		sink->route = sink_route_prepare(sink->name, relid, sink->route_version,
										 sink->route_delete, sink->cxt);
		leave_handler(&env);
	}
	sink->problem[0] = '\0';
	sink->usable = true;
}

/*
 * Run the handler (or the route) of one event.  Errors propagate.  What the
 * call sets (SET, set_config()) ends with it, as a function's SET clause
 * does: the next event's call, and the worker, do not inherit it.
 */
static void
run_handler(Sink *sink, SinkEvent *ev)
{
	Datum		values[8];
	bool		nulls[8];
	int			nestlevel = NewGUCNestLevel();

	if (event_id_too_long(ev))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the event_id header of %s[%d] at offset " INT64_FORMAT " is %zu bytes long, more than %d",
						ev->topic, ev->partition, ev->offset, strlen(ev->event_id), EVENT_ID_MAX)));
	memset(nulls, 0, sizeof(nulls));
	if (ev->value == NULL)
		nulls[4] = true;
	else
		values[4] = jsonb_from_text(ev->value, ev->valuelen);

	if (OidIsValid(sink->handler))
	{
		HeapTuple	tup;
		LOCAL_FCINFO(fcinfo, 1);

		values[0] = CStringGetTextDatum(ev->topic);
		values[1] = Int32GetDatum(ev->partition);
		values[2] = Int64GetDatum(ev->offset);
		if (ev->key)
			values[3] = CStringGetTextDatum(ev->key);
		else
			nulls[3] = true;
		values[5] = event_headers_jsonb(ev);
		if (ev->event_id)
			values[6] = CStringGetTextDatum(ev->event_id);
		else
			nulls[6] = true;
		values[7] = TimestampTzGetDatum(ev->ts);
		nulls[7] = ev->ts_null;
		tup = heap_form_tuple(event_desc, values, nulls);

		InitFunctionCallInfoData(*fcinfo, &sink->handler_finfo, 1, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = HeapTupleGetDatum(tup);
		fcinfo->args[0].isnull = false;
		sink_enter_user_code();
		(void) FunctionCallInvoke(fcinfo);
		sink_in_user_code = false;
	}
	else
	{
		if (nulls[4])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("the route of sink \"%s\" needs a JSON object, not a null message value",
							sink->name)));
		sink_enter_user_code();
		sink_route_apply(sink->route, sink->name, values[4]);
		sink_in_user_code = false;
	}
	AtEOXact_GUC(false, nestlevel);
}

/* ---- classification ------------------------------------------------------------------ */

/*
 * Problems that are not the event's: the worker waits and tries again,
 * spending no budget and dead-lettering nothing.  Besides outages of the
 * database itself, a permission or a missing table, column or function is
 * for an operator to fix, as on the write side: the sink waits and alerts.
 * A program limit (class 54: a value too long for an index, a payload
 * nested too deep) is the event's: waiting would not change it.
 */
bool
sink_error_is_transient(int sqlerrcode)
{
	int			category = ERRCODE_TO_CATEGORY(sqlerrcode);

	return category == ERRCODE_TRANSACTION_ROLLBACK ||	/* 40: serialization, deadlock */
		category == ERRCODE_CONNECTION_EXCEPTION || /* 08 */
		category == ERRCODE_INSUFFICIENT_RESOURCES ||	/* 53: disk full, memory */
		category == ERRCODE_OPERATOR_INTERVENTION ||	/* 57: canceled, shutdown */
		category == ERRCODE_SYSTEM_ERROR || /* 58: I/O */
		sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE || /* 55P03: lock_timeout */
		sqlerrcode == ERRCODE_OBJECT_IN_USE ||
		sqlerrcode == ERRCODE_READ_ONLY_SQL_TRANSACTION ||	/* 25006 */
		sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE ||
		sqlerrcode == ERRCODE_UNDEFINED_TABLE ||
		sqlerrcode == ERRCODE_UNDEFINED_COLUMN ||
		sqlerrcode == ERRCODE_UNDEFINED_FUNCTION ||
		sqlerrcode == ERRCODE_INVALID_SCHEMA_NAME;
}

/* Work memory of the transactions, made once. */
static void
ensure_contexts(void)
{
	if (txn_cxt != NULL)
		return;
	txn_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync sink transaction",
									ALLOCSET_DEFAULT_SIZES);
	event_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync sink event",
									  ALLOCSET_DEFAULT_SIZES);
}

/*
 * sink_check() in a subtransaction: a sink that cannot be resolved (its
 * route's table dropped, say) says so in sink->problem without failing the
 * transaction, which serves other sinks too.
 */
static void
check_quietly(Sink *sink)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	PG_TRY();
	{
		(void) sink_check(sink);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		sink->usable = false;
		strlcpy(sink->problem, edata->message, sizeof(sink->problem));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
	CurrentResourceOwner = oldowner;
}

/* ---- a batch ----------------------------------------------------------------------------- */

typedef struct PartTally
{
	bool		in_batch;		/* has messages in this batch */
	bool		locked;			/* its position row is locked */
	int64		stored;			/* the stored position */
	int64		next;			/* the new position */
	int64		applied;
	int64		duplicates;
	int64		held;
	TimestampTz last_ts;
	bool		last_ts_null;
} PartTally;

typedef struct HeldKey
{
	int			part;
	char	   *key;
} HeldKey;

static bool
key_held(List *held, int part, const char *key)
{
	ListCell   *lc;

	if (key == NULL)
		return false;
	foreach(lc, held)
	{
		HeldKey    *h = lfirst(lc);

		if (h->part == part && strcmp(h->key, key) == 0)
			return true;
	}
	return false;
}

static int
find_part(Sink *sink, const char *topic, int32 partition)
{
	for (int i = 0; i < sink->nparts; i++)
		if (sink->parts[i].partition == partition && strcmp(sink->parts[i].topic, topic) == 0)
			return i;
	return -1;
}

/* Take an event out of the stream: RETRY (with its error) or BLOCKED. */
static void
hold_event(Sink *sink, SinkEvent *ev, const char *error)
{
	Datum		values[15];
	char		nulls[15];
	bool		retry = (error != NULL);

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(sink->name);
	values[1] = CStringGetTextDatum(ev->topic);
	values[2] = Int32GetDatum(ev->partition);
	values[3] = Int64GetDatum(ev->offset);
	if (ev->key)
		values[4] = CStringGetTextDatum(ev->key);
	else
		nulls[4] = 'n';
	if (ev->value)
		values[5] = bytea_datum(ev->value, ev->valuelen);
	else
		nulls[5] = 'n';
	values[6] = CStringGetTextDatum(event_headers_text(ev));
	Assert(ev->rkm != NULL);	/* only a batch's events are held here */
	message_raw_args(ev->rkm, false, &values[13], &nulls[13]);
	if (ev->event_id)
		values[7] = CStringGetTextDatum(ev->event_id);
	else
		nulls[7] = 'n';
	values[8] = TimestampTzGetDatum(ev->ts);
	if (ev->ts_null)
		nulls[8] = 'n';
	values[9] = CStringGetTextDatum(retry ? "RETRY" : "BLOCKED");
	values[10] = Int32GetDatum(retry ? 1 : 0);
	if (retry)
	{
		/* no budget left after the first failure: dead-lettered at once */
		TimestampTz now = GetCurrentTimestamp();

		values[11] = TimestampTzGetDatum(sink->max_retries == 0 ? now :
										 TimestampTzPlusMilliseconds(now, sink->retry_backoff_ms));
		values[12] = CStringGetTextDatum(error);
	}
	else
	{
		nulls[11] = 'n';
		nulls[12] = 'n';
	}
	if (SPI_execute_plan(plan_hold, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "cqrs_sync sink: could not hold an event of sink \"%s\"", sink->name);
}

typedef enum TryResult
{
	TRY_DONE,
	TRY_WAIT,
	TRY_GONE,
	TRY_CAREFUL,				/* a handler raised: again, with savepoints */
	TRY_INBOX_DUPS				/* the inbox held an id: again, skipping it */
} TryResult;

/* One attempt at a batch, inside its transaction. */
typedef struct BatchWork
{
	Sink	   *sink;
	int			careful_from;	/* batch index from which savepoints are used */
	volatile int *current;		/* batch index of the event whose handler runs */
	volatile bool *inbox_new;	/* plan_inbox_new runs */
	ResourceOwner txnowner;
	PartTally  *tally;
	SinkEvent  *events;
	int			nevents;
	List	   *held;			/* HeldKey */
	char	   *errbuf;
	size_t		errlen;
} BatchWork;

/*
 * One event inside its savepoint: recorded in the inbox under the sink's
 * consumer, then its handler run unless it was seen before.  Returns
 * whether it was new; *in_handler is true while the handler runs (an error
 * then is the event's).
 */
static bool
inbox_then_handler(Sink *sink, SinkEvent *ev, volatile bool *in_handler)
{
	bool		new = true;
	HandlerEnv	env;

	if (ev->event_id && !event_id_too_long(ev))
	{
		Datum		args[2];

		args[0] = CStringGetTextDatum(sink->consumer);
		args[1] = CStringGetTextDatum(ev->event_id);
		if (SPI_execute_plan(plan_inbox_one, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "cqrs_sync sink: could not record an event of sink \"%s\" in the inbox",
				 sink->name);
		new = (SPI_processed == 1);
	}
	if (new)
	{
		enter_handler(sink, &env);
		*in_handler = true;
		run_handler(sink, ev);
		*in_handler = false;
		leave_handler(&env);
	}
	return new;
}

/*
 * One event with a savepoint: its own failure is rolled back alone and the
 * event held (RETRY); a transient error, or one outside the handler, is
 * thrown on, for the whole transaction to wait.
 */
static void
apply_with_savepoint(BatchWork *w, SinkEvent *ev)
{
	Sink	   *sink = w->sink;
	PartTally  *t = &w->tally[ev->part];
	volatile bool in_handler = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(event_cxt);
	PG_TRY();
	{
		if (inbox_then_handler(sink, ev, &in_handler))
		{
			t->applied++;
			t->last_ts = ev->ts;
			t->last_ts_null = ev->ts_null;
		}
		else
			t->duplicates++;
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(txn_cxt);
		CurrentResourceOwner = w->txnowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(txn_cxt);
		edata = CopyErrorData();
		if (!in_handler || sink_error_is_transient(edata->sqlerrcode))
			PG_RE_THROW();		/* the whole transaction waits */
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(txn_cxt);
		CurrentResourceOwner = w->txnowner;

		/* the event's own failure: it is held, the rest goes on */
		hold_event(sink, ev, edata->message);
		t->held++;
		if (ev->key)
		{
			HeldKey    *h = palloc(sizeof(HeldKey));

			h->part = ev->part;
			h->key = ev->key;
			w->held = lappend(w->held, h);
		}
		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": the handler failed on %s[%d] at offset " INT64_FORMAT ": %s",
						sink->name, ev->topic, ev->partition, ev->offset, edata->message),
				 errdetail("The event is held and tried again; later events of its key wait for it.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextReset(event_cxt);
}

static int
cmp_event_id(const void *a, const void *b)
{
	const SinkEvent *ea = *(SinkEvent *const *) a;
	const SinkEvent *eb = *(SinkEvent *const *) b;
	int			c = strcmp(ea->event_id, eb->event_id);

	if (c != 0)
		return c;
	/* the first of the batch's copies first */
	return (ea->batch_index > eb->batch_index) - (ea->batch_index < eb->batch_index);
}

/* For bsearch() in the sorted ids (strcmp: "C" order, as they were sorted). */
static int
cmp_id(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/*
 * Record the event_ids of events[0..n) in the inbox under the sink's
 * consumer, in one statement, and say which events are new (is_new[e]).
 * An event without an event_id is new (its position deduplicates it).  Of
 * several copies of an event_id in the batch, the first is new if the
 * inbox did not hold it, and the others are duplicates.  The ids are given
 * distinct and sorted (in "C" order, the index's): two workers inserting
 * overlapping ids take their index entries in the same order.
 *
 * Duplicates are rare (the relay sends at least once), and ON CONFLICT's
 * check before each insertion costs an index search per id.  So while the
 * inbox held none of the sink's last ids, they are inserted without it:
 * an id the inbox holds (or gets from a transaction that commits
 * meanwhile) raises a unique violation, which rolls the whole transaction
 * back before any handler ran; try_batch() then says TRY_INBOX_DUPS and
 * the batch is applied again at once, with ON CONFLICT, which skips it.
 */
static void
record_in_inbox(BatchWork *w, SinkEvent *events, int n, bool *is_new)
{
	Sink	   *sink = w->sink;
	SinkEvent **byid = palloc(sizeof(SinkEvent *) * Max(n, 1));
	char	  **ids = palloc(sizeof(char *) * Max(n, 1));
	int		   *first = palloc(sizeof(int) * Max(n, 1));
	int			nids = 0;
	int			nwith = 0;
	Datum		args[2];

	for (int e = 0; e < n; e++)
	{
		if (events[e].event_id && !event_id_too_long(&events[e]))
			byid[nwith++] = &events[e];
		else
			is_new[e] = true;	/* one too long fails in run_handler() */
	}
	if (nwith == 0)
		return;
	qsort(byid, nwith, sizeof(SinkEvent *), cmp_event_id);
	for (int i = 0; i < nwith; i++)
	{
		if (nids > 0 && strcmp(ids[nids - 1], byid[i]->event_id) == 0)
			continue;			/* a later copy: a duplicate */
		ids[nids] = byid[i]->event_id;
		first[nids++] = byid[i] - events;
	}

	args[0] = CStringGetTextDatum(sink->consumer);
	args[1] = text_array(ids, nids);
	if (!sink->inbox_dups)
	{
		*w->inbox_new = true;
		if (SPI_execute_plan(plan_inbox_new, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "cqrs_sync sink: could not record the events of sink \"%s\" in the inbox",
				 sink->name);
		*w->inbox_new = false;
		for (int i = 0; i < nids; i++)
			is_new[first[i]] = true;
		return;
	}
	if (SPI_execute_plan(plan_inbox_many, args, NULL, false, 0) != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "cqrs_sync sink: could not record the events of sink \"%s\" in the inbox",
			 sink->name);
	/* without duplicates this time, the next batch tries without ON CONFLICT */
	sink->inbox_dups = (SPI_processed < (uint64) nids);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		char	   *id = col_text(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1);
		char	  **hit = bsearch(&id, ids, nids, sizeof(char *), cmp_id);

		if (hit)
			is_new[first[hit - ids]] = true;
		pfree(id);
	}
}

/* The positions and counters of the batch, in its transaction. */
static void
store_positions(BatchWork *w)
{
	Sink	   *sink = w->sink;
	char	  **ptopics = palloc(sizeof(char *) * sink->nparts);
	int32	   *pparts = palloc(sizeof(int32) * sink->nparts);
	int64	   *next = palloc(sizeof(int64) * sink->nparts);
	int64	   *applied = palloc(sizeof(int64) * sink->nparts);
	int64	   *dups = palloc(sizeof(int64) * sink->nparts);
	TimestampTz *ts = palloc(sizeof(TimestampTz) * sink->nparts);
	bool	   *tsnull = palloc(sizeof(bool) * sink->nparts);
	Datum		args[7];
	int			np = 0;

	for (int p = 0; p < sink->nparts; p++)
	{
		PartTally  *t = &w->tally[p];

		if (!t->locked || sink->parts[p].resync || t->next == t->stored)
			continue;
		ptopics[np] = sink->parts[p].topic;
		pparts[np] = sink->parts[p].partition;
		next[np] = t->next;
		applied[np] = t->applied;
		dups[np] = t->duplicates;
		ts[np] = t->last_ts;
		tsnull[np] = (t->applied == 0 || t->last_ts_null);
		np++;
	}
	if (np == 0)
		return;
	args[0] = CStringGetTextDatum(sink->name);
	args[1] = text_array(ptopics, np);
	args[2] = int4_array(pparts, np);
	args[3] = int8_array(next, np);
	args[4] = int8_array(applied, np);
	args[5] = int8_array(dups, np);
	args[6] = timestamptz_array(ts, tsnull, np);
	if (SPI_execute_plan(plan_positions, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync sink: could not store the positions of sink \"%s\"", sink->name);
}

/*
 * Lock the sink and the batch's positions, decide what to apply, apply it
 * and store the positions.  Inside the transaction, SPI connected.
 */
static TryResult
batch_body(BatchWork *w)
{
	Sink	   *sink = w->sink;
	PartTally  *tally = w->tally;
	char	  **ptopics;
	int32	   *pparts;
	int			np = 0;
	int			nunknown = 0;
	Datum		args[2];
	bool		isnull;
	int			ret;
	int			nfast;
	bool	   *is_new;
	HandlerEnv	env;

	if (!sink_extension_ready())
		return TRY_GONE;
	ensure_plans();
	if (!sink_check(sink))
	{
		strlcpy(w->errbuf, sink->problem, w->errlen);
		return TRY_WAIT;
	}

	/* the sink's row: a pause, rewind or drop waits for this transaction */
	args[0] = CStringGetTextDatum(sink->name);
	ret = SPI_execute_plan(plan_lock_sink, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed == 0)
		return TRY_GONE;
	if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
	{
		sink->paused = true;
		return TRY_GONE;
	}
	MemoryContextSwitchTo(txn_cxt);

	/* the partitions of the batch; position rows that may be missing */
	for (int i = 0; i < sink->nbatch; i++)
		tally[sink->batch[i].part].in_batch = true;
	ptopics = palloc(sizeof(char *) * sink->nparts);
	pparts = palloc(sizeof(int32) * sink->nparts);
	for (int p = 0; p < sink->nparts; p++)
		if (tally[p].in_batch && !sink->parts[p].known)
		{
			ptopics[np] = sink->parts[p].topic;
			pparts[np++] = sink->parts[p].partition;
			nunknown++;
		}
	if (nunknown > 0)
	{
		/* (its row was deleted meanwhile: from the start of the batch) */
		Datum		a[4] = {args[0], text_array(ptopics, np), int4_array(pparts, np),
		int8_array(palloc0(sizeof(int64) * np), np)};

		if (SPI_execute_plan(plan_ensure_offsets, a, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "cqrs_sync sink: could not create positions of sink \"%s\"", sink->name);
	}
	np = 0;
	for (int p = 0; p < sink->nparts; p++)
		if (tally[p].in_batch)
		{
			ptopics[np] = sink->parts[p].topic;
			pparts[np++] = sink->parts[p].partition;
		}
	{
		Datum		a[3] = {args[0], text_array(ptopics, np), int4_array(pparts, np)};

		ret = SPI_execute_plan(plan_lock_offsets, a, NULL, false, 0);
	}
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync sink: could not lock the positions of sink \"%s\"", sink->name);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *topic = col_text(tup, desc, 1);
		int32		partition = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		int			p = find_part(sink, topic, partition);

		if (p < 0)
			continue;
		tally[p].locked = true;
		tally[p].stored = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		tally[p].next = tally[p].stored;
		/* rewound since the worker read it: fetch again from there */
		if (DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull)) != sink->parts[p].epoch)
			sink->parts[p].resync = true;
	}
	for (int p = 0; p < sink->nparts; p++)
		if (tally[p].in_batch && !tally[p].locked)
			sink->parts[p].resync = true;	/* its row is gone: read it again */

	/*
	 * Keys held behind an earlier event of theirs, read with a snapshot
	 * taken now (not read-only: the batch's snapshot was taken before the
	 * position rows were locked).  A worker that had these partitions until
	 * a rebalance may have committed a batch meanwhile, holding a key the
	 * positions it moved say this batch must not pass.
	 */
	ret = SPI_execute_plan(plan_held_keys, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync sink: could not read the held keys of sink \"%s\"", sink->name);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		int			p = find_part(sink, col_text(tup, desc, 1),
								  DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull)));

		if (p >= 0)
		{
			HeldKey    *h = MemoryContextAlloc(txn_cxt, sizeof(HeldKey));

			h->part = p;
			h->key = MemoryContextStrdup(txn_cxt, col_text(tup, desc, 3));
			w->held = lappend(w->held, h);
		}
	}
	MemoryContextSwitchTo(txn_cxt);

	/* the events to apply, in the batch's order */
	for (int i = 0; i < sink->nbatch; i++)
	{
		SinkMsg    *m = &sink->batch[i];
		PartTally  *t = &tally[m->part];
		SinkEvent  *ev;

		if (sink->parts[m->part].resync)
			continue;
		if (m->rkm->offset < t->stored)
			continue;			/* applied already */
		t->next = Max(t->next, m->rkm->offset + 1);
		ev = &w->events[w->nevents];
		event_from_message(ev, m->rkm, m->part, i);
		if (key_held(w->held, m->part, ev->key))
		{
			hold_event(sink, ev, NULL);
			t->held++;
			continue;
		}
		w->nevents++;
	}

	/* the inbox of the events without savepoints, in one statement */
	is_new = palloc0(sizeof(bool) * Max(w->nevents, 1));
	nfast = 0;
	while (nfast < w->nevents && w->events[nfast].batch_index < w->careful_from)
		nfast++;
	record_in_inbox(w, w->events, nfast, is_new);
	MemoryContextSwitchTo(txn_cxt);

	/* the events before careful_from: no savepoints */
	enter_handler(sink, &env);
	for (int e = 0; e < w->nevents && w->events[e].batch_index < w->careful_from; e++)
	{
		SinkEvent  *ev = &w->events[e];
		PartTally  *t = &tally[ev->part];

		if (!is_new[e])
		{
			t->duplicates++;
			continue;
		}
		MemoryContextSwitchTo(event_cxt);
		*w->current = ev->batch_index;
		run_handler(sink, ev);
		*w->current = -1;
		MemoryContextSwitchTo(txn_cxt);
		MemoryContextReset(event_cxt);
		t->applied++;
		t->last_ts = ev->ts;
		t->last_ts_null = ev->ts_null;
	}
	leave_handler(&env);

	/* the events from careful_from on: a savepoint each */
	for (int e = 0; e < w->nevents; e++)
	{
		SinkEvent  *ev = &w->events[e];

		if (ev->batch_index < w->careful_from)
			continue;
		if (key_held(w->held, ev->part, ev->key))
		{
			/* an earlier event of its key failed in this batch */
			hold_event(sink, ev, NULL);
			tally[ev->part].held++;
			continue;
		}
		apply_with_savepoint(w, ev);
	}

	store_positions(w);
	return TRY_DONE;
}

/*
 * One attempt at the batch.  Events whose batch index is careful_from or
 * more run with a savepoint each.  On a handler error outside a savepoint,
 * sets *careful_from to that event and returns TRY_CAREFUL.
 */
static TryResult
try_batch(Sink *sink, int *careful_from, char *errbuf, size_t errlen)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile int current = -1;
	volatile bool inbox_new = false;
	volatile TryResult result = TRY_DONE;
	BatchWork	w;

	MemoryContextReset(txn_cxt);
	MemoryContextSwitchTo(txn_cxt);
	memset(&w, 0, sizeof(w));
	w.sink = sink;
	w.careful_from = *careful_from;
	w.current = &current;
	w.inbox_new = &inbox_new;
	w.tally = palloc0(sizeof(PartTally) * Max(sink->nparts, 1));
	w.events = palloc(sizeof(SinkEvent) * Max(sink->nbatch, 1));
	w.errbuf = errbuf;
	w.errlen = errlen;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	w.txnowner = CurrentResourceOwner;
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "cqrs_sync sink: applying a batch");
		MemoryContextSwitchTo(txn_cxt);
		result = batch_body(&w);
		MemoryContextSwitchTo(txn_cxt);
		SPI_finish();
		PopActiveSnapshot();
		if (result == TRY_DONE)
			CommitTransactionCommand();
		else
			AbortCurrentTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata = cqrs_catch_and_abort(txn_cxt);

		if (current >= 0 && !sink_error_is_transient(edata->sqlerrcode))
		{
			*careful_from = current;
			result = TRY_CAREFUL;
		}
		else if (inbox_new && edata->sqlerrcode == ERRCODE_UNIQUE_VIOLATION)
		{
			/* an id was in the inbox: again at once, with ON CONFLICT */
			sink->inbox_dups = true;
			result = TRY_INBOX_DUPS;
		}
		else
		{
			strlcpy(errbuf, edata->message ? edata->message : "error", errlen);
			result = TRY_WAIT;
		}
		FreeErrorData(edata);
	}
	PG_END_TRY();

	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(oldcxt);
	if (result != TRY_DONE)
		return result;

	/* committed: what the worker now knows of its partitions */
	sink->held_last = 0;
	for (int p = 0; p < sink->nparts; p++)
	{
		/*
		 * Known only now: a batch that created the position and rolled back
		 * must create it again, not take it for deleted (and resync).
		 */
		if (w.tally[p].locked)
			sink->parts[p].known = true;
		if (w.tally[p].locked && !sink->parts[p].resync)
			sink->parts[p].position = w.tally[p].next;
		sink->held_last += w.tally[p].held;
	}
	return TRY_DONE;
}

/*
 * Apply the fetched messages of a sink (sink->batch) in one transaction.
 * Partitions found rewound are flagged resync; the caller drops their
 * messages and seeks.  On SINK_WAIT errbuf says why.
 */
SinkOutcome
sink_apply_batch(Sink *sink, char *errbuf, size_t errlen)
{
	int			careful_from = INT_MAX;

	ensure_contexts();
	/* each handler error restarts the batch once, with savepoints from it */
	for (int attempt = 0; attempt <= sink->nbatch; attempt++)
	{
		int			before = careful_from;

		switch (try_batch(sink, &careful_from, errbuf, errlen))
		{
			case TRY_DONE:
				return SINK_APPLIED;
			case TRY_WAIT:
				return SINK_WAIT;
			case TRY_GONE:
				return SINK_GONE;
			case TRY_CAREFUL:
				/* a handler raised outside a savepoint (never twice at one event) */
				if (careful_from >= before)
					careful_from = before == INT_MAX ? careful_from : before - 1;
				break;
			case TRY_INBOX_DUPS:
				/* the next attempt uses ON CONFLICT (inbox_dups is set) */
				break;
		}
	}
	strlcpy(errbuf, "a batch kept failing", errlen);
	return SINK_WAIT;
}

/* ---- positions on assignment -------------------------------------------------------- */

/*
 * The latest offsets of the partitions of parts (a partition list) whose
 * position the worker has not read yet, in ends[] (others: 0), asked of
 * Kafka (one request per broker).  False if Kafka did not answer for all.
 * (A resync of known partitions thus never waits for a broker away.)
 */
static bool
latest_offsets(Sink *sink, rd_kafka_topic_partition_list_t *parts, int64 *ends)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(Max(parts->cnt, 1));
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	bool		ok = true;

	for (int i = 0; i < parts->cnt; i++)
	{
		int			p = find_part(sink, parts->elems[i].topic, parts->elems[i].partition);

		if (p < 0 || !sink->parts[p].known)
			/* as a time, OFFSET_END means the latest */
			rd_kafka_topic_partition_list_add(list, parts->elems[i].topic,
											  parts->elems[i].partition)->offset = RD_KAFKA_OFFSET_END;
	}
	if (list->cnt > 0)
		err = rd_kafka_offsets_for_times(sink->rk, list, LATEST_OFFSETS_TIMEOUT_MS);
	for (int i = 0; i < parts->cnt && ok; i++)
	{
		rd_kafka_topic_partition_t *tp =
			rd_kafka_topic_partition_list_find(list, parts->elems[i].topic, parts->elems[i].partition);

		if (tp == NULL)
			continue;			/* known: not asked */
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR || tp->err != RD_KAFKA_RESP_ERR_NO_ERROR || tp->offset < 0)
		{
			ereport(LOG,
					(errmsg("cqrs_sync sink \"%s\": could not learn the latest offset of \"%s\" [%d]: %s",
							sink->name, tp->topic, tp->partition,
							rd_kafka_err2str(err != RD_KAFKA_RESP_ERR_NO_ERROR ? err : tp->err))));
			ok = false;
		}
		else
			ends[i] = tp->offset;
	}
	rd_kafka_topic_partition_list_destroy(list);
	return ok;
}

/*
 * Move the stored position of sink->parts[p] as consumer_error() asked
 * (SinkPart.move_from, move_to: a new epoch, as a rewind), unless it moved
 * meanwhile.  In sink_read_positions()'s transaction, before it reads.
 */
static void
move_position(Sink *sink, int p)
{
	SinkPart   *sp = &sink->parts[p];
	Oid			types[5] = {TEXTOID, TEXTOID, INT4OID, INT8OID, INT8OID};
	Datum		args[5];

	args[0] = CStringGetTextDatum(sink->name);
	args[1] = CStringGetTextDatum(sp->topic);
	args[2] = Int32GetDatum(sp->partition);
	args[3] = Int64GetDatum(sp->move_from);
	args[4] = Int64GetDatum(sp->move_to);
	if (SPI_execute_with_args(psprintf("UPDATE %s.cqrs_sink_offset"
									   " SET next_offset = $5, epoch = epoch OPERATOR(pg_catalog.+) 1,"
									   " updated_at = pg_catalog.now()"
									   " WHERE sink OPERATOR(pg_catalog.=) $1"
									   " AND topic OPERATOR(pg_catalog.=) $2"
									   " AND \"partition\" OPERATOR(pg_catalog.=) $3"
									   " AND next_offset OPERATOR(pg_catalog.=) $4",
									   sink_ext_schema()),
							  5, types, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync sink: could not move a position of sink \"%s\"", sink->name);
}

/*
 * Fill the offsets of parts (a partition list) from the stored positions of
 * the sink, and update the matching sink->parts.  A partition without a
 * position gets one first: 0 (the beginning), or for a sink that starts at
 * the latest offset, Kafka's latest offset now.  Storing that absolute
 * offset at once matters: a batch that must wait, a paused partition or a
 * rebalance would otherwise start at the latest offset again, and skip
 * what came meanwhile.  False on a database or Kafka error (then try again).
 */
bool
sink_read_positions(Sink *sink, rd_kafka_topic_partition_list_t *parts)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;
	int64	   *starts = palloc0(sizeof(int64) * Max(parts->cnt, 1));

	if (sink->start_latest && !latest_offsets(sink, parts, starts))
	{
		pfree(starts);
		return false;
	}

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		char	  **ptopics = palloc(sizeof(char *) * Max(parts->cnt, 1));
		int32	   *pparts = palloc(sizeof(int32) * Max(parts->cnt, 1));
		Datum		args[4];
		bool		isnull;

		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "cqrs_sync sink: reading positions");
		if (!sink_extension_ready())
			elog(ERROR, "extension \"cqrs_sync\" does not exist");
		ensure_plans();
		for (int i = 0; i < parts->cnt; i++)
		{
			ptopics[i] = parts->elems[i].topic;
			pparts[i] = parts->elems[i].partition;
			parts->elems[i].offset = RD_KAFKA_OFFSET_BEGINNING;
		}
		args[0] = CStringGetTextDatum(sink->name);
		args[1] = text_array(ptopics, parts->cnt);
		args[2] = int4_array(pparts, parts->cnt);
		args[3] = int8_array(starts, parts->cnt);
		if (SPI_execute_plan(plan_ensure_offsets, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "cqrs_sync sink: could not create positions of sink \"%s\"", sink->name);
		for (int i = 0; i < parts->cnt; i++)
		{
			int			p = find_part(sink, parts->elems[i].topic, parts->elems[i].partition);

			if (p >= 0 && sink->parts[p].move)
				move_position(sink, p);
		}
		/* (FOR UPDATE: a batch of another worker in flight commits first) */
		if (SPI_execute_plan(plan_lock_offsets, args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "cqrs_sync sink: could not read the positions of sink \"%s\"", sink->name);
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			HeapTuple	tup = SPI_tuptable->vals[r];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			char	   *topic = col_text(tup, desc, 1);
			int32		partition = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
			int64		position = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
			int32		epoch = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
			int			p = find_part(sink, topic, partition);

			for (int i = 0; i < parts->cnt; i++)
				if (parts->elems[i].partition == partition && strcmp(parts->elems[i].topic, topic) == 0)
					parts->elems[i].offset = position > 0 ? position : RD_KAFKA_OFFSET_BEGINNING;
			if (p >= 0)
			{
				sink->parts[p].position = position;
				sink->parts[p].epoch = epoch;
				sink->parts[p].known = true;
				sink->parts[p].resync = false;
				sink->parts[p].move = false;
			}
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata = cqrs_catch_and_abort(oldcxt);

		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": could not read the positions: %s",
						sink->name, edata->message)));
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(oldcxt);
	return ok;
}

/* ---- held events ------------------------------------------------------------------------ */

static bool
dead_letter_in_flight(int64 id)
{
	ListCell   *lc;

	foreach(lc, dead_letters_in_flight)
		if (*(int64 *) lfirst(lc) == id)
			return true;
	return false;
}

static Datum
sink_names(List *sinks, bool for_retries)
{
	char	  **names = palloc(sizeof(char *) * Max(list_length(sinks), 1));
	int			n = 0;
	ListCell   *lc;

	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		if (!for_retries || (!s->paused && s->usable))
			names[n++] = s->name;
	}
	return text_array(names, n);
}

/* The counters of a partition, for the held events handled. */
static void
add_counters(const char *sink, const char *topic, int32 partition, int64 applied,
			 int64 duplicates, int64 retried, int64 dead_lettered, int64 dlt_failed)
{
	Datum		args[8];

	args[0] = CStringGetTextDatum(sink);
	args[1] = CStringGetTextDatum(topic);
	args[2] = Int32GetDatum(partition);
	args[3] = Int64GetDatum(applied);
	args[4] = Int64GetDatum(duplicates);
	args[5] = Int64GetDatum(retried);
	args[6] = Int64GetDatum(dead_lettered);
	args[7] = Int64GetDatum(dlt_failed);
	if (SPI_execute_plan(plan_counters, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync sink: could not count the held events of sink \"%s\"", sink);
}

static void
lock_position(const char *sink, const char *topic, int32 partition)
{
	Datum		args[3];

	args[0] = CStringGetTextDatum(sink);
	args[1] = CStringGetTextDatum(topic);
	args[2] = Int32GetDatum(partition);
	if (SPI_execute_plan(plan_lock_offset_one, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync sink: could not lock a position of sink \"%s\"", sink);
}

/* The held events being tried again in one transaction. */
typedef struct RetryWork
{
	List	   *sinks;
	List	   *dead_letters;	/* SinkDeadLetter, in out_cxt */
	MemoryContext out_cxt;
	ResourceOwner txnowner;
	int			tried;
	TimestampTz next_due;
	/* the sink whose row is locked (skipped if paused or gone) */
	char	   *locked_sink;
	bool		sink_ok;
	/* the partition whose position is locked, and its counts */
	char	   *cur_sink;
	char	   *cur_topic;
	int32		cur_part;
	int64		c_applied;
	int64		c_dups;
	int64		c_retried;
} RetryWork;

static void
flush_counts(RetryWork *w)
{
	if (w->cur_sink != NULL && (w->c_applied || w->c_dups || w->c_retried))
		add_counters(w->cur_sink, w->cur_topic, w->cur_part, w->c_applied, w->c_dups,
					 w->c_retried, 0, 0);
	w->c_applied = w->c_dups = w->c_retried = 0;
}

/* An event over its budget: to the dead-letter topic, after the commit. */
static void
decide_dead_letter(RetryWork *w, Sink *sink, int64 id, SinkEvent *ev, int attempts,
				   const char *last_error)
{
	MemoryContext m = MemoryContextSwitchTo(w->out_cxt);
	SinkDeadLetter *dl = palloc0(sizeof(SinkDeadLetter));
	Datum		f[4];

	dl->held_id = id;
	strlcpy(dl->sink, sink->name, sizeof(dl->sink));
	dl->topic = pstrdup(ev->topic);
	dl->dlt_topic = sink->dlt_topic ? pstrdup(sink->dlt_topic) :
		psprintf("%s%s", ev->topic, sink->dlt_suffix);
	dl->partition = ev->partition;
	dl->offset = ev->offset;
	dl->key = ev->key ? pstrdup(ev->key) : NULL;
	if (ev->value)
		dl->value = DatumGetByteaPP(bytea_datum(ev->value, ev->valuelen));
	dl->headers_json = pstrdup(event_headers_text(ev));
	dl->raw_key = ev->raw_key ? DatumGetByteaPCopy(PointerGetDatum(ev->raw_key)) : NULL;
	dl->raw_headers = ev->raw_headers ? pstrdup(ev->raw_headers) : NULL;
	dl->event_id = ev->event_id ? pstrdup(ev->event_id) : NULL;
	dl->attempts = attempts;
	dl->last_error = pstrdup(last_error ? last_error : "");
	w->dead_letters = lappend(w->dead_letters, dl);
	MemoryContextSwitchTo(m);

	/* not tried again while its dead letter is in flight */
	f[0] = Int64GetDatum(id);
	f[1] = Int32GetDatum(attempts);
	f[2] = TimestampTzGetDatum(TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														   DEAD_LETTER_GUARD_MS));
	f[3] = CStringGetTextDatum(last_error ? last_error : "");
	if (SPI_execute_plan(plan_held_failed, f, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync sink: could not mark a dead letter");
}

/*
 * One held event tried again, with a savepoint: applied (its row deleted),
 * or failed (its budget spent a little more).  A transient error is thrown
 * on.
 */
static void
retry_one(RetryWork *w, Sink *sink, int64 id, SinkEvent *ev, int attempts, bool replay)
{
	volatile bool is_handler = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(event_cxt);
	PG_TRY();
	{
		bool		new = inbox_then_handler(sink, ev, &is_handler);
		Datum		args[1];

		args[0] = Int64GetDatum(id);
		if (SPI_execute_plan(plan_delete_held, args, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "cqrs_sync sink: could not release a held event");
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(txn_cxt);
		CurrentResourceOwner = w->txnowner;
		if (new)
			w->c_applied++;
		else
			w->c_dups++;
		if (attempts > 0)
			w->c_retried++;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		Datum		f[4];
		int			failed = attempts + 1;
		TimestampTz next;

		MemoryContextSwitchTo(txn_cxt);
		edata = CopyErrorData();
		if (!is_handler || sink_error_is_transient(edata->sqlerrcode))
			PG_RE_THROW();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(txn_cxt);
		CurrentResourceOwner = w->txnowner;

		/* the event's failure spends its budget */
		if (attempts > 0)
			w->c_retried++;
		next = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   failed > sink->max_retries ? 0 :
										   (int64) sink->retry_backoff_ms << Min(attempts, 6));
		f[0] = Int64GetDatum(id);
		f[1] = Int32GetDatum(failed);
		f[2] = TimestampTzGetDatum(next);
		f[3] = CStringGetTextDatum(edata->message);
		if (SPI_execute_plan(plan_held_failed, f, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "cqrs_sync sink: could not record a failed attempt");
		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": attempt %d of the held event of %s[%d] at offset " INT64_FORMAT " failed: %s",
						sink->name, failed, ev->topic, ev->partition, ev->offset, edata->message),
				 failed > sink->max_retries ?
				 errdetail("Its retry budget (%d) is spent: it goes to the dead-letter topic.",
						   sink->max_retries) :
				 errdetail("It is tried again later%s.", replay ? "" : "; later events of its key wait for it")));
		if (failed > sink->max_retries)
			decide_dead_letter(w, sink, id, ev, failed, edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextReset(event_cxt);
}

/* The due held events, inside the transaction, SPI connected. */
static void
retry_body(RetryWork *w)
{
	Datum		args[1];
	bool		isnull;
	SPITupleTable *due;
	uint64		ndue;
	ListCell   *lc;

	if (!sink_extension_ready())
		return;
	ensure_plans();
	/* (a sink that cannot run keeps its held events for later) */
	foreach(lc, w->sinks)
	{
		Sink	   *s = lfirst(lc);

		if (!s->paused)
			check_quietly(s);
	}
	MemoryContextSwitchTo(txn_cxt);

	args[0] = sink_names(w->sinks, true);
	if (SPI_execute_plan(plan_due, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync sink: could not read the held events");
	due = SPI_tuptable;
	ndue = SPI_processed;
	MemoryContextSwitchTo(txn_cxt);

	for (uint64 r = 0; r < ndue; r++)
	{
		HeapTuple	tup = due->vals[r];
		TupleDesc	desc = due->tupdesc;
		int64		id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		char	   *sname = col_text(tup, desc, 2);
		Sink	   *sink = sink_find(w->sinks, sname);
		SinkEvent	ev;
		int			attempts;
		bool		replay;
		Datum		d;
		Datum		a[1];

		if (sink == NULL || dead_letter_in_flight(id))
			continue;
		/* the sink's row first, as batches do: a pause waits, then holds */
		if (w->locked_sink == NULL || strcmp(w->locked_sink, sname) != 0)
		{
			Datum		a1[1];

			w->locked_sink = sname;
			a1[0] = CStringGetTextDatum(sname);
			w->sink_ok = SPI_execute_plan(plan_lock_sink, a1, NULL, false, 1) == SPI_OK_SELECT &&
				SPI_processed == 1 &&
				!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			MemoryContextSwitchTo(txn_cxt);
		}
		if (!w->sink_ok)
			continue;
		memset(&ev, 0, sizeof(ev));
		ev.topic = col_text(tup, desc, 3);
		ev.partition = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
		ev.offset = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
		ev.key = col_text(tup, desc, 6);
		d = SPI_getbinval(tup, desc, 7, &isnull);
		if (!isnull)
		{
			bytea	   *value = DatumGetByteaPP(d);

			ev.value = VARDATA_ANY(value);
			ev.valuelen = VARSIZE_ANY_EXHDR(value);
		}
		ev.headers = col_text(tup, desc, 8);
		if (ev.headers == NULL)
			ev.headers = "{}";
		ev.headers_jsonb = NULL;
		ev.event_id = col_text(tup, desc, 9);
		d = SPI_getbinval(tup, desc, 14, &isnull);
		ev.raw_key = isnull ? NULL : DatumGetByteaPCopy(d);
		ev.raw_headers = col_text(tup, desc, 15);
		d = SPI_getbinval(tup, desc, 10, &isnull);
		ev.ts_null = isnull;
		if (!isnull)
			ev.ts = DatumGetTimestampTz(d);
		replay = DatumGetBool(SPI_getbinval(tup, desc, 12, &isnull));
		ev.part = -1;

		/* the partition's position first, then the event (as batches do) */
		if (w->cur_sink == NULL || strcmp(w->cur_sink, sname) != 0 ||
			strcmp(w->cur_topic, ev.topic) != 0 || w->cur_part != ev.partition)
		{
			flush_counts(w);
			w->cur_sink = sname;
			w->cur_topic = (char *) ev.topic;
			w->cur_part = ev.partition;
			lock_position(sname, ev.topic, ev.partition);
		}
		a[0] = Int64GetDatum(id);
		if (SPI_execute_plan(plan_lock_held, a, NULL, false, 0) != SPI_OK_SELECT ||
			SPI_processed == 0)
			continue;			/* another worker has it, or it was discarded */
		attempts = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		MemoryContextSwitchTo(txn_cxt);
		w->tried++;

		if (attempts > sink->max_retries)
			decide_dead_letter(w, sink, id, &ev, attempts, col_text(tup, desc, 13));
		else
			retry_one(w, sink, id, &ev, attempts, replay);
	}
	flush_counts(w);

	/* when to look again */
	args[0] = sink_names(w->sinks, true);
	if (SPI_execute_plan(plan_next_due, args, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		int64		n = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));

		if (n > 0)
			w->next_due = isnull ? GetCurrentTimestamp() : DatumGetTimestampTz(d);
	}
}

/*
 * Try the due held events of the sinks again, in one transaction: the first
 * held event of each key, and replayed ones.  Events over their budget are
 * appended to *dead_letters (allocated in the caller's memory context), to
 * be produced after the commit.  *next_due: when a held event is due next
 * (0: none held).  Returns the events tried, or -1 on a transient error
 * (errbuf says which).
 */
int
sink_retry_due(List *sinks, List **dead_letters, TimestampTz *next_due,
			   char *errbuf, size_t errlen)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool failed = false;
	RetryWork	w;
	ListCell   *lc;

	ensure_contexts();
	MemoryContextReset(txn_cxt);
	memset(&w, 0, sizeof(w));
	w.sinks = sinks;
	w.out_cxt = oldcxt;
	w.cur_part = -1;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	w.txnowner = CurrentResourceOwner;
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "cqrs_sync sink: trying held events again");
		MemoryContextSwitchTo(txn_cxt);
		retry_body(&w);
		MemoryContextSwitchTo(txn_cxt);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata = cqrs_catch_and_abort(txn_cxt);

		strlcpy(errbuf, edata->message ? edata->message : "error", errlen);
		FreeErrorData(edata);
		failed = true;
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(oldcxt);
	*next_due = w.next_due;
	if (failed)
		return -1;

	/* remembered until their delivery report is recorded */
	MemoryContextSwitchTo(TopMemoryContext);
	foreach(lc, w.dead_letters)
	{
		int64	   *id = palloc(sizeof(int64));

		*id = ((SinkDeadLetter *) lfirst(lc))->held_id;
		dead_letters_in_flight = lappend(dead_letters_in_flight, id);
	}
	MemoryContextSwitchTo(oldcxt);
	*dead_letters = list_concat(*dead_letters, w.dead_letters);
	return w.tried;
}

/*
 * Record a dead letter's outcome: DEAD_LETTERED where Kafka wrote it, or
 * DLT_FAILED (with a notification on cqrs_sync_alert).  Errors are logged
 * and the event is tried again later (a dead letter twice, at worst).
 */
void
sink_record_dead_letter(SinkDeadLetter *dl, bool ok, int32 dlt_partition, int64 dlt_offset,
						const char *error)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ListCell   *lc;

	foreach(lc, dead_letters_in_flight)
		if (*(int64 *) lfirst(lc) == dl->held_id)
		{
			pfree(lfirst(lc));
			dead_letters_in_flight = foreach_delete_current(dead_letters_in_flight, lc);
			break;
		}

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		Datum		args[6];
		char		nulls[6];
		char	   *last_error;

		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "cqrs_sync sink: recording a dead letter");
		if (!sink_extension_ready())
			elog(ERROR, "extension \"cqrs_sync\" does not exist");
		ensure_plans();
		lock_position(dl->sink, dl->topic, dl->partition);

		memset(nulls, ' ', sizeof(nulls));
		last_error = ok ? dl->last_error :
			psprintf("%s; dead-letter topic \"%s\": %s", dl->last_error, dl->dlt_topic, error);
		args[0] = Int64GetDatum(dl->held_id);
		args[1] = CStringGetTextDatum(ok ? "DEAD_LETTERED" : "DLT_FAILED");
		args[2] = CStringGetTextDatum(dl->dlt_topic);
		args[3] = Int32GetDatum(dlt_partition);
		args[4] = Int64GetDatum(dlt_offset);
		if (!ok || dlt_partition < 0)
			nulls[3] = nulls[4] = 'n';
		args[5] = CStringGetTextDatum(last_error);
		if (SPI_execute_plan(plan_dead_lettered, args, nulls, false, 0) != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "cqrs_sync sink: could not record a dead letter");
		if (SPI_processed == 1)
		{
			add_counters(dl->sink, dl->topic, dl->partition, 0, 0, 0, ok ? 1 : 0, ok ? 0 : 1);
			if (!ok)
			{
				StringInfoData json;

				initStringInfo(&json);
				appendStringInfoString(&json, "{\"alert\":\"sink_dlt_failed\",\"sink\":");
				escape_json(&json, dl->sink);
				appendStringInfo(&json, ",\"held_id\":" INT64_FORMAT ",\"topic\":", dl->held_id);
				escape_json(&json, dl->topic);
				appendStringInfo(&json, ",\"partition\":%d,\"offset\":" INT64_FORMAT ",\"dlt_topic\":",
								 dl->partition, dl->offset);
				escape_json(&json, dl->dlt_topic);
				appendStringInfoChar(&json, '}');
				cqrs_notify_alert("sink", json.data);
			}
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
		MemoryContextSwitchTo(oldcxt);
		if (ok)
			ereport(LOG,
					(errmsg("cqrs_sync sink \"%s\": the event of %s[%d] at offset " INT64_FORMAT " was dead-lettered to %s[%d] at offset " INT64_FORMAT,
							dl->sink, dl->topic, dl->partition, dl->offset, dl->dlt_topic,
							dlt_partition, dlt_offset)));
		else
			ereport(WARNING,
					(errcode(CQRS_ERRCODE_SINK_DLT_FAILED),
					 errmsg("cqrs_sync sink \"%s\": the dead-letter topic \"%s\" refused the event of %s[%d] at offset " INT64_FORMAT ": %s",
							dl->sink, dl->dlt_topic, dl->topic, dl->partition, dl->offset, error),
					 errdetail("The event is kept as DLT_FAILED in cqrs_sink_held (id " INT64_FORMAT ") until an operator replays or discards it.",
							   dl->held_id),
					 errhint("Fix the dead-letter topic (its existence, permissions, max.message.bytes), then SELECT cqrs_sink_replay(" INT64_FORMAT ").",
							 dl->held_id)));
	}
	PG_CATCH();
	{
		ErrorData  *edata = cqrs_catch_and_abort(oldcxt);

		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": could not record the dead letter of held event " INT64_FORMAT ": %s",
						dl->sink, dl->held_id, edata->message),
				 errdetail("It is dead-lettered again when it is next due.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(oldcxt);
}

/* ---- replays from the dead-letter topic -------------------------------------------------- */

/*
 * The next replay request of the sinks (status FETCH) that is due: a list of
 * one SinkDeadLetter with held_id, sink, dlt_topic, partition (of the DLT)
 * and offset (in the DLT); NIL if none or on error.
 */
List *
sink_fetch_requests(List *sinks)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	List	   *volatile result = NIL;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		Datum		args[1];
		bool		isnull;

		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (sink_extension_ready())
		{
			ensure_plans();
			args[0] = sink_names(sinks, false);
			if (SPI_execute_plan(plan_fetch_requests, args, NULL, true, 1) == SPI_OK_SELECT &&
				SPI_processed == 1)
			{
				HeapTuple	tup = SPI_tuptable->vals[0];
				TupleDesc	desc = SPI_tuptable->tupdesc;
				MemoryContext m = MemoryContextSwitchTo(oldcxt);
				SinkDeadLetter *r = palloc0(sizeof(SinkDeadLetter));

				r->held_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
				strlcpy(r->sink, col_text(tup, desc, 2), sizeof(r->sink));
				r->dlt_topic = col_text(tup, desc, 3);
				r->partition = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
				r->offset = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
				result = list_make1(r);
				MemoryContextSwitchTo(m);
			}
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		FlushErrorState();
		AbortCurrentTransaction();
		result = NIL;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
	return result;
}

static const char *
header_value(rd_kafka_headers_t *hdrs, const char *name, char *buf, size_t len)
{
	const void *val;
	size_t		size;

	if (hdrs == NULL || rd_kafka_header_get_last(hdrs, name, &val, &size) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		val == NULL)
		return NULL;
	size = Min(size, len - 1);
	memcpy(buf, val, size);
	buf[size] = '\0';
	return buf;
}

static bool
dead_letter_header(const char *name)
{
	return strncmp(name, "x-original-", 11) == 0 || strcmp(name, "x-failure-source") == 0 ||
		strcmp(name, "x-retry-count") == 0 || strcmp(name, "x-last-error") == 0 ||
		strcmp(name, "x-sink") == 0;
}

/* The replayed event's row, inside the transaction, SPI connected. */
static void
record_fetched_body(int64 held_id, rd_kafka_message_t *rkm, rd_kafka_headers_t *hdrs,
					const char *topic, int32 partition, int64 offset, const char *error)
{
	Datum		args[11];
	char		nulls[11];
	SinkEvent	ev;
	StringInfoData json;
	const char *name;
	const void *val;
	size_t		size;
	bool		first = true;

	if (!sink_extension_ready())
		elog(ERROR, "extension \"cqrs_sync\" does not exist");
	ensure_plans();
	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(held_id);
	if (rkm == NULL)
	{
		args[1] = CStringGetTextDatum(error);
		if (SPI_execute_plan(plan_fetch_failed, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "cqrs_sync sink: could not record a failed replay");
		return;
	}

	/* the event as it was: without the dead-letter headers */
	event_from_message(&ev, rkm, -1, -1);
	initStringInfo(&json);
	appendStringInfoChar(&json, '{');
	for (size_t i = 0; hdrs && rd_kafka_header_get_all(hdrs, i, &name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
	{
		if (dead_letter_header(name))
			continue;
		if (!first)
			appendStringInfoChar(&json, ',');
		first = false;
		escape_json(&json, sink_text(name, strlen(name)));
		appendStringInfoChar(&json, ':');
		if (val)
			escape_json(&json, sink_text(val, size));
		else
			appendStringInfoString(&json, "null");
	}
	appendStringInfoChar(&json, '}');

	args[1] = CStringGetTextDatum(topic);
	args[2] = Int32GetDatum(partition);
	args[3] = Int64GetDatum(offset);
	if (ev.key)
		args[4] = CStringGetTextDatum(ev.key);
	else
		nulls[4] = 'n';
	if (ev.value)
		args[5] = bytea_datum(ev.value, ev.valuelen);
	else
		nulls[5] = 'n';
	args[6] = CStringGetTextDatum(json.data);
	if (ev.event_id)
		args[7] = CStringGetTextDatum(ev.event_id);
	else
		nulls[7] = 'n';
	args[8] = TimestampTzGetDatum(ev.ts);
	if (ev.ts_null)
		nulls[8] = 'n';
	message_raw_args(rkm, true, &args[9], &nulls[9]);
	if (SPI_execute_plan(plan_fetched, args, nulls, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync sink: could not record a replayed event");
}

/* The transaction of sink_record_fetched(). */
static void
record_fetched_txn(Sink *sink, int64 held_id, rd_kafka_message_t *rkm, rd_kafka_headers_t *hdrs,
				   const char *topic, int32 partition, int64 offset, const char *error)
{
	MemoryContext oldcxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		record_fetched_body(held_id, rkm, hdrs, topic, partition, offset, error);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata = cqrs_catch_and_abort(oldcxt);

		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": could not record replay request " INT64_FORMAT ": %s",
						sink->name, held_id, edata->message)));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
}

static bool
sink_consumes(Sink *sink, const char *topic)
{
	for (int i = 0; i < sink->ntopics; i++)
		if (strcmp(sink->topics[i], topic) == 0)
			return true;
	return false;
}

/*
 * A replay request's message was read from the dead-letter topic (rkm), or
 * could not be (error): the held row becomes the original event, RETRY and
 * due now, or keeps FETCH with the error for a minute.
 */
void
sink_record_fetched(Sink *sink, int64 held_id, rd_kafka_message_t *rkm, const char *error)
{
	char		topic[CQRS_TOPIC_NAMELEN];
	char		num[32];
	char		errtext[512];
	int32		partition = -1;
	int64		offset = -1;
	rd_kafka_headers_t *hdrs = NULL;

	topic[0] = '\0';
	if (rkm != NULL)
	{
		if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
			hdrs = NULL;
		if (header_value(hdrs, "x-original-topic", topic, sizeof(topic)) == NULL ||
			header_value(hdrs, "x-original-partition", num, sizeof(num)) == NULL)
		{
			snprintf(errtext, sizeof(errtext),
					 "the message at offset " INT64_FORMAT " of %s[%d] has no x-original-topic and x-original-partition headers",
					 rkm->offset, rd_kafka_topic_name(rkm->rkt), rkm->partition);
			error = errtext;
			rkm = NULL;
		}
		else if (!sink_consumes(sink, topic))
		{
			/* it would be applied as an event of a topic the sink never had */
			snprintf(errtext, sizeof(errtext),
					 "the message at offset " INT64_FORMAT " of %s[%d] names topic \"%s\" in x-original-topic, which sink \"%s\" does not consume",
					 rkm->offset, rd_kafka_topic_name(rkm->rkt), rkm->partition, topic, sink->name);
			error = errtext;
			rkm = NULL;
		}
		else
		{
			partition = atoi(num);
			offset = header_value(hdrs, "x-original-offset", num, sizeof(num)) ? strtoll(num, NULL, 10) : 0;
		}
	}
	record_fetched_txn(sink, held_id, rkm, hdrs, topic, partition, offset, error);
	if (rkm == NULL && error != NULL)
		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": replay request " INT64_FORMAT " failed: %s",
						sink->name, held_id, error),
				 errdetail("It is tried again in a minute; cqrs_sink_discard() drops the request.")));
}
