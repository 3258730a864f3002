/*-------------------------------------------------------------------------
 *
 * attach.c
 *	  Attached outbox tables: an application's own outbox table (Debezium's
 *	  layout, or any other whose columns are named) whose new rows flow
 *	  through the relay without a change to the application.
 *
 * cqrs_attach_outbox() (SQL) checks the mapping of the table's columns and
 * creates an AFTER INSERT row trigger whose one argument is that mapping as
 * JSON.  The trigger, cqrs_outbox_attached(), turns each inserted row into an
 * event (topic, key, payload, headers, event id) and hands it to
 * cqrs_enqueue_event(), the path cqrs_enqueue() takes: the row's key is
 * registered in the in-flight registry before its outbox id is taken, and
 * the relay is woken when the transaction commits, so the relay's guarantees
 * (order per key across out-of-order commits, dead letters, DLT_FAILED,
 * statistics, cleanup) hold for these rows as for any other.
 * cqrs_attached_outbox_enqueue() maps a row already in the table the same
 * way (cqrs_attach_outbox()'s backfill).
 *
 * The row is read as the inserting user (type output functions run as that
 * user); only the INSERT into cqrs_outbox runs as the outbox's owner, the
 * way cqrs_enqueue() does as a SECURITY DEFINER function.  Creating the
 * trigger needs EXECUTE on cqrs_outbox_attached(), which only
 * cqrs_sync_writer has.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parse_coerce.h"
#include "parser/parse_func.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/typcache.h"
#include "utils/uuid.h"
#include "storage/proc.h"

#include "attach.h"
#include "enqueue.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_outbox_attached);
PG_FUNCTION_INFO_V1(cqrs_attached_outbox_enqueue);

/* EventRouter's placeholder in route.topic.replacement */
#define ROUTED_BY_VALUE "${routedByValue}"

typedef struct AttachHeader
{
	char	   *name;
	char	   *column;
} AttachHeader;

/* The mapping of one attached table, from its trigger's argument. */
typedef struct AttachMapping
{
	Oid			tgoid;			/* hash key: the trigger */
	char	   *arg;			/* the trigger's argument, parsed below */
	char	   *topic;			/* topic, or a template with ROUTED_BY_VALUE */
	char	   *route_by;		/* column replacing the placeholder, or NULL */
	char	   *key;			/* column of the Kafka key, or NULL */
	char	   *payload;		/* column of the message value */
	char	   *event_id;		/* column of the event id, or NULL */
	int			nheaders;
	AttachHeader *headers;
} AttachMapping;

/*
 * Mappings by trigger oid, with the argument they were parsed from: CREATE
 * OR REPLACE TRIGGER keeps a trigger's oid and changes its argument.
 */
static HTAB *mappings = NULL;

/* The outbox's owner: the role its rows are inserted as. */
static Oid	outbox_ext = InvalidOid;
static Oid	outbox_relid = InvalidOid;

/* For the error context: which table's row was being published. */
typedef struct AttachErrorContext
{
	Oid			relid;
} AttachErrorContext;

static void
attach_error_callback(void *arg)
{
	AttachErrorContext *ctx = (AttachErrorContext *) arg;
	char	   *name = get_rel_name(ctx->relid);

	if (name != NULL)
		errcontext("publishing a row of attached outbox table \"%s\"", name);
}

/* A string member of the mapping, or NULL for a JSON null or absent one. */
static char *
mapping_string(Jsonb *jb, const char *name, bool required)
{
	JsonbValue *v = getKeyJsonValueFromContainer(&jb->root, name, strlen(name), NULL);

	if (v == NULL || v->type == jbvNull)
	{
		if (required)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the mapping of an attached outbox table has no \"%s\"", name),
					 errhint("Detach the table with cqrs_detach_outbox() and attach it again with cqrs_attach_outbox().")));
		return NULL;
	}
	if (v->type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" in the mapping of an attached outbox table must be a string", name)));
	return MemoryContextStrdup(TopMemoryContext,
							   pnstrdup(v->val.string.val, v->val.string.len));
}

