/*-------------------------------------------------------------------------
 *
 * topics.h
 *	  What the relay knows about each topic it produces to: the largest
 *	  record batch Kafka accepts (max.message.bytes), and whether the topic
 *	  is paused after a configuration or permission error.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_TOPICS_H
#define CQRS_TOPICS_H

#include <librdkafka/rdkafka.h>

#include "nodes/pg_list.h"
#include "utils/timestamp.h"

#define CQRS_TOPIC_MAXLEN 249

typedef struct CqrsTopic
{
	char		name[CQRS_TOPIC_MAXLEN + 1];	/* hash key */
	int			limit;			/* max.message.bytes, -1 when unknown */
	TimestampTz limit_checked_at;
	TimestampTz paused_until;	/* 0 when not paused */
	int			pause_ms;		/* length of the current pause */
	char		pause_reason[256];	/* the error that paused it */
	bool		dlt_written;	/* a dead-letter topic the relay wrote to */
} CqrsTopic;

extern CqrsTopic *cqrs_topic(const char *name);
extern int	cqrs_topic_limit(rd_kafka_t *rk, CqrsTopic *topic);
extern int	cqrs_topic_refresh_limit(rd_kafka_t *rk, CqrsTopic *topic);
extern int	cqrs_topics_min_limit(void);
extern void cqrs_topics_forget_limits(void);
extern bool cqrs_topic_paused(CqrsTopic *topic, TimestampTz now);
extern bool cqrs_topic_pause(CqrsTopic *topic, int base_ms, const char *reason);
extern CqrsTopic *cqrs_topics_first_paused(TimestampTz now);
extern List *cqrs_topics_dlt_written(void);
extern void cqrs_topic_resume(CqrsTopic *topic);

#endif							/* CQRS_TOPICS_H */
