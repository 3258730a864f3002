/*-------------------------------------------------------------------------
 *
 * apply_cache.h
 *	  The read side: the cache of target descriptions and its invalidation.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_APPLY_CACHE_H
#define CQRS_APPLY_CACHE_H

#include "access/attnum.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "nodes/pg_list.h"
#include "utils/palloc.h"

/* How a JSON value becomes a parameter of the column's (base) type */
typedef enum ColumnKind
{
	COL_INPUT,					/* through the type's input function */
	COL_TEXT,					/* text: JSON strings directly */
	COL_NUMERIC,				/* numeric: JSON numbers directly */
	COL_JSON,					/* json: the JSON text of the value */
	COL_JSONB					/* jsonb: the value itself */
} ColumnKind;

typedef struct ApplyColumn
{
	AttrNumber	attnum;
	char	   *name;
	int			namelen;
	char	   *qname;			/* quote_identifier(name) */
	Oid			basetype;		/* type of the parameter */
	char	   *typname;		/* the column's declared type, for messages */
	ColumnKind	kind;
	bool		is_array;
	bool		json_elems;		/* an array of json or jsonb */
	bool		addable;		/* int2/4/8, float4/8, numeric */
	bool		generated;
	bool		identity_always;
	bool		plain;			/* stored as given: no domain, no type modifier */
	bool		needs_value;	/* NOT NULL, no default, not identity */
	bool		has_default;	/* a default, an identity or generated */
	int			pkpos;			/* position in the primary key, or -1 */
	FmgrInfo	input;
	Oid			ioparam;
	int32		typmod;			/* the base type's modifier, or -1 */
	bool		typmod_coerce;	/* a length coercion function applies it: */
	FmgrInfo	coerce;			/* (value, typmod, explicit) */
	/* primary key columns only: */
	FmgrInfo	output;
	char	   *eqop;			/* "OPERATOR(nsp.=)" */
	Oid			keycoll;		/* the primary key's collation of the column */
	bool		key_by_text;	/* no hash function fits the key's equality:
								 * hash and compare the text form */
	FmgrInfo	keyhash;		/* hash function consistent with keyeq */
	FmgrInfo	keyeq;			/* the primary key's equality (also when
								 * key_by_text; for index scans) */
	bool		fixed_format;	/* text form depends on DateStyle & co. */
} ApplyColumn;

/* A plan for one set of columns, in JSON member order */
typedef struct ColumnSetPlan
{
	int			ncols;
	int		   *colidx;			/* indexes into ApplyTarget.cols */
	SPIPlanPtr	plan;			/* UPDATE of an existing row */
	SPIPlanPtr	plan2;			/* INSERT of a missing row */
} ColumnSetPlan;

typedef struct ApplyTarget
{
	Oid			relid;			/* hash key: must be first */
	bool		valid;
	MemoryContext cxt;
	Oid			extnsp;			/* the extension's schema when described */
	char		version_name[NAMEDATALEN];
	char	   *relname;
	char	   *qualname;		/* quoted schema.table */
	bool		partitioned;
	int			ncols;
	ApplyColumn *cols;			/* sorted like JSON object keys */
	int			version_idx;
	int			npk;
	int			pk_idx[INDEX_MAX_KEYS]; /* in primary key order */
	bool		key_fixed_format;	/* some key column's text form depends on
									 * settings (see apply_json.c) */
	SPIPlanPtr	delete_plan;	/* DELETE ... WHERE pk AND version <= $v */
	SPIPlanPtr	exists_plan;	/* SELECT version ... WHERE pk */
	SPIPlanPtr	hidden_plan;	/* the same, run only as the owner without
								 * forced row security (apply_acl.c) */
	char	   *exists_sql;		/* the query of both */
	Oid		   *pk_types;		/* its parameters' types */
	List	   *upsert_plans;	/* of ColumnSetPlan */
	List	   *delta_plans;	/* of ColumnSetPlan */
} ApplyTarget;

/*
 * Entering and leaving a helper: apply_enter() flushes what invalid entries
 * left behind (outermost call only) and connects to SPI; apply_leave()
 * disconnects.
 */
extern void apply_enter(void);
extern void apply_leave(void);

/*
 * The target's cached description and plans, described afresh if the table
 * changed.  Locks the table (RowExclusiveLock) first.
 */
extern ApplyTarget *apply_get_target(Oid relid, Oid extnsp);

/* Frees a plan now, or when no helper runs any more (nested calls). */
extern void apply_retire_plan(SPIPlanPtr plan);
extern void apply_retire_plan_list(List *plans);

#endif							/* CQRS_APPLY_CACHE_H */