static void
parse_mapping(AttachMapping *m, const char *arg)
{
	static const char *const known[] = {
		"topic", "route_by", "key", "payload", "event_id", "headers"
	};
	Jsonb	   *jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(arg)));
	JsonbValue *hv;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;

	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the mapping of an attached outbox table must be a JSON object")));

	/* every member is one this library knows */
	it = JsonbIteratorInit(&jb->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		bool		found = false;

		if (tok != WJB_KEY)
			continue;
		for (int i = 0; i < lengthof(known); i++)
			if (strlen(known[i]) == v.val.string.len &&
				strncmp(known[i], v.val.string.val, v.val.string.len) == 0)
				found = true;
		if (!found)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown member \"%.*s\" in the mapping of an attached outbox table",
							v.val.string.len, v.val.string.val),
					 errhint("The library and the extension's SQL objects may be of different versions: run ALTER EXTENSION cqrs_sync UPDATE.")));
	}

	m->topic = mapping_string(jb, "topic", true);
	m->route_by = mapping_string(jb, "route_by", false);
	m->key = mapping_string(jb, "key", false);
	m->payload = mapping_string(jb, "payload", true);
	m->event_id = mapping_string(jb, "event_id", false);
	if (strstr(m->topic, ROUTED_BY_VALUE) != NULL && m->route_by == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the topic \"%s\" of an attached outbox table needs \"route_by\"", m->topic)));

	m->nheaders = 0;
	m->headers = NULL;
	hv = getKeyJsonValueFromContainer(&jb->root, "headers", strlen("headers"), NULL);
	if (hv == NULL || hv->type == jbvNull)
		return;
	if (hv->type != jbvBinary || !JsonContainerIsObject(hv->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"headers\" in the mapping of an attached outbox table must be a JSON object")));
	m->headers = MemoryContextAllocZero(TopMemoryContext,
										sizeof(AttachHeader) *
										JsonContainerSize(hv->val.binary.data));
	it = JsonbIteratorInit(hv->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			m->headers[m->nheaders].name =
				MemoryContextStrdup(TopMemoryContext,
									pnstrdup(v.val.string.val, v.val.string.len));
		else if (tok == WJB_VALUE)
		{
			if (v.type != jbvString)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("header \"%s\" in the mapping of an attached outbox table must name a column",
								m->headers[m->nheaders].name)));
			m->headers[m->nheaders++].column =
				MemoryContextStrdup(TopMemoryContext,
									pnstrdup(v.val.string.val, v.val.string.len));
		}
	}
}

/* The mapping of a trigger of cqrs_outbox_attached(), parsed once. */
static AttachMapping *
get_mapping(Trigger *trigger)
{
	AttachMapping *m;
	bool		found;

	if (mappings == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(AttachMapping);
		mappings = hash_create("cqrs_sync attached outbox mappings", 16, &ctl,
							   HASH_ELEM | HASH_BLOBS);
	}
	if (trigger->tgnargs != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("trigger \"%s\" must pass cqrs_outbox_attached() one argument, the mapping",
						trigger->tgname),
				 errhint("Create it with cqrs_attach_outbox().")));

	m = hash_search(mappings, &trigger->tgoid, HASH_FIND, NULL);
	if (m != NULL && strcmp(m->arg, trigger->tgargs[0]) == 0)
		return m;

	/*
	 * Parse first: a bad argument leaves no half-made entry behind.  (The
	 * strings of a replaced mapping are left in TopMemoryContext: a trigger
	 * is rarely replaced, and only in sessions that used it.)
	 */
	{
		AttachMapping tmp;

		parse_mapping(&tmp, trigger->tgargs[0]);
		tmp.arg = MemoryContextStrdup(TopMemoryContext, trigger->tgargs[0]);
		m = hash_search(mappings, &trigger->tgoid, HASH_ENTER, &found);
		tmp.tgoid = trigger->tgoid;
		*m = tmp;
	}
	return m;
}

/* Attribute number of a mapped column in desc; errors if it is gone. */
static int
mapped_column(TupleDesc desc, Oid relid, const char *column, const char *option)
{
	int			fnum = SPI_fnumber(desc, column);

	if (fnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of attached outbox table \"%s\" does not exist",
						column, get_rel_name(relid)),
				 errdetail("Option \"%s\" of cqrs_attach_outbox() names it.", option),
				 errhint("Detach the table with cqrs_detach_outbox() and attach it again naming its current columns.")));
	return fnum;
}

