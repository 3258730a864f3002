/*-------------------------------------------------------------------------
 *
 * enqueue.c
 *	  cqrs_enqueue(): validates an event and writes it to the outbox in the
 *	  caller's transaction, registering the transaction's keys in the
 *	  in-flight registry first (see shmem.c), and wakes the relay when the
 *	  transaction commits.  Attached outbox tables (attach.c) hand their rows
 *	  to the same path, cqrs_enqueue_event().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_sequence.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "replication/syncrep.h"
#include "replication/walsender_private.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

#include "enqueue.h"
#include "shmem.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_enqueue);
PG_FUNCTION_INFO_V1(cqrs_wake_relay_sql);
PG_FUNCTION_INFO_V1(cqrs_relay_revisit);
PG_FUNCTION_INFO_V1(cqrs_discard_check);

/* Kafka's limit on topic names (Topic.MAX_NAME_LENGTH). */
#define KAFKA_TOPIC_MAX_LEN 249

static bool enqueued_in_xact = false;
/* at commit, wake the relay and have its scan go back to this id; MAX: no */
static int64 wake_from = PG_INT64_MAX;
static bool early_commit = false;	/* counted in cqrs_early_commit_begin() */

/* The prepared INSERTs, and the extension they were prepared for. */
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr insert_id_plan = NULL;
static SPIPlanPtr insert_new_plan = NULL;
static Oid	insert_plan_ext = InvalidOid;
static Oid	outbox_seq = InvalidOid;	/* cqrs_outbox.id's sequence */

/*
 * Will this transaction's commit be visible before it is durable?  With
 * synchronous_commit = off it is visible before it is flushed; with local
 * while synchronous standbys are configured, before the standbys have it.
 * (A commit that must be flushed anyway, one that dropped a table, is
 * counted too: the relay then flushes for nothing.)  A higher level whose
 * wait for the standbys is cancelled is visible early too: see
 * cqrs_enqueue_log_hook().
 */
static bool
commit_visible_early(void)
{
	if (synchronous_commit == SYNCHRONOUS_COMMIT_OFF)
		return true;
	if (!cqrs_sync_standbys_configured())
		return false;
	if (synchronous_commit == SYNCHRONOUS_COMMIT_LOCAL_FLUSH)
		return true;

	/*
	 * emit_log_hook sees only what goes to the server log: where warnings
	 * do not (log_min_messages above warning; its log level logs only log
	 * and fatal and above), a cancelled wait would be counted only after the
	 * commit is visible, so every commit counts itself before.
	 */
	return log_min_messages == LOG || log_min_messages > WARNING;
}

/*
 * Did the standbys confirm this transaction's commit?  For a commit whose
 * level waits for them (remote_write and above).
 */
static bool
standbys_confirmed_commit(void)
{
	int			mode;
	XLogRecPtr	confirmed;

	switch (synchronous_commit)
	{
		case SYNCHRONOUS_COMMIT_REMOTE_WRITE:
			mode = SYNC_REP_WAIT_WRITE;
			break;
		case SYNCHRONOUS_COMMIT_REMOTE_FLUSH:
			mode = SYNC_REP_WAIT_FLUSH;
			break;
		case SYNCHRONOUS_COMMIT_REMOTE_APPLY:
			mode = SYNC_REP_WAIT_APPLY;
			break;
		default:
			return false;
	}
	LWLockAcquire(SyncRepLock, LW_SHARED);
	confirmed = WalSndCtl->lsn[mode];
	LWLockRelease(SyncRepLock);
	return confirmed >= XactLastCommitEnd;
}

/*
 * A commit waiting for the synchronous standbys whose wait is cancelled
 * (pg_cancel_backend(), a client's cancel, pg_terminate_backend()) becomes
 * visible without them: "committed locally, but might not have been
 * replicated".  SyncRepWaitForLSN() says so with a WARNING while the
 * backend is still waiting, before the commit is visible: a transaction
 * that enqueued counts itself then as an early commit, so the relay waits
 * for the standbys before it produces its rows.  (Should the WARNING be
 * emitted nowhere, the commit callback counts it, a moment late.)
 */
static emit_log_hook_type prev_emit_log_hook = NULL;

