/*-------------------------------------------------------------------------
 *
 * sink_route.c
 *	  The declarative route of a sink: the payload is the row, a named field
 *	  holds its version, a field that is true (or a set of field values
 *	  that all match) says delete.
 *
 *	  An event becomes one call of cqrs_upsert(target, row, version) or
 *	  cqrs_delete(target, key, version), made directly through fmgr as the
 *	  sink's role: no statement is planned, started and ended per event.
 *	  What a query would check is checked here: the role's EXECUTE right on
 *	  the helper (a permission error, for which the sink waits) and the
 *	  object access hook.  The row is the payload's members that name
 *	  columns of the target (not generated ones), the key its primary key
 *	  members (JSON null where missing), and the version the field's text
 *	  read as a bigint, as ($1->>'field')::bigint would: a missing field or
 *	  a JSON null gives NULL, which the helper refuses.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/objectaccess.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

#include "apply_json.h"
#include "sink.h"
#include "util.h"

struct SinkRoute
{
	MemoryContext cxt;
	Oid			relid;
	FmgrInfo	upsert;			/* cqrs_upsert(regclass, jsonb, bigint) */
	FmgrInfo	delete;			/* cqrs_delete(regclass, jsonb, bigint) */
	int			ncols;
	char	  **cols;			/* the target's columns, not generated */
	int			npk;
	char	  **pk;				/* its primary key */
	char	   *version;		/* the field holding the version */
	char	   *delete_field;	/* a field whose value true means delete */
	Jsonb	   *delete_match;	/* or values that must all match */
	bool		stale;			/* the target changed since (columns, key) */
	dlist_node	node;			/* in routes */
	MemoryContextCallback forget;	/* leaves routes when cxt goes */
};

/*
 * The routes prepared, for the relcache callback: a change of a target
 * (ALTER TABLE) makes its route stale, and the sink resolves it again.
 */
static dlist_head routes = DLIST_STATIC_INIT(routes);
static bool callback_registered = false;

static void prepare(SinkRoute *r, const char *sink_name, const char *version,
					const char *delete_spec);

/* The route's memory goes (sink_route_free(), or its sink's memory) */
static void
route_forget(void *arg)
{
	SinkRoute  *r = (SinkRoute *) arg;

	dlist_delete(&r->node);
}

static void
route_relcache_callback(Datum arg, Oid relid)
{
	dlist_iter	iter;

	dlist_foreach(iter, &routes)
	{
		SinkRoute  *r = dlist_container(SinkRoute, node, iter.cur);

		if (!OidIsValid(relid) || relid == r->relid)
			r->stale = true;
	}
}

/* The OID of the extension's helper name(regclass, jsonb, bigint). */
static Oid
helper_oid(Oid nsp, const char *name)
{
	Oid			argtypes[3] = {REGCLASSOID, JSONBOID, INT8OID};
	Oid			oid;

	oid = GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid, CStringGetDatum(name),
						  PointerGetDatum(buildoidvector(argtypes, 3)),
						  ObjectIdGetDatum(nsp));
	if (!OidIsValid(oid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function %s.%s(regclass, jsonb, bigint) does not exist",
						get_namespace_name(nsp), name)));
	return oid;
}

