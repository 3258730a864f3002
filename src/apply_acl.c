/*-------------------------------------------------------------------------
 *
 * apply_acl.c
 *	  The read side: who may write what, and as whom.
 *
 *	  The helpers run as their caller (SECURITY INVOKER), so the statements
 *	  on a target table need the caller's own privileges on it.  The
 *	  extension's tables (the inbox, the delta memory, the tombstones and
 *	  the consumers) grant nothing to readers: the helpers write them as the
 *	  tables' owner, the way PostgreSQL's foreign key triggers check the
 *	  referenced table as its owner, and only after checking what the caller
 *	  acts for:
 *
 *	  - a tombstone is written for a target only by a caller that may
 *	    DELETE from it, and delta memory only by one that may UPDATE the
 *	    columns the deltas add to;
 *	  - a consumer's inbox entries and delta memory are written only by the
 *	    role that owns the consumer name (cqrs_consumer) or a member of it.
 *	    A name nobody owns yet belongs to the first role that uses it;
 *	    superusers use any name and claim none; an operator can give a name
 *	    to a role (cqrs_set_consumer_owner()).
 *
 *	  Owners are cached per backend.  The cache is dropped when cqrs_consumer
 *	  changes (its trigger sends a relcache invalidation to every backend),
 *	  when a role changes, and when a transaction aborts (it may have cached
 *	  its own claim).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/objectaddress.h"
#include "catalog/pg_class.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rls.h"
#include "utils/syscache.h"

#include "apply_acl.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_consumer_changed);

/* Consumer names this long or longer are looked up every time. */
#define CONSUMER_KEYLEN 128

typedef struct ConsumerOwner
{
	char		consumer[CONSUMER_KEYLEN];	/* hash key */
	Oid			owner;
} ConsumerOwner;

static HTAB *owners = NULL;
static Oid	owners_relid = InvalidOid;	/* the cqrs_consumer they came from */
static bool owners_stale = false;
static bool callbacks_registered = false;

void
apply_become_owner(const ApplyExtPlans *ext, ApplyUser *save)
{
	GetUserIdAndSecContext(&save->userid, &save->sec_context);
	SetUserIdAndSecContext(ext->owner,
						   save->sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
}

void
apply_restore_user(ApplyUser *save)
{
	SetUserIdAndSecContext(save->userid, save->sec_context);
}

void
apply_check_target_privilege(ApplyTarget *t, AclMode mode, int ncols,
							 const int *colidx)
{
	Oid			userid = GetUserId();
	AclResult	result = pg_class_aclcheck(t->relid, userid, mode);

	/*
	 * UPDATE and INSERT may also be granted column by column: on each of the
	 * columns given, or on any column when none is.
	 */
	if (result != ACLCHECK_OK && (mode == ACL_UPDATE || mode == ACL_INSERT))
	{
		if (ncols == 0)
			result = pg_attribute_aclcheck_all(t->relid, userid, mode, ACLMASK_ANY);
		else
		{
			result = ACLCHECK_OK;
			for (int i = 0; i < ncols && result == ACLCHECK_OK; i++)
				result = pg_attribute_aclcheck(t->relid, t->cols[colidx[i]].attnum,
											   userid, mode);
		}
	}
	if (result != ACLCHECK_OK)
		aclcheck_error(result,
					   get_relkind_objtype(t->partitioned ? RELKIND_PARTITIONED_TABLE
										   : RELKIND_RELATION),
					   t->relname);
}

/*
 * cqrs_delete() found no row of the key the caller may see (for_delete), or
 * cqrs_apply_delta() could neither update nor insert it.  Where row-level
 * security applies to the caller, a row it hides may be there all the same:
 * a tombstone for it would keep its key from being written again, by anyone,
 * and deltas would be tried again for ever.  So the row is looked for as the
 * table's owner (as PostgreSQL's foreign key checks look, ignoring FORCE ROW
 * LEVEL SECURITY), and its presence refused like an update of a hidden row
 * (42501).  values: the key, as exists_plan and hidden_plan take it.
 */
void
apply_check_hidden_row(ApplyTarget *t, Datum *values, bool for_delete)
{
	HeapTuple	tup;
	Oid			owner;
	Oid			save_user;
	int			save_sec;
	uint64		found;

	if (check_enable_rls(t->relid, InvalidOid, true) != RLS_ENABLED)
		return;
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(t->relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", t->relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);

	GetUserIdAndSecContext(&save_user, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_NOFORCE_RLS);

	/*
	 * A plan of its own, prepared in this context: the policies are applied
	 * when a query is prepared, and the plan cache applies them again for
	 * another role, not when only the lift of forced row security changes.
	 * Shared with the caller's (the owner, under FORCE ROW LEVEL SECURITY),
	 * one plan would see the rows the other's context shows.
	 */
	if (t->hidden_plan == NULL)
		t->hidden_plan = cqrs_keep_plan(t->exists_sql, t->npk, t->pk_types);
	found = apply_run_plan(t->hidden_plan, values, NULL, true, true);
	SetUserIdAndSecContext(save_user, save_sec);
	if (found == 0)
		return;
	if (for_delete)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("row-level security of table \"%s\" hides the row to delete from role \"%s\"",
						t->relname, GetUserNameFromId(save_user, false)),
				 errdetail("A tombstone for it would keep its key from being written again.")));
	else
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("row-level security of table \"%s\" hides the row to add deltas to from role \"%s\"",
						t->relname, GetUserNameFromId(save_user, false)),
				 errdetail("The row exists, and its policies let this role neither update it nor see it.")));
}

