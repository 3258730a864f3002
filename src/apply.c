/*-------------------------------------------------------------------------
 *
 * apply.c
 *	  The read side: the entry points of the idempotent apply helpers and
 *	  their lock protocol.  (The target cache is in apply_cache.c, JSON to
 *	  Datum and keys in apply_json.c, the SQL and its plans in
 *	  apply_plans.c, the update of an existing row without its statement
 *	  in apply_fast.c, who may write what in apply_acl.c.)
 *
 *	  A read service calls these inside its own transaction, so that an
 *	  event applied twice, or out of order, changes nothing:
 *
 *	  cqrs_mark_processed(consumer, event_id): INSERT into cqrs_inbox ... ON
 *	  CONFLICT DO NOTHING; the primary key, not a read-then-check, decides
 *	  whether the event is new.
 *
 *	  cqrs_upsert(target, row, version): UPDATE ... WHERE stored version <
 *	  incoming version; if no row was updated, INSERT ... ON CONFLICT
 *	  (primary key) DO UPDATE ... WHERE stored version < incoming version,
 *	  unless a tombstone of the key has a version >= the incoming one.
 *
 *	  cqrs_delete(target, key, version): deletes the row if its version is
 *	  <= version and records a tombstone (cqrs_tombstone) with the version,
 *	  so that a later, older upsert does not bring the row back.
 *
 *	  cqrs_apply_delta(target, key, deltas, consumer, event_id): adds numeric
 *	  deltas once per (consumer, target, event, key), remembered in
 *	  cqrs_delta_inbox.
 *
 *	  All of them run as the caller (SECURITY INVOKER): the caller needs the
 *	  privileges on the target table.  The extension's own tables are
 *	  written as their owner, after the checks of apply_acl.c.
 *
 *	  Version 0.1.0's SQL definitions call the symbols without suffix, which
 *	  keep using 0.1.0's tables (delta memory in the inbox, tombstones found
 *	  by their exact key, no consumer owners) until ALTER EXTENSION ...
 *	  UPDATE points the functions at the _0_2 symbols.
 *
 *	  Deletes versus creates.  A row lock serializes an upsert and a delete
 *	  of an existing row, but not a delete of a missing row (which only
 *	  writes a tombstone) and the insert of that row: neither sees the
 *	  other's uncommitted work.  So cqrs_delete() takes a transaction-level
 *	  advisory lock on (target, hash of the key) before it reads anything,
 *	  and an insert of a new row takes the same lock afterwards and re-checks
 *	  the tombstones with a fresh snapshot; if a delete committed meanwhile,
 *	  the insert removes the row it made and reports "not applied".  Updates
 *	  of existing rows, the common case, take no extra lock.
 *
 *	  Deltas versus creates.  A delta for a missing row first inserts the
 *	  row (its key, the defaults), with ON CONFLICT DO NOTHING: the unique
 *	  index makes it wait for any transaction that is inserting the key (an
 *	  upsert re-creating a deleted row), and then add to that row.  Only
 *	  when its own insert made the row does it look for a tombstone, under
 *	  the key's lock; a delta for a deleted row is recorded and dropped.
 *	  On a table whose BEFORE DELETE trigger may skip the removal of that
 *	  row (a soft delete; assumed of a partitioned table's partitions), a
 *	  key deleted, with no row, by all that committed is dropped before the
 *	  insert: a re-create in flight does not make that delta wait.
 *	  Under REPEATABLE READ, a row created or deleted by a transaction the
 *	  caller's snapshot cannot see is a serialization failure, never a lost
 *	  delta.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "access/table.h"
#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/rls.h"

#include "apply.h"
#include "apply_acl.h"
#include "apply_cache.h"
#include "apply_fast.h"
#include "apply_json.h"
#include "apply_plans.h"

/* 0.1.0's SQL definitions */
PG_FUNCTION_INFO_V1(cqrs_mark_processed);
PG_FUNCTION_INFO_V1(cqrs_upsert);
PG_FUNCTION_INFO_V1(cqrs_delete);
PG_FUNCTION_INFO_V1(cqrs_apply_delta);
/* 0.2.0's */
PG_FUNCTION_INFO_V1(cqrs_mark_processed_0_2);
PG_FUNCTION_INFO_V1(cqrs_upsert_0_2);
PG_FUNCTION_INFO_V1(cqrs_delete_0_2);
PG_FUNCTION_INFO_V1(cqrs_apply_delta_0_2);

