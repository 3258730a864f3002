/*-------------------------------------------------------------------------
 *
 * apply_fast.c
 *	  The read side: cqrs_upsert()'s update of an existing row without a
 *	  statement.
 *
 *	  The common case of cqrs_upsert() is a newer version of a row that
 *	  exists.  Its UPDATE statement spends most of its time starting and
 *	  ending the executor.  Where that statement could do nothing but find
 *	  the row by its primary key, compare versions and write the row, this
 *	  file does just that, the way logical replication's apply worker
 *	  writes a row: the primary key's index finds the row, the row is
 *	  locked in its latest version, and ExecSimpleRelationUpdate() checks
 *	  the constraints and the replica identity, writes the row and its
 *	  index entries.
 *
 *	  The statement runs instead (apply_fast_update() returns -1) whenever
 *	  it could do more or differently: a target with triggers (which
 *	  include foreign keys and deferred unique constraints), rules, row
 *	  security, inheritance children, partitions or stored generated
 *	  columns; a column whose value needs a coercion (a domain or a type
 *	  modifier) or that is GENERATED ALWAYS AS IDENTITY; a caller without
 *	  UPDATE and SELECT on the whole table (column privileges); an executor
 *	  permission hook (sepgsql, pgaudit); a transaction that is read only
 *	  or uses REPEATABLE READ or SERIALIZABLE.  So the errors, privileges
 *	  and audit records are the statement's, and only its cost is saved.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relscan.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/sysattr.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/bitmapset.h"
#include "utils/acl.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"

#include "apply_fast.h"

/* Whether the statement is needed for reasons outside the table. */
static bool
needs_statement(ApplyTarget *t, int ncols, const int *colidx)
{
	ApplyColumn *ver = &t->cols[t->version_idx];

	if (XactReadOnly || IsolationUsesXactSnapshot() ||
		ExecutorCheckPerms_hook != NULL || t->partitioned)
		return true;
	if (!ver->plain ||
		(ver->basetype != INT2OID && ver->basetype != INT4OID && ver->basetype != INT8OID))
		return true;
	for (int i = 0; i < ncols; i++)
	{
		ApplyColumn *c = &t->cols[colidx[i]];

		if (!c->plain || c->identity_always)
			return true;
	}
	for (int k = 0; k < t->npk; k++)
		if (!OidIsValid(t->cols[t->pk_idx[k]].keyeq.fn_oid))
			return true;
	return pg_class_aclmask(t->relid, GetUserId(), ACL_UPDATE | ACL_SELECT,
							ACLMASK_ALL) != (ACL_UPDATE | ACL_SELECT);
}

/* Whether the table itself needs the statement. */
static bool
table_needs_statement(Relation rel)
{
	return rel->rd_rel->relkind != RELKIND_RELATION ||
		rel->rd_rel->relispartition ||
		rel->rd_rel->relhassubclass ||
		rel->rd_rel->relrowsecurity ||
		rel->trigdesc != NULL ||
		rel->rd_rules != NULL ||
		(rel->rd_att->constr != NULL && rel->rd_att->constr->has_generated_stored);
}

static int64
version_of(ApplyColumn *ver, Datum d)
{
	switch (ver->basetype)
	{
		case INT2OID:
			return DatumGetInt16(d);
		case INT4OID:
			return DatumGetInt32(d);
		default:
			return DatumGetInt64(d);
	}
}

static Datum
version_datum(ApplyColumn *ver, int64 version)
{
	/* in range: apply_check_version_range() */
	switch (ver->basetype)
	{
		case INT2OID:
			return Int16GetDatum((int16) version);
		case INT4OID:
			return Int32GetDatum((int32) version);
		default:
			return Int64GetDatum(version);
	}
}

/*
 * Find the row of the key through the primary key index idx, visible to a
 * new snapshot.  If its version is NULL or older than "version", lock it
 * and return true with the row in slot; as the statement's scan would,
 * leave a newer row alone and unlocked (false).  A row changed or deleted
 * between the snapshot and the lock is looked for again: its key or its
 * version may have changed.
 */
