/*-------------------------------------------------------------------------
 *
 * topics.h
 *	  What the relay knows about each topic it produces to: the largest
 *	  record batch Kafka accepts (max.message.bytes), whether the topic is
 *	  paused after a configuration or permission error, its partition count
 *	  and which of its partitions stall.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_TOPICS_H
#define CQRS_TOPICS_H

#include <librdkafka/rdkafka.h>

#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "utils/timestamp.h"

#include "kafka.h"

#define CQRS_TOPIC_MAXLEN 249

/* A partition of a topic, as the relay sees it. */
typedef struct CqrsPartition
{
	TimestampTz last_ack_at;	/* last report from Kafka (relay_pipeline.c) */
	bool		stalled;		/* its keys are held */
	int64		resume_from;	/* lowest id held for it (PG_INT64_MAX: none) */
	TimestampTz oldest;			/* scratch of the stall check: oldest in
								 * flight, 0 = none */
} CqrsPartition;

typedef struct CqrsTopic
{
	char		name[CQRS_TOPIC_MAXLEN + 1];	/* hash key */

	/* max.message.bytes: -1 when unknown */
	int			limit;
	/* cleanup.policy has compact (it refuses null keys): -1 when unknown */
	int			compacted;
	TimestampTz limit_asked_at;
	TimestampTz given_up_at;	/* when the oldest question given up but
								 * still out was asked (0: none) */
	TimestampTz back_asked_at;	/* when the question that last came back
								 * (answered or not) was asked */
	TimestampTz answered_at;	/* when Kafka last answered without error */
	bool		limit_pending;	/* a DescribeConfigs is under way */

	/* rows wait for the first answer about the limit, until then at most */
	TimestampTz limit_wait_until;

	/* pause after a configuration error */
	TimestampTz paused_until;	/* 0 when not paused */
	int			pause_ms;		/* length of the current pause */
	TimestampTz failed_at;		/* the last configuration error */
	char		pause_reason[256];	/* the error that paused it */
	int64		resume_from;	/* lowest id skipped while paused */

	/* partitions: the count is written by the partitioner (any thread) */
	pg_atomic_uint32 partition_cnt;
	int			nparts;			/* entries in parts */
	CqrsPartition *parts;

	rd_kafka_topic_t *rkt;		/* handle of the current producer */
} CqrsTopic;

extern CqrsTopic *cqrs_topic(const char *name);
extern int32 cqrs_topic_keyless_partition(CqrsTopic *topic, uint64 seed);
extern rd_kafka_topic_t *cqrs_topic_handle(rd_kafka_t *rk, CqrsTopic *topic);
extern void cqrs_topics_forget_producer(void);

/* limits */
extern void cqrs_topic_want_limit(rd_kafka_t *rk, CqrsTopic *topic, bool now);
extern int64 cqrs_topic_learn_limit(const char *name, CqrsAnswer answer, int limit,
									 int compacted);
extern int	cqrs_topics_min_limit(void);
extern void cqrs_topics_forget_limits(void);

/*
 * Kafka refuses a message without a key to a compacted topic, and with it
 * every other message of its record batch (INVALID_RECORD, the same error
 * for all: librdkafka cannot tell which was at fault).  Such a message fails
 * before it is produced, alone.
 */
#define CQRS_KEYLESS_TO_COMPACTED \
	"INVALID_RECORD: the topic is compacted (cleanup.policy) and refuses a message without a key"

static inline bool
cqrs_topic_refuses_keyless(const CqrsTopic *topic, const void *key)
{
	return key == NULL && topic->compacted == 1;
}

/* pauses */
extern bool cqrs_topic_paused(CqrsTopic *topic, TimestampTz now);
extern bool cqrs_topic_pause(CqrsTopic *topic, int base_ms, const char *reason);
extern void cqrs_topic_resume(CqrsTopic *topic);
extern CqrsTopic *cqrs_topics_first_paused(TimestampTz now);
extern List *cqrs_topics_paused_names(TimestampTz now);
extern int64 cqrs_topics_expire_pauses(TimestampTz now, TimestampTz *next);
extern void cqrs_topics_note_skipped(TimestampTz now, int64 from);
extern int64 cqrs_topics_resume_floor(void);

/* partitions */
extern CqrsPartition *cqrs_topic_partition(CqrsTopic *topic, int32 partition);
extern int	cqrs_topics_stalled_text(char *buf, size_t len);

/* iterate over every topic */
typedef void (*CqrsTopicVisitor) (CqrsTopic *topic, void *arg);
extern void cqrs_topics_visit(CqrsTopicVisitor visitor, void *arg);

#endif							/* CQRS_TOPICS_H */
