/*-------------------------------------------------------------------------
 *
 * apply.c
 *	  The read side: idempotent apply helpers and the inbox.
 *
 *	  A read service calls these inside its own transaction, so that an
 *	  event applied twice, or out of order, changes nothing:
 *
 *	  cqrs_mark_processed(consumer, event_id): INSERT into cqrs_inbox ... ON
 *	  CONFLICT DO NOTHING; the primary key, not a read-then-check, decides
 *	  whether the event is new.
 *
 *	  cqrs_upsert(target, row, version): INSERT ... ON CONFLICT (primary key)
 *	  DO UPDATE ... WHERE stored version < incoming version, unless a
 *	  tombstone of the key has a version >= the incoming one.
 *
 *	  cqrs_delete(target, key, version): deletes the row if its version is
 *	  <= version and records a tombstone (cqrs_tombstone) with the version,
 *	  so that a later, older upsert does not bring the row back.
 *
 *	  cqrs_apply_delta(target, key, deltas, consumer, event_id): adds numeric
 *	  deltas once per (consumer, event, target, key), deduplicated in the
 *	  inbox under a derived consumer name.
 *
 *	  All of them run as the caller (SECURITY INVOKER): the caller needs the
 *	  privileges on the target table, and on cqrs_inbox/cqrs_tombstone the
 *	  ones granted to cqrs_sync_reader.  SQL is built once per (target,
 *	  column set) with quoted identifiers and schema-qualified operators,
 *	  prepared with SPI and kept in a backend-local cache that a relcache
 *	  invalidation of the target discards; values are always parameters.
 *
 *	  Deletes versus creates.  A row lock serializes an upsert and a delete
 *	  of an existing row, but not a delete of a missing row (which only
 *	  writes a tombstone) and the insert of that row: neither sees the
 *	  other's uncommitted work.  So cqrs_delete() takes a transaction-level
 *	  advisory lock on (target, hash of the key) before it reads anything,
 *	  and an upsert that inserted a new row takes the same lock afterwards
 *	  and re-checks the tombstones with a fresh snapshot; if a delete with
 *	  a version >= its own committed meanwhile, it removes the row it
 *	  inserted and reports "not applied".  Updates of existing rows, the
 *	  common case, take no extra lock.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "apply.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_mark_processed);
PG_FUNCTION_INFO_V1(cqrs_upsert);
PG_FUNCTION_INFO_V1(cqrs_delete);
PG_FUNCTION_INFO_V1(cqrs_apply_delta);
PG_FUNCTION_INFO_V1(cqrs_prune_read_side);

/*
 * locktag_field4 of the advisory locks on (target, key hash); the user-level
 * pg_advisory_lock() functions use 1 and 2, so these never collide with
 * them.  pg_locks shows them as locktype "advisory", classid = target oid,
 * objid = key hash, objsubid = 17233.
 */
#define CQRS_KEY_LOCK_FIELD4	0x4351

/* More plans than this for one target: the column sets are not stable. */
#define MAX_PLANS_PER_TARGET	64

/* Settings */
char	   *cqrs_version_column = NULL;
int			cqrs_inbox_retention = 7 * 24 * 3600;

/* How a JSON value becomes a parameter of the column's (base) type */
typedef enum ColumnKind
{
	COL_INPUT,					/* through the type's input function */
	COL_TEXT,					/* text: JSON strings directly */
	COL_NUMERIC,				/* numeric: JSON numbers directly */
	COL_JSON,					/* json: the JSON text of the value */
	COL_JSONB					/* jsonb: the value itself */
} ColumnKind;

typedef struct ApplyColumn
{
	AttrNumber	attnum;
	char	   *name;
	int			namelen;
	char	   *qname;			/* quote_identifier(name) */
	Oid			basetype;		/* type of the parameter */
	char	   *typname;		/* the column's declared type, for messages */
	ColumnKind	kind;
	bool		is_array;
	bool		addable;		/* int2/4/8, float4/8, numeric */
	bool		generated;
	bool		identity_always;
	bool		needs_value;	/* NOT NULL, no default, not identity */
	int			pkpos;			/* position in the primary key, or -1 */
	FmgrInfo	input;
	Oid			ioparam;
	FmgrInfo	output;			/* primary key columns only */
	char	   *eqop;			/* "OPERATOR(nsp.=)", primary key columns only */
} ApplyColumn;

/* A plan for one set of columns, in JSON member order */
typedef struct ColumnSetPlan
{
	int			ncols;
	int		   *colidx;			/* indexes into ApplyTarget.cols */
	SPIPlanPtr	plan;			/* upsert; or delta UPDATE */
	SPIPlanPtr	plan2;			/* delta: INSERT of a missing row */
} ColumnSetPlan;

typedef struct ApplyTarget
{
	Oid			relid;			/* hash key: must be first */
	bool		valid;
	MemoryContext cxt;
	Oid			extnsp;			/* schema of cqrs_tombstone in the plans */
	char		version_name[NAMEDATALEN];
	char	   *relname;
	char	   *qualname;		/* quoted schema.table */
	char	   *tombstone;		/* quoted schema.cqrs_tombstone */
	bool		partitioned;
	int			ncols;
	ApplyColumn *cols;			/* sorted like JSON object keys */
	int			version_idx;
	int			npk;
	int			pk_idx[INDEX_MAX_KEYS]; /* in primary key order */
	SPIPlanPtr	delete_plan;	/* DELETE ... WHERE pk AND version <= $v */
	SPIPlanPtr	exists_plan;	/* SELECT version ... WHERE pk */
	List	   *upsert_plans;	/* of ColumnSetPlan */
	List	   *delta_plans;	/* of ColumnSetPlan */
} ApplyTarget;

/* A top-level member of a JSON object */
typedef struct JsonMember
{
	char	   *key;			/* not null-terminated */
	int			keylen;
	JsonbValue	value;
} JsonMember;

/* errcontext while a JSON member is converted */
typedef struct ConvertContext
{
	const char *what;			/* "row", "key", "deltas" */
	JsonMember *member;
	ApplyColumn *col;
} ConvertContext;

static HTAB *apply_targets = NULL;
static bool targets_invalidated = false;	/* some entry became invalid */
static bool callbacks_registered = false;
static bool settings_defined = false;

/* Plans on the extension's own tables, and the schema they were made for */
static Oid	ext_plans_nsp = InvalidOid;
static SPIPlanPtr inbox_plan = NULL;
static SPIPlanPtr tomb_write_plan = NULL;
static SPIPlanPtr tomb_check_plan = NULL;

/*
 * Calls of the helpers in progress in this backend (a trigger on a target
 * can call them again).  Plans and memory of a rebuilt target are freed at
 * once by the outermost call, which uses none of them yet; a nested call
 * leaves them in the graveyard, freed when no call is in progress.
 */
static int	apply_depth = 0;
static List *graveyard_plans = NIL;
static List *graveyard_cxts = NIL;

void		cqrs_apply_init(void);

/* ------------------------------------------------------------------------
 * Settings, cache maintenance
 * ------------------------------------------------------------------------
 */

static bool
check_version_column(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("The version column name must not be empty.");
		return false;
	}
	if (strlen(*newval) >= NAMEDATALEN)
	{
		GUC_check_errdetail("The version column name must be shorter than %d bytes.",
							NAMEDATALEN);
		return false;
	}
	return true;
}

void
cqrs_apply_init(void)
{
	if (settings_defined)
		return;
	settings_defined = true;

	DefineCustomStringVariable("cqrs_sync.version_column",
							   "Name of the version column in tables written by cqrs_upsert(), cqrs_delete() and cqrs_apply_delta().",
							   "The column must be of type bigint, integer or smallint; a row is only overwritten by a higher version.",
							   &cqrs_version_column,
							   "version",
							   PGC_USERSET,
							   0,
							   check_version_column, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.inbox_retention",
							"How long inbox entries and tombstones are kept before cqrs_prune_read_side() removes them.",
							"An event redelivered after this time is applied again, and a delete older than this no longer stops a stale upsert; keep it above the longest redelivery delay. 0 keeps them for ever.",
							&cqrs_inbox_retention,
							7 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);
}

