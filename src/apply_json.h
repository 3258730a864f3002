/*-------------------------------------------------------------------------
 *
 * apply_json.h
 *	  The read side: JSON to Datum, and keys.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_APPLY_JSON_H
#define CQRS_APPLY_JSON_H

#include "utils/jsonb.h"
#include "utils/rel.h"

#include "apply_cache.h"

/* A top-level member of a JSON object */
typedef struct JsonMember
{
	char	   *key;			/* not null-terminated */
	int			keylen;
	JsonbValue	value;
} JsonMember;

/* errcontext while a JSON member is converted (apply_convert_error_callback) */
typedef struct ConvertContext
{
	const char *what;			/* "row", "key", "deltas" */
	JsonMember *member;
	ApplyColumn *col;
} ConvertContext;

extern const char *apply_jsonb_root_type(Jsonb *jb);
extern const char *apply_json_value_type(JsonbValue *v);
extern int	apply_json_members(Jsonb *jb, JsonMember **out);
extern char *apply_member_name(JsonMember *m);
extern int	apply_column_cmp(const void *a, const void *b);
extern int	apply_find_column(ApplyTarget *t, JsonMember *m, int *cursor);
extern void apply_convert_error_callback(void *arg);
extern char *apply_json_scalar_text(JsonbValue *v);
extern Datum apply_json_to_datum(ApplyColumn *c, JsonbValue *v, bool *isnull);
extern void apply_check_row_version(ApplyTarget *t, JsonMember *m, int64 version);
extern void apply_check_version_range(ApplyTarget *t, int64 version);
extern void apply_parse_key(ApplyTarget *t, Jsonb *key, Datum *pkvals);

/* A key of a target: its values, canonical form and hash (apply_key_make) */
typedef struct ApplyKey
{
	Datum		vals[INDEX_MAX_KEYS];	/* in primary key order */
	Jsonb	   *canonical;		/* {"col": "text form", ...} */
	char	   *text;			/* canonical, as JSON text */
	uint32		hash;			/* equal keys, equal hashes */
} ApplyKey;

extern void apply_describe_key_column(ApplyColumn *c, Relation idx, int k,
									  MemoryContext cxt);
extern void apply_describe_typmod(ApplyColumn *c, int32 typmod, MemoryContext cxt);
extern void apply_key_make(ApplyTarget *t, ApplyKey *key);
extern bool apply_key_matches(ApplyTarget *t, ApplyKey *key, Jsonb *stored);

#endif							/* CQRS_APPLY_JSON_H */
