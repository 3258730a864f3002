/*-------------------------------------------------------------------------
 *
 * topics.c
 *	  Per-topic state of the relay (its own memory; the relay is the only
 *	  producer).
 *
 * Limits: librdkafka never splits a record batch, and a broker rejects a
 * whole batch (every message in it, however small) with MSG_SIZE_TOO_LARGE
 * when the batch exceeds the topic's max.message.bytes.  The relay asks each
 * topic's limit with DescribeConfigs, without waiting for the answer, asks
 * again every LIMIT_TTL_MS and after every size error, and keeps the
 * producer's batch.size at or below the smallest limit known (relay_worker.c
 * re-creates the producer when that changes).  What it does when a limit is
 * unknown is in relay_pipeline.c (a batch too large is shrunk, free).
 *
 * Pauses: a configuration or permission error (topic authorization, unknown
 * topic) is not the message's fault; the topic is held, with a pause that
 * doubles on each repeated failure up to a minute, and nothing is
 * dead-lettered.  While a topic is paused the relay's scans skip its rows;
 * resume_from remembers where the first skipped one may be.
 *
 * Partitions: the relay counts messages in flight per partition; one whose
 * oldest message waits much longer than Kafka takes to answer others is
 * stalled (relay_pipeline.c), and its keys are held until it answers again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "kafka.h"
#include "shmem.h"
#include "topics.h"

/* A known limit is asked again after this long; an unknown one sooner. */
#define LIMIT_TTL_MS		600000
/*
 * What Kafka told is kept this long after its last answer while questions
 * go unanswered: longer than LIMIT_TTL_MS, so that a routine question that
 * finds a broker not answering does not forget it at once.
 */
#define LIMIT_KEEP_MS		(3 * LIMIT_TTL_MS)
/* A new topic's rows wait this long at most for the first answer. */
#define LIMIT_WAIT_MS		2000
#define LIMIT_RETRY_MS		10000

/*
 * A question still unanswered after this long counts as not answered.  librdkafka
 * is asked to give up after 10 s (cqrs_kafka_request_limit()), but a request
 * sent to a broker that stopped answering was seen to wait for
 * socket.timeout.ms (60 s by default) instead.
 */
#define LIMIT_ANSWER_MS		15000
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
		memset(((char *) topic) + sizeof(topic->name), 0,
			   sizeof(CqrsTopic) - sizeof(topic->name));
		topic->limit = -1;
		topic->compacted = -1;
		topic->resume_from = PG_INT64_MAX;
		pg_atomic_init_u32(&topic->partition_cnt, 0);
	}
	return topic;
}

void
cqrs_topics_visit(CqrsTopicVisitor visitor, void *arg)
{
	HASH_SEQ_STATUS seq;
	CqrsTopic  *topic;

	if (topics == NULL)
		return;
	hash_seq_init(&seq, topics);
	while ((topic = hash_seq_search(&seq)) != NULL)
		visitor(topic, arg);
}

/* The topic's handle for this producer (created once). */
rd_kafka_topic_t *
cqrs_topic_handle(rd_kafka_t *rk, CqrsTopic *topic)
{
	if (topic->rkt == NULL)
		topic->rkt = rd_kafka_topic_new(rk, topic->name, NULL);
	return topic->rkt;
}

static void
forget_producer(CqrsTopic *topic, void *arg)
{
	if (topic->rkt)
		rd_kafka_topic_destroy(topic->rkt);
	topic->rkt = NULL;
	topic->limit_pending = false;	/* its answer went with the producer */
	topic->given_up_at = 0;
}

/* The producer is about to be destroyed: drop what belongs to it. */
void
cqrs_topics_forget_producer(void)
{
	cqrs_topics_visit(forget_producer, NULL);
}

/* ---- limits ---------------------------------------------------------------- */

/*
 * What a question that came back tells; one given up counts as not
 * answered.
 *
 * Kafka's answer renews what is known.  An answer with an error (no
 * DescribeConfigs permission, no such topic) forgets the limit: an
 * operator may have raised it since, and the relay cannot learn it, so a
 * row larger than the old one goes to Kafka, which decides (a row too large
 * is then refused alone: the batch.size is at or below the old limit).  No
 * answer (a timeout, a broker that stopped answering) keeps the limit: a
 * message Kafka refuses makes librdkafka's idempotent producer wait, before
 * it sends anything more, for every request in flight
 * (rd_kafka_idemp_drain_epoch_bump(), called from librdkafka's
 * rdkafka_request.c), and the broker that did not answer may hold some of
 * those for socket.timeout.ms: every partition would wait that long.  Either
 * keeps the compaction, and no answer the limit, for at most LIMIT_KEEP_MS
 * after Kafka last answered.
 */
