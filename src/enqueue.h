/*-------------------------------------------------------------------------
 *
 * enqueue.h
 *	  cqrs_enqueue(): writing events to the outbox.  cqrs_enqueue_event() is
 *	  the path every event takes into the outbox, cqrs_enqueue()'s and an
 *	  attached outbox table's (attach.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_ENQUEUE_H
#define CQRS_ENQUEUE_H

#include "utils/jsonb.h"
#include "utils/uuid.h"

extern void cqrs_enqueue_init(void);
extern int64 cqrs_enqueue_event(text *topic, text *key, Jsonb *payload,
								Jsonb *headers, pg_uuid_t *event_id,
								bool if_new);
extern bool cqrs_topic_name_valid(const char *topic);

#endif							/* CQRS_ENQUEUE_H */