static void
retire_plan(SPIPlanPtr plan)
{
	MemoryContext old;

	if (plan == NULL)
		return;
	if (apply_depth <= 1)
	{
		SPI_freeplan(plan);
		return;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	graveyard_plans = lappend(graveyard_plans, plan);
	MemoryContextSwitchTo(old);
}

static void
retire_cxt(MemoryContext cxt)
{
	MemoryContext old;

	if (cxt == NULL)
		return;
	if (apply_depth <= 1)
	{
		MemoryContextDelete(cxt);
		return;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	graveyard_cxts = lappend(graveyard_cxts, cxt);
	MemoryContextSwitchTo(old);
}

static void
flush_graveyard(void)
{
	ListCell   *lc;

	Assert(apply_depth == 0);
	foreach(lc, graveyard_plans)
		SPI_freeplan((SPIPlanPtr) lfirst(lc));
	list_free(graveyard_plans);
	graveyard_plans = NIL;
	foreach(lc, graveyard_cxts)
		MemoryContextDelete((MemoryContext) lfirst(lc));
	list_free(graveyard_cxts);
	graveyard_cxts = NIL;
}

/* Frees everything a target entry holds; the entry stays, invalid. */
static void
release_target(ApplyTarget *t)
{
	ListCell   *lc;

	retire_plan(t->delete_plan);
	retire_plan(t->exists_plan);
	foreach(lc, t->upsert_plans)
		retire_plan(((ColumnSetPlan *) lfirst(lc))->plan);
	foreach(lc, t->delta_plans)
	{
		retire_plan(((ColumnSetPlan *) lfirst(lc))->plan);
		retire_plan(((ColumnSetPlan *) lfirst(lc))->plan2);
	}
	t->delete_plan = NULL;
	t->exists_plan = NULL;
	t->upsert_plans = NIL;
	t->delta_plans = NIL;
	retire_cxt(t->cxt);			/* the lists live there too */
	t->cxt = NULL;
	t->cols = NULL;
	t->ncols = 0;
	t->valid = false;
}

static void
apply_relcache_callback(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS status;
	ApplyTarget *t;

	if (apply_targets == NULL)
		return;
	if (OidIsValid(relid))
	{
		t = hash_search(apply_targets, &relid, HASH_FIND, NULL);
		if (t)
		{
			t->valid = false;
			targets_invalidated = true;
		}
		return;
	}
	hash_seq_init(&status, apply_targets);
	while ((t = hash_seq_search(&status)) != NULL)
		t->valid = false;
	targets_invalidated = true;
}

/*
 * Frees the invalid entries (of dropped or changed tables); the next call
 * on a changed table describes it afresh anyway.  Only when no helper is
 * running.
 */
static void
sweep_targets(void)
{
	HASH_SEQ_STATUS status;
	ApplyTarget *t;

	Assert(apply_depth == 0);
	targets_invalidated = false;
	hash_seq_init(&status, apply_targets);
	while ((t = hash_seq_search(&status)) != NULL)
	{
		if (t->valid)
			continue;
		release_target(t);
		hash_search(apply_targets, &t->relid, HASH_REMOVE, NULL);
	}
}

/* A schema was renamed or dropped: the names in every plan may be stale. */
static void
apply_namespace_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	apply_relcache_callback((Datum) 0, InvalidOid);
	ext_plans_nsp = InvalidOid;
}

static void
apply_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* no helper can still be running */
			apply_depth = 0;
			break;
		default:
			break;
	}
}

static void
register_callbacks(void)
{
	HASHCTL		ctl;

	if (callbacks_registered)
		return;

	/* in case _PG_init() did not define the settings */
	cqrs_apply_init();

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(ApplyTarget);
	apply_targets = hash_create("cqrs_sync apply targets", 32, &ctl,
								HASH_ELEM | HASH_BLOBS);
	CacheRegisterRelcacheCallback(apply_relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, apply_namespace_callback,
								  (Datum) 0);
	RegisterXactCallback(apply_xact_callback, NULL);
	callbacks_registered = true;
}

/* Entering and leaving a helper; the caller is SPI-connected in between. */
static void
apply_enter(void)
{
	register_callbacks();
	if (apply_depth == 0)
	{
		if (graveyard_plans != NIL || graveyard_cxts != NIL)
			flush_graveyard();
		if (targets_invalidated)
			sweep_targets();
	}
	apply_depth++;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

static void
apply_leave(void)
{
	SPI_finish();
	if (apply_depth > 0)
		apply_depth--;
}

/* ------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------
 */

/*
 * Runs a plan.  With "latest", it sees everything committed up to now even
 * in REPEATABLE READ, where a change not visible to the transaction's
 * snapshot then raises a serialization failure instead of being missed
 * (the way foreign key checks do it).
 */
static uint64
run_plan(SPIPlanPtr plan, Datum *values, const char *nulls, bool read_only,
		 bool latest)
{
	int			rc;

	if (latest)
		rc = SPI_execute_snapshot(plan, values, nulls,
								  GetLatestSnapshot(),
								  IsolationUsesXactSnapshot() ?
								  GetTransactionSnapshot() : InvalidSnapshot,
								  read_only, true, 0);
	else
		rc = SPI_execute_plan(plan, values, nulls, read_only, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute_plan failed: %s", SPI_result_code_string(rc));
	return SPI_processed;
}

/* The first column of the first result row, as a bool (false when NULL) */
static bool
result_bool(void)
{
	bool		isnull;
	Datum		d;

	if (SPI_processed == 0 || SPI_tuptable == NULL)
		return false;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return !isnull && DatumGetBool(d);
}

static Oid
helper_namespace(FunctionCallInfo fcinfo)
{
	Oid			nsp = get_func_namespace(fcinfo->flinfo->fn_oid);

	if (!OidIsValid(nsp))
		elog(ERROR, "could not find the schema of function %u",
			 fcinfo->flinfo->fn_oid);
	return nsp;
}

static char *
operator_sql(Oid opno)
{
	HeapTuple	tup;
	Form_pg_operator op;
	char	   *res;

	tup = SearchSysCache1(OPEROID, ObjectIdGetDatum(opno));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for operator %u", opno);
	op = (Form_pg_operator) GETSTRUCT(tup);
	res = psprintf("OPERATOR(%s.%s)",
				   quote_identifier(get_namespace_name(op->oprnamespace)),
				   NameStr(op->oprname));
	ReleaseSysCache(tup);
	return res;
}

/* The plans on cqrs_inbox and cqrs_tombstone, for the extension's schema */
static void
ensure_ext_plans(Oid nsp)
{
	const char *schema;
	char	   *sql;
	Oid			inbox_types[2] = {TEXTOID, TEXTOID};
	Oid			tomb_types[3] = {REGCLASSOID, JSONBOID, INT8OID};

	if (ext_plans_nsp == nsp && inbox_plan && tomb_write_plan && tomb_check_plan)
		return;

	retire_plan(inbox_plan);
	retire_plan(tomb_write_plan);
	retire_plan(tomb_check_plan);
	inbox_plan = tomb_write_plan = tomb_check_plan = NULL;
	ext_plans_nsp = InvalidOid;

	schema = quote_identifier(get_namespace_name(nsp));

	sql = psprintf("INSERT INTO %s.cqrs_inbox (consumer, event_id) VALUES ($1, $2) "
				   "ON CONFLICT DO NOTHING", schema);
	inbox_plan = cqrs_keep_plan(sql, 2, inbox_types);

	sql = psprintf("INSERT INTO %s.cqrs_tombstone AS tb (target, key, version) "
				   "VALUES ($1, $2, $3) "
				   "ON CONFLICT (target, key) DO UPDATE "
				   "SET version = excluded.version, deleted_at = pg_catalog.now() "
				   "WHERE tb.version OPERATOR(pg_catalog.<) excluded.version",
				   schema);
	tomb_write_plan = cqrs_keep_plan(sql, 3, tomb_types);

	sql = psprintf("SELECT tb.version FROM %s.cqrs_tombstone tb "
				   "WHERE tb.target OPERATOR(pg_catalog.=) $1 "
				   "AND tb.key OPERATOR(pg_catalog.=) $2", schema);
	tomb_check_plan = cqrs_keep_plan(sql, 2, tomb_types);

	ext_plans_nsp = nsp;
}

/* The kind of a JSON document's root, for messages */
static const char *
jsonb_root_type(Jsonb *jb)
{
	JsonbValue	v;

	if (JB_ROOT_IS_SCALAR(jb))
	{
		JsonbExtractScalar(&jb->root, &v);
		return JsonbTypeName(&v);
	}
	return JB_ROOT_IS_OBJECT(jb) ? "object" : "array";
}

static const char *
json_value_type(JsonbValue *v)
{
	if (v->type == jbvBinary)
		return JsonContainerIsArray(v->val.binary.data) ? "array" : "object";
	return JsonbTypeName(v);
}

static int
json_members(Jsonb *jb, JsonMember **out)
{
	int			n = JB_ROOT_COUNT(jb);
	JsonMember *m = palloc(sizeof(JsonMember) * Max(n, 1));
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbIteratorToken tok;
	JsonbValue	v;
	int			i = 0;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			m[i].key = v.val.string.val;
			m[i].keylen = v.val.string.len;
		}
		else if (tok == WJB_VALUE)
			m[i++].value = v;
	}
	*out = m;
	return i;
}

