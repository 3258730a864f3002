/*-------------------------------------------------------------------------
 *
 * apply_plans.c
 *	  The read side: the SQL the helpers run, and its prepared plans.
 *
 *	  SQL is built once per (target, column set) with quoted identifiers and
 *	  schema-qualified operators, prepared with SPI and kept with the
 *	  target's cache entry; values are always parameters.  The statements
 *	  on the extension's own tables (the inbox, the delta memory, the
 *	  tombstones, the consumers) are prepared once per schema and run as
 *	  the tables' owner (see apply_acl.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "apply_acl.h"
#include "apply_json.h"
#include "apply_plans.h"
#include "util.h"

/* More plans than this for one target: the column sets are not stable. */
#define MAX_PLANS_PER_TARGET	64

/* Plans on the extension's own tables, and the schema they were made for */
static ApplyExtPlans ext_plans_v1;
static ApplyExtPlans ext_plans_v2;

/*
 * Runs a plan.  With "latest", it sees everything committed up to now even
 * in REPEATABLE READ, where a change not visible to the transaction's
 * snapshot then raises a serialization failure instead of being missed
 * (the way foreign key checks do it).
 */
uint64
apply_run_plan(SPIPlanPtr plan, Datum *values, const char *nulls, bool read_only,
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
bool
apply_result_bool(void)
{
	bool		isnull;
	Datum		d;

	if (SPI_processed == 0 || SPI_tuptable == NULL)
		return false;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return !isnull && DatumGetBool(d);
}

char *
apply_operator_sql(Oid opno)
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

static void
forget(ApplyExtPlans *p)
{
	apply_retire_plan(p->inbox);
	apply_retire_plan(p->delta_inbox);
	apply_retire_plan(p->tomb_find);
	apply_retire_plan(p->tomb_insert);
	apply_retire_plan(p->tomb_raise);
	apply_retire_plan(p->consumer_get);
	apply_retire_plan(p->consumer_claim);
	memset(p, 0, sizeof(*p));
}

/*
 * The statements on the extension's own tables, for its schema nsp.
 * version2: the tables of version 0.2.0 (delta memory, tombstones found by
 * hash, consumers); else those of 0.1.0, for its SQL definitions still
 * calling this library before ALTER EXTENSION ... UPDATE.  Every name is
 * schema-qualified; the statements run as the tables' owner.
 */
const ApplyExtPlans *
apply_ensure_ext_plans(Oid nsp, bool version2)
{
	ApplyExtPlans *p = version2 ? &ext_plans_v2 : &ext_plans_v1;
	const char *schema;
	Oid			inbox_relid;
	HeapTuple	tup;
	Oid			text2[2] = {TEXTOID, TEXTOID};
	Oid			delta_types[4] = {TEXTOID, REGCLASSOID, TEXTOID, TEXTOID};
	Oid			find_types[2] = {REGCLASSOID, INT4OID};
	Oid			insert_types[4] = {REGCLASSOID, JSONBOID, INT8OID, INT4OID};
	Oid			tomb_types[3] = {REGCLASSOID, JSONBOID, INT8OID};

	/*
	 * The extension dropped and created again in the same schema has other
	 * tables: their owner, and the relation whose changes make the cache of
	 * consumer owners stale (apply_acl.c), are those of the new ones.
	 */
	inbox_relid = get_relname_relid("cqrs_inbox", nsp);
	if (p->nsp == nsp && p->inbox != NULL && p->inbox_relid == inbox_relid)
		return p;
	forget(p);

	schema = quote_identifier(get_namespace_name(nsp));
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(inbox_relid));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"%s.cqrs_inbox\" does not exist", schema),
				 errhint("The read-side helpers need the tables of CREATE EXTENSION cqrs_sync.")));
	p->owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	p->inbox_relid = inbox_relid;
	ReleaseSysCache(tup);

	p->inbox = cqrs_keep_plan(psprintf("INSERT INTO %s.cqrs_inbox (consumer, event_id) VALUES ($1, $2) "
									   "ON CONFLICT DO NOTHING", schema),
							  2, text2);
	if (version2)
	{
		p->consumer_relid = get_relname_relid("cqrs_consumer", nsp);
		p->delta_inbox = cqrs_keep_plan(psprintf("INSERT INTO %s.cqrs_delta_inbox (consumer, target, event_id, key) "
												 "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
												 schema),
										4, delta_types);
		p->tomb_find = cqrs_keep_plan(psprintf("SELECT tb.version, tb.key FROM %s.cqrs_tombstone tb "
											   "WHERE tb.target OPERATOR(pg_catalog.=) $1 "
											   "AND tb.key_hash OPERATOR(pg_catalog.=) $2",
											   schema),
									  2, find_types);
		p->tomb_insert = cqrs_keep_plan(psprintf("INSERT INTO %s.cqrs_tombstone AS tb (target, key, version, key_hash) "
												 "VALUES ($1, $2, $3, $4) "
												 "ON CONFLICT (target, key) DO UPDATE "
												 "SET version = excluded.version, deleted_at = pg_catalog.now(), "
												 "key_hash = excluded.key_hash "
												 "WHERE tb.version OPERATOR(pg_catalog.<) excluded.version",
												 schema),
										4, insert_types);
		p->tomb_raise = cqrs_keep_plan(psprintf("UPDATE %s.cqrs_tombstone tb "
												"SET version = $3, deleted_at = pg_catalog.now() "
												"WHERE tb.target OPERATOR(pg_catalog.=) $1 "
												"AND tb.key OPERATOR(pg_catalog.=) $2 "
												"AND tb.version OPERATOR(pg_catalog.<) $3",
												schema),
									   3, tomb_types);
		p->consumer_get = cqrs_keep_plan(psprintf("SELECT c.owner FROM %s.cqrs_consumer c "
												  "WHERE c.consumer OPERATOR(pg_catalog.=) $1",
												  schema),
										 1, text2);
		p->consumer_claim = cqrs_keep_plan(psprintf("INSERT INTO %s.cqrs_consumer (consumer, owner) "
													"VALUES ($1, $2) ON CONFLICT DO NOTHING",
													schema),
										   2, text2);
	}
	else
	{
		p->tomb_find = cqrs_keep_plan(psprintf("SELECT tb.version, tb.key FROM %s.cqrs_tombstone tb "
											   "WHERE tb.target OPERATOR(pg_catalog.=) $1 "
											   "AND tb.key OPERATOR(pg_catalog.=) $2",
											   schema),
									  2, tomb_types);
		p->tomb_insert = cqrs_keep_plan(psprintf("INSERT INTO %s.cqrs_tombstone AS tb (target, key, version) "
												 "VALUES ($1, $2, $3) "
												 "ON CONFLICT (target, key) DO UPDATE "
												 "SET version = excluded.version, deleted_at = pg_catalog.now() "
												 "WHERE tb.version OPERATOR(pg_catalog.<) excluded.version",
												 schema),
										3, tomb_types);
	}
	p->version2 = version2;
	p->nsp = nsp;
	return p;
}

