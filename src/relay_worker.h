/*-------------------------------------------------------------------------
 *
 * relay_worker.h
 *	  The outbox relay background worker.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_RELAY_WORKER_H
#define CQRS_RELAY_WORKER_H

extern void cqrs_relay_register(void);

#endif							/* CQRS_RELAY_WORKER_H */
