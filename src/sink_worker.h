/*-------------------------------------------------------------------------
 *
 * sink_worker.h
 *	  The sink workers ("cqrs_sync sink"): the read side's consumer.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_SINK_WORKER_H
#define CQRS_SINK_WORKER_H

extern void cqrs_sink_register(void);

#endif							/* CQRS_SINK_WORKER_H */