static void
cqrs_enqueue_log_hook(ErrorData *edata)
{
	if (edata->elevel == WARNING && enqueued_in_xact && !early_commit &&
		MyProc != NULL && MyProc->syncRepState == SYNC_REP_WAITING &&
		cqrs_shared != NULL)
	{
		cqrs_early_commit_begin();
		early_commit = true;
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

static void
cqrs_xact_callback(XactEvent event, void *arg)
{
	/*
	 * Before the commit can become visible, and after it was written (or the
	 * transaction aborted): the relay flushes only for such commits.
	 */
	if (event == XACT_EVENT_PRE_COMMIT &&
		(enqueued_in_xact || wake_from != PG_INT64_MAX) &&
		cqrs_shared != NULL && commit_visible_early())
	{
		cqrs_early_commit_begin();
		early_commit = true;
	}
	else if (early_commit && (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT))
	{
		cqrs_early_commit_end(event == XACT_EVENT_COMMIT ? XactLastCommitEnd : InvalidXLogRecPtr);
		early_commit = false;
	}
	else if (event == XACT_EVENT_COMMIT && enqueued_in_xact && cqrs_shared != NULL &&
			 synchronous_commit > SYNCHRONOUS_COMMIT_LOCAL_FLUSH &&
			 cqrs_sync_standbys_configured() && !standbys_confirmed_commit())
	{
		/* its cancelled wait was not logged (cqrs_enqueue_log_hook()) */
		cqrs_early_commit_begin();
		cqrs_early_commit_end(XactLastCommitEnd);
	}

	if (wake_from != PG_INT64_MAX && (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT))
	{
		/* rows from wake_from on may be PENDING again: the relay goes back */
		if (event == XACT_EVENT_COMMIT)
			cqrs_request_rescan(wake_from);
		wake_from = PG_INT64_MAX;
	}
	if (!enqueued_in_xact)
		return;

	switch (event)
	{
		case XACT_EVENT_PRE_PREPARE:
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("cannot prepare a transaction that called cqrs_enqueue()"),
					 errdetail("The relay must know when an enqueuing transaction ends to keep per-key order."),
					 errhint("Inserting into an outbox table attached with cqrs_attach_outbox() calls it too.")));
			break;
		case XACT_EVENT_COMMIT:
			/* runs after the commit became visible to new snapshots */
			cqrs_inflight_clear();
			cqrs_wake_relay();
			enqueued_in_xact = false;
			break;
		case XACT_EVENT_ABORT:
			cqrs_inflight_clear();
			enqueued_in_xact = false;
			break;
		default:
			break;
	}
}

void
cqrs_enqueue_init(void)
{
	RegisterXactCallback(cqrs_xact_callback, NULL);
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = cqrs_enqueue_log_hook;
}

/*
 * Version 0.1.0's cqrs_wake_relay() -> void: when this transaction commits,
 * wake the relay and have it scan the outbox from the start (an operator made
 * rows PENDING again, below where the relay's scan has got to).
 */
Datum
cqrs_wake_relay_sql(PG_FUNCTION_ARGS)
{
	wake_from = 1;
	PG_RETURN_VOID();
}

/*
 * cqrs_relay_revisit(from_id bigint) -> void: a row at from_id was made
 * PENDING again.  Lowers cqrs_relay_mark.scan_from to it in this transaction,
 * so that a relay restarted later goes back there too (the update locks the
 * mark's row: the relay does not move it past the row meanwhile).  When the
 * transaction commits, wakes the relay and has its scan go back there.
 */
Datum
cqrs_relay_revisit(PG_FUNCTION_ARGS)
{
	int64		from = Max(PG_GETARG_INT64(0), 1);
	Oid			nsp = get_func_namespace(fcinfo->flinfo->fn_oid);
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(from)};
	char	   *sql;

	sql = psprintf("UPDATE %s.cqrs_relay_mark SET scan_from = least(scan_from, $1)",
				   quote_identifier(get_namespace_name(nsp)));
	SPI_connect();
	if (SPI_execute_with_args(sql, 1, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_relay_revisit: could not update cqrs_relay_mark");
	SPI_finish();
	pfree(sql);

	wake_from = Min(wake_from, from);
	PG_RETURN_VOID();
}

/* Kafka topic names: 1-249 of [A-Za-z0-9._-], and not "." or "..". */
bool
cqrs_topic_name_valid(const char *topic)
{
	size_t		len = strlen(topic);

	if (len == 0 || len > KAFKA_TOPIC_MAX_LEN)
		return false;
	if (strcmp(topic, ".") == 0 || strcmp(topic, "..") == 0)
		return false;
	for (const char *p = topic; *p; p++)
	{
		char		c = *p;

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
			return false;
	}
	return true;
}

/* headers must be a JSON object whose values are strings */
static void
check_headers(Jsonb *headers)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *name = NULL;

	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("headers must be a JSON object"),
				 errhint("Pass an object of string values, for example '{\"trace-id\": \"abc\"}', or NULL.")));

	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			name = pnstrdup(v.val.string.val, v.val.string.len);
			if (strcmp(name, "event_id") == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("header name \"event_id\" is reserved"),
						 errdetail("The relay sends the outbox row's event_id under this name.")));
		}
		else if (tok == WJB_VALUE && v.type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("value of header \"%s\" must be a JSON string", name),
					 errhint("Kafka header values are byte strings; convert numbers and objects to text.")));
	}
}