static char *
member_name(JsonMember *m)
{
	return pnstrdup(m->key, m->keylen);
}

/*
 * Columns are sorted the way jsonb sorts object keys (shorter first, then
 * bytewise), so one forward pass matches the members of an object.
 */
static int
column_cmp(const void *a, const void *b)
{
	const ApplyColumn *ca = a;
	const ApplyColumn *cb = b;

	if (ca->namelen != cb->namelen)
		return ca->namelen < cb->namelen ? -1 : 1;
	return memcmp(ca->name, cb->name, ca->namelen);
}

/*
 * Finds the column of each member; *cursor carries the position between
 * calls for the members of one object, in order.  Returns -1 if none.
 */
static int
find_column(ApplyTarget *t, JsonMember *m, int *cursor)
{
	int			j;

	for (j = *cursor; j < t->ncols; j++)
	{
		ApplyColumn *c = &t->cols[j];

		if (c->namelen < m->keylen)
			continue;
		if (c->namelen > m->keylen)
			break;
		{
			int			r = memcmp(c->name, m->key, m->keylen);

			if (r < 0)
				continue;
			if (r > 0)
				break;
			*cursor = j + 1;
			return j;
		}
	}
	*cursor = j;
	return -1;
}

static void
append_quoted_element(StringInfo buf, const char *s, int len)
{
	appendStringInfoChar(buf, '"');
	for (int i = 0; i < len; i++)
	{
		if (s[i] == '"' || s[i] == '\\')
			appendStringInfoChar(buf, '\\');
		appendStringInfoChar(buf, s[i]);
	}
	appendStringInfoChar(buf, '"');
}

/* A JSON array as an array literal, for the array type's input function */
static void
append_array_literal(StringInfo buf, JsonbContainer *arr)
{
	JsonbIterator *it = JsonbIteratorInit(arr);
	JsonbIteratorToken tok;
	JsonbValue	v;
	bool		first = true;

	appendStringInfoChar(buf, '{');
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok != WJB_ELEM)
			continue;
		if (!first)
			appendStringInfoChar(buf, ',');
		first = false;
		switch (v.type)
		{
			case jbvNull:
				appendStringInfoString(buf, "NULL");
				break;
			case jbvString:
				append_quoted_element(buf, v.val.string.val, v.val.string.len);
				break;
			case jbvNumeric:
				appendStringInfoString(buf,
									   DatumGetCString(DirectFunctionCall1(numeric_out,
																		   NumericGetDatum(v.val.numeric))));
				break;
			case jbvBool:
				appendStringInfoString(buf, v.val.boolean ? "true" : "false");
				break;
			case jbvBinary:
				if (JsonContainerIsArray(v.val.binary.data))
					append_array_literal(buf, v.val.binary.data);
				else
				{
					char	   *s = JsonbToCString(NULL, v.val.binary.data,
												   v.val.binary.len);

					append_quoted_element(buf, s, strlen(s));
				}
				break;
			default:
				elog(ERROR, "unexpected jsonb value type %d", (int) v.type);
		}
	}
	appendStringInfoChar(buf, '}');
}

static void
convert_error_callback(void *arg)
{
	ConvertContext *cc = arg;

	if (cc->member && cc->col)
		errcontext("converting JSON %s member \"%s\" to type %s",
				   cc->what, member_name(cc->member), cc->col->typname);
}

/*
 * A JSON value as a parameter of the column's base type; the statement
 * coerces it to the column's type modifier and checks its domain.
 */
static Datum
json_to_datum(ApplyColumn *c, JsonbValue *v, bool *isnull)
{
	char	   *str;

	*isnull = false;
	if (v->type == jbvNull)
	{
		*isnull = true;
		return (Datum) 0;
	}

	switch (c->kind)
	{
		case COL_JSONB:
			return JsonbPGetDatum(JsonbValueToJsonb(v));
		case COL_JSON:
			{
				Jsonb	   *jb = JsonbValueToJsonb(v);

				return PointerGetDatum(cstring_to_text(JsonbToCString(NULL, &jb->root,
																	  VARSIZE(jb))));
			}
		case COL_TEXT:
			if (v->type == jbvString)
				return PointerGetDatum(cstring_to_text_with_len(v->val.string.val,
																v->val.string.len));
			break;
		case COL_NUMERIC:
			if (v->type == jbvNumeric)
				return NumericGetDatum(v->val.numeric);
			break;
		case COL_INPUT:
			break;
	}

	switch (v->type)
	{
		case jbvString:
			str = pnstrdup(v->val.string.val, v->val.string.len);
			break;
		case jbvNumeric:
			str = DatumGetCString(DirectFunctionCall1(numeric_out,
													  NumericGetDatum(v->val.numeric)));
			break;
		case jbvBool:
			str = v->val.boolean ? "true" : "false";
			break;
		case jbvBinary:
			if (c->is_array && JsonContainerIsArray(v->val.binary.data))
			{
				StringInfoData buf;

				initStringInfo(&buf);
				append_array_literal(&buf, v->val.binary.data);
				str = buf.data;
				break;
			}
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("cannot convert a JSON %s to type %s",
							json_value_type(v), c->typname),
					 errhint("Pass the value as a JSON string in the input format of type %s.",
							 c->typname)));
			str = NULL;			/* keep the compiler quiet */
			break;
		default:
			elog(ERROR, "unexpected jsonb value type %d", (int) v->type);
			str = NULL;
	}
	return InputFunctionCall(&c->input, str, c->ioparam, -1);
}

/* The value of the row's version member, which must equal the argument */
static void
check_row_version(ApplyTarget *t, JsonMember *m, int64 version)
{
	char	   *str = NULL;
	int64		v;

	if (m->value.type == jbvNumeric)
		str = DatumGetCString(DirectFunctionCall1(numeric_out,
												  NumericGetDatum(m->value.val.numeric)));
	else if (m->value.type == jbvString)
		str = pnstrdup(m->value.val.string.val, m->value.val.string.len);
	else
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("version member \"%s\" of the row must be a JSON number, not a JSON %s",
						t->version_name, json_value_type(&m->value))));
	{
		ConvertContext cc = {"row", m, &t->cols[t->version_idx]};
		ErrorContextCallback errcb;

		errcb.callback = convert_error_callback;
		errcb.arg = &cc;
		errcb.previous = error_context_stack;
		error_context_stack = &errcb;
		v = DatumGetInt64(DirectFunctionCall1(int8in, CStringGetDatum(str)));
		error_context_stack = errcb.previous;
	}
	if (v != version)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("version member \"%s\" of the row (" INT64_FORMAT ") differs from the version argument (" INT64_FORMAT ")",
						t->version_name, v, version),
				 errhint("Omit the member from the row or pass the same version.")));
}