static void
question_back(CqrsTopic *topic, CqrsAnswer answer, int limit, int compacted,
			  bool given_up)
{
	TimestampTz now = GetCurrentTimestamp();

	topic->limit_pending = false;
	topic->back_asked_at = topic->limit_asked_at;
	if (topic->given_up_at != 0 && !given_up)
	{
		/* it may be the answer to that one: counted as asked then */
		topic->back_asked_at = topic->given_up_at;
		topic->given_up_at = 0;
	}
	else if (given_up && topic->given_up_at == 0)
		topic->given_up_at = topic->limit_asked_at;
	if (answer == CQRS_ANSWER_OK)
	{
		topic->limit = limit > 0 ? limit : -1;
		topic->answered_at = now;
		if (compacted >= 0)
			topic->compacted = compacted;
		return;
	}
	if (answer == CQRS_ANSWER_ERROR)
		topic->limit = -1;
	if (TimestampDifferenceExceeds(topic->answered_at, now, LIMIT_KEEP_MS))
	{
		topic->limit = -1;
		topic->compacted = -1;
	}
}

/*
 * Ask for the topic's limit when it was never asked, when the known limit is
 * older than LIMIT_TTL_MS, when an unknown one was asked more than
 * LIMIT_RETRY_MS ago, or (now) at once after a size error.
 */
void
cqrs_topic_want_limit(rd_kafka_t *rk, CqrsTopic *topic, bool now)
{
	TimestampTz t = GetCurrentTimestamp();
	int			interval;

	/*
	 * Given up: a new question may go.  Which question a later answer
	 * answers is not known: the first one to come back counts as asked when
	 * the oldest given up was: it confirms only refusals from before that.
	 */
	if (topic->limit_pending && rk != NULL &&
		TimestampDifferenceExceeds(topic->limit_asked_at, t, LIMIT_ANSWER_MS))
		question_back(topic, CQRS_ANSWER_NONE, -1, -1, true);
	if (topic->limit_pending || rk == NULL)
		return;
	/* a limit kept after a question Kafka did not answer is asked sooner */
	interval = (topic->limit > 0 && topic->answered_at >= topic->limit_asked_at) ?
		LIMIT_TTL_MS : LIMIT_RETRY_MS;
	if (!now && topic->limit_asked_at != 0 &&
		!TimestampDifferenceExceeds(topic->limit_asked_at, t, interval))
		return;
	/* the first time: its rows wait for the answer, briefly */
	if (topic->limit_asked_at == 0)
		topic->limit_wait_until = TimestampTzPlusMilliseconds(t, LIMIT_WAIT_MS);
	topic->limit_asked_at = t;
	topic->limit_pending = true;
	cqrs_kafka_request_limit(rk, topic->name);
}

/*
 * A question came back: answered, with max.message.bytes and whether
 * cleanup.policy has compact (-1: Kafka did not say), answered with an
 * error, or not answered (question_back() says what each keeps).  A row
 * refused for what was known is charged for what is known now, once a
 * question asked after its first refusal came back (relay_pipeline.c).
 * Returns the lowest id of the rows that waited for it (PG_INT64_MAX: none).
 */
int64
cqrs_topic_learn_limit(const char *name, CqrsAnswer answer, int limit,
					   int compacted)
{
	CqrsTopic  *topic = cqrs_topic(name);
	int64		resume = PG_INT64_MAX;

	question_back(topic, answer, limit, compacted, false);
	if (topic->limit_wait_until != 0)
	{
		topic->limit_wait_until = 0;
		if (topic->paused_until == 0)
		{
			resume = topic->resume_from;
			topic->resume_from = PG_INT64_MAX;
		}
	}
	return resume;
}

/*
 * The partition for a message without a key while some of the topic's
 * partitions are stalled: a healthy one, chosen by seed.  The partitioner
 * would send it to any, the stalled ones too, where it would wait as long
 * as they stall and keep its claim's memory.  -1 (the partitioner chooses)
 * when none is stalled, all are, or the count is not known yet.  In the
 * relay's thread.
 */
int32
cqrs_topic_keyless_partition(CqrsTopic *topic, uint64 seed)
{
	int			cnt = (int) pg_atomic_read_u32(&topic->partition_cnt);
	int			nstalled = 0;
	int			k;

	for (int p = 0; p < Min(cnt, topic->nparts); p++)
		if (topic->parts[p].stalled)
			nstalled++;
	if (nstalled == 0 || nstalled >= cnt)
		return -1;
	k = (int) (seed % (uint64) (cnt - nstalled));
	for (int p = 0; p < cnt; p++)
	{
		if (p < topic->nparts && topic->parts[p].stalled)
			continue;
		if (k-- == 0)
			return p;
	}
	return -1;
}

