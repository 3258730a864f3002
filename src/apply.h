/*-------------------------------------------------------------------------
 *
 * apply.h
 *	  The read side: idempotent apply helpers and the inbox.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_APPLY_H
#define CQRS_APPLY_H

/* Settings, defined by cqrs_apply_init() */
extern char *cqrs_version_column;
extern int	cqrs_inbox_retention;

/*
 * Defines the read-side settings (cqrs_sync.version_column and
 * cqrs_sync.inbox_retention).  Call from _PG_init() before
 * MarkGUCPrefixReserved("cqrs_sync").
 */
extern void cqrs_apply_init(void);

#endif							/* CQRS_APPLY_H */
