/*-------------------------------------------------------------------------
 *
 * monitor_worker.h
 *	  The monitor background worker: what cqrs_sync asks Kafka on a timer,
 *	  away from the relay (today: how many messages each dead-letter topic
 *	  holds).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_MONITOR_WORKER_H
#define CQRS_MONITOR_WORKER_H

/* Registers the monitor worker; from _PG_init during preload only. */
extern void cqrs_monitor_register(void);

#endif							/* CQRS_MONITOR_WORKER_H */