/* A version must fit the version column, or no comparison makes sense */
static void
check_version_range(ApplyTarget *t, int64 version)
{
	ApplyColumn *ver = &t->cols[t->version_idx];
	int64		min = PG_INT64_MIN;
	int64		max = PG_INT64_MAX;

	if (ver->basetype == INT4OID)
	{
		min = PG_INT32_MIN;
		max = PG_INT32_MAX;
	}
	else if (ver->basetype == INT2OID)
	{
		min = PG_INT16_MIN;
		max = PG_INT16_MAX;
	}
	if (version < min || version > max)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("version " INT64_FORMAT " is out of range for version column \"%s\" of relation \"%s\"",
						version, ver->name, t->relname),
				 errdetail("The column is of type %s.", ver->typname)));
}

/* ------------------------------------------------------------------------
 * Targets
 * ------------------------------------------------------------------------
 */

static bool
is_addable_type(Oid typid)
{
	switch (typid)
	{
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case FLOAT4OID:
		case FLOAT8OID:
		case NUMERICOID:
			return true;
		default:
			return false;
	}
}

static void
build_target(ApplyTarget *t, Oid extnsp, const char *vername)
{
	Relation	rel;
	TupleDesc	tupdesc;
	MemoryContext old;
	Oid			pkoid;
	Relation	idx;
	int		   *byattnum;
	StringInfoData sql;
	Oid			argtypes[INDEX_MAX_KEYS + 1];
	ApplyColumn *ver;

	release_target(t);
	t->cxt = AllocSetContextCreate(CacheMemoryContext,
								   "cqrs_sync apply target",
								   ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(t->cxt);

	rel = relation_open(t->relid, NoLock);	/* the caller holds a lock */
	t->relname = pstrdup(RelationGetRelationName(rel));
	if (rel->rd_rel->relkind != RELKIND_RELATION &&
		rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a table", t->relname),
				 errdetail("The read-side helpers write to ordinary and partitioned tables only.")));

	t->partitioned = rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE;
	t->qualname = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
											 t->relname);
	t->tombstone = psprintf("%s.cqrs_tombstone",
							quote_identifier(get_namespace_name(extnsp)));
	t->extnsp = extnsp;
	strlcpy(t->version_name, vername, NAMEDATALEN);

	/* columns */
	tupdesc = RelationGetDescr(rel);
	t->cols = palloc0(sizeof(ApplyColumn) * Max(tupdesc->natts, 1));
	t->ncols = 0;
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);
		ApplyColumn *c;
		int32		typmod = att->atttypmod;
		Oid			func;

		if (att->attisdropped)
			continue;
		c = &t->cols[t->ncols++];
		c->attnum = att->attnum;
		c->name = pstrdup(NameStr(att->attname));
		c->namelen = strlen(c->name);
		c->qname = pstrdup(quote_identifier(c->name));
		c->basetype = getBaseTypeAndTypmod(att->atttypid, &typmod);
		c->typname = format_type_with_typemod(att->atttypid, att->atttypmod);
		switch (c->basetype)
		{
			case TEXTOID:
				c->kind = COL_TEXT;
				break;
			case NUMERICOID:
				c->kind = COL_NUMERIC;
				break;
			case JSONOID:
				c->kind = COL_JSON;
				break;
			case JSONBOID:
				c->kind = COL_JSONB;
				break;
			default:
				c->kind = COL_INPUT;
		}
		c->is_array = type_is_array(c->basetype);
		c->addable = is_addable_type(c->basetype);
		c->generated = att->attgenerated != '\0';
		c->identity_always = att->attidentity == ATTRIBUTE_IDENTITY_ALWAYS;
		c->needs_value = att->attnotnull && !att->atthasdef &&
			att->attidentity == '\0' && !c->generated;
		c->pkpos = -1;
		getTypeInputInfo(c->basetype, &func, &c->ioparam);
		fmgr_info_cxt(func, &c->input, t->cxt);
	}
	qsort(t->cols, t->ncols, sizeof(ApplyColumn), column_cmp);

	byattnum = palloc(sizeof(int) * (tupdesc->natts + 1));
	for (int i = 0; i <= tupdesc->natts; i++)
		byattnum[i] = -1;
	for (int j = 0; j < t->ncols; j++)
		byattnum[t->cols[j].attnum] = j;

	/* primary key */
	pkoid = RelationGetPrimaryKeyIndex(rel);	/* never a deferrable one */
	if (!OidIsValid(pkoid))
	{
		ListCell   *lc;

		foreach(lc, RelationGetIndexList(rel))
		{
			Relation	i = index_open(lfirst_oid(lc), AccessShareLock);
			bool		deferrable = i->rd_index->indisprimary;

			index_close(i, AccessShareLock);
			if (deferrable)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("primary key of relation \"%s\" is deferrable", t->relname),
						 errdetail("INSERT ... ON CONFLICT cannot use a deferrable constraint as its arbiter."),
						 errhint("Make the primary key NOT DEFERRABLE.")));
		}
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("relation \"%s\" has no primary key", t->relname),
				 errhint("Add a primary key; the read-side helpers identify rows by it.")));
	}
	idx = index_open(pkoid, AccessShareLock);
	t->npk = idx->rd_index->indnkeyatts;
	for (int k = 0; k < t->npk; k++)
	{
		AttrNumber	attnum = idx->rd_index->indkey.values[k];
		ApplyColumn *c;
		TypeCacheEntry *tce;
		Oid			func;
		bool		varlena;

		if (attnum <= 0 || byattnum[attnum] < 0)
			elog(ERROR, "unexpected primary key column %d of relation \"%s\"",
				 attnum, t->relname);
		t->pk_idx[k] = byattnum[attnum];
		c = &t->cols[t->pk_idx[k]];
		c->pkpos = k;
		getTypeOutputInfo(c->basetype, &func, &varlena);
		fmgr_info_cxt(func, &c->output, t->cxt);
		tce = lookup_type_cache(c->basetype, TYPECACHE_EQ_OPR);
		if (!OidIsValid(tce->eq_opr))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_FUNCTION),
					 errmsg("could not identify an equality operator for type %s",
							c->typname)));
		c->eqop = operator_sql(tce->eq_opr);
	}
	index_close(idx, AccessShareLock);

	/* version column */
	t->version_idx = -1;
	for (int j = 0; j < t->ncols; j++)
		if (strcmp(t->cols[j].name, vername) == 0)
			t->version_idx = j;
	if (t->version_idx < 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("relation \"%s\" has no version column \"%s\"",
						t->relname, vername),
				 errhint("Add a bigint column named \"%s\", or set cqrs_sync.version_column to the name of the table's version column.",
						 vername)));
	ver = &t->cols[t->version_idx];
	if (ver->basetype != INT8OID && ver->basetype != INT4OID &&
		ver->basetype != INT2OID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("version column \"%s\" of relation \"%s\" must be of type bigint, integer or smallint",
						vername, t->relname),
				 errdetail("It is of type %s.", ver->typname)));
	if (ver->pkpos >= 0 || ver->generated)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
				 errmsg("version column \"%s\" of relation \"%s\" must not be part of the primary key or generated",
						vername, t->relname)));

	relation_close(rel, NoLock);

	/* DELETE ... WHERE <pk> AND (version IS NULL OR version <= $n+1) */
	initStringInfo(&sql);
	appendStringInfo(&sql, "DELETE FROM %s AS t WHERE ", t->qualname);
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];

		appendStringInfo(&sql, "t.%s %s $%d AND ", c->qname, c->eqop, k + 1);
		argtypes[k] = c->basetype;
	}
	appendStringInfo(&sql, "(t.%s IS NULL OR t.%s OPERATOR(pg_catalog.<=) $%d)",
					 ver->qname, ver->qname, t->npk + 1);
	argtypes[t->npk] = INT8OID;
	MemoryContextSwitchTo(old);
	t->delete_plan = cqrs_keep_plan(sql.data, t->npk + 1, argtypes);

	/* SELECT true ... WHERE <pk> */
	resetStringInfo(&sql);
	appendStringInfo(&sql, "SELECT true FROM %s AS t WHERE ", t->qualname);
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];

		appendStringInfo(&sql, "%st.%s %s $%d", k > 0 ? " AND " : "",
						 c->qname, c->eqop, k + 1);
	}
	t->exists_plan = cqrs_keep_plan(sql.data, t->npk, argtypes);

	t->valid = true;
}