/* The smallest limit known, or -1. */
static void
min_limit(CqrsTopic *topic, void *arg)
{
	int		   *min = arg;

	if (topic->limit > 0 && (*min < 0 || topic->limit < *min))
		*min = topic->limit;
}

int
cqrs_topics_min_limit(void)
{
	int			min = -1;

	cqrs_topics_visit(min_limit, &min);
	return min;
}

static void
forget_limit(CqrsTopic *topic, void *arg)
{
	topic->limit = -1;
	topic->compacted = -1;
	topic->limit_asked_at = 0;
	topic->back_asked_at = 0;
	topic->given_up_at = 0;
	topic->answered_at = 0;
	topic->limit_pending = false;
}

/* Forget what was learned (the Kafka settings changed). */
void
cqrs_topics_forget_limits(void)
{
	cqrs_topics_visit(forget_limit, NULL);
}

/* ---- pauses ------------------------------------------------------------------ */

/* Do the topic's rows wait now (a pause, or the first answer about its limit)? */
bool
cqrs_topic_paused(CqrsTopic *topic, TimestampTz now)
{
	return (topic->paused_until != 0 && now < topic->paused_until) ||
		(topic->limit_wait_until != 0 && now < topic->limit_wait_until);
}

/*
 * Pause the topic after a configuration error.  Returns true when the topic
 * was not paused before (the caller alerts once per pause, not per retry).
 */
bool
cqrs_topic_pause(CqrsTopic *topic, int base_ms, const char *reason)
{
	bool		newly = (topic->pause_ms == 0);
	TimestampTz now = GetCurrentTimestamp();

	topic->failed_at = now;
	/* several failures of one attempt extend nothing */
	if (cqrs_topic_paused(topic, now))
		return false;
	strlcpy(topic->pause_reason, reason, sizeof(topic->pause_reason));
	topic->pause_ms = newly ? Min(Max(base_ms, 1), MAX_PAUSE_MS) :
		Min(topic->pause_ms * 2, MAX_PAUSE_MS);
	topic->paused_until = TimestampTzPlusMilliseconds(now, topic->pause_ms);
	return newly;
}

/* A message of the topic was delivered: it works again. */
void
cqrs_topic_resume(CqrsTopic *topic)
{
	topic->paused_until = 0;
	topic->pause_ms = 0;
}

typedef struct PausedScan
{
	TimestampTz now;
	CqrsTopic  *first;
	List	   *names;
	int64		resume_from;
	TimestampTz next;
	int64		skipped_from;
} PausedScan;

static void
first_paused(CqrsTopic *topic, void *arg)
{
	PausedScan *ps = arg;

	/*
	 * A configuration error's pause (not the wait for a limit): while paused,
	 * and while its retries keep failing (the last failure is less than two
	 * pauses old); a delivery, or no more rows to try, ends it.
	 */
	if (ps->first == NULL && topic->pause_ms != 0 &&
		!TimestampDifferenceExceeds(topic->failed_at, ps->now, 2 * topic->pause_ms + 1000))
		ps->first = topic;
}

/* A topic paused now, if any (for the relay's state). */
CqrsTopic *
cqrs_topics_first_paused(TimestampTz now)
{
	PausedScan	ps = {.now = now};

	cqrs_topics_visit(first_paused, &ps);
	return ps.first;
}

static void
paused_name(CqrsTopic *topic, void *arg)
{
	PausedScan *ps = arg;

	if (cqrs_topic_paused(topic, ps->now))
		ps->names = lappend(ps->names, topic->name);
}

/* Names of the topics paused now (pointers into the topics' state). */
List *
cqrs_topics_paused_names(TimestampTz now)
{
	PausedScan	ps = {.now = now};

	cqrs_topics_visit(paused_name, &ps);
	return ps.names;
}

static void
expire_pause(CqrsTopic *topic, void *arg)
{
	PausedScan *ps = arg;

	/* no answer about the limit in time: go on without it */
	if (topic->limit_wait_until != 0 && ps->now >= topic->limit_wait_until)
		topic->limit_wait_until = 0;
	if (topic->paused_until != 0 && ps->now >= topic->paused_until)
		topic->paused_until = 0;	/* the pause lapsed (pause_ms stays) */
	if (topic->paused_until == 0 && topic->limit_wait_until == 0)
	{
		/* its rows are tried again */
		ps->resume_from = Min(ps->resume_from, topic->resume_from);
		topic->resume_from = PG_INT64_MAX;
		return;
	}
	if (topic->paused_until != 0 && (ps->next == 0 || topic->paused_until < ps->next))
		ps->next = topic->paused_until;
	if (topic->limit_wait_until != 0 &&
		(ps->next == 0 || topic->limit_wait_until < ps->next))
		ps->next = topic->limit_wait_until;
}