/*
 * locktag_field4 of the advisory locks on (target, key hash); the user-level
 * pg_advisory_lock() functions use 1 and 2, so these never collide with
 * them.  pg_locks shows them as locktype "advisory", classid = target oid,
 * objid = key hash, objsubid = 17233.
 */
#define CQRS_KEY_LOCK_FIELD4	0x4351

/* Attempts of a delta at a row that others keep creating and deleting */
#define DELTA_ATTEMPTS	3

/* Settings */
char	   *cqrs_version_column = NULL;
int			cqrs_inbox_retention = 7 * 24 * 3600;

static bool settings_defined = false;

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
lock_key(ApplyTarget *t, ApplyKey *key)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, t->relid, key->hash, CQRS_KEY_LOCK_FIELD4);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/*
 * May a trigger of the target skip a DELETE (a BEFORE DELETE row trigger
 * that returns NULL: a soft delete)?  A partitioned table's partitions may
 * have triggers of their own: assumed so.  Locked by apply_get_target().
 */
static bool
skips_deletes(ApplyTarget *t)
{
	Relation	rel = table_open(t->relid, NoLock);
	bool		result = t->partitioned ||
		(rel->trigdesc != NULL && rel->trigdesc->trig_delete_before_row);

	table_close(rel, NoLock);
	return result;
}

/*
 * Removes a row this transaction just inserted, found to be stale: a delete
 * of the key committed meanwhile.  When the DELETE removes nothing, the row
 * cannot stay (the key is deleted): an error.  On a table with a BEFORE
 * DELETE row trigger (or partitioned), whatever kept the row, a retry of the
 * transaction sees the key's delete before it inserts (the upsert always
 * looks first, a delta on such a table too), so 40001.  Otherwise row-level
 * security without a DELETE policy is the likely cause (42501).
 */
static void
undo_insert(ApplyTarget *t, Datum *pkvals, int64 version)
{
	Datum		values[INDEX_MAX_KEYS + 1];

	memcpy(values, pkvals, sizeof(Datum) * t->npk);
	values[t->npk] = Int64GetDatum(version);
	if (apply_run_plan(t->delete_plan, values, NULL, false, false) == 1)
		return;
	if (skips_deletes(t))
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not remove the row of relation \"%s\" this call inserted for a deleted key",
						t->relname),
				 errdetail("The key was deleted meanwhile, so the row must go, but its DELETE removed nothing: a BEFORE DELETE trigger skipped it, or row-level security kept it."),
				 errhint("Retry the transaction: it then sees the deletion before it inserts anything.")));
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("cannot remove the row of relation \"%s\" this call inserted for a deleted key",
					t->relname),
			 errdetail("A newer event deleted the key meanwhile, so the row must go, but row-level security does not let role \"%s\" delete it.",
					   GetUserNameFromId(GetUserId(), false)),
			 errhint("Give the role a DELETE policy on the table: cqrs_upsert() and cqrs_apply_delta() need one under row-level security.")));
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

/*
 * cqrs_mark_processed(consumer text, event_id text) RETURNS boolean
 */
static Datum
mark_processed(FunctionCallInfo fcinfo, bool version2)
{
	text	   *consumer;
	text	   *event_id;
	const ApplyExtPlans *ext;
	bool		result;

	check_not_null(fcinfo, 0, "consumer");
	check_not_null(fcinfo, 1, "event_id");
	consumer = PG_GETARG_TEXT_PP(0);
	event_id = PG_GETARG_TEXT_PP(1);
	check_not_empty(consumer, "consumer");
	check_not_empty(event_id, "event_id");

	apply_enter();
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo), version2);
	if (version2)
		apply_check_consumer(ext, consumer);
	result = apply_inbox_insert(ext, consumer, event_id);
	apply_leave();

	PG_RETURN_BOOL(result);
}