/*
 * The target's cached description and plans.  Locks the table first with
 * the lock the statements take anyway; that processes invalidations, so a
 * changed table is described afresh, and no DDL can change it until the
 * transaction ends.
 */
static ApplyTarget *
get_target(Oid relid, Oid extnsp)
{
	ApplyTarget *t;
	bool		found;
	const char *vername = cqrs_version_column ? cqrs_version_column : "version";

	LockRelationOid(relid, RowExclusiveLock);
	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));

	t = hash_search(apply_targets, &relid, HASH_ENTER, &found);
	if (!found)
	{
		memset(t, 0, sizeof(ApplyTarget));
		t->relid = relid;
	}
	if (!t->valid || t->extnsp != extnsp ||
		strcmp(t->version_name, vername) != 0)
		build_target(t, extnsp, vername);
	return t;
}

/* Limits the plans kept for one target */
static void
trim_plans(List **plans)
{
	ListCell   *lc;

	if (list_length(*plans) < MAX_PLANS_PER_TARGET)
		return;
	foreach(lc, *plans)
	{
		retire_plan(((ColumnSetPlan *) lfirst(lc))->plan);
		retire_plan(((ColumnSetPlan *) lfirst(lc))->plan2);
	}
	*plans = NIL;				/* the cells stay in the target's context */
}

static ColumnSetPlan *
find_plan(List *plans, int ncols, int *colidx)
{
	ListCell   *lc;

	foreach(lc, plans)
	{
		ColumnSetPlan *p = lfirst(lc);

		if (p->ncols == ncols &&
			memcmp(p->colidx, colidx, sizeof(int) * ncols) == 0)
			return p;
	}
	return NULL;
}

static ColumnSetPlan *
new_plan_entry(ApplyTarget *t, List **plans, int ncols, int *colidx)
{
	MemoryContext old = MemoryContextSwitchTo(t->cxt);
	ColumnSetPlan *p = palloc0(sizeof(ColumnSetPlan));

	p->ncols = ncols;
	p->colidx = palloc(sizeof(int) * Max(ncols, 1));
	memcpy(p->colidx, colidx, sizeof(int) * ncols);
	*plans = lappend(*plans, p);
	MemoryContextSwitchTo(old);
	return p;
}

/*
 * What an INSERT ... ON CONFLICT DO UPDATE returns, so that row_is_new()
 * can tell an inserted row from an updated one: a new row has no xmax,
 * while the update left the lock of the conflict check in it.  A
 * partitioned table cannot return xmax; it returns the row's partition and
 * ctid instead, and row_is_new() reads the tuple header.
 */
static const char *
returning_sql(ApplyTarget *t)
{
	return t->partitioned ?
		" RETURNING t.tableoid, t.ctid" :
		" RETURNING t.xmax OPERATOR(pg_catalog.=) '0'::pg_catalog.xid";
}

static bool
row_is_new(ApplyTarget *t)
{
	bool		isnull;
	Oid			partoid;
	ItemPointerData tid;
	Relation	rel;
	TupleTableSlot *slot;
	bool		isnew = true;

	if (!t->partitioned)
		return result_bool();

	partoid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
	ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[0],
																SPI_tuptable->tupdesc,
																2, &isnull)),
					&tid);
	rel = table_open(partoid, NoLock);	/* locked by the INSERT */
	slot = table_slot_create(rel, NULL);
	/* not a heap partition: assume new, which is safe but takes the lock */
	if (TTS_IS_BUFFERTUPLE(slot) &&
		table_tuple_fetch_row_version(rel, &tid, SnapshotAny, slot))
	{
		bool		should_free;
		HeapTuple	tup = ExecFetchSlotHeapTuple(slot, false, &should_free);

		isnew = !TransactionIdIsValid(HeapTupleHeaderGetRawXmax(tup->t_data));
		if (should_free)
			heap_freetuple(tup);
	}
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, NoLock);
	return isnew;
}

static void
append_pk_list(StringInfo sql, ApplyTarget *t)
{
	for (int k = 0; k < t->npk; k++)
		appendStringInfo(sql, "%s%s", k > 0 ? ", " : "",
						 t->cols[t->pk_idx[k]].qname);
}

/*
 * Two statements per column set.  Parameters: the row's columns in JSON
 * member order, then the version, the target and the canonical key.
 *
 * plan, for the common case of a newer version of an existing row:
 * UPDATE target AS t SET <non-key cols> = $.., version = $v
 * WHERE <pk> AND (t.version IS NULL OR t.version < $v)
 * It needs no tombstone check: a row that exists is newer than any
 * tombstone of its key (it was inserted after the check below).
 *
 * plan2, when the UPDATE found nothing (no row, or a newer one):
 * INSERT INTO target AS t (<cols>, version) SELECT $1.., $v
 * WHERE NOT EXISTS (tombstone of the key with version >= $v)
 * ON CONFLICT (<pk>) DO UPDATE SET <non-key cols> = excluded.., version
 * WHERE t.version IS NULL OR t.version < excluded.version
 * RETURNING whether the row is new (see returning_sql())
 */
static ColumnSetPlan *
upsert_plan(ApplyTarget *t, int ncols, int *colidx)
{
	ColumnSetPlan *p = find_plan(t->upsert_plans, ncols, colidx);
	ApplyColumn *ver = &t->cols[t->version_idx];
	StringInfoData sql;
	Oid		   *argtypes;
	bool		overriding = false;
	int			k;
	SPIPlanPtr	plan;
	SPIPlanPtr	plan2;

	if (p)
		return p;
	trim_plans(&t->upsert_plans);

	argtypes = palloc(sizeof(Oid) * (ncols + 3));
	for (int i = 0; i < ncols; i++)
	{
		argtypes[i] = t->cols[colidx[i]].basetype;
		overriding |= t->cols[colidx[i]].identity_always;
	}
	argtypes[ncols] = INT8OID;
	argtypes[ncols + 1] = REGCLASSOID;
	argtypes[ncols + 2] = JSONBOID;

	initStringInfo(&sql);
	appendStringInfo(&sql, "UPDATE %s AS t SET ", t->qualname);
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		if (c->pkpos < 0)
			appendStringInfo(&sql, "%s = $%d, ", c->qname, i + 1);
	}
	appendStringInfo(&sql, "%s = $%d WHERE ", ver->qname, ncols + 1);
	k = 0;
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		if (c->pkpos >= 0)
			appendStringInfo(&sql, "%st.%s %s $%d", k++ > 0 ? " AND " : "",
							 c->qname, c->eqop, i + 1);
	}
	appendStringInfo(&sql, " AND (t.%s IS NULL OR t.%s OPERATOR(pg_catalog.<) $%d)",
					 ver->qname, ver->qname, ncols + 1);
	plan = cqrs_keep_plan(sql.data, ncols + 1, argtypes);

	resetStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s AS t (", t->qualname);
	for (int i = 0; i < ncols; i++)
		appendStringInfo(&sql, "%s, ", t->cols[colidx[i]].qname);
	appendStringInfo(&sql, "%s) %sSELECT ", ver->qname,
					 overriding ? "OVERRIDING SYSTEM VALUE " : "");
	for (int i = 0; i <= ncols; i++)
		appendStringInfo(&sql, "%s$%d", i > 0 ? ", " : "", i + 1);
	appendStringInfo(&sql,
					 " WHERE NOT EXISTS (SELECT FROM %s tb"
					 " WHERE tb.target OPERATOR(pg_catalog.=) $%d"
					 " AND tb.key OPERATOR(pg_catalog.=) $%d"
					 " AND tb.version OPERATOR(pg_catalog.>=) $%d)",
					 t->tombstone, ncols + 2, ncols + 3, ncols + 1);
	appendStringInfoString(&sql, " ON CONFLICT (");
	append_pk_list(&sql, t);
	appendStringInfoString(&sql, ") DO UPDATE SET ");
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		if (c->pkpos < 0)
			appendStringInfo(&sql, "%s = excluded.%s, ", c->qname, c->qname);
	}
	appendStringInfo(&sql, "%s = excluded.%s"
					 " WHERE t.%s IS NULL OR t.%s OPERATOR(pg_catalog.<) excluded.%s",
					 ver->qname, ver->qname, ver->qname, ver->qname, ver->qname);
	appendStringInfoString(&sql, returning_sql(t));
	plan2 = cqrs_keep_plan(sql.data, ncols + 3, argtypes);

	p = new_plan_entry(t, &t->upsert_plans, ncols, colidx);
	p->plan = plan;
	p->plan2 = plan2;
	return p;
}