/* Runs a statement on the extension's tables as their owner. */
static uint64
run_as_owner(const ApplyExtPlans *ext, SPIPlanPtr plan, Datum *values,
			 bool read_only, bool latest)
{
	ApplyUser	save;
	uint64		n;

	apply_become_owner(ext, &save);
	n = apply_run_plan(plan, values, NULL, read_only, latest);
	apply_restore_user(&save);
	return n;
}

/* Records (consumer, event_id) in the inbox; true if it was not there. */
bool
apply_inbox_insert(const ApplyExtPlans *ext, text *consumer, text *event_id)
{
	Datum		values[2];

	values[0] = PointerGetDatum(consumer);
	values[1] = PointerGetDatum(event_id);
	return run_as_owner(ext, ext->inbox, values, false, false) == 1;
}

/*
 * Records that consumer added the deltas of event_id to the key's row of
 * target; true if it had not.  0.1.0 kept this in the inbox, under the
 * consumer "<consumer>/delta/<target oid>" and the event id "<event_id>
 * <key>".
 */
bool
apply_delta_memory_insert(const ApplyExtPlans *ext, ApplyTarget *t,
						  text *consumer, text *event_id, ApplyKey *key)
{
	Datum		values[4];

	if (!ext->version2)
		return apply_inbox_insert(ext,
								  cstring_to_text(psprintf("%s/delta/%u", text_to_cstring(consumer),
														   t->relid)),
								  cstring_to_text(psprintf("%s %s", text_to_cstring(event_id),
														   key->text)));
	values[0] = PointerGetDatum(consumer);
	values[1] = ObjectIdGetDatum(t->relid);
	values[2] = PointerGetDatum(event_id);
	values[3] = CStringGetTextDatum(key->text);
	return run_as_owner(ext, ext->delta_inbox, values, false, false) == 1;
}

/*
 * The tombstone of the key: true and its version and stored key if there is
 * one.  With latest, seen with a fresh snapshot (see apply_run_plan()).
 */
