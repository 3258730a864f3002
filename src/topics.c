/*-------------------------------------------------------------------------
 *
 * topics.c
 *	  Per-topic state of the relay (its own memory; the relay is the only
 *	  producer).
 *
 * Limits: librdkafka never splits a record batch, and a broker rejects a
 * whole batch (every message in it, however small) with MSG_SIZE_TOO_LARGE
 * when the batch exceeds the topic's max.message.bytes.  The relay asks each
 * topic's limit with DescribeConfigs, keeps the producer's batch.size at or
 * below the smallest limit, and fails locally only a message that alone
 * exceeds its topic's limit, so a small message is never dead-lettered for
 * the size of its batch.
 *
 * Pauses: a configuration or permission error (topic authorization, unknown
 * topic) is not the message's fault; the topic is held, with a pause that
 * doubles on each repeated failure up to a minute, and nothing is
 * dead-lettered.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "kafka.h"
#include "topics.h"

/* How long an unknown limit is trusted before asking again. */
#define LIMIT_RECHECK_MS	10000
/* DescribeConfigs timeout: short, a broker outage must not stall the relay. */
#define DESCRIBE_TIMEOUT_MS	2000
#define MAX_PAUSE_MS		60000

static HTAB *topics = NULL;

CqrsTopic *
cqrs_topic(const char *name)
{
	CqrsTopic  *topic;
	bool		found;
	char		key[CQRS_TOPIC_MAXLEN + 1];

	if (topics == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = CQRS_TOPIC_MAXLEN + 1;
		ctl.entrysize = sizeof(CqrsTopic);
		ctl.hcxt = TopMemoryContext;
		topics = hash_create("cqrs_sync topics", 64, &ctl,
							 HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	memset(key, 0, sizeof(key));
	strlcpy(key, name, sizeof(key));
	topic = hash_search(topics, key, HASH_ENTER, &found);
	if (!found)
	{
		topic->limit = -1;
		topic->limit_checked_at = 0;
		topic->paused_until = 0;
		topic->pause_ms = 0;
		topic->pause_reason[0] = '\0';
		topic->dlt_written = false;
	}
	return topic;
}

/*
 * The topic's max.message.bytes, asking Kafka when it is not known yet (at
 * most every LIMIT_RECHECK_MS); -1 when Kafka did not say, e.g. because the
 * topic does not exist before its first message creates it.
 */
int
cqrs_topic_limit(rd_kafka_t *rk, CqrsTopic *topic)
{
	TimestampTz now;

	if (topic->limit > 0)
		return topic->limit;
	now = GetCurrentTimestamp();
	if (topic->limit_checked_at != 0 &&
		!TimestampDifferenceExceeds(topic->limit_checked_at, now, LIMIT_RECHECK_MS))
		return -1;
	topic->limit_checked_at = now;
	topic->limit = cqrs_kafka_topic_limit(rk, topic->name, DESCRIBE_TIMEOUT_MS);
	return topic->limit;
}

/*
 * Ask again for a limit a message exceeds (an operator may have raised it
 * before retrying the message), at most once a second.
 */
int
cqrs_topic_refresh_limit(rd_kafka_t *rk, CqrsTopic *topic)
{
	TimestampTz now = GetCurrentTimestamp();

	if (!TimestampDifferenceExceeds(topic->limit_checked_at, now, 1000))
		return topic->limit;
	topic->limit_checked_at = now;
	topic->limit = cqrs_kafka_topic_limit(rk, topic->name, DESCRIBE_TIMEOUT_MS);
	return topic->limit;
}

/* The smallest limit known, or -1. */
int
cqrs_topics_min_limit(void)
{
	HASH_SEQ_STATUS seq;
	CqrsTopic  *topic;
	int			min = -1;

	if (topics == NULL)
		return -1;
	hash_seq_init(&seq, topics);
	while ((topic = hash_seq_search(&seq)) != NULL)
		if (topic->limit > 0 && (min < 0 || topic->limit < min))
			min = topic->limit;
	return min;
}

/* Forget what was learned (the Kafka settings changed). */
void
cqrs_topics_forget_limits(void)
{
	HASH_SEQ_STATUS seq;
	CqrsTopic  *topic;

	if (topics == NULL)
		return;
	hash_seq_init(&seq, topics);
	while ((topic = hash_seq_search(&seq)) != NULL)
	{
		topic->limit = -1;
		topic->limit_checked_at = 0;
	}
}

bool
cqrs_topic_paused(CqrsTopic *topic, TimestampTz now)
{
	return topic->paused_until != 0 && now < topic->paused_until;
}

/*
 * Pause the topic after a configuration error.  Returns true when the topic
 * was not paused before (the caller alerts once per pause, not per retry).
 */
bool
cqrs_topic_pause(CqrsTopic *topic, int base_ms, const char *reason)
{
	bool		newly = (topic->pause_ms == 0);

	strlcpy(topic->pause_reason, reason, sizeof(topic->pause_reason));
	topic->pause_ms = newly ? Max(base_ms, 1) : Min(topic->pause_ms * 2, MAX_PAUSE_MS);
	topic->paused_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  topic->pause_ms);
	return newly;
}

/* A message of the topic was delivered: it works again. */
void
cqrs_topic_resume(CqrsTopic *topic)
{
	topic->paused_until = 0;
	topic->pause_ms = 0;
}

/* A topic paused now, if any (for the relay's state). */
CqrsTopic *
cqrs_topics_first_paused(TimestampTz now)
{
	HASH_SEQ_STATUS seq;
	CqrsTopic  *topic;

	if (topics == NULL)
		return NULL;
	hash_seq_init(&seq, topics);
	while ((topic = hash_seq_search(&seq)) != NULL)
		if (cqrs_topic_paused(topic, now))
		{
			hash_seq_term(&seq);
			return topic;
		}
	return NULL;
}

/* Names of the dead-letter topics the relay wrote to (a List of strings). */
List *
cqrs_topics_dlt_written(void)
{
	HASH_SEQ_STATUS seq;
	CqrsTopic  *topic;
	List	   *names = NIL;

	if (topics == NULL)
		return NIL;
	hash_seq_init(&seq, topics);
	while ((topic = hash_seq_search(&seq)) != NULL)
		if (topic->dlt_written)
			names = lappend(names, pstrdup(topic->name));
	return names;
}