/*
 * UPDATE target AS t SET <col> = t.<col> + $d.. WHERE <pk>
 * and, for a missing row:
 * INSERT INTO target AS t (<pk>, <cols>) SELECT $1..
 * WHERE NOT EXISTS (any tombstone of the key)
 * ON CONFLICT (<pk>) DO UPDATE SET <col> = t.<col> + excluded.<col>..
 * RETURNING whether the row is new
 * Parameters: the key columns in primary key order, then the deltas, then
 * (INSERT only) target and canonical key.
 */
static ColumnSetPlan *
delta_plan(ApplyTarget *t, int ncols, int *colidx)
{
	ColumnSetPlan *p = find_plan(t->delta_plans, ncols, colidx);
	StringInfoData sql;
	Oid		   *argtypes;
	int			n = t->npk + ncols;
	bool		overriding = false;
	SPIPlanPtr	plan;
	SPIPlanPtr	plan2;

	if (p)
		return p;
	trim_plans(&t->delta_plans);

	argtypes = palloc(sizeof(Oid) * (n + 2));
	for (int k = 0; k < t->npk; k++)
	{
		argtypes[k] = t->cols[t->pk_idx[k]].basetype;
		overriding |= t->cols[t->pk_idx[k]].identity_always;
	}
	for (int i = 0; i < ncols; i++)
	{
		argtypes[t->npk + i] = t->cols[colidx[i]].basetype;
		overriding |= t->cols[colidx[i]].identity_always;
	}
	argtypes[n] = REGCLASSOID;
	argtypes[n + 1] = JSONBOID;

	initStringInfo(&sql);
	appendStringInfo(&sql, "UPDATE %s AS t SET ", t->qualname);
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		appendStringInfo(&sql, "%s%s = t.%s OPERATOR(pg_catalog.+) $%d",
						 i > 0 ? ", " : "", c->qname, c->qname, t->npk + i + 1);
	}
	appendStringInfoString(&sql, " WHERE ");
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];

		appendStringInfo(&sql, "%st.%s %s $%d", k > 0 ? " AND " : "",
						 c->qname, c->eqop, k + 1);
	}
	plan = cqrs_keep_plan(sql.data, n, argtypes);

	resetStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s AS t (", t->qualname);
	append_pk_list(&sql, t);
	for (int i = 0; i < ncols; i++)
		appendStringInfo(&sql, ", %s", t->cols[colidx[i]].qname);
	appendStringInfo(&sql, ") %sSELECT ",
					 overriding ? "OVERRIDING SYSTEM VALUE " : "");
	for (int i = 0; i < n; i++)
		appendStringInfo(&sql, "%s$%d", i > 0 ? ", " : "", i + 1);
	appendStringInfo(&sql,
					 " WHERE NOT EXISTS (SELECT FROM %s tb"
					 " WHERE tb.target OPERATOR(pg_catalog.=) $%d"
					 " AND tb.key OPERATOR(pg_catalog.=) $%d)",
					 t->tombstone, n + 1, n + 2);
	appendStringInfoString(&sql, " ON CONFLICT (");
	append_pk_list(&sql, t);
	appendStringInfoString(&sql, ") DO UPDATE SET ");
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		appendStringInfo(&sql, "%s%s = t.%s OPERATOR(pg_catalog.+) excluded.%s",
						 i > 0 ? ", " : "", c->qname, c->qname, c->qname);
	}
	appendStringInfoString(&sql, returning_sql(t));
	plan2 = cqrs_keep_plan(sql.data, n + 2, argtypes);

	p = new_plan_entry(t, &t->delta_plans, ncols, colidx);
	p->plan = plan;
	p->plan2 = plan2;
	return p;
}

/* ------------------------------------------------------------------------
 * Keys
 * ------------------------------------------------------------------------
 */

/*
 * The canonical form of a key, as stored in cqrs_tombstone: an object of
 * the key columns' text representations, e.g. {"id": "42"}.  Equal keys
 * give equal documents whatever JSON spelled them ("42" or 42; "ABC" or
 * "abc" for a uuid).
 */
static Jsonb *
canonical_key(ApplyTarget *t, Datum *pkvals)
{
	JsonbParseState *st = NULL;
	JsonbValue *res;

	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];
		JsonbValue	jk;
		JsonbValue	jv;
		char	   *s = OutputFunctionCall(&c->output, pkvals[k]);

		jk.type = jbvString;
		jk.val.string.val = c->name;
		jk.val.string.len = c->namelen;
		pushJsonbValue(&st, WJB_KEY, &jk);
		jv.type = jbvString;
		jv.val.string.val = s;
		jv.val.string.len = strlen(s);
		pushJsonbValue(&st, WJB_VALUE, &jv);
	}
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/* Serializes deletes and inserts of one key of one target */
static void
lock_key(ApplyTarget *t, Jsonb *key)
{
	LOCKTAG		tag;
	uint32		h = hash_bytes((const unsigned char *) key, VARSIZE(key));

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, t->relid, h, CQRS_KEY_LOCK_FIELD4);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/*
 * The version of the key's tombstone, seen with a fresh snapshot; false if
 * there is none.
 */
static bool
tombstone_version(ApplyTarget *t, Jsonb *key, int64 *version)
{
	Datum		values[2];
	bool		isnull;

	values[0] = ObjectIdGetDatum(t->relid);
	values[1] = JsonbPGetDatum(key);
	if (run_plan(tomb_check_plan, values, NULL, true, true) == 0)
		return false;
	*version = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										   SPI_tuptable->tupdesc, 1, &isnull));
	return true;
}

/* Removes a row this transaction just inserted, found to be stale */
static void
undo_insert(ApplyTarget *t, Datum *pkvals, int64 version)
{
	Datum		values[INDEX_MAX_KEYS + 1];

	memcpy(values, pkvals, sizeof(Datum) * t->npk);
	values[t->npk] = Int64GetDatum(version);
	run_plan(t->delete_plan, values, NULL, false, false);
}

/*
 * The primary key values of a key argument: an object naming exactly the
 * key columns, or for a one-column key also the bare value.
 */
