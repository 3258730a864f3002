/*-------------------------------------------------------------------------
 *
 * apply.c
 *	  The read side: the entry points of the idempotent apply helpers and
 *	  their lock protocol.  (The target cache is in apply_cache.c, JSON to
 *	  Datum and keys in apply_json.c, the SQL and its plans in
 *	  apply_plans.c.)
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
 *	  ones granted to cqrs_sync_reader.
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

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "apply.h"
#include "apply_cache.h"
#include "apply_json.h"
#include "apply_plans.h"

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

/* Settings */
char	   *cqrs_version_column = NULL;
int			cqrs_inbox_retention = 7 * 24 * 3600;

static bool settings_defined = false;

/* The plans on the extension's tables, for the schema of the running helper */
static const ApplyExtPlans *ext = NULL;

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

static Oid
helper_namespace(FunctionCallInfo fcinfo)
{
	Oid			nsp = get_func_namespace(fcinfo->flinfo->fn_oid);

	if (!OidIsValid(nsp))
		elog(ERROR, "could not find the schema of function %u",
			 fcinfo->flinfo->fn_oid);
	return nsp;
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
	if (apply_run_plan(ext->tomb_check, values, NULL, true, true) == 0)
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
	apply_run_plan(t->delete_plan, values, NULL, false, false);
}

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
	return apply_run_plan(ext->inbox, values, NULL, false, false) == 1;
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
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo));
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
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo));
	t = apply_get_target(relid, ext->nsp);

	apply_check_version_range(t, version);
	if (!JB_ROOT_IS_OBJECT(row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("row must be a JSON object"),
				 errdetail("It is a JSON %s.", apply_jsonb_root_type(row))));

	nmembers = apply_json_members(row, &members);
	colidx = palloc(sizeof(int) * Max(nmembers, 1));
	values = palloc(sizeof(Datum) * (nmembers + 3));
	nulls = palloc(nmembers + 4);

	errcb.callback = apply_convert_error_callback;
	errcb.arg = &cc;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;
	for (int i = 0; i < nmembers; i++)
	{
		int			j = apply_find_column(t, &members[i], &cursor);
		ApplyColumn *c;
		bool		isnull;

		if (j < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of relation \"%s\" does not exist",
							apply_member_name(&members[i]), t->relname),
					 errdetail("Every member of the row must name a column of the table.")));
		c = &t->cols[j];
		if (j == t->version_idx)
		{
			apply_check_row_version(t, &members[i], version);
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
		values[ncols] = apply_json_to_datum(c, &members[i].value, &isnull);
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

	p = apply_upsert_plan(t, ncols, colidx);
	values[ncols] = Int64GetDatum(version);
	nulls[ncols] = ' ';
	if (apply_run_plan(p->plan, values, nulls, false, false) == 1)
		result = true;
	else
	{
		key = apply_canonical_key(t, pkvals);
		values[ncols + 1] = ObjectIdGetDatum(relid);
		values[ncols + 2] = JsonbPGetDatum(key);
		nulls[ncols + 1] = nulls[ncols + 2] = ' ';
		nulls[ncols + 3] = '\0';
		if (apply_run_plan(p->plan2, values, nulls, false, false) == 1)
		{
			result = true;
			if (apply_row_is_new(t))
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
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo));
	t = apply_get_target(relid, ext->nsp);
	apply_check_version_range(t, version);
	apply_parse_key(t, keyarg, pkvals);
	key = apply_canonical_key(t, pkvals);

	/* before reading anything: see the comment at the top of the file */
	lock_key(t, key);

	pkvals[t->npk] = Int64GetDatum(version);
	deleted = apply_run_plan(t->delete_plan, pkvals, NULL, false, true);
	if (deleted == 0 &&
		apply_run_plan(t->exists_plan, pkvals, NULL, true, true) > 0)
	{
		/* the row is newer than this delete */
		result = false;
	}
	else
	{
		tvalues[0] = ObjectIdGetDatum(relid);
		tvalues[1] = JsonbPGetDatum(key);
		tvalues[2] = Int64GetDatum(version);
		result = apply_run_plan(ext->tomb_write, tvalues, NULL, false, false) > 0 ||
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
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo));
	t = apply_get_target(relid, ext->nsp);
	apply_parse_key(t, keyarg, pkvals);
	key = apply_canonical_key(t, pkvals);

	if (!JB_ROOT_IS_OBJECT(deltas))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("deltas must be a JSON object"),
				 errdetail("It is a JSON %s.", apply_jsonb_root_type(deltas)),
				 errhint("Map column names to numbers, for example '{\"likes\": 1}'.")));

	nmembers = apply_json_members(deltas, &members);
	colidx = palloc(sizeof(int) * Max(nmembers, 1));
	values = palloc(sizeof(Datum) * (t->npk + nmembers + 2));
	memcpy(values, pkvals, sizeof(Datum) * t->npk);

	errcb.callback = apply_convert_error_callback;
	errcb.arg = &cc;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;
	for (int i = 0; i < nmembers; i++)
	{
		int			j = apply_find_column(t, &members[i], &cursor);
		ApplyColumn *c;
		bool		isnull;

		if (j < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of relation \"%s\" does not exist",
							apply_member_name(&members[i]), t->relname),
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
							c->name, apply_json_value_type(&members[i].value))));
		cc.member = &members[i];
		cc.col = c;
		values[t->npk + i] = apply_json_to_datum(c, &members[i].value, &isnull);
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

	p = apply_delta_plan(t, nmembers, colidx);
	if (apply_run_plan(p->plan, values, NULL, false, false) > 0)
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
	if (apply_run_plan(p->plan2, values, NULL, false, false) == 0)
	{
		result = false;			/* the row was deleted */
		goto done;
	}
	if (apply_row_is_new(t))
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
