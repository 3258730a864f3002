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

/* The statements on the extension's own tables, for one schema */
typedef struct ApplyExtPlans
{
	Oid			nsp;			/* the extension's schema */
	SPIPlanPtr	inbox;			/* INSERT INTO cqrs_inbox ... ON CONFLICT DO NOTHING */
	SPIPlanPtr	tomb_write;		/* INSERT INTO cqrs_tombstone ... raise if higher */
	SPIPlanPtr	tomb_check;		/* SELECT version FROM cqrs_tombstone */
} ApplyExtPlans;

extern const ApplyExtPlans *apply_ensure_ext_plans(Oid nsp);
extern void apply_forget_ext_plans(void);

extern uint64 apply_run_plan(SPIPlanPtr plan, Datum *values, const char *nulls,
							 bool read_only, bool latest);
extern bool apply_result_bool(void);
extern char *apply_operator_sql(Oid opno);

extern void apply_target_plans(ApplyTarget *t);
extern ColumnSetPlan *apply_upsert_plan(ApplyTarget *t, int ncols, int *colidx);
extern ColumnSetPlan *apply_delta_plan(ApplyTarget *t, int ncols, int *colidx);
extern bool apply_row_is_new(ApplyTarget *t);

#endif							/* CQRS_APPLY_PLANS_H */