Datum
cqrs_mark_processed(PG_FUNCTION_ARGS)
{
	return mark_processed(fcinfo, false);
}

Datum
cqrs_mark_processed_0_2(PG_FUNCTION_ARGS)
{
	return mark_processed(fcinfo, true);
}

/*
 * cqrs_upsert(target regclass, row jsonb, version bigint) RETURNS boolean
 */
static Datum
upsert(FunctionCallInfo fcinfo, bool version2)
{
	Oid			relid;
	Jsonb	   *row;
	int64		version;
	const ApplyExtPlans *ext;
	ApplyTarget *t;
	JsonMember *members;
	int			nmembers;
	int			ncols = 0;
	int		   *colidx;
	Datum	   *values;
	char	   *nulls;
	ApplyKey	key;
	bool		seen[INDEX_MAX_KEYS] = {0};
	int			cursor = 0;
	ConvertContext cc = {"row", NULL, NULL};
	ErrorContextCallback errcb;
	ColumnSetPlan *p;
	bool		result = false;
	int			fast;

	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "row");
	check_not_null(fcinfo, 2, "version");
	relid = PG_GETARG_OID(0);
	row = PG_GETARG_JSONB_P(1);
	version = PG_GETARG_INT64(2);

	apply_enter();
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo), version2);
	t = apply_get_target(relid, ext->nsp);

	apply_check_version_range(t, version);
	if (!JB_ROOT_IS_OBJECT(row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("row must be a JSON object"),
				 errdetail("It is a JSON %s.", apply_jsonb_root_type(row))));

	nmembers = apply_json_members(row, &members);
	colidx = palloc(sizeof(int) * Max(nmembers, 1));
	values = palloc(sizeof(Datum) * (nmembers + 1));
	nulls = palloc(nmembers + 1);

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
			key.vals[c->pkpos] = values[ncols];
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
	fast = apply_fast_update(t, ncols, colidx, values, nulls, key.vals, version);
	if (fast < 0)
		fast = (int) apply_run_plan(p->plan, values, nulls, false, false);
	if (fast == 1)
		result = true;
	else
	{
		int64		tv;
		Jsonb	   *stored;

		/* no row, or a newer one: insert, unless the key was deleted */
		apply_key_make(t, &key);
		if (apply_tombstone_find(ext, t, &key, false, &tv, &stored) && tv >= version)
			result = false;
		else if (apply_run_plan(p->plan2, values, nulls, false, false) == 1)
		{
			result = true;
			if (apply_row_is_new(t))
			{
				/* a delete of the key may have committed meanwhile */
				lock_key(t, &key);
				if (apply_tombstone_find(ext, t, &key, true, &tv, &stored) &&
					tv >= version)
				{
					undo_insert(t, key.vals, version);
					result = false;
				}
			}
		}
	}
	apply_leave();

	PG_RETURN_BOOL(result);
}

Datum
cqrs_upsert(PG_FUNCTION_ARGS)
{
	return upsert(fcinfo, false);
}

Datum
cqrs_upsert_0_2(PG_FUNCTION_ARGS)
{
	return upsert(fcinfo, true);
}

/*
 * cqrs_delete(target regclass, key jsonb, version bigint) RETURNS boolean
 */
