/*-------------------------------------------------------------------------
 *
 * enqueue.h
 *	  cqrs_enqueue(): writing events to the outbox.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_ENQUEUE_H
#define CQRS_ENQUEUE_H

extern void cqrs_enqueue_init(void);
extern bool cqrs_topic_name_valid(const char *topic);

#endif							/* CQRS_ENQUEUE_H */