/*
 * The relay's order and its high-water mark rely on outbox ids handed out in
 * the order of the sequence, which a cache of more than one value per
 * session breaks: a session takes an id from its cache, below the
 * sequence's last value, after the relay has passed it, and the row is
 * never sent.  Refused before an id is taken.
 */
static void
check_sequence_cache(void)
{
	HeapTuple	tup = SearchSysCache1(SEQRELID, ObjectIdGetDatum(outbox_seq));
	int64		cache;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for sequence %u", outbox_seq);
	cache = ((Form_pg_sequence) GETSTRUCT(tup))->seqcache;
	ReleaseSysCache(tup);
	if (cache > 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("sequence \"%s\" caches " INT64_FORMAT " values per session",
						get_rel_name(outbox_seq), cache),
				 errdetail("The relay sends outbox rows in the order of their ids, and a cached id is handed out after higher ones: its row could be passed over and never sent."),
				 errhint("Run ALTER SEQUENCE %s CACHE 1.",
						 quote_qualified_identifier(get_namespace_name(get_rel_namespace(outbox_seq)),
													get_rel_name(outbox_seq)))));
}

static SPIPlanPtr
prepare_one(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

static void
prepare_inserts(Oid ext_oid)
{
	const char *schema = quote_identifier(cqrs_extension_schema(ext_oid));
	Oid			argtypes[5] = {TEXTOID, TEXTOID, JSONBOID, JSONBOID, UUIDOID};
	SPIPlanPtr	plan;
	SPIPlanPtr	id_plan;
	SPIPlanPtr	new_plan;
	Oid			seq;
	bool		isnull;

	plan = prepare_one(psprintf("INSERT INTO %s.cqrs_outbox (topic, key, payload, headers) "
								"VALUES ($1, $2, $3, $4) RETURNING id", schema),
					   4, argtypes);
	/* an event with an id of its own (an attached outbox table's) */
	id_plan = prepare_one(psprintf("INSERT INTO %s.cqrs_outbox (topic, key, payload, headers, event_id) "
								   "VALUES ($1, $2, $3, $4, $5) RETURNING id", schema),
						  5, argtypes);
	/* ... unless it is in the outbox already */
	new_plan = prepare_one(psprintf("INSERT INTO %s.cqrs_outbox (topic, key, payload, headers, event_id) "
									"VALUES ($1, $2, $3, $4, $5) "
									"ON CONFLICT (event_id) DO NOTHING RETURNING id", schema),
						   5, argtypes);
	/* the sequence first: the plans are stored only when all is known */
	if (SPI_execute(psprintf("SELECT pg_catalog.pg_get_serial_sequence('%s.cqrs_outbox', 'id')"
							 "::pg_catalog.regclass::pg_catalog.oid", schema),
					true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cqrs_enqueue: could not find the sequence of %s.cqrs_outbox", schema);
	seq = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
										 1, &isnull));
	if (isnull)
		elog(ERROR, "cqrs_enqueue: %s.cqrs_outbox.id has no sequence", schema);
	if (insert_plan)
		SPI_freeplan(insert_plan);
	if (insert_id_plan)
		SPI_freeplan(insert_id_plan);
	if (insert_new_plan)
		SPI_freeplan(insert_new_plan);
	insert_plan = plan;
	insert_id_plan = id_plan;
	insert_new_plan = new_plan;
	insert_plan_ext = ext_oid;
	outbox_seq = seq;
}

/*
 * cqrs_enqueue_event(): validates an event and inserts it into the outbox
 * as the current user, registering its key in the in-flight registry before
 * the INSERT takes its id (so that the relay keeps order per key across
 * out-of-order commits), and has the relay woken when the transaction
 * commits.  key, headers and event_id may be NULL (a NULL event_id: a new
 * one is generated).  Returns the outbox id.  With if_new, an event whose
 * event_id is in the outbox already is not inserted again, and 0 is
 * returned.  Used by cqrs_enqueue() and by attached outbox tables
 * (attach.c).
 */
int64
cqrs_enqueue_event(text *topic_t, text *key, Jsonb *payload, Jsonb *headers,
				   pg_uuid_t *event_id, bool if_new)
{
	char	   *topic = text_to_cstring(topic_t);
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	uint64		keyhash;
	Oid			ext_oid;
	bool		isnull;
	int64		id;
	int			ret;
	SPIPlanPtr	plan;

	if (topic[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topic must not be empty")));
	if (!cqrs_topic_name_valid(topic))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Kafka topic name \"%s\"", topic),
				 errdetail("Topic names are 1 to 249 ASCII letters, digits, periods, underscores or hyphens, and may not be \".\" or \"..\".")));
	if (payload == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("payload must not be null"),
				 errhint("Use the JSON value 'null'::jsonb for an event without a body.")));
	if (headers != NULL)
		check_headers(headers);

	values[0] = PointerGetDatum(topic_t);
	if (key == NULL)
	{
		nulls[1] = 'n';
		values[1] = (Datum) 0;
		keyhash = cqrs_key_hash(NULL, 0);
	}
	else
	{
		values[1] = PointerGetDatum(key);
		keyhash = cqrs_key_hash(VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key));
	}
	values[2] = JsonbPGetDatum(payload);
	if (headers == NULL)
	{
		nulls[3] = 'n';
		values[3] = (Datum) 0;
	}
	else
		values[3] = JsonbPGetDatum(headers);
	if (event_id != NULL)
		values[4] = UUIDPGetDatum(event_id);
	else
	{
		nulls[4] = 'n';
		values[4] = (Datum) 0;
	}

	ext_oid = get_extension_oid("cqrs_sync", false);

	SPI_connect();
	if (insert_plan == NULL || insert_plan_ext != ext_oid)
		prepare_inserts(ext_oid);
	check_sequence_cache();
	/* cqrs_enqueue()'s own statement when it has no event id of its own */
	if (event_id == NULL)
		plan = insert_plan;
	else
		plan = if_new ? insert_new_plan : insert_id_plan;

	/* publish the key before the INSERT takes its id */
	enqueued_in_xact = true;
	cqrs_inflight_add_key(keyhash);

	ret = SPI_execute_plan(plan, values, nulls, false, 1);
	if (ret == SPI_OK_INSERT_RETURNING && SPI_processed == 0 && plan == insert_new_plan)
	{
		SPI_finish();
		return 0;
	}
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "cqrs_enqueue: INSERT failed: %s", SPI_result_code_string(ret));
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1, &isnull));
	cqrs_inflight_set_min(id);
	SPI_finish();

	return id;
}