bool
apply_tombstone_find(const ApplyExtPlans *ext, ApplyTarget *t, ApplyKey *key,
					 bool latest, int64 *version, Jsonb **stored)
{
	Datum		values[2];
	uint64		n;
	int64	   *versions;
	Jsonb	  **keys;
	bool		found = false;

	values[0] = ObjectIdGetDatum(t->relid);
	values[1] = ext->version2 ? Int32GetDatum((int32) key->hash) :
		JsonbPGetDatum(key->canonical);
	n = run_as_owner(ext, ext->tomb_find, values, true, latest);

	/* the candidates, out of SPI's result before anything else runs */
	versions = palloc(sizeof(int64) * Max(n, 1));
	keys = palloc(sizeof(Jsonb *) * Max(n, 1));
	for (uint64 i = 0; i < n; i++)
	{
		bool		isnull;

		versions[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												  SPI_tuptable->tupdesc, 1, &isnull));
		keys[i] = DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[i],
												   SPI_tuptable->tupdesc, 2, &isnull));
	}
	for (uint64 i = 0; i < n; i++)
	{
		/* 0.1.0 found the key itself; 0.2.0 its hash, which may collide */
		if (ext->version2 && !apply_key_matches(t, key, keys[i]))
			continue;
		if (!found || versions[i] > *version)
		{
			*version = versions[i];
			*stored = keys[i];
		}
		found = true;
	}
	return found;
}

/*
 * Records a tombstone of the key with version, or raises the key's
 * tombstone to it; true if it changed.  The caller holds the key's lock.
 */
bool
apply_tombstone_write(const ApplyExtPlans *ext, ApplyTarget *t, ApplyKey *key,
					  int64 version)
{
	Datum		values[4];
	int64		old;
	Jsonb	   *stored;

	values[0] = ObjectIdGetDatum(t->relid);
	values[2] = Int64GetDatum(version);
	if (ext->version2 && apply_tombstone_find(ext, t, key, true, &old, &stored))
	{
		/* the key's tombstone, as another spelling of the key wrote it */
		if (old >= version)
			return false;
		values[1] = JsonbPGetDatum(stored);
		return run_as_owner(ext, ext->tomb_raise, values, false, true) > 0;
	}
	values[1] = JsonbPGetDatum(key->canonical);
	values[3] = Int32GetDatum((int32) key->hash);
	return run_as_owner(ext, ext->tomb_insert, values, false, ext->version2) > 0;
}

/* A schema was renamed or dropped: prepare the plans again. */
void
apply_forget_ext_plans(void)
{
	ext_plans_v1.nsp = InvalidOid;
	ext_plans_v2.nsp = InvalidOid;
}

/*
 * The target's own statements: DELETE ... WHERE <pk> AND (version IS NULL
 * OR version <= $n+1), and SELECT version ... WHERE <pk>.
 */
void
apply_target_plans(ApplyTarget *t)
{
	ApplyColumn *ver = &t->cols[t->version_idx];
	StringInfoData sql;
	Oid			argtypes[INDEX_MAX_KEYS + 1];

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
	t->delete_plan = cqrs_keep_plan(sql.data, t->npk + 1, argtypes);

	resetStringInfo(&sql);
	appendStringInfo(&sql, "SELECT t.%s::pg_catalog.int8 FROM %s AS t WHERE ",
					 ver->qname, t->qualname);
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];

		appendStringInfo(&sql, "%st.%s %s $%d", k > 0 ? " AND " : "",
						 c->qname, c->eqop, k + 1);
	}
	t->exists_plan = cqrs_keep_plan(sql.data, t->npk, argtypes);

	/* the same query for apply_check_hidden_row(), which prepares it itself */
	t->exists_sql = MemoryContextStrdup(t->cxt, sql.data);
	t->pk_types = MemoryContextAlloc(t->cxt, sizeof(Oid) * Max(t->npk, 1));
	memcpy(t->pk_types, argtypes, sizeof(Oid) * t->npk);
}

