/*-------------------------------------------------------------------------
 *
 * apply_plans.h
 *	  The read side: the SQL the helpers run, and its prepared plans.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_APPLY_PLANS_H
#define CQRS_APPLY_PLANS_H

#include "executor/spi.h"

#include "apply_cache.h"

#include "utils/jsonb.h"

/* The statements on the extension's own tables, for one schema */
typedef struct ApplyExtPlans
{
	Oid			nsp;			/* the extension's schema */
	bool		version2;		/* its 0.2.0 tables (else 0.1.0's) */
	Oid			owner;			/* owner of the tables */
	Oid			inbox_relid;	/* cqrs_inbox: another one, other tables */
	Oid			consumer_relid; /* cqrs_consumer (0.2.0) */
	SPIPlanPtr	inbox;			/* INSERT INTO cqrs_inbox */
	SPIPlanPtr	delta_inbox;	/* INSERT INTO cqrs_delta_inbox (0.2.0) */
	SPIPlanPtr	tomb_find;		/* SELECT version, key: by hash (0.2.0), by key */
	SPIPlanPtr	tomb_insert;	/* INSERT INTO cqrs_tombstone ... raise if higher */
	SPIPlanPtr	tomb_raise;		/* UPDATE cqrs_tombstone (0.2.0) */
	SPIPlanPtr	consumer_get;	/* SELECT owner FROM cqrs_consumer (0.2.0) */
	SPIPlanPtr	consumer_claim; /* INSERT INTO cqrs_consumer (0.2.0) */
} ApplyExtPlans;

struct ApplyKey;

extern const ApplyExtPlans *apply_ensure_ext_plans(Oid nsp, bool version2);
extern void apply_forget_ext_plans(void);

extern bool apply_inbox_insert(const ApplyExtPlans *ext, text *consumer,
							   text *event_id);
extern bool apply_delta_memory_insert(const ApplyExtPlans *ext, ApplyTarget *t,
									  text *consumer, text *event_id,
									  struct ApplyKey *key);
extern bool apply_tombstone_find(const ApplyExtPlans *ext, ApplyTarget *t,
								 struct ApplyKey *key, bool latest,
								 int64 *version, Jsonb **stored);
extern bool apply_tombstone_write(const ApplyExtPlans *ext, ApplyTarget *t,
								  struct ApplyKey *key, int64 version);

extern uint64 apply_run_plan(SPIPlanPtr plan, Datum *values, const char *nulls,
							 bool read_only, bool latest);
extern bool apply_result_bool(void);
extern char *apply_operator_sql(Oid opno);

extern void apply_target_plans(ApplyTarget *t);
extern ColumnSetPlan *apply_upsert_plan(ApplyTarget *t, int ncols, int *colidx);
extern ColumnSetPlan *apply_delta_plan(ApplyTarget *t, int ncols, int *colidx);
extern bool apply_row_is_new(ApplyTarget *t);

#endif							/* CQRS_APPLY_PLANS_H */