static Datum
delete_row(FunctionCallInfo fcinfo, bool version2)
{
	Oid			relid;
	Jsonb	   *keyarg;
	int64		version;
	const ApplyExtPlans *ext;
	ApplyTarget *t;
	ApplyKey	key;
	Datum		values[INDEX_MAX_KEYS + 1];
	uint64		deleted;
	bool		result;

	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "key");
	check_not_null(fcinfo, 2, "version");
	relid = PG_GETARG_OID(0);
	keyarg = PG_GETARG_JSONB_P(1);
	version = PG_GETARG_INT64(2);

	apply_enter();
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo), version2);
	t = apply_get_target(relid, ext->nsp);
	apply_check_version_range(t, version);
	apply_parse_key(t, keyarg, key.vals);
	apply_key_make(t, &key);

	/* a tombstone is written only by who may delete from the table */
	apply_check_target_privilege(t, ACL_DELETE, 0, NULL);

	/* before reading anything: see the comment at the top of the file */
	lock_key(t, &key);

	memcpy(values, key.vals, sizeof(Datum) * t->npk);
	values[t->npk] = Int64GetDatum(version);
	deleted = apply_run_plan(t->delete_plan, values, NULL, false, true);
	if (deleted == 0 &&
		apply_run_plan(t->exists_plan, values, NULL, true, true) > 0)
	{
		bool		isnull;
		Datum		stored = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
										   &isnull);

		/*
		 * The row is newer than this delete; or not, and the DELETE left it
		 * all the same: a BEFORE DELETE trigger skipped it (the table's
		 * decision, as for an INSERT: false), or row-level security lets
		 * the caller see the row but not delete it (42501).
		 */
		if ((isnull || DatumGetInt64(stored) <= version) &&
			check_enable_rls(t->relid, InvalidOid, true) == RLS_ENABLED &&
			!skips_deletes(t))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("row-level security of table \"%s\" does not let role \"%s\" delete the row",
							t->relname, GetUserNameFromId(GetUserId(), false)),
					 errdetail("The role sees the row, whose version is not newer than this delete, but its policies for DELETE do not let it remove the row.")));
		result = false;
	}
	else
	{
		if (deleted == 0)
			apply_check_hidden_row(t, values, true);
		result = apply_tombstone_write(ext, t, &key, version) || deleted > 0;
	}
	apply_leave();

	PG_RETURN_BOOL(result);
}

Datum
cqrs_delete(PG_FUNCTION_ARGS)
{
	return delete_row(fcinfo, false);
}

Datum
cqrs_delete_0_2(PG_FUNCTION_ARGS)
{
	return delete_row(fcinfo, true);
}

/*
 * May a row trigger skip an INSERT into the target (a BEFORE INSERT trigger
 * that returns NULL)?  An INSERT ... ON CONFLICT DO NOTHING that inserted
 * nothing, with no row of the key to be found, again and again, was skipped.
 */
static bool
inserts_skippable(const ApplyTarget *t)
{
	Relation	rel = table_open(t->relid, NoLock);	/* locked by the INSERT */
	bool		skippable;

	/* (a partition's own triggers are not its parent's) */
	skippable = rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE ||
		(rel->trigdesc != NULL && rel->trigdesc->trig_insert_before_row);
	table_close(rel, NoLock);
	return skippable;
}

/*
 * cqrs_apply_delta(target regclass, key jsonb, deltas jsonb, consumer text,
 *					event_id text) RETURNS boolean
 *
 * Remembered per (consumer, target, event_id, key), so that one event can
 * add to several rows and tables, and a cqrs_mark_processed(consumer,
 * event_id) in the same transaction does not suppress it.
 */