static Oid
column_base_type(TupleDesc desc, int fnum)
{
	return getBaseType(TupleDescAttr(desc, fnum - 1)->atttypid);
}

/* A mapped column's value as text, NULL for SQL NULL. */
static char *
column_text(TupleDesc desc, HeapTuple tup, Oid relid, const char *column,
			const char *option)
{
	return SPI_getvalue(tup, desc, mapped_column(desc, relid, column, option));
}

/* Each occurrence of ROUTED_BY_VALUE in the template replaced by value. */
static char *
route_topic(const char *template, const char *value)
{
	StringInfoData buf;
	const char *p = template;
	const char *hit;

	initStringInfo(&buf);
	while ((hit = strstr(p, ROUTED_BY_VALUE)) != NULL)
	{
		appendBinaryStringInfo(&buf, p, hit - p);
		appendStringInfoString(&buf, value);
		p = hit + strlen(ROUTED_BY_VALUE);
	}
	appendStringInfoString(&buf, p);
	return buf.data;
}

/*
 * A mapped column's value as a Datum of type want: the column's own if it is
 * of that type, else its text read by want's input function (for text types,
 * and for type also, e.g. json for jsonb).  *isnull for SQL NULL; a column of
 * another type is an error, whose detail says what fits.
 */
static Datum
typed_value(TupleDesc desc, HeapTuple tup, Oid relid, const char *column,
			const char *option, Oid want, Oid also, PGFunction input,
			const char *fits, bool *isnull)
{
	int			fnum = mapped_column(desc, relid, column, option);
	Oid			type = column_base_type(desc, fnum);
	char	   *text;

	if (type == want)
		return SPI_getbinval(tup, desc, fnum, isnull);
	if (type != also && TypeCategory(type) != TYPCATEGORY_STRING)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("column \"%s\" of attached outbox table \"%s\" is of type %s",
						column, get_rel_name(relid), format_type_be(type)),
				 errdetail("Option \"%s\" of cqrs_attach_outbox() names it. %s", option, fits),
				 errhint("Detach the table with cqrs_detach_outbox() and attach it again naming its current columns.")));
	text = SPI_getvalue(tup, desc, fnum);
	*isnull = (text == NULL);
	return *isnull ? (Datum) 0 : DirectFunctionCall1(input, CStringGetDatum(text));
}

static Jsonb *
payload_value(TupleDesc desc, HeapTuple tup, Oid relid, const char *column)
{
	bool		isnull;
	Datum		d = typed_value(desc, tup, relid, column, "payload", JSONBOID, JSONOID,
								jsonb_in,
								"The payload must be JSON: jsonb, json or a text type holding JSON.",
								&isnull);

	/* a row without a payload is sent as the JSON value null */
	if (isnull)
		d = DirectFunctionCall1(jsonb_in, CStringGetDatum("null"));
	return DatumGetJsonbP(d);
}

static pg_uuid_t *
event_id_value(TupleDesc desc, HeapTuple tup, Oid relid, const char *column)
{
	bool		isnull;
	Datum		d = typed_value(desc, tup, relid, column, "event_id", UUIDOID, InvalidOid,
								uuid_in,
								"Event ids are UUIDs: the column must be of type uuid or a text type holding UUIDs.",
								&isnull);

	return isnull ? NULL : DatumGetUUIDP(d);
}

static Jsonb *
headers_value(AttachMapping *m, TupleDesc desc, HeapTuple tup, Oid relid)
{
	JsonbParseState *state = NULL;
	JsonbValue *res;
	int			n = 0;

	if (m->nheaders == 0)
		return NULL;
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < m->nheaders; i++)
	{
		char	   *value = column_text(desc, tup, relid, m->headers[i].column, "headers");
		JsonbValue	k;
		JsonbValue	v;

		/* a NULL column sends no header, as the EventRouter does */
		if (value == NULL)
			continue;
		k.type = jbvString;
		k.val.string.val = m->headers[i].name;
		k.val.string.len = strlen(m->headers[i].name);
		v.type = jbvString;
		v.val.string.val = value;
		v.val.string.len = strlen(value);
		pushJsonbValue(&state, WJB_KEY, &k);
		pushJsonbValue(&state, WJB_VALUE, &v);
		n++;
	}
	res = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return n > 0 ? JsonbValueToJsonb(res) : NULL;
}

