/*-------------------------------------------------------------------------
 *
 * apply_plans.c
 *	  The read side: the SQL the helpers run, and its prepared plans.
 *
 *	  SQL is built once per (target, column set) with quoted identifiers and
 *	  schema-qualified operators, prepared with SPI and kept with the
 *	  target's cache entry; values are always parameters.  The statements
 *	  on the extension's own tables (the inbox and the tombstones) are
 *	  prepared once per schema.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
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

#include "apply_plans.h"
#include "util.h"

/* More plans than this for one target: the column sets are not stable. */
#define MAX_PLANS_PER_TARGET	64

/* Plans on the extension's own tables, and the schema they were made for */
static ApplyExtPlans ext_plans = {InvalidOid, NULL, NULL, NULL};

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

/* The plans on cqrs_inbox and cqrs_tombstone, for the extension's schema */
const ApplyExtPlans *
apply_ensure_ext_plans(Oid nsp)
{
	const char *schema;
	char	   *sql;
	Oid			inbox_types[2] = {TEXTOID, TEXTOID};
	Oid			tomb_types[3] = {REGCLASSOID, JSONBOID, INT8OID};

	if (ext_plans.nsp == nsp && ext_plans.inbox && ext_plans.tomb_write &&
		ext_plans.tomb_check)
		return &ext_plans;

	apply_retire_plan(ext_plans.inbox);
	apply_retire_plan(ext_plans.tomb_write);
	apply_retire_plan(ext_plans.tomb_check);
	ext_plans.inbox = ext_plans.tomb_write = ext_plans.tomb_check = NULL;
	ext_plans.nsp = InvalidOid;

	schema = quote_identifier(get_namespace_name(nsp));

	sql = psprintf("INSERT INTO %s.cqrs_inbox (consumer, event_id) VALUES ($1, $2) "
				   "ON CONFLICT DO NOTHING", schema);
	ext_plans.inbox = cqrs_keep_plan(sql, 2, inbox_types);

	sql = psprintf("INSERT INTO %s.cqrs_tombstone AS tb (target, key, version) "
				   "VALUES ($1, $2, $3) "
				   "ON CONFLICT (target, key) DO UPDATE "
				   "SET version = excluded.version, deleted_at = pg_catalog.now() "
				   "WHERE tb.version OPERATOR(pg_catalog.<) excluded.version",
				   schema);
	ext_plans.tomb_write = cqrs_keep_plan(sql, 3, tomb_types);

	sql = psprintf("SELECT tb.version FROM %s.cqrs_tombstone tb "
				   "WHERE tb.target OPERATOR(pg_catalog.=) $1 "
				   "AND tb.key OPERATOR(pg_catalog.=) $2", schema);
	ext_plans.tomb_check = cqrs_keep_plan(sql, 2, tomb_types);

	ext_plans.nsp = nsp;
	return &ext_plans;
}

/* A schema was renamed or dropped: prepare the plans again. */
void
apply_forget_ext_plans(void)
{
	ext_plans.nsp = InvalidOid;
}

/*
 * The target's own statements: DELETE ... WHERE <pk> AND (version IS NULL
 * OR version <= $n+1), and SELECT true ... WHERE <pk>.
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
	appendStringInfo(&sql, "SELECT true FROM %s AS t WHERE ", t->qualname);
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];

		appendStringInfo(&sql, "%st.%s %s $%d", k > 0 ? " AND " : "",
						 c->qname, c->eqop, k + 1);
	}
	t->exists_plan = cqrs_keep_plan(sql.data, t->npk, argtypes);
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
		apply_retire_plan(((ColumnSetPlan *) lfirst(lc))->plan);
		apply_retire_plan(((ColumnSetPlan *) lfirst(lc))->plan2);
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