static void
parse_key(ApplyTarget *t, Jsonb *key, Datum *pkvals)
{
	bool		seen[INDEX_MAX_KEYS] = {0};
	ConvertContext cc = {"key", NULL, NULL};
	ErrorContextCallback errcb;
	bool		isnull;

	errcb.callback = convert_error_callback;
	errcb.arg = &cc;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;

	if (JB_ROOT_IS_SCALAR(key) && t->npk == 1)
	{
		JsonMember	m;
		ApplyColumn *c = &t->cols[t->pk_idx[0]];

		JsonbExtractScalar(&key->root, &m.value);
		m.key = c->name;
		m.keylen = c->namelen;
		cc.member = &m;
		cc.col = c;
		pkvals[0] = json_to_datum(c, &m.value, &isnull);
		cc.member = NULL;
		seen[0] = !isnull;
		if (isnull)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("primary key column \"%s\" must not be null", c->name)));
	}
	else if (!JB_ROOT_IS_OBJECT(key))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("key must be a JSON object"),
				 errdetail("It is a JSON %s.", jsonb_root_type(key)),
				 errhint("Name the primary key columns of \"%s\", for example '{\"%s\": 1}'.",
						 t->relname, t->cols[t->pk_idx[0]].name)));
	else
	{
		JsonMember *members;
		int			n = json_members(key, &members);
		int			cursor = 0;

		for (int i = 0; i < n; i++)
		{
			int			j = find_column(t, &members[i], &cursor);
			ApplyColumn *c;

			if (j < 0)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("column \"%s\" of relation \"%s\" does not exist",
								member_name(&members[i]), t->relname),
						 errdetail("The key names a column the table does not have.")));
			c = &t->cols[j];
			if (c->pkpos < 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("column \"%s\" is not part of the primary key of relation \"%s\"",
								c->name, t->relname),
						 errhint("A key names exactly the primary key columns.")));
			cc.member = &members[i];
			cc.col = c;
			pkvals[c->pkpos] = json_to_datum(c, &members[i].value, &isnull);
			cc.member = NULL;
			if (isnull)
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("primary key column \"%s\" must not be null", c->name)));
			seen[c->pkpos] = true;
		}
	}
	error_context_stack = errcb.previous;

	for (int k = 0; k < t->npk; k++)
		if (!seen[k])
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("key lacks primary key column \"%s\" of relation \"%s\"",
							t->cols[t->pk_idx[k]].name, t->relname)));
}

/* ------------------------------------------------------------------------
 * SQL-callable functions
 * ------------------------------------------------------------------------
 */

static void
check_not_null(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

static void
check_not_empty(text *t, const char *name)
{
	if (VARSIZE_ANY_EXHDR(t) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", name)));
}

/* Records (consumer, event_id) in the inbox; true if it was not there. */
static bool
inbox_insert(text *consumer, text *event_id)
{
	Datum		values[2];

	values[0] = PointerGetDatum(consumer);
	values[1] = PointerGetDatum(event_id);
	return run_plan(inbox_plan, values, NULL, false, false) == 1;
}

/*
 * cqrs_mark_processed(consumer text, event_id text) RETURNS boolean
 */
Datum
cqrs_mark_processed(PG_FUNCTION_ARGS)
{
	text	   *consumer;
	text	   *event_id;
	bool		result;

	check_not_null(fcinfo, 0, "consumer");
	check_not_null(fcinfo, 1, "event_id");
	consumer = PG_GETARG_TEXT_PP(0);
	event_id = PG_GETARG_TEXT_PP(1);
	check_not_empty(consumer, "consumer");
	check_not_empty(event_id, "event_id");

	apply_enter();
	ensure_ext_plans(helper_namespace(fcinfo));
	result = inbox_insert(consumer, event_id);
	apply_leave();

	PG_RETURN_BOOL(result);
}

/*
 * cqrs_upsert(target regclass, row jsonb, version bigint) RETURNS boolean
 */
Datum
cqrs_upsert(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Jsonb	   *row;
	int64		version;
	ApplyTarget *t;
	JsonMember *members;
	int			nmembers;
	int			ncols = 0;
	int		   *colidx;
	Datum	   *values;
	char	   *nulls;
	Datum		pkvals[INDEX_MAX_KEYS];
	bool		seen[INDEX_MAX_KEYS] = {0};
	int			cursor = 0;
	ConvertContext cc = {"row", NULL, NULL};
	ErrorContextCallback errcb;
	ColumnSetPlan *p;
	Jsonb	   *key;
	bool		result = false;

	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "row");
	check_not_null(fcinfo, 2, "version");
	relid = PG_GETARG_OID(0);
	row = PG_GETARG_JSONB_P(1);
	version = PG_GETARG_INT64(2);

	apply_enter();
	ensure_ext_plans(helper_namespace(fcinfo));
	t = get_target(relid, ext_plans_nsp);

	check_version_range(t, version);
	if (!JB_ROOT_IS_OBJECT(row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("row must be a JSON object"),
				 errdetail("It is a JSON %s.", jsonb_root_type(row))));

	nmembers = json_members(row, &members);
	colidx = palloc(sizeof(int) * Max(nmembers, 1));
	values = palloc(sizeof(Datum) * (nmembers + 3));
	nulls = palloc(nmembers + 4);

	errcb.callback = convert_error_callback;
	errcb.arg = &cc;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;
	for (int i = 0; i < nmembers; i++)
	{
		int			j = find_column(t, &members[i], &cursor);
		ApplyColumn *c;
		bool		isnull;

		if (j < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of relation \"%s\" does not exist",
							member_name(&members[i]), t->relname),
					 errdetail("Every member of the row must name a column of the table.")));
		c = &t->cols[j];
		if (j == t->version_idx)
		{
			check_row_version(t, &members[i], version);
			continue;
		}
		if (c->generated)
			ereport(ERROR,
					(errcode(ERRCODE_GENERATED_ALWAYS),
					 errmsg("column \"%s\" of relation \"%s\" is a generated column",
							c->name, t->relname),
					 errdetail("Generated columns cannot be written; leave the member out of the row.")));
		cc.member = &members[i];
		cc.col = c;
		values[ncols] = json_to_datum(c, &members[i].value, &isnull);
		cc.member = NULL;
		nulls[ncols] = isnull ? 'n' : ' ';
		if (c->pkpos >= 0)
		{
			if (isnull)
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("primary key column \"%s\" must not be null", c->name)));
			pkvals[c->pkpos] = values[ncols];
			seen[c->pkpos] = true;
		}
		colidx[ncols++] = j;
	}
	error_context_stack = errcb.previous;

	for (int k = 0; k < t->npk; k++)
		if (!seen[k])
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("row lacks primary key column \"%s\" of relation \"%s\"",
							t->cols[t->pk_idx[k]].name, t->relname)));

	p = upsert_plan(t, ncols, colidx);
	values[ncols] = Int64GetDatum(version);
	nulls[ncols] = ' ';
	if (run_plan(p->plan, values, nulls, false, false) == 1)
		result = true;
	else
	{
		key = canonical_key(t, pkvals);
		values[ncols + 1] = ObjectIdGetDatum(relid);
		values[ncols + 2] = JsonbPGetDatum(key);
		nulls[ncols + 1] = nulls[ncols + 2] = ' ';
		nulls[ncols + 3] = '\0';
		if (run_plan(p->plan2, values, nulls, false, false) == 1)
		{
			result = true;
			if (row_is_new(t))
			{
				int64		tv;

				/* a delete of the key may have committed meanwhile */
				lock_key(t, key);
				if (tombstone_version(t, key, &tv) && tv >= version)
				{
					undo_insert(t, pkvals, version);
					result = false;
				}
			}
		}
	}
	apply_leave();

	PG_RETURN_BOOL(result);
}

/*
 * cqrs_delete(target regclass, key jsonb, version bigint) RETURNS boolean
 */
Datum
cqrs_delete(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Jsonb	   *keyarg;
	int64		version;
	ApplyTarget *t;
	Datum		pkvals[INDEX_MAX_KEYS + 1];
	Datum		tvalues[3];
	Jsonb	   *key;
	uint64		deleted;
	bool		result;

	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "key");
	check_not_null(fcinfo, 2, "version");
	relid = PG_GETARG_OID(0);
	keyarg = PG_GETARG_JSONB_P(1);
	version = PG_GETARG_INT64(2);

	apply_enter();
	ensure_ext_plans(helper_namespace(fcinfo));
	t = get_target(relid, ext_plans_nsp);
	check_version_range(t, version);
	parse_key(t, keyarg, pkvals);
	key = canonical_key(t, pkvals);

	/* before reading anything: see the comment at the top of the file */
	lock_key(t, key);

	pkvals[t->npk] = Int64GetDatum(version);
	deleted = run_plan(t->delete_plan, pkvals, NULL, false, true);
	if (deleted == 0 &&
		run_plan(t->exists_plan, pkvals, NULL, true, true) > 0)
	{
		/* the row is newer than this delete */
		result = false;
	}
	else
	{
		tvalues[0] = ObjectIdGetDatum(relid);
		tvalues[1] = JsonbPGetDatum(key);
		tvalues[2] = Int64GetDatum(version);
		result = run_plan(tomb_write_plan, tvalues, NULL, false, false) > 0 ||
			deleted > 0;
	}
	apply_leave();

	PG_RETURN_BOOL(result);
}

