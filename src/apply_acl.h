/*-------------------------------------------------------------------------
 *
 * apply_acl.h
 *	  The read side: who may write what, and as whom.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_APPLY_ACL_H
#define CQRS_APPLY_ACL_H

#include "utils/acl.h"

#include "apply_cache.h"
#include "apply_plans.h"

/* The caller's identity, saved while a statement runs as the tables' owner */
typedef struct ApplyUser
{
	Oid			userid;
	int			sec_context;
} ApplyUser;

/*
 * Runs the statements on the extension's own tables (inbox, delta memory,
 * tombstones, consumers) as their owner: callers have no privileges on
 * them.  An error in between restores the caller at (sub)transaction abort.
 */
extern void apply_become_owner(const ApplyExtPlans *ext, ApplyUser *save);
extern void apply_restore_user(ApplyUser *save);

/*
 * Raises "permission denied for table ..." unless the caller has the
 * privilege on the target (for ACL_UPDATE and ACL_INSERT, on the whole
 * table, or on each of the ncols columns given by colidx, or with ncols 0
 * on any column).
 */
extern void apply_check_hidden_row(ApplyTarget *t, Datum *values, bool for_delete);
extern void apply_check_target_privilege(ApplyTarget *t, AclMode mode,
										 int ncols, const int *colidx);

/*
 * Raises 42501 unless the caller's role owns the consumer or is a member of
 * its owner; a consumer nobody owns yet is claimed for the caller's role
 * (superusers use any consumer and claim none).
 */
extern void apply_check_consumer(const ApplyExtPlans *ext, text *consumer);

#endif							/* CQRS_APPLY_ACL_H */