/* ------------------------------------------------------------------------
 * Consumers
 * ------------------------------------------------------------------------
 */

static void
owners_relcache_callback(Datum arg, Oid relid)
{
	if (!OidIsValid(relid) || relid == owners_relid)
		owners_stale = true;
}

static void
owners_role_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	owners_stale = true;
}

static void
owners_xact_callback(XactEvent event, void *arg)
{
	/* a prepared transaction's claim may yet be rolled back */
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		owners_stale = true;
}

/* a claim rolled back to a savepoint is no claim either */
static void
owners_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		owners_stale = true;
}

static void
prepare_cache(Oid relid)
{
	HASHCTL		ctl;

	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(owners_relcache_callback, (Datum) 0);
		CacheRegisterSyscacheCallback(AUTHOID, owners_role_callback, (Datum) 0);
		RegisterXactCallback(owners_xact_callback, NULL);
		RegisterSubXactCallback(owners_subxact_callback, NULL);
		callbacks_registered = true;
	}
	if (owners != NULL && !owners_stale && owners_relid == relid)
		return;
	if (owners != NULL)
		hash_destroy(owners);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = CONSUMER_KEYLEN;
	ctl.entrysize = sizeof(ConsumerOwner);
	owners = hash_create("cqrs_sync consumer owners", 64, &ctl,
						 HASH_ELEM | HASH_STRINGS);
	owners_relid = relid;
	owners_stale = false;
}

/* The owner's name recorded for a consumer, or NULL; as the tables' owner */
static char *
lookup_owner(const ApplyExtPlans *ext, text *consumer)
{
	Datum		values[1];
	bool		isnull;
	Datum		d;

	values[0] = PointerGetDatum(consumer);
	if (apply_run_plan(ext->consumer_get, values, NULL, true, true) == 0)
		return NULL;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? NULL : TextDatumGetCString(d);
}

void
apply_check_consumer(const ApplyExtPlans *ext, text *consumer)
{
	Oid			userid = GetUserId();
	char	   *name = text_to_cstring(consumer);
	bool		cacheable = strlen(name) < CONSUMER_KEYLEN;
	ConsumerOwner *entry = NULL;
	Oid			owner = InvalidOid;
	char	   *owner_name = NULL;

	/* superusers use any consumer, and claim none */
	if (superuser_arg(userid))
		return;

	prepare_cache(ext->consumer_relid);
	if (cacheable)
		entry = hash_search(owners, name, HASH_FIND, NULL);
	if (entry != NULL)
		owner = entry->owner;
	else
	{
		ApplyUser	save;

		apply_become_owner(ext, &save);
		owner_name = lookup_owner(ext, consumer);
		if (owner_name == NULL)
		{
			/* nobody owns it yet: it is the caller's */
			Datum		values[2];

			values[0] = PointerGetDatum(consumer);
			values[1] = CStringGetTextDatum(GetUserNameFromId(userid, false));
			apply_run_plan(ext->consumer_claim, values, NULL, false, false);
			owner_name = lookup_owner(ext, consumer);
		}
		apply_restore_user(&save);
		owner = owner_name ? get_role_oid(owner_name, true) : InvalidOid;
		if (OidIsValid(owner) && cacheable)
		{
			entry = hash_search(owners, name, HASH_ENTER, NULL);
			entry->owner = owner;
		}
	}

	if (OidIsValid(owner) && has_privs_of_role(userid, owner))
		return;

	if (owner_name == NULL)
		owner_name = GetUserNameFromId(owner, true);
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("consumer \"%s\" belongs to role \"%s\"",
					name, owner_name ? owner_name : "(dropped)"),
			 errdetail("Only that role and its members may record events under the consumer; role \"%s\" is not a member.",
					   GetUserNameFromId(userid, false)),
			 errhint("Use a consumer name of your own, or have an operator give the consumer to your role with cqrs_set_consumer_owner().")));
}

/*
 * cqrs_consumer_changed() RETURNS trigger
 *
 * AFTER UPDATE OR DELETE OR TRUNCATE ON cqrs_consumer, FOR EACH STATEMENT:
 * every backend drops the owners it cached, at the next command after the
 * change commits (this one's at once).
 */
Datum
cqrs_consumer_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("cqrs_consumer_changed() must be called as a trigger")));
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}