/*
 * The role events are inserted as: the owner of cqrs_outbox in the
 * extension's schema (as cqrs_enqueue(), SECURITY DEFINER, runs as the
 * extension's owner).
 */
static Oid
outbox_owner(void)
{
	Oid			ext_oid = get_extension_oid("cqrs_sync", false);
	HeapTuple	tup;
	Oid			owner;

	if (ext_oid != outbox_ext || !OidIsValid(outbox_relid))
	{
		Oid			nsp = cqrs_extension_namespace(ext_oid);

		outbox_relid = get_relname_relid("cqrs_outbox", nsp);
		if (!OidIsValid(outbox_relid))
			elog(ERROR, "cqrs_sync: table cqrs_outbox not found");
		outbox_ext = ext_oid;
	}
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(outbox_relid));
	if (!HeapTupleIsValid(tup))
	{
		outbox_relid = InvalidOid;
		elog(ERROR, "cache lookup failed for relation cqrs_outbox");
	}
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * Turns one row of an attached table into an event; returns its outbox id.
 * With if_new, a row whose event id is in the outbox already is left out
 * (returns 0).
 */
static int64
publish_row(AttachMapping *m, TupleDesc desc, HeapTuple tup, Oid relid,
			bool if_new)
{
	ErrorContextCallback errcallback;
	AttachErrorContext ctx;
	char	   *topic;
	char	   *key = NULL;
	Jsonb	   *payload;
	Jsonb	   *headers;
	pg_uuid_t  *event_id = NULL;
	Oid			save_userid;
	int			save_sec_context;
	int64		id;

	ctx.relid = relid;
	errcallback.callback = attach_error_callback;
	errcallback.arg = &ctx;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	topic = m->topic;
	if (m->route_by != NULL)
	{
		char	   *value = column_text(desc, tup, relid, m->route_by, "route_by");

		if (value == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("column \"%s\" of a row of attached outbox table \"%s\" is null",
							m->route_by, get_rel_name(relid)),
					 errdetail("Its value names the row's Kafka topic (option route_by, topic \"%s\").",
							   m->topic)));
		topic = route_topic(m->topic, value);
	}
	if (m->key != NULL)
		key = column_text(desc, tup, relid, m->key, "key");
	payload = payload_value(desc, tup, relid, m->payload);
	headers = headers_value(m, desc, tup, relid);
	if (m->event_id != NULL)
		event_id = event_id_value(desc, tup, relid, m->event_id);

	/* only the INSERT into cqrs_outbox runs as its owner */
	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(outbox_owner(),
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	id = cqrs_enqueue_event(cstring_to_text(topic),
							key ? cstring_to_text(key) : NULL,
							payload, headers, event_id, if_new);
	SetUserIdAndSecContext(save_userid, save_sec_context);

	error_context_stack = errcallback.previous;
	return id;
}

/*
 * The row a cross-partition UPDATE just deleted from its partition, until
 * the trigger fires for its copy.  PostgreSQL runs such an UPDATE as a
 * DELETE from the old partition and an INSERT into the new one; their AFTER
 * ROW events are queued one after the other, so the trigger fires for the
 * DELETE (the old row marked as moved) and then, next, for the INSERT of the
 * copy.  The copy is the same event: it is not published again, whether or
 * not the event is still in cqrs_outbox (sent and cleaned up, deleted on
 * sending, or discarded).  Any INSERT the trigger sees ends the memory, and
 * only a row inserted by the same command (its cmin, the old row's cmax) in
 * the same (sub)transaction matches it, with the same event id or, both
 * without one, on a partition attached on its own, the same values
 * published (mapped_values()).
 */
static struct
{
	bool		set;
	LocalTransactionId lxid;
	SubTransactionId subxid;
	CommandId	cid;			/* the UPDATE's, the copy's cmin */
	char	   *mapping;		/* the trigger's argument, in TopMemoryContext */
	bool		has_event_id;
	pg_uuid_t	event_id;
	char	   *values;			/* without one: mapped_values(), likewise */
}			moved;