/* One text column of the result of a catalog query, copied into cxt. */
static char **
query_names(const char *sql, int *n, MemoryContext cxt)
{
	char	  **names;

	if (SPI_execute(sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "cqrs_sync sink: could not run \"%s\"", sql);
	*n = (int) SPI_processed;
	names = MemoryContextAlloc(cxt, sizeof(char *) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
		names[i] = MemoryContextStrdup(cxt, SPI_getvalue(SPI_tuptable->vals[i],
														 SPI_tuptable->tupdesc, 1));
	return names;
}

/*
 * Prepares the route of a sink to target relid.  delete_spec is the route's
 * "delete" option as JSON text (a field name, or an object of field
 * values), or NULL.  Inside a transaction, SPI connected.
 */
SinkRoute *
sink_route_prepare(const char *sink_name, Oid relid, const char *version,
				   const char *delete_spec, MemoryContext parent)
{
	MemoryContext cxt = AllocSetContextCreate(parent, "cqrs_sync sink route",
											  ALLOCSET_SMALL_SIZES);
	SinkRoute  *r = MemoryContextAllocZero(cxt, sizeof(SinkRoute));

	r->cxt = cxt;
	r->relid = relid;
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(route_relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	PG_TRY();
	{
		prepare(r, sink_name, version, delete_spec);
	}
	PG_CATCH();
	{
		MemoryContextDelete(cxt);
		PG_RE_THROW();
	}
	PG_END_TRY();
	dlist_push_tail(&routes, &r->node);
	r->forget.func = route_forget;
	r->forget.arg = r;
	MemoryContextRegisterResetCallback(cxt, &r->forget);
	return r;
}

static void
prepare(SinkRoute *r, const char *sink_name, const char *version, const char *delete_spec)
{
	MemoryContext cxt = r->cxt;
	Oid			relid = r->relid;
	Oid			nsp = cqrs_extension_namespace(get_extension_oid("cqrs_sync", false));

	r->cols = query_names(psprintf("SELECT a.attname FROM pg_catalog.pg_attribute a"
								   " WHERE a.attrelid = %u AND a.attnum > 0"
								   " AND NOT a.attisdropped AND a.attgenerated = ''"
								   " ORDER BY a.attnum", relid), &r->ncols, cxt);
	if (r->ncols == 0)
		elog(ERROR, "cqrs_sync sink: could not read the columns of relation %u", relid);
	r->pk = query_names(psprintf("SELECT a.attname FROM pg_catalog.pg_index i"
								 " JOIN pg_catalog.pg_attribute a"
								 " ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
								 " WHERE i.indrelid = %u AND i.indisprimary ORDER BY a.attnum",
								 relid), &r->npk, cxt);
	if (r->npk == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("route target %s of sink \"%s\" has no primary key",
						get_rel_name(relid), sink_name)));
	fmgr_info_cxt(helper_oid(nsp, "cqrs_upsert"), &r->upsert, cxt);
	fmgr_info_cxt(helper_oid(nsp, "cqrs_delete"), &r->delete, cxt);
	r->version = MemoryContextStrdup(cxt, version);

	if (delete_spec)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);
		Jsonb	   *spec = DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
															  CStringGetDatum(delete_spec)));
		JsonbValue	v;

		if (JB_ROOT_IS_SCALAR(spec) && JsonbExtractScalar(&spec->root, &v) &&
			v.type == jbvString)
			r->delete_field = pnstrdup(v.val.string.val, v.val.string.len);
		else
			r->delete_match = spec;
		MemoryContextSwitchTo(old);
	}
}

void
sink_route_free(SinkRoute *route)
{
	if (route)
		MemoryContextDelete(route->cxt);
}

/*
 * Whether the route still fits its target and the helpers it calls still
 * exist (see sink_check): a target dropped and created again, or altered
 * (its columns, its key), is resolved anew.  The target is locked first,
 * as the helpers will lock it, so that a change committed before the lock
 * is seen (its invalidation) before the batch's events are applied.
 */
bool
sink_route_valid(SinkRoute *route)
{
	LockRelationOid(route->relid, RowExclusiveLock);
	return !route->stale &&
		SearchSysCacheExists1(RELOID, ObjectIdGetDatum(route->relid)) &&
		SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(route->upsert.fn_oid)) &&
		SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(route->delete.fn_oid));
}

/* The member name of object, or NULL. */
static JsonbValue *
member(Jsonb *object, const char *name, JsonbValue *buf)
{
	return getKeyJsonValueFromContainer(&object->root, name, strlen(name), buf);
}

