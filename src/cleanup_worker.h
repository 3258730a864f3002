/*-------------------------------------------------------------------------
 *
 * cleanup_worker.h
 *	  Retention: the cleanup pass, cqrs_cleanup(), cqrs_prune_read_side()
 *	  and the cleanup background worker.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_CLEANUP_WORKER_H
#define CQRS_CLEANUP_WORKER_H

/* Settings, defined by cqrs_cleanup_init() */
extern int	cqrs_cleanup_interval_s;
extern int	cqrs_sent_retention_s;
extern int	cqrs_dlt_retention_s;
extern int	cqrs_purge_grace_s;
extern int	cqrs_cleanup_batch_size;
extern int	cqrs_cleanup_max_rows_per_call;
extern int	cqrs_cleanup_delay_ms;

/*
 * Defines the cleanup settings (cqrs_sync.cleanup_interval,
 * cqrs_sync.sent_retention, cqrs_sync.dlt_retention, cqrs_sync.purge_grace,
 * cqrs_sync.cleanup_batch_size, cqrs_sync.cleanup_max_rows_per_call,
 * cqrs_sync.cleanup_delay).  Call
 * from _PG_init() before MarkGUCPrefixReserved("cqrs_sync").
 */
extern void cqrs_cleanup_init(void);

/* Registers the cleanup worker; from _PG_init during preload only. */
extern void cqrs_cleanup_register(void);

#endif							/* CQRS_CLEANUP_WORKER_H */