static void
append_mapped(StringInfo buf, TupleDesc desc, HeapTuple tup, Oid relid,
			  const char *column, const char *option)
{
	char	   *value;

	if (column == NULL)
	{
		appendStringInfoString(buf, "-;");
		return;
	}
	value = column_text(desc, tup, relid, column, option);
	if (value == NULL)
		appendStringInfoString(buf, "n;");
	else
		appendStringInfo(buf, "%zu:%s;", strlen(value), value);
}

/*
 * What the mapping publishes of a row (its topic's column, key, payload and
 * headers), as text.  Without an event id, that is what tells a moved row's
 * copy from a new row inserted by the same command: the copy of a row that
 * moved to a partition not attached never fires the trigger, and the next
 * row it sees may be another one (a statement that moves rows out and
 * inserts new ones).
 */
static char *
mapped_values(AttachMapping *m, TupleDesc desc, HeapTuple tup, Oid relid)
{
	StringInfoData buf;

	initStringInfo(&buf);
	append_mapped(&buf, desc, tup, relid, m->route_by, "route_by");
	append_mapped(&buf, desc, tup, relid, m->key, "key");
	append_mapped(&buf, desc, tup, relid, m->payload, "payload");
	for (int i = 0; i < m->nheaders; i++)
		append_mapped(&buf, desc, tup, relid, m->headers[i].column, "headers");
	return buf.data;
}

static void
remember_moved(Trigger *trigger, AttachMapping *m, TupleDesc desc, HeapTuple tup,
			   Oid relid)
{
	pg_uuid_t  *event_id = m->event_id ? event_id_value(desc, tup, relid, m->event_id) : NULL;

	if (moved.mapping != NULL)
		pfree(moved.mapping);
	moved.mapping = MemoryContextStrdup(TopMemoryContext, trigger->tgargs[0]);
	moved.lxid = MyProc->lxid;
	moved.subxid = GetCurrentSubTransactionId();
	moved.cid = HeapTupleHeaderGetCmax(tup->t_data);
	moved.has_event_id = (event_id != NULL);
	if (event_id != NULL)
		moved.event_id = *event_id;
	if (moved.values != NULL)
		pfree(moved.values);
	moved.values = NULL;
	/* a cloned trigger sees the copy next: is_moved_copy() needs no values */
	if (event_id == NULL && !trigger->tgisclone)
	{
		char	   *values = mapped_values(m, desc, tup, relid);

		moved.values = MemoryContextStrdup(TopMemoryContext, values);
		pfree(values);
	}
	moved.set = true;
}

/* Is this inserted row the copy of the row remembered?  Forgets it. */
static bool
is_moved_copy(Trigger *trigger, AttachMapping *m, TupleDesc desc, HeapTuple tup,
			  Oid relid)
{
	pg_uuid_t  *event_id;
	bool		same;

	if (!moved.set)
		return false;
	moved.set = false;
	if (moved.lxid != MyProc->lxid ||
		moved.subxid != GetCurrentSubTransactionId() ||
		moved.cid != HeapTupleHeaderGetCmin(tup->t_data) ||
		strcmp(moved.mapping, trigger->tgargs[0]) != 0)
		return false;
	event_id = m->event_id ? event_id_value(desc, tup, relid, m->event_id) : NULL;
	if (event_id == NULL || !moved.has_event_id)
	{
		/*
		 * A trigger cloned from the parent's fires for the copy next, so
		 * the row it sees next is the copy; a partition attached on its own
		 * may never see the copy, and then only the values tell.
		 */
		same = (event_id == NULL && !moved.has_event_id &&
				(trigger->tgisclone ||
				 (moved.values != NULL &&
				  strcmp(mapped_values(m, desc, tup, relid), moved.values) == 0)));
	}
	else
		same = memcmp(event_id, &moved.event_id, sizeof(pg_uuid_t)) == 0;
	return same;
}

/*
 * cqrs_outbox_attached() -> trigger: AFTER INSERT FOR EACH ROW on an
 * attached outbox table; its argument is the mapping.  A partitioned table's
 * trigger is AFTER INSERT OR DELETE: the DELETE tells a row moved to another
 * partition (see moved above).
 */
