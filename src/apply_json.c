/*-------------------------------------------------------------------------
 *
 * apply_json.c
 *	  The read side: JSON to Datum, and keys.
 *
 *	  A row, a key or deltas arrive as a JSON object whose members name
 *	  columns of the target.  The members are matched to the columns in one
 *	  forward pass (both sorted the way jsonb sorts object keys), and each
 *	  value becomes a parameter of its column's base type: text and numeric
 *	  directly, json and jsonb as they are, arrays through an array literal,
 *	  everything else through the type's input function.  A key's values
 *	  also have a canonical form, the one stored in cqrs_tombstone.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relation.h"
#include "access/stratnum.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "parser/parse_coerce.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/syscache.h"

#include "apply_json.h"

PG_FUNCTION_INFO_V1(cqrs_tombstone_key_hash);
PG_FUNCTION_INFO_V1(cqrs_key_respelled);

/* The kind of a JSON document's root, for messages */
const char *
apply_jsonb_root_type(Jsonb *jb)
{
	JsonbValue	v;

	if (JB_ROOT_IS_SCALAR(jb))
	{
		JsonbExtractScalar(&jb->root, &v);
		return JsonbTypeName(&v);
	}
	return JB_ROOT_IS_OBJECT(jb) ? "object" : "array";
}

const char *
apply_json_value_type(JsonbValue *v)
{
	if (v->type == jbvBinary)
		return JsonContainerIsArray(v->val.binary.data) ? "array" : "object";
	return JsonbTypeName(v);
}

int
apply_json_members(Jsonb *jb, JsonMember **out)
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

char *
apply_member_name(JsonMember *m)
{
	return pnstrdup(m->key, m->keylen);
}

/*
 * Columns are sorted the way jsonb sorts object keys (shorter first, then
 * bytewise), so one forward pass matches the members of an object.
 */
int
apply_column_cmp(const void *a, const void *b)
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
int
apply_find_column(ApplyTarget *t, JsonMember *m, int *cursor)
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

/*
 * A JSON array as an array literal, for the array type's input function.
 * For an array of json or jsonb (json_elems) each element is a JSON value,
 * written as JSON text: a string stays a string, and a nested array is one
 * element.  JSON null is an SQL NULL element either way.
 */
static void
append_array_literal(StringInfo buf, JsonbContainer *arr, bool json_elems)
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
				if (json_elems)
				{
					StringInfoData json;

					initStringInfo(&json);
					escape_json(&json, pnstrdup(v.val.string.val, v.val.string.len));
					append_quoted_element(buf, json.data, json.len);
					pfree(json.data);
				}
				else
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
				if (JsonContainerIsArray(v.val.binary.data) && !json_elems)
					append_array_literal(buf, v.val.binary.data, false);
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

void
apply_convert_error_callback(void *arg)
{
	ConvertContext *cc = arg;

	if (cc->member && cc->col)
		errcontext("converting JSON %s member \"%s\" to type %s",
				   cc->what, apply_member_name(cc->member), cc->col->typname);
}

/* The text of a JSON string, number or boolean, as ->> gives it; else NULL */
char *
apply_json_scalar_text(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out,
													   NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		default:
			return NULL;
	}
}

static Datum json_to_base_datum(ApplyColumn *c, JsonbValue *v, bool *isnull);

/*
 * The column's type modifier (-1: none), and the length coercion function
 * that applies it, if its type has one (numeric, timestamp, varchar...).
 */
void
apply_describe_typmod(ApplyColumn *c, int32 typmod, MemoryContext cxt)
{
	Oid			func;

	c->typmod = typmod;
	c->typmod_coerce = typmod >= 0 &&
		find_typmod_coercion_function(c->basetype, &func) == COERCION_PATH_FUNC;
	if (c->typmod_coerce)
		fmgr_info_cxt(func, &c->coerce, cxt);
}

/* A value of the column's base type, fitted to its type modifier. */
static Datum
fit_to_typmod(ApplyColumn *c, Datum d)
{
	if (c->typmod_coerce)
		d = FunctionCall3(&c->coerce, d, Int32GetDatum(c->typmod), BoolGetDatum(false));
	return d;
}

/*
 * A JSON value as a parameter of the column's base type; the statement
 * coerces it to the column's type modifier and checks its domain.  A value
 * of a primary key column is coerced to the type modifier here already: it
 * is also looked up, hashed and remembered as a key, which must be the value
 * the row stores (1.04 in a numeric(6,1) column is the key 1.0).
 */
Datum
apply_json_to_datum(ApplyColumn *c, JsonbValue *v, bool *isnull)
{
	Datum		d = json_to_base_datum(c, v, isnull);

	if (!*isnull && c->pkpos >= 0)
		d = fit_to_typmod(c, d);
	return d;
}