/* The version, as ($1->>'field')::bigint reads it; false if NULL. */
static bool
route_version(SinkRoute *r, Jsonb *payload, int64 *version)
{
	JsonbValue	buf;
	JsonbValue *v = member(payload, r->version, &buf);
	char	   *text;

	if (v == NULL || v->type == jbvNull)
		return false;
	text = apply_json_scalar_text(v);
	if (text == NULL)			/* an object or an array */
		text = JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
	*version = DatumGetInt64(DirectFunctionCall1(int8in, CStringGetDatum(text)));
	return true;
}

/* An object of the payload's members named in names (JSON null if missing). */
static Jsonb *
pick(Jsonb *payload, char **names, int n, bool nulls, bool *empty)
{
	JsonbParseState *state = NULL;
	JsonbValue *res;

	*empty = true;
	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < n; i++)
	{
		JsonbValue	buf;
		JsonbValue *v = member(payload, names[i], &buf);
		JsonbValue	k;

		if (v == NULL)
		{
			if (!nulls)
				continue;
			buf.type = jbvNull;
			v = &buf;
		}
		k.type = jbvString;
		k.val.string.val = names[i];
		k.val.string.len = strlen(names[i]);
		(void) pushJsonbValue(&state, WJB_KEY, &k);
		(void) pushJsonbValue(&state, WJB_VALUE, v);
		*empty = false;
	}
	res = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/* fn(target, object, version) as the current user, as a query would call it. */
static void
call_helper(SinkRoute *r, FmgrInfo *fn, Jsonb *object, bool have_version, int64 version)
{
	AclResult	acl = pg_proc_aclcheck(fn->fn_oid, GetUserId(), ACL_EXECUTE);

	LOCAL_FCINFO(fcinfo, 3);

	if (acl != ACLCHECK_OK)
		aclcheck_error(acl, OBJECT_FUNCTION, get_func_name(fn->fn_oid));
	InvokeFunctionExecuteHook(fn->fn_oid);

	InitFunctionCallInfoData(*fcinfo, fn, 3, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ObjectIdGetDatum(r->relid);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = object ? JsonbPGetDatum(object) : (Datum) 0;
	fcinfo->args[1].isnull = (object == NULL);
	fcinfo->args[2].value = Int64GetDatum(version);
	fcinfo->args[2].isnull = !have_version;
	(void) FunctionCallInvoke(fcinfo);
}

/*
 * Applies one event's payload (a jsonb) through the route.  Errors
 * propagate: they are the event's, except permission errors and missing
 * objects (see sink_error_is_transient).
 */
void
sink_route_apply(SinkRoute *r, const char *sink_name, Datum payload_datum)
{
	Jsonb	   *payload = DatumGetJsonbP(payload_datum);
	bool		deletes = false;
	bool		have_version;
	int64		version = 0;
	bool		empty;

	if (!JB_ROOT_IS_OBJECT(payload))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the route of sink \"%s\" needs a JSON object, not a JSON %s",
						sink_name, JB_ROOT_IS_SCALAR(payload) ? "scalar" : "array")));
	if (r->delete_field)
	{
		JsonbValue	buf;
		JsonbValue *v = member(payload, r->delete_field, &buf);

		deletes = (v != NULL && v->type == jbvBool && v->val.boolean);
	}
	else if (r->delete_match)
		deletes = DatumGetBool(DirectFunctionCall2(jsonb_contains, JsonbPGetDatum(payload),
												   JsonbPGetDatum(r->delete_match)));
	have_version = route_version(r, payload, &version);

	if (deletes)
		call_helper(r, &r->delete, pick(payload, r->pk, r->npk, true, &empty),
					have_version, version);
	else
	{
		Jsonb	   *row = pick(payload, r->cols, r->ncols, false, &empty);

		call_helper(r, &r->upsert, empty ? NULL : row, have_version, version);
	}
}