static Datum
apply_delta(FunctionCallInfo fcinfo, bool version2)
{
	Oid			relid;
	Jsonb	   *keyarg;
	Jsonb	   *deltas;
	text	   *consumer;
	text	   *event_id;
	const ApplyExtPlans *ext;
	ApplyTarget *t;
	ApplyKey	key;
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
	ext = apply_ensure_ext_plans(helper_namespace(fcinfo), version2);
	t = apply_get_target(relid, ext->nsp);
	apply_parse_key(t, keyarg, key.vals);
	apply_key_make(t, &key);

	if (!JB_ROOT_IS_OBJECT(deltas))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("deltas must be a JSON object"),
				 errdetail("It is a JSON %s.", apply_jsonb_root_type(deltas)),
				 errhint("Map column names to numbers, for example '{\"likes\": 1}'.")));

	nmembers = apply_json_members(deltas, &members);
	colidx = palloc(sizeof(int) * Max(nmembers, 1));
	values = palloc(sizeof(Datum) * (t->npk + nmembers));
	memcpy(values, key.vals, sizeof(Datum) * t->npk);

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

	/* who may record events under the consumer, and add to the table */
	if (version2)
	{
		apply_check_consumer(ext, consumer);
		apply_check_target_privilege(t, ACL_UPDATE, nmembers, colidx);
	}

	/* the memory decides first */
	if (!apply_delta_memory_insert(ext, t, consumer, event_id, &key))
		goto done;
	result = true;
	if (nmembers == 0)
		goto done;

	p = apply_delta_plan(t, nmembers, colidx);
	if (apply_run_plan(p->plan, values, NULL, false, false) > 0)
		goto done;

	/*
	 * No row: create one from the defaults, unless the key was deleted.  The
	 * insert comes first, and a deleted key's row is removed again (a
	 * re-create of the key in flight makes the insert wait, and the delta
	 * counts on the re-created row).  Where a BEFORE DELETE trigger may skip
	 * that removal, a key deleted, with no row, by all that committed is
	 * dropped first; only a delete that commits meanwhile leaves a row to
	 * remove (undo_insert()).
	 */
	if (skips_deletes(t))
	{
		int64		tv;
		Jsonb	   *stored;

		if (apply_tombstone_find(ext, t, &key, true, &tv, &stored) &&
			apply_run_plan(t->exists_plan, values, NULL, true, true) == 0)
		{
			/* (a row re-created since, hidden from the role: 42501) */
			apply_check_hidden_row(t, values, false);
			result = false;
			goto done;
		}
	}
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
							key.text, t->relname),
					 errdetail("Column \"%s\" is NOT NULL and has no default.", c->name),
					 errhint("Create the row with cqrs_upsert() before applying deltas, or give the column a default.")));
	}
	for (int attempt = 1;; attempt++)
	{
		if (apply_run_plan(p->plan2, values, NULL, false, false) > 0)
		{
			int64		tv;
			Jsonb	   *stored;

			/* this transaction made the row: was the key deleted? */
			lock_key(t, &key);
			if (apply_tombstone_find(ext, t, &key, true, &tv, &stored))
			{
				undo_insert(t, key.vals, PG_INT64_MAX);
				result = false;
			}
			else if (apply_run_plan(p->plan, values, NULL, false, false) != 1)
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("cannot add the delta to the row of relation \"%s\" this call inserted",
								t->relname),
						 errdetail("Row-level security does not let role \"%s\" update the row it inserted.",
								   GetUserNameFromId(GetUserId(), false)),
						 errhint("Give the role an UPDATE policy on the table that covers the rows it inserts.")));
			break;
		}
		/* another transaction made the row and committed: add to it */
		if (apply_run_plan(p->plan, values, NULL, false, true) > 0)
			break;
		/* or the row is there, hidden from this role by its policies */
		if (attempt == 1)
			apply_check_hidden_row(t, values, false);
		/* or a BEFORE INSERT trigger skipped it: as an INSERT, nothing */
		if (attempt == DELTA_ATTEMPTS && inserts_skippable(t))
		{
			result = false;
			break;
		}
		if (attempt == DELTA_ATTEMPTS)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not apply deltas to row %s of relation \"%s\"",
							key.text, t->relname),
					 errdetail("Other transactions created and deleted the row %d times meanwhile.",
							   DELTA_ATTEMPTS),
					 errhint("Retry the transaction.")));
	}

done:
	apply_leave();
	PG_RETURN_BOOL(result);
}

Datum
cqrs_apply_delta(PG_FUNCTION_ARGS)
{
	return apply_delta(fcinfo, false);
}

Datum
cqrs_apply_delta_0_2(PG_FUNCTION_ARGS)
{
	return apply_delta(fcinfo, true);
}