Datum
cqrs_outbox_attached(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	AttachMapping *m;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("cqrs_outbox_attached() was not called by the trigger manager")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		  TRIGGER_FIRED_BY_DELETE(trigdata->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("cqrs_outbox_attached() must be fired AFTER INSERT FOR EACH ROW"),
				 errhint("Attach outbox tables with cqrs_attach_outbox().")));

	rel = trigdata->tg_relation;
	m = get_mapping(trigdata->tg_trigger);

	if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
	{
		/* only the old row of a cross-partition UPDATE matters */
		if (rel->rd_rel->relispartition &&
			HeapTupleHeaderIndicatesMovedPartitions(trigdata->tg_trigtuple->t_data))
			remember_moved(trigdata->tg_trigger, m, RelationGetDescr(rel),
						   trigdata->tg_trigtuple, RelationGetRelid(rel));
		return PointerGetDatum(NULL);
	}

	if (rel->rd_rel->relispartition &&
		is_moved_copy(trigdata->tg_trigger, m, RelationGetDescr(rel),
					  trigdata->tg_trigtuple, RelationGetRelid(rel)))
		return PointerGetDatum(NULL);

	/*
	 * A partition's row whose event id is in the outbox already is not
	 * published again either (an UPDATE of a partition attached on its own
	 * that moves a row there).
	 */
	(void) publish_row(m, RelationGetDescr(rel), trigdata->tg_trigtuple,
					   RelationGetRelid(rel), rel->rd_rel->relispartition);
	return PointerGetDatum(NULL);
}

/*
 * cqrs_attached_outbox_enqueue(outbox regclass, row record) -> bigint:
 * publishes a row of an attached outbox table as its trigger would have,
 * and returns its outbox id, or NULL if its event id is in the outbox
 * already (cqrs_attach_outbox()'s backfill: attaching again publishes no
 * event twice).  Needs INSERT on the table, as the trigger's way does.
 */
Datum
cqrs_attached_outbox_enqueue(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	HeapTupleHeader rec = PG_GETARG_HEAPTUPLEHEADER(1);
	Oid			rectype = HeapTupleHeaderGetTypeId(rec);
	Oid			nsp = get_func_namespace(fcinfo->flinfo->fn_oid);
	Oid			trigfn;
	Relation	rel;
	Trigger    *trigger = NULL;
	TupleDesc	desc;
	HeapTupleData tup;
	int64		id;

	trigfn = LookupFuncName(list_make2(makeString(get_namespace_name(nsp)),
									   makeString("cqrs_outbox_attached")),
							0, NULL, false);

	rel = try_table_open(relid, AccessShareLock);
	if (rel == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	/* what inserting the row would publish: for those who may insert it */
	if (pg_class_aclcheck(relid, GetUserId(), ACL_INSERT) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, get_relkind_objtype(rel->rd_rel->relkind),
					   RelationGetRelationName(rel));
	if (rectype != rel->rd_rel->reltype)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("row is of type %s, not a row of table \"%s\"",
						format_type_be(rectype), RelationGetRelationName(rel))));
	for (int i = 0; rel->trigdesc != NULL && i < rel->trigdesc->numtriggers; i++)
		if (rel->trigdesc->triggers[i].tgfoid == trigfn)
			trigger = &rel->trigdesc->triggers[i];
	if (trigger == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("table \"%s\" is not an attached outbox table",
						RelationGetRelationName(rel)),
				 errhint("Attach it with cqrs_attach_outbox().")));

	desc = lookup_rowtype_tupdesc(rectype, HeapTupleHeaderGetTypMod(rec));
	tup.t_len = HeapTupleHeaderGetDatumLength(rec);
	ItemPointerSetInvalid(&tup.t_self);
	tup.t_tableOid = relid;
	tup.t_data = rec;
	id = publish_row(get_mapping(trigger), desc, &tup, relid, true);
	ReleaseTupleDesc(desc);
	table_close(rel, NoLock);

	if (id == 0)
		PG_RETURN_NULL();
	PG_RETURN_INT64(id);
}
