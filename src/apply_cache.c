/*-------------------------------------------------------------------------
 *
 * apply_cache.c
 *	  The read side: the cache of target descriptions and its invalidation.
 *
 *	  A target (a read-model table) is described once per backend: its
 *	  columns, primary key and version column, and the plans made for it.
 *	  The entry lives in a hash table keyed by the table's OID.  A relcache
 *	  invalidation of the table (ALTER TABLE, DROP TABLE) or a change of a
 *	  schema marks entries invalid; they are freed, and described afresh on
 *	  their next use, when no helper is running.
 *
 *	  Calls of the helpers in progress in this backend (a trigger on a
 *	  target can call them again) are counted.  Plans and memory of a
 *	  rebuilt target are freed at once by the outermost call, which uses
 *	  none of them yet; a nested call leaves them in a graveyard, freed when
 *	  no call is in progress.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relation.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "apply.h"
#include "apply_cache.h"
#include "apply_json.h"
#include "apply_plans.h"

static HTAB *apply_targets = NULL;
static bool targets_invalidated = false;	/* some entry became invalid */
static bool callbacks_registered = false;

static int	apply_depth = 0;

/*
 * The subtransaction each running helper entered in, innermost last: an
 * error caught by a savepoint (a PL/pgSQL EXCEPTION block, the sink's
 * savepoint per event) ends the helpers entered in it without their
 * apply_leave(), and apply_subxact_callback() takes them off.
 */
static SubTransactionId *depth_subids = NULL;
static int	depth_cap = 0;
static List *graveyard_plans = NIL;
static List *graveyard_cxts = NIL;

void
apply_retire_plan(SPIPlanPtr plan)
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

/* Retire the plans of a list of ColumnSetPlan (the entries stay). */
static void
retire_column_set_plans(List *plans)
{
	ListCell   *lc;

	foreach(lc, plans)
	{
		apply_retire_plan(((ColumnSetPlan *) lfirst(lc))->plan);
		apply_retire_plan(((ColumnSetPlan *) lfirst(lc))->plan2);
	}
}

/*
 * Retire the plans of a list of ColumnSetPlan, and free the list and its
 * entries, unless a call further out may still hold one of them (a trigger
 * on a target that calls a helper): then the entries stay in the target's
 * memory until it is described again.
 */
void
apply_retire_plan_list(List *plans)
{
	ListCell   *lc;

	retire_column_set_plans(plans);
	if (apply_depth > 1)
		return;
	foreach(lc, plans)
	{
		ColumnSetPlan *p = lfirst(lc);

		pfree(p->colidx);
		pfree(p);
	}
	list_free(plans);
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
	apply_retire_plan(t->delete_plan);
	apply_retire_plan(t->exists_plan);
	apply_retire_plan(t->hidden_plan);
	/* the entries go with t->cxt */
	retire_column_set_plans(t->upsert_plans);
	retire_column_set_plans(t->delta_plans);
	t->delete_plan = NULL;
	t->exists_plan = NULL;
	t->hidden_plan = NULL;
	t->exists_sql = NULL;		/* in t->cxt */
	t->pk_types = NULL;
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
	apply_forget_ext_plans();
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
apply_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					   SubTransactionId parentSubid, void *arg)
{
	if (event != SUBXACT_EVENT_ABORT_SUB)
		return;
	while (apply_depth > 0 && depth_subids[apply_depth - 1] >= mySubid)
		apply_depth--;
}

static void
register_callbacks(void)
{
	HASHCTL		ctl;

	if (callbacks_registered)
		return;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(ApplyTarget);
	apply_targets = hash_create("cqrs_sync apply targets", 32, &ctl,
								HASH_ELEM | HASH_BLOBS);
	CacheRegisterRelcacheCallback(apply_relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, apply_namespace_callback,
								  (Datum) 0);
	RegisterXactCallback(apply_xact_callback, NULL);
	RegisterSubXactCallback(apply_subxact_callback, NULL);
	callbacks_registered = true;
}

/* Entering and leaving a helper; the caller is SPI-connected in between. */
void
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
	if (apply_depth == depth_cap)
	{
		depth_cap = Max(16, depth_cap * 2);
		depth_subids = depth_subids == NULL ?
			MemoryContextAlloc(TopMemoryContext, sizeof(SubTransactionId) * depth_cap) :
			repalloc(depth_subids, sizeof(SubTransactionId) * depth_cap);
	}
	depth_subids[apply_depth++] = GetCurrentSubTransactionId();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

void
apply_leave(void)
{
	SPI_finish();
	if (apply_depth > 0)
		apply_depth--;
}

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
	t->extnsp = extnsp;
	t->key_fixed_format = false;
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
		c->json_elems = c->is_array &&
			(get_element_type(c->basetype) == JSONOID ||
			 get_element_type(c->basetype) == JSONBOID);
		c->addable = is_addable_type(c->basetype);
		c->generated = att->attgenerated != '\0';
		c->identity_always = att->attidentity == ATTRIBUTE_IDENTITY_ALWAYS;
		c->plain = (c->basetype == att->atttypid && att->atttypmod < 0);
		c->has_default = att->atthasdef || att->attidentity != '\0' ||
			c->generated;
		c->needs_value = att->attnotnull && !c->has_default;
		c->pkpos = -1;
		getTypeInputInfo(c->basetype, &func, &c->ioparam);
		fmgr_info_cxt(func, &c->input, t->cxt);
		apply_describe_typmod(c, typmod, t->cxt);
	}
	qsort(t->cols, t->ncols, sizeof(ApplyColumn), apply_column_cmp);

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

		if (attnum <= 0 || byattnum[attnum] < 0)
			elog(ERROR, "unexpected primary key column %d of relation \"%s\"",
				 attnum, t->relname);
		t->pk_idx[k] = byattnum[attnum];
		c = &t->cols[t->pk_idx[k]];
		c->pkpos = k;
		apply_describe_key_column(c, idx, k, t->cxt);
		t->key_fixed_format |= c->fixed_format;
		tce = lookup_type_cache(c->basetype, TYPECACHE_EQ_OPR);
		if (!OidIsValid(tce->eq_opr))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_FUNCTION),
					 errmsg("could not identify an equality operator for type %s",
							c->typname)));
		c->eqop = apply_operator_sql(tce->eq_opr);
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

	MemoryContextSwitchTo(old);
	apply_target_plans(t);

	t->valid = true;
}

/*
 * The target's cached description and plans.  Locks the table first with
 * the lock the statements take anyway; that processes invalidations, so a
 * changed table is described afresh, and no DDL can change it until the
 * transaction ends.
 */
ApplyTarget *
apply_get_target(Oid relid, Oid extnsp)
{
	ApplyTarget *t;
	bool		found;
	const char *vername = cqrs_version_column ? cqrs_version_column : "version";

	/*
	 * A role with no privilege at all on the table may not queue a lock on
	 * it (and hold up its DDL) nor have it described, as LOCK TABLE and name
	 * lookups refuse first.  Which privileges each statement needs is
	 * checked later, as the statement would.
	 */
	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	if (pg_class_aclmask(relid, GetUserId(), ACL_SELECT | ACL_INSERT | ACL_UPDATE | ACL_DELETE,
						 ACLMASK_ANY) == 0 &&
		pg_attribute_aclcheck_all(relid, GetUserId(), ACL_SELECT | ACL_INSERT | ACL_UPDATE,
								  ACLMASK_ANY) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table %s", get_rel_name(relid))));

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