/*
 * End the pauses that lapsed.  Returns the lowest id their scans skipped
 * (PG_INT64_MAX: none); *next is set to the end of the next pause (0: none).
 */
int64
cqrs_topics_expire_pauses(TimestampTz now, TimestampTz *next)
{
	PausedScan	ps = {.now = now, .resume_from = PG_INT64_MAX};

	cqrs_topics_visit(expire_pause, &ps);
	*next = ps.next;
	return ps.resume_from;
}

static void
note_skipped(CqrsTopic *topic, void *arg)
{
	PausedScan *ps = arg;

	if (cqrs_topic_paused(topic, ps->now))
		topic->resume_from = Min(topic->resume_from, ps->skipped_from);
}

/* A scan from id from skipped the rows of every topic paused now. */
void
cqrs_topics_note_skipped(TimestampTz now, int64 from)
{
	PausedScan	ps = {.now = now, .skipped_from = from};

	cqrs_topics_visit(note_skipped, &ps);
}

static void
resume_floor(CqrsTopic *topic, void *arg)
{
	int64	   *floor = arg;

	*floor = Min(*floor, topic->resume_from);
	for (int p = 0; p < topic->nparts; p++)
		*floor = Min(*floor, topic->parts[p].resume_from);
}

/*
 * The lowest id held for a topic or a partition (paused, waiting for its
 * limit, stalled), to come back to when that ends; PG_INT64_MAX: none.
 */
int64
cqrs_topics_resume_floor(void)
{
	int64		floor = PG_INT64_MAX;

	cqrs_topics_visit(resume_floor, &floor);
	return floor;
}

/* ---- partitions ------------------------------------------------------------------ */

/* The state of one partition; NULL when the topic's partitions are unknown. */
CqrsPartition *
cqrs_topic_partition(CqrsTopic *topic, int32 partition)
{
	int			cnt = (int) pg_atomic_read_u32(&topic->partition_cnt);

	if (partition < 0)
		return NULL;
	cnt = Max(cnt, partition + 1);
	if (cnt > topic->nparts)
	{
		CqrsPartition *parts = MemoryContextAllocZero(TopMemoryContext,
													  sizeof(CqrsPartition) * cnt);

		if (topic->parts)
		{
			memcpy(parts, topic->parts, sizeof(CqrsPartition) * topic->nparts);
			pfree(topic->parts);
		}
		for (int p = topic->nparts; p < cnt; p++)
			parts[p].resume_from = PG_INT64_MAX;
		topic->parts = parts;
		topic->nparts = cnt;
	}
	return &topic->parts[partition];
}

typedef struct StalledText
{
	char	   *buf;
	size_t		len;
	int			n;
	bool		cut;
} StalledText;

/* what ends a text with no room for every name */
#define STALLED_CUT ", ..."

static void
stalled_text(CqrsTopic *topic, void *arg)
{
	StalledText *st = arg;

	for (int p = 0; p < topic->nparts; p++)
	{
		size_t		used;
		char		entry[CQRS_TOPIC_NAMELEN + 16];

		if (!topic->parts[p].stalled)
			continue;
		st->n++;
		if (st->cut)
			continue;
		used = strlen(st->buf);
		snprintf(entry, sizeof(entry), "%s%s[%d]", used > 0 ? ", " : "", topic->name, p);
		/* room for this one and for the mark of a cut */
		if (used + strlen(entry) + strlen(STALLED_CUT) < st->len)
			strcpy(st->buf + used, entry);
		else
		{
			st->cut = true;
			strcpy(st->buf + used, used > 0 ? STALLED_CUT : "...");
		}
	}
}

/*
 * "topic[p], ..." of the stalled partitions in buf (len at least
 * CQRS_TOPIC_NAMELEN + 16); names that do not fit are left out, and the text
 * then ends with ", ...".  Returns how many partitions are stalled.
 */
int
cqrs_topics_stalled_text(char *buf, size_t len)
{
	StalledText st = {buf, len, 0, false};

	buf[0] = '\0';
	cqrs_topics_visit(stalled_text, &st);
	return st.n;
}