/*
 * cqrs_enqueue(topic text, key text, payload jsonb, headers jsonb) -> bigint
 */
Datum
cqrs_enqueue(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("topic must not be null")));

	PG_RETURN_INT64(cqrs_enqueue_event(PG_GETARG_TEXT_PP(0),
									   PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1),
									   PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2),
									   PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3),
									   NULL, false));
}

/*
 * cqrs_discard_check(id bigint, key text) -> void: called by cqrs_discard()
 * before it deletes outbox row id.  Registers the discard in the in-flight
 * registry (the relay then does not produce the row, nor later rows of its
 * key, while this transaction may commit), then refuses if the relay has
 * the row in flight already: a discarded event is never delivered.  See the
 * handshake in shmem.c.
 */
Datum
cqrs_discard_check(PG_FUNCTION_ARGS)
{
	int64		id;
	uint64		keyhash;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("id must not be null")));
	id = PG_GETARG_INT64(0);
	if (cqrs_shared == NULL)
		PG_RETURN_VOID();		/* not preloaded: no relay */

	if (PG_ARGISNULL(1))
		keyhash = cqrs_key_hash(NULL, 0);
	else
	{
		text	   *key = PG_GETARG_TEXT_PP(1);

		keyhash = cqrs_key_hash(VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key));
	}
	/* cleared at commit or abort by cqrs_xact_callback */
	enqueued_in_xact = true;
	cqrs_inflight_register_discard(keyhash, id);

	if (cqrs_inflight_ids_contains(id))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("outbox row " INT64_FORMAT " is being sent right now", id),
				 errdetail("The relay has handed it to Kafka and waits for its acknowledgement; if Kafka accepts it, it is delivered and becomes SENT."),
				 errhint("Look at the row again once it is SENT or has failed (its status and last_error in cqrs_outbox). During a Kafka outage a row stays in flight until the broker answers.")));
	PG_RETURN_VOID();
}
