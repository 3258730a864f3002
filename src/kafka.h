/*-------------------------------------------------------------------------
 *
 * kafka.h
 *	  cqrs_sync's Kafka clients (librdkafka): creation from settings and the
 *	  superuser-owned properties file, producing, delivery reports, failure
 *	  classification, topic limits, and the log lines librdkafka wants to
 *	  write (served by the worker, with secrets redacted).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_KAFKA_H
#define CQRS_KAFKA_H

#include <librdkafka/rdkafka.h>

#include "port/atomics.h"

/* The smallest batch.size a producer is given (bytes). */
#define CQRS_MIN_BATCH_BYTES 1024
/* A smaller batch.size waits at most this long for what is in flight (ms). */
#define CQRS_RESIZE_WAIT_MS 10000

/* How a delivery failure is handled (DESIGN.md section 5). */
typedef enum CqrsFailureClass
{
	CQRS_FAIL_TRANSIENT,		/* outage, timeout: retry, spend no budget */
	CQRS_FAIL_MESSAGE,			/* this message is bad: spend its budget */
	CQRS_FAIL_CONFIG,			/* topic/permission/config: hold and alert */
	CQRS_FAIL_FATAL				/* producer unusable: re-create it */
} CqrsFailureClass;

/* Which client: the relay's idempotent producer, or a plain one for metadata. */
typedef enum CqrsKafkaRole
{
	CQRS_KAFKA_RELAY,
	CQRS_KAFKA_MONITOR
} CqrsKafkaRole;

struct CqrsTopic;

/* One message as the relay hands it to the producer. */
typedef struct CqrsMessage
{
	int64		id;				/* outbox id */
	const char *topic;
	struct CqrsTopic *tstate;	/* the relay's state of the topic */
	const char *key;			/* NULL for a NULL key */
	int			keylen;
	const char *value;
	int			valuelen;
	const char *event_id;		/* NULL: no event_id header */
	int			nheaders;
	const char **header_names;
	const char **header_values; /* NULL: a null header */
	const int  *header_sizes;	/* NULL: the values are C strings */

	/* partition + 1 as chosen by the partitioner (0: not yet) */
	pg_atomic_uint32 partition;

	/* filled by the delivery report, in the worker's thread */
	bool		done;
	rd_kafka_resp_err_t err;
	int64		offset;			/* where Kafka wrote it, -1 if unknown */
} CqrsMessage;

/* Called for every delivery report, inside rd_kafka_poll(); must not elog. */
typedef void (*CqrsDeliveryHook) (CqrsMessage *msg);

extern rd_kafka_t *cqrs_kafka_create(CqrsKafkaRole role, int batch_bytes,
									 char *errbuf, size_t errlen);
extern void cqrs_kafka_destroy(rd_kafka_t *rk, int timeout_ms);
extern void cqrs_kafka_set_delivery_hook(CqrsDeliveryHook hook);
extern int	cqrs_kafka_event_fd(void);
extern void cqrs_kafka_drain_events(void);
extern bool cqrs_kafka_main_wakeups(bool on);
extern int	cqrs_kafka_serve(rd_kafka_t *rk);
extern void cqrs_kafka_emit_logs(const char *who);
extern bool cqrs_kafka_take_error(char *buf, size_t len);
extern bool cqrs_kafka_fatal(rd_kafka_t *rk, char *errbuf, size_t errlen);
extern bool cqrs_kafka_config_changed(void);
extern void cqrs_kafka_redact(char *text);

extern rd_kafka_resp_err_t cqrs_kafka_produce(rd_kafka_t *rk, CqrsMessage *msg);
extern int	cqrs_kafka_message_size(const CqrsMessage *msg);
extern int	cqrs_kafka_smaller_batch(int size, int limit, int batch_bytes,
									int wanted_bytes);
extern int	cqrs_kafka_fatal_pause_ms(int streak);
extern int32 cqrs_kafka_partition_of(const CqrsMessage *msg, int32 partition_cnt);
extern CqrsFailureClass cqrs_kafka_classify(rd_kafka_resp_err_t err);
extern const char *cqrs_kafka_error_text(rd_kafka_resp_err_t err, char *buf, size_t len);

/* the sink's consumers */
typedef void (*CqrsRebalanceHook) (rd_kafka_t *rk, rd_kafka_resp_err_t err,
								   rd_kafka_topic_partition_list_t *partitions,
								   void *opaque);
extern rd_kafka_t *cqrs_kafka_create_consumer(const char *group_id, const char *client_id,
											  void *opaque, CqrsRebalanceHook rebalance,
											  char *errbuf, size_t errlen);
extern void cqrs_kafka_destroy_consumer(rd_kafka_t *rk, int timeout_ms);

typedef struct CqrsPartitionOffset
{
	char		topic[250];
	int32		partition;
	int64		offset;
} CqrsPartitionOffset;
extern int	cqrs_kafka_offsets_for_time(char **topics, int ntopics, int64 at_ms,
										bool beginning, int timeout_ms,
										CqrsPartitionOffset **out,
										char *errbuf, size_t errlen);

/*
 * Topic limits (max.message.bytes) and compaction, asked asynchronously; how
 * a question came back (with OK, limit and compacted are -1 where Kafka did
 * not say).
 */
typedef enum CqrsAnswer
{
	CQRS_ANSWER_NONE,			/* no answer: a timeout, no broker reached,
								 * Kafka's UNKNOWN_SERVER_ERROR */
	CQRS_ANSWER_ERROR,			/* Kafka answered with an error: no
								 * permission, no such topic */
	CQRS_ANSWER_OK
} CqrsAnswer;

typedef void (*CqrsLimitHook) (const char *topic, CqrsAnswer answer, int limit, int compacted);
extern void cqrs_kafka_request_limit(rd_kafka_t *rk, const char *topic);
extern void cqrs_kafka_collect_limits(CqrsLimitHook hook);

#endif							/* CQRS_KAFKA_H */