/* Limits the plans kept for one target */
static void
trim_plans(List **plans)
{
	if (list_length(*plans) < MAX_PLANS_PER_TARGET)
		return;
	apply_retire_plan_list(*plans);
	*plans = NIL;
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
 * What an INSERT ... ON CONFLICT DO UPDATE returns, so that apply_row_is_new()
 * can tell an inserted row from an updated one: a new row has no xmax,
 * while the update left the lock of the conflict check in it.  A
 * partitioned table cannot return xmax; it returns the row's partition and
 * ctid instead, and apply_row_is_new() reads the tuple header.
 */
static const char *
returning_sql(ApplyTarget *t)
{
	return t->partitioned ?
		" RETURNING t.tableoid, t.ctid" :
		" RETURNING t.xmax OPERATOR(pg_catalog.=) '0'::pg_catalog.xid";
}

bool
apply_row_is_new(ApplyTarget *t)
{
	bool		isnull;
	Oid			partoid;
	ItemPointerData tid;
	Relation	rel;
	TupleTableSlot *slot;
	bool		isnew = true;

	if (!t->partitioned)
		return apply_result_bool();

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
 * member order, then the version.
 *
 * plan, for the common case of a newer version of an existing row:
 * UPDATE target AS t SET <non-key cols> = $.., version = $v
 * WHERE <pk> AND (t.version IS NULL OR t.version < $v)
 * It needs no tombstone check: a row that exists is newer than any
 * tombstone of its key (it was inserted after the check below).
 *
 * plan2, when the UPDATE found nothing (no row, or a newer one) and no
 * tombstone stops the version (checked before, see apply.c):
 * INSERT INTO target AS t (<cols>, version) SELECT $1.., $v
 * ON CONFLICT (<pk>) DO UPDATE SET <non-key cols> = excluded.., version
 * WHERE t.version IS NULL OR t.version < excluded.version
 * RETURNING whether the row is new (see returning_sql())
 */
ColumnSetPlan *
apply_upsert_plan(ApplyTarget *t, int ncols, int *colidx)
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

	argtypes = palloc(sizeof(Oid) * (ncols + 1));
	for (int i = 0; i < ncols; i++)
	{
		argtypes[i] = t->cols[colidx[i]].basetype;
		overriding |= t->cols[colidx[i]].identity_always;
	}
	argtypes[ncols] = INT8OID;

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
	plan2 = cqrs_keep_plan(sql.data, ncols + 1, argtypes);

	p = new_plan_entry(t, &t->upsert_plans, ncols, colidx);
	p->plan = plan;
	p->plan2 = plan2;
	return p;
}

/*
 * Two statements per column set.  Parameters: the key columns in primary
 * key order, then (UPDATE only) the deltas.
 *
 * plan: UPDATE target AS t SET <col> = COALESCE(t.<col>, 0) + $d.. WHERE <pk>
 * (a NULL counts from 0).
 *
 * plan2, for a missing row: INSERT INTO target AS t (<pk>, <delta columns
 * without default>) VALUES ($1.., 0..) ON CONFLICT (<pk>) DO NOTHING
 * RETURNING true.  The other columns take their defaults; the deltas are
 * then added by plan, so that a row created from deltas starts from the
 * defaults.  DO NOTHING waits for a concurrent insert of the key and
 * returns no row if it committed.
 */
ColumnSetPlan *
apply_delta_plan(ApplyTarget *t, int ncols, int *colidx)
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

	argtypes = palloc(sizeof(Oid) * n);
	for (int k = 0; k < t->npk; k++)
	{
		argtypes[k] = t->cols[t->pk_idx[k]].basetype;
		overriding |= t->cols[t->pk_idx[k]].identity_always;
	}
	for (int i = 0; i < ncols; i++)
		argtypes[t->npk + i] = t->cols[colidx[i]].basetype;

	initStringInfo(&sql);
	appendStringInfo(&sql, "UPDATE %s AS t SET ", t->qualname);
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		appendStringInfo(&sql, "%s%s = COALESCE(t.%s, 0) OPERATOR(pg_catalog.+) $%d",
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
		if (!t->cols[colidx[i]].has_default)
			appendStringInfo(&sql, ", %s", t->cols[colidx[i]].qname);
	appendStringInfo(&sql, ") %sVALUES (",
					 overriding ? "OVERRIDING SYSTEM VALUE " : "");
	for (int k = 0; k < t->npk; k++)
		appendStringInfo(&sql, "%s$%d", k > 0 ? ", " : "", k + 1);
	for (int i = 0; i < ncols; i++)
		if (!t->cols[colidx[i]].has_default)
			appendStringInfoString(&sql, ", 0");
	appendStringInfoString(&sql, ") ON CONFLICT (");
	append_pk_list(&sql, t);
	appendStringInfoString(&sql, ") DO NOTHING RETURNING true");
	plan2 = cqrs_keep_plan(sql.data, t->npk, argtypes);

	p = new_plan_entry(t, &t->delta_plans, ncols, colidx);
	p->plan = plan;
	p->plan2 = plan2;
	return p;
}
