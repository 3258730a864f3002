/*-------------------------------------------------------------------------
 *
 * cleanup_stats.h
 *	  The cleanup's counters in shared memory: passes, rows deleted per
 *	  status, errors, per database; cqrs_cleanup_counters() reads them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_CLEANUP_STATS_H
#define CQRS_CLEANUP_STATS_H

#include "utils/timestamp.h"

/* Rows one pass deleted */
typedef struct CqrsCleanupCounts
{
	int64		sent;
	int64		dead_lettered;
	int64		dlt_failed;
	int64		read_side;
} CqrsCleanupCounts;

/* The cleanup worker runs in this database (until it exits). */
extern void cqrs_cleanup_stats_worker_started(void);

/* A pass of the worker that committed everything it did, or failed. */
extern void cqrs_cleanup_stats_pass(TimestampTz start, TimestampTz end,
									const CqrsCleanupCounts *counts);
extern void cqrs_cleanup_stats_error(TimestampTz start, TimestampTz end,
									 const char *message);

/*
 * A pass of cqrs_cleanup() in the caller's transaction: it counts when (and
 * if) that transaction commits; rolled back with its (sub)transaction.
 */
extern void cqrs_cleanup_stats_pass_at_commit(TimestampTz start, TimestampTz end,
											  const CqrsCleanupCounts *counts);

#endif							/* CQRS_CLEANUP_STATS_H */