static bool
find_older_and_lock(Relation rel, Relation idx, ScanKey skey, int nkeys,
					ApplyColumn *ver, int64 version, CommandId cid,
					TupleTableSlot *slot)
{
	for (;;)
	{
		Snapshot	snap = GetLatestSnapshot();
		IndexScanDesc scan;
		bool		found;
		bool		isnull;
		Datum		stored;
		TM_FailureData tmfd;
		TM_Result	res;

		scan = index_beginscan(rel, idx, snap, nkeys, 0);
		index_rescan(scan, skey, nkeys, NULL, 0);
		found = index_getnext_slot(scan, ForwardScanDirection, slot);
		index_endscan(scan);
		if (!found)
			return false;
		stored = slot_getattr(slot, ver->attnum, &isnull);
		if (!isnull && version_of(ver, stored) >= version)
			return false;

		res = table_tuple_lock(rel, &slot->tts_tid, snap, slot, cid,
							   LockTupleNoKeyExclusive, LockWaitBlock,
							   TUPLE_LOCK_FLAG_FIND_LAST_VERSION, &tmfd);
		if (res == TM_Ok && !tmfd.traversed)
			return true;
		if (res != TM_Ok && res != TM_Deleted)
			elog(ERROR, "cqrs_sync: unexpected result %d locking a row of \"%s\"",
				 (int) res, RelationGetRelationName(rel));
		/* changed or deleted by a transaction that committed: look again */
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * Update the row of the key keyvals[] (in primary key order) to values[]
 * (the row's columns, in the order colidx[] gives into t->cols; nulls[]
 * 'n' for a null) and "version", if it exists with no or an older version.
 * Returns 1 if it was updated, 0 if not (no row, or a newer one), and -1
 * if the caller must run the UPDATE statement instead (see the top of the
 * file).  Inside apply_enter() (SPI connected), the target locked.
 */
int
apply_fast_update(ApplyTarget *t, int ncols, const int *colidx,
				  const Datum *values, const char *nulls,
				  const Datum *keyvals, int64 version)
{
	ApplyColumn *ver = &t->cols[t->version_idx];
	Relation	rel;
	Relation	idx = NULL;
	Oid			pkoid;
	EState	   *estate;
	RangeTblEntry *rte;
	ResultRelInfo *rri;
	EPQState	epqstate;
	ScanKeyData skey[INDEX_MAX_KEYS];
	TupleTableSlot *oldslot;
	Bitmapset  *updated = NULL;
	int			result = 0;

	if (needs_statement(t, ncols, colidx))
		return -1;
	rel = table_open(t->relid, RowExclusiveLock);
	pkoid = RelationGetPrimaryKeyIndex(rel);
	if (table_needs_statement(rel) || !OidIsValid(pkoid))
	{
		table_close(rel, NoLock);
		return -1;
	}

	/* as a statement would, see what the transaction did so far */
	CommandCounterIncrement();

	estate = CreateExecutorState();
	rte = makeNode(RangeTblEntry);
	rte->rtekind = RTE_RELATION;
	rte->relid = t->relid;
	rte->relkind = RELKIND_RELATION;
	rte->rellockmode = RowExclusiveLock;
	for (int i = 0; i < ncols; i++)
		if (t->cols[colidx[i]].pkpos < 0)
			updated = bms_add_member(updated, t->cols[colidx[i]].attnum -
									 FirstLowInvalidHeapAttributeNumber);
	updated = bms_add_member(updated, ver->attnum - FirstLowInvalidHeapAttributeNumber);
	rte->updatedCols = updated;
	ExecInitRangeTable(estate, list_make1(rte));
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	ExecOpenIndices(rri, false);
	estate->es_output_cid = GetCurrentCommandId(true);
	PushActiveSnapshot(GetTransactionSnapshot());
	estate->es_snapshot = GetActiveSnapshot();

	for (int i = 0; i < rri->ri_NumIndices; i++)
		if (RelationGetRelid(rri->ri_IndexRelationDescs[i]) == pkoid)
			idx = rri->ri_IndexRelationDescs[i];
	if (idx == NULL || idx->rd_index->indnkeyatts != t->npk)
		elog(ERROR, "cqrs_sync: primary key index of \"%s\" not open", t->relname);

	/* the key, with the index's own equality (apply_describe_key_column) */
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];

		ScanKeyEntryInitializeWithInfo(&skey[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
									   c->keycoll, &c->keyeq, keyvals[k]);
	}

	oldslot = table_slot_create(rel, &estate->es_tupleTable);
	if (find_older_and_lock(rel, idx, skey, t->npk, ver, version,
							estate->es_output_cid, oldslot))
	{
		int			natts = RelationGetDescr(rel)->natts;
		TupleTableSlot *newslot = table_slot_create(rel, &estate->es_tupleTable);

		/* the row as the statement's SET makes it (the key is not set) */
		slot_getallattrs(oldslot);
		ExecClearTuple(newslot);
		memcpy(newslot->tts_values, oldslot->tts_values, sizeof(Datum) * natts);
		memcpy(newslot->tts_isnull, oldslot->tts_isnull, sizeof(bool) * natts);
		for (int i = 0; i < ncols; i++)
		{
			ApplyColumn *c = &t->cols[colidx[i]];

			if (c->pkpos >= 0)
				continue;
			newslot->tts_values[c->attnum - 1] = values[i];
			newslot->tts_isnull[c->attnum - 1] = (nulls[i] == 'n');
		}
		newslot->tts_values[ver->attnum - 1] = version_datum(ver, version);
		newslot->tts_isnull[ver->attnum - 1] = false;
		ExecStoreVirtualTuple(newslot);

		EvalPlanQualInit(&epqstate, estate, NULL, NIL, -1);
		ExecSimpleRelationUpdate(rri, estate, &epqstate, oldslot, newslot);
		EvalPlanQualEnd(&epqstate);
		result = 1;
	}

	PopActiveSnapshot();
	ExecResetTupleTable(estate->es_tupleTable, false);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
	return result;
}