static Datum
json_to_base_datum(ApplyColumn *c, JsonbValue *v, bool *isnull)
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

	str = apply_json_scalar_text(v);
	if (str != NULL)
		return InputFunctionCall(&c->input, str, c->ioparam, -1);
	switch (v->type)
	{
		case jbvBinary:
			if (c->is_array && JsonContainerIsArray(v->val.binary.data))
			{
				StringInfoData buf;

				initStringInfo(&buf);
				append_array_literal(&buf, v->val.binary.data, c->json_elems);
				str = buf.data;
				break;
			}
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("cannot convert a JSON %s to type %s",
							apply_json_value_type(v), c->typname),
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
void
apply_check_row_version(ApplyTarget *t, JsonMember *m, int64 version)
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
						t->version_name, apply_json_value_type(&m->value))));
	{
		ConvertContext cc = {"row", m, &t->cols[t->version_idx]};
		ErrorContextCallback errcb;

		errcb.callback = apply_convert_error_callback;
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
void
apply_check_version_range(ApplyTarget *t, int64 version)
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

/*
 * Keys.
 *
 * A key is stored (cqrs_tombstone.key, cqrs_delta_inbox.key) in a canonical
 * form: an object of the key columns' text representations, e.g. {"id":
 * "42"}.  Types whose text form depends on settings (dates and times on
 * DateStyle and IntervalStyle, timestamptz on TimeZone, floats on
 * extra_float_digits) are written with fixed settings, so that every
 * session spells a key the same way.
 *
 * Keys the table holds equal are not always spelled the same: numeric 42
 * and 42.0, float -0 and 0, citext 'ABC' and 'abc', text under a
 * nondeterministic collation, one instant in two time zones.  So a key
 * also has a hash, by the hash functions consistent with the primary key's
 * equality (with its collation): equal keys, equal hashes.  Tombstones are
 * found by (target, hash) and then compared with that equality, the stored
 * text parsed back into the column's type.  A key column whose type has no
 * such hash function is hashed and compared by its text form.
 * ------------------------------------------------------------------------
 */

/* Fixed output settings for the text forms, while a key is written or read */
static int
fixed_format_begin(void)
{
	int			level = NewGUCNestLevel();

	(void) set_config_option("datestyle", "ISO, YMD", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("intervalstyle", "postgres", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("extra_float_digits", "1", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	/* one instant, one text (the delta memory is keyed by it) */
	(void) set_config_option("timezone", "UTC", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("bytea_output", "hex", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return level;
}

static void
fixed_format_end(int level)
{
	AtEOXact_GUC(true, level);
}

static bool
text_form_depends_on_settings(Oid typid)
{
	switch (typid)
	{
		case DATEOID:
		case TIMEOID:
		case TIMETZOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
		case INTERVALOID:
		case FLOAT4OID:
		case FLOAT8OID:
		case BYTEAOID:
			return true;
		default:
			break;
	}
	/* a container prints its elements with the same settings */
	return type_is_array(typid) || type_is_range(typid) ||
		type_is_multirange(typid) || type_is_rowtype(typid);
}

/*
 * Describes the k-th column of the primary key index idx for keys: its
 * output function, its collation in the key, and the equality and hash
 * functions of the key's operator family.  c->basetype and c->input must be
 * set.
 */
void
apply_describe_key_column(ApplyColumn *c, Relation idx, int k, MemoryContext cxt)
{
	Oid			func;
	bool		varlena;
	Oid			opcintype = idx->rd_opcintype[k];
	Oid			eqop;
	RegProcedure hashfn = InvalidOid;
	RegProcedure rhashfn = InvalidOid;

	getTypeOutputInfo(c->basetype, &func, &varlena);
	fmgr_info_cxt(func, &c->output, cxt);
	c->keycoll = idx->rd_indcollation[k];
	c->fixed_format = text_form_depends_on_settings(c->basetype);

	eqop = get_opfamily_member(idx->rd_opfamily[k], opcintype, opcintype,
							   BTEqualStrategyNumber);
	if (OidIsValid(eqop))
		fmgr_info_cxt(get_opcode(eqop), &c->keyeq, cxt);
	c->key_by_text = !OidIsValid(eqop) ||
		!get_op_hash_functions(eqop, &hashfn, &rhashfn) ||
		!OidIsValid(hashfn);
	if (!c->key_by_text)
		fmgr_info_cxt(hashfn, &c->keyhash, cxt);
}

static uint32
key_column_hash(ApplyColumn *c, Datum value, const char *text)
{
	if (c->key_by_text)
		return hash_bytes((const unsigned char *) text, strlen(text));
	return DatumGetUInt32(FunctionCall1Coll(&c->keyhash, c->keycoll, value));
}

/*
 * Fills in a key's canonical form, its text and its hash from key->vals
 * (the primary key values, in primary key order).
 */
void
apply_key_make(ApplyTarget *t, ApplyKey *key)
{
	JsonbParseState *st = NULL;
	JsonbValue *res;
	char	   *texts[INDEX_MAX_KEYS];
	int			level = 0;

	if (t->key_fixed_format)
		level = fixed_format_begin();
	for (int k = 0; k < t->npk; k++)
		texts[k] = OutputFunctionCall(&t->cols[t->pk_idx[k]].output, key->vals[k]);
	if (t->key_fixed_format)
		fixed_format_end(level);

	key->hash = 0;
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	for (int k = 0; k < t->npk; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];
		JsonbValue	jk;
		JsonbValue	jv;

		key->hash = hash_combine(key->hash, key_column_hash(c, key->vals[k], texts[k]));
		jk.type = jbvString;
		jk.val.string.val = c->name;
		jk.val.string.len = c->namelen;
		pushJsonbValue(&st, WJB_KEY, &jk);
		jv.type = jbvString;
		jv.val.string.val = texts[k];
		jv.val.string.len = strlen(texts[k]);
		pushJsonbValue(&st, WJB_VALUE, &jv);
	}
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	key->canonical = JsonbValueToJsonb(res);
	key->text = JsonbToCString(NULL, &key->canonical->root, VARSIZE(key->canonical));
}

/* The text a stored key holds for a column, or NULL */
static char *
stored_text(Jsonb *stored, ApplyColumn *c)
{
	JsonbValue	v;

	if (!JB_ROOT_IS_OBJECT(stored) ||
		getKeyJsonValueFromContainer(&stored->root, c->name, c->namelen, &v) == NULL ||
		v.type != jbvString)
		return NULL;
	return pnstrdup(v.val.string.val, v.val.string.len);
}

/*
 * Whether a stored key (a tombstone's) is the same key as key for the
 * table: each column's stored text, parsed back into the column's type,
 * equal by the primary key's equality.
 */
bool
apply_key_matches(ApplyTarget *t, ApplyKey *key, Jsonb *stored)
{
	bool		match = true;
	int			level = 0;

	if (t->key_fixed_format)
		level = fixed_format_begin();
	for (int k = 0; k < t->npk && match; k++)
	{
		ApplyColumn *c = &t->cols[t->pk_idx[k]];
		char	   *text = stored_text(stored, c);

		if (text == NULL)
			match = false;
		else if (c->key_by_text)
		{
			char	   *mine = OutputFunctionCall(&c->output, key->vals[k]);

			match = strcmp(text, mine) == 0;
		}
		else
		{
			Datum		v = InputFunctionCall(&c->input, text, c->ioparam, -1);

			match = DatumGetBool(FunctionCall2Coll(&c->keyeq, c->keycoll, v,
												   key->vals[k]));
		}
	}
	if (t->key_fixed_format)
		fixed_format_end(level);
	return match;
}

/*
 * A stored key of a table (a tombstone's, or one 0.1.0 remembered a delta
 * by): the table's primary key columns, described from the table alone (no
 * version column needed), and the text the key holds for each.  False when
 * the table, its primary key or a column's text is gone.
 */
typedef struct StoredKey
{
	int			n;
	ApplyColumn cols[INDEX_MAX_KEYS];
	char	   *texts[INDEX_MAX_KEYS];
} StoredKey;

static bool
stored_key_read(Oid relid, Jsonb *stored, StoredKey *sk)
{
	Relation	rel;
	Relation	idx;
	Oid			pkoid;
	bool		complete = true;

	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
		return false;
	rel = relation_open(relid, AccessShareLock);
	pkoid = RelationGetPrimaryKeyIndex(rel);
	if (!OidIsValid(pkoid))
	{
		relation_close(rel, AccessShareLock);
		return false;
	}
	idx = index_open(pkoid, AccessShareLock);
	sk->n = idx->rd_index->indnkeyatts;
	for (int k = 0; k < sk->n && complete; k++)
	{
		AttrNumber	attnum = idx->rd_index->indkey.values[k];
		Form_pg_attribute att = TupleDescAttr(RelationGetDescr(rel), attnum - 1);
		ApplyColumn *c = &sk->cols[k];
		Oid			func;
		int32		typmod = att->atttypmod;

		memset(c, 0, sizeof(*c));
		c->name = pstrdup(NameStr(att->attname));
		c->namelen = strlen(c->name);
		c->basetype = getBaseTypeAndTypmod(att->atttypid, &typmod);
		getTypeInputInfo(c->basetype, &func, &c->ioparam);
		fmgr_info(func, &c->input);
		/* as apply_json_to_datum() fits a key to its column (numeric(6,1)) */
		apply_describe_typmod(c, typmod, CurrentMemoryContext);
		apply_describe_key_column(c, idx, k, CurrentMemoryContext);
		sk->texts[k] = stored_text(stored, c);
		complete = (sk->texts[k] != NULL);
	}
	index_close(idx, AccessShareLock);
	relation_close(rel, AccessShareLock);
	return complete;
}

/*
 * cqrs_tombstone_key_hash(target regclass, key jsonb) RETURNS integer
 *
 * The hash of a stored key of target, from the table's primary key alone
 * (no version column needed): what cqrs_tombstone.key_hash holds.  0 when
 * the table, its primary key or a key column is gone.  For the update from
 * 0.1.0, which had no key_hash.
 */
Datum
cqrs_tombstone_key_hash(PG_FUNCTION_ARGS)
{
	StoredKey	sk;
	uint32		hash = 0;
	int			level;

	if (!stored_key_read(PG_GETARG_OID(0), PG_GETARG_JSONB_P(1), &sk))
		PG_RETURN_INT32(0);
	level = fixed_format_begin();
	for (int k = 0; k < sk.n; k++)
	{
		ApplyColumn *c = &sk.cols[k];
		Datum		v = c->key_by_text ? (Datum) 0 :
			InputFunctionCall(&c->input, sk.texts[k], c->ioparam, -1);

		hash = hash_combine(hash, key_column_hash(c, v, sk.texts[k]));
	}
	fixed_format_end(level);
	PG_RETURN_INT32((int32) hash);
}

/*
 * cqrs_key_respelled(target regclass, key jsonb) RETURNS jsonb
 *
 * For the update from 0.1.0, which wrote the texts of a key (tombstones,
 * the memory of deltas) with the writing session's settings (TimeZone,
 * DateStyle, ...): each text read with this session's settings and written
 * as 0.2.0 writes it, with fixed ones (apply_key_make()).  Errors when the
 * key no longer fits the table (the update keeps such a key as it was).
 */
Datum
cqrs_key_respelled(PG_FUNCTION_ARGS)
{
	StoredKey	sk;
	Datum		values[INDEX_MAX_KEYS];
	JsonbParseState *st = NULL;
	JsonbValue *res;
	int			level;

	if (!stored_key_read(PG_GETARG_OID(0), PG_GETARG_JSONB_P(1), &sk))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("key does not fit the primary key of relation %u", PG_GETARG_OID(0))));
	for (int k = 0; k < sk.n; k++)
	{
		ApplyColumn *c = &sk.cols[k];

		values[k] = fit_to_typmod(c, InputFunctionCall(&c->input, sk.texts[k],
														c->ioparam, -1));
	}
	level = fixed_format_begin();
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	for (int k = 0; k < sk.n; k++)
	{
		char	   *text = OutputFunctionCall(&sk.cols[k].output, values[k]);
		JsonbValue	jk;
		JsonbValue	jv;

		jk.type = jbvString;
		jk.val.string.val = sk.cols[k].name;
		jk.val.string.len = sk.cols[k].namelen;
		pushJsonbValue(&st, WJB_KEY, &jk);
		jv.type = jbvString;
		jv.val.string.val = text;
		jv.val.string.len = strlen(text);
		pushJsonbValue(&st, WJB_VALUE, &jv);
	}
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	fixed_format_end(level);
	PG_RETURN_JSONB_P(JsonbValueToJsonb(res));
}

/*
 * The primary key values of a key argument: an object naming exactly the
 * key columns, or for a one-column key also the bare value.
 */
void
apply_parse_key(ApplyTarget *t, Jsonb *key, Datum *pkvals)
{
	bool		seen[INDEX_MAX_KEYS] = {0};
	ConvertContext cc = {"key", NULL, NULL};
	ErrorContextCallback errcb;
	bool		isnull;

	errcb.callback = apply_convert_error_callback;
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
		pkvals[0] = apply_json_to_datum(c, &m.value, &isnull);
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
				 errdetail("It is a JSON %s.", apply_jsonb_root_type(key)),
				 errhint("Name the primary key columns of \"%s\", for example '{\"%s\": 1}'.",
						 t->relname, t->cols[t->pk_idx[0]].name)));
	else
	{
		JsonMember *members;
		int			n = apply_json_members(key, &members);
		int			cursor = 0;

		for (int i = 0; i < n; i++)
		{
			int			j = apply_find_column(t, &members[i], &cursor);
			ApplyColumn *c;

			if (j < 0)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("column \"%s\" of relation \"%s\" does not exist",
								apply_member_name(&members[i]), t->relname),
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
			pkvals[c->pkpos] = apply_json_to_datum(c, &members[i].value, &isnull);
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