/*
 * cqrs_apply_delta(target regclass, key jsonb, deltas jsonb, consumer text,
 *					event_id text) RETURNS boolean
 *
 * Deduplicated in cqrs_inbox as consumer "<consumer>/delta/<target oid>",
 * event id "<event_id> <canonical key>", so that one event can add to
 * several rows and tables, and a cqrs_mark_processed(consumer, event_id) in
 * the same transaction does not suppress it.
 */
Datum
cqrs_apply_delta(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Jsonb	   *keyarg;
	Jsonb	   *deltas;
	text	   *consumer;
	text	   *event_id;
	ApplyTarget *t;
	Datum		pkvals[INDEX_MAX_KEYS];
	Jsonb	   *key;
	char	   *keytext;
	JsonMember *members;
	int			nmembers;
	int		   *colidx;
	Datum	   *values;
	int			cursor = 0;
	ConvertContext cc = {"deltas", NULL, NULL};
	ErrorContextCallback errcb;
	ColumnSetPlan *p;
	bool		result = false;

	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "key");
	check_not_null(fcinfo, 2, "deltas");
	check_not_null(fcinfo, 3, "consumer");
	check_not_null(fcinfo, 4, "event_id");
	relid = PG_GETARG_OID(0);
	keyarg = PG_GETARG_JSONB_P(1);
	deltas = PG_GETARG_JSONB_P(2);
	consumer = PG_GETARG_TEXT_PP(3);
	event_id = PG_GETARG_TEXT_PP(4);
	check_not_empty(consumer, "consumer");
	check_not_empty(event_id, "event_id");

	apply_enter();
	ensure_ext_plans(helper_namespace(fcinfo));
	t = get_target(relid, ext_plans_nsp);
	parse_key(t, keyarg, pkvals);
	key = canonical_key(t, pkvals);

	if (!JB_ROOT_IS_OBJECT(deltas))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("deltas must be a JSON object"),
				 errdetail("It is a JSON %s.", jsonb_root_type(deltas)),
				 errhint("Map column names to numbers, for example '{\"likes\": 1}'.")));

	nmembers = json_members(deltas, &members);
	colidx = palloc(sizeof(int) * Max(nmembers, 1));
	values = palloc(sizeof(Datum) * (t->npk + nmembers + 2));
	memcpy(values, pkvals, sizeof(Datum) * t->npk);

	errcb.callback = convert_error_callback;
	errcb.arg = &cc;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;
	for (int i = 0; i < nmembers; i++)
	{
		int			j = find_column(t, &members[i], &cursor);
		ApplyColumn *c;
		bool		isnull;

		if (j < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of relation \"%s\" does not exist",
							member_name(&members[i]), t->relname),
					 errdetail("Every member of the deltas must name a column of the table.")));
		c = &t->cols[j];
		if (c->pkpos >= 0 || j == t->version_idx)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("cannot apply a delta to %s column \"%s\" of relation \"%s\"",
							c->pkpos >= 0 ? "primary key" : "version",
							c->name, t->relname)));
		if (!c->addable || c->generated)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" of relation \"%s\" is not a numeric column",
							c->name, t->relname),
					 errdetail("It is of type %s; deltas apply to ordinary columns of type smallint, integer, bigint, numeric, real or double precision.",
							   c->typname)));
		if (members[i].value.type != jbvNumeric)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("delta for column \"%s\" must be a JSON number, not a JSON %s",
							c->name, json_value_type(&members[i].value))));
		cc.member = &members[i];
		cc.col = c;
		values[t->npk + i] = json_to_datum(c, &members[i].value, &isnull);
		cc.member = NULL;
		colidx[i] = j;
	}
	error_context_stack = errcb.previous;

	/* the inbox decides first */
	keytext = JsonbToCString(NULL, &key->root, VARSIZE(key));
	if (!inbox_insert(cstring_to_text(psprintf("%s/delta/%u",
											   text_to_cstring(consumer), relid)),
					  cstring_to_text(psprintf("%s %s",
											   text_to_cstring(event_id), keytext))))
		goto done;
	result = true;
	if (nmembers == 0)
		goto done;

	p = delta_plan(t, nmembers, colidx);
	if (run_plan(p->plan, values, NULL, false, false) > 0)
		goto done;

	/* no row: create one from the deltas, unless the key was deleted */
	for (int j = 0; j < t->ncols; j++)
	{
		ApplyColumn *c = &t->cols[j];
		bool		given = c->pkpos >= 0;

		for (int i = 0; i < nmembers && !given; i++)
			given = colidx[i] == j;
		if (c->needs_value && !given)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("cannot create the missing row %s of relation \"%s\" from deltas",
							keytext, t->relname),
					 errdetail("Column \"%s\" is NOT NULL and has no default.", c->name),
					 errhint("Create the row with cqrs_upsert() before applying deltas, or give the column a default.")));
	}
	values[t->npk + nmembers] = ObjectIdGetDatum(relid);
	values[t->npk + nmembers + 1] = JsonbPGetDatum(key);
	if (run_plan(p->plan2, values, NULL, false, false) == 0)
	{
		result = false;			/* the row was deleted */
		goto done;
	}
	if (row_is_new(t))
	{
		int64		tv;

		lock_key(t, key);
		if (tombstone_version(t, key, &tv))
		{
			undo_insert(t, pkvals, PG_INT64_MAX);
			result = false;
		}
	}

done:
	apply_leave();
	PG_RETURN_BOOL(result);
}

/*
 * cqrs_prune_read_side(older_than interval DEFAULT NULL) RETURNS bigint
 *
 * Deletes inbox entries and tombstones older than older_than (default
 * cqrs_sync.inbox_retention; 0 keeps them for ever) and tombstones of
 * dropped tables.  Returns the number of rows deleted.
 */
Datum
cqrs_prune_read_side(PG_FUNCTION_ARGS)
{
	Interval   *older;
	Interval	zero;
	const char *schema;
	Datum		values[1];
	Oid			argtypes[1] = {INTERVALOID};
	int64		total = 0;
	int			rc;

	memset(&zero, 0, sizeof(zero));
	if (PG_ARGISNULL(0))
	{
		if (cqrs_inbox_retention <= 0)
			PG_RETURN_INT64(0);
		older = palloc0(sizeof(Interval));
		older->time = (int64) cqrs_inbox_retention * USECS_PER_SEC;
	}
	else
	{
		older = PG_GETARG_INTERVAL_P(0);
		if (DatumGetBool(DirectFunctionCall2(interval_lt,
											 IntervalPGetDatum(older),
											 IntervalPGetDatum(&zero))))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("older_than must not be negative")));
	}
	values[0] = IntervalPGetDatum(older);

	apply_enter();
	schema = quote_identifier(get_namespace_name(helper_namespace(fcinfo)));
	rc = SPI_execute_with_args(psprintf("DELETE FROM %s.cqrs_inbox "
										"WHERE processed_at OPERATOR(pg_catalog.<) "
										"(pg_catalog.now() OPERATOR(pg_catalog.-) $1)",
										schema),
							   1, argtypes, values, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "could not prune the inbox: %s", SPI_result_code_string(rc));
	total += SPI_processed;
	rc = SPI_execute_with_args(psprintf("DELETE FROM %s.cqrs_tombstone tb "
										"WHERE tb.deleted_at OPERATOR(pg_catalog.<) "
										"(pg_catalog.now() OPERATOR(pg_catalog.-) $1) "
										"OR NOT EXISTS (SELECT FROM pg_catalog.pg_class c "
										"WHERE c.oid OPERATOR(pg_catalog.=) tb.target)",
										schema),
							   1, argtypes, values, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "could not prune the tombstones: %s", SPI_result_code_string(rc));
	total += SPI_processed;
	apply_leave();

	PG_RETURN_INT64(total);
}
