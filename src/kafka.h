/*-------------------------------------------------------------------------
 *
 * kafka.h
 *	  The relay's Kafka producer (librdkafka): creation from settings and
 *	  the superuser-owned properties file, producing, delivery reports and
 *	  failure classification.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_KAFKA_H
#define CQRS_KAFKA_H

#include <librdkafka/rdkafka.h>

/* How a delivery failure is handled (DESIGN.md section 5). */
typedef enum CqrsFailureClass
{
	CQRS_FAIL_TRANSIENT,		/* outage, timeout: retry, spend no budget */
	CQRS_FAIL_MESSAGE,			/* this message is bad: spend its budget */
	CQRS_FAIL_CONFIG,			/* topic/permission/config: hold and alert */
	CQRS_FAIL_FATAL				/* producer unusable: re-create it */
} CqrsFailureClass;

/* One message of a batch, as the relay hands it to the producer. */
typedef struct CqrsMessage
{
	int64		id;				/* outbox id */
	const char *topic;
	const char *key;			/* NULL for a NULL key */
	int			keylen;
	const char *value;
	int			valuelen;
	const char *event_id;
	int			nheaders;
	const char **header_names;
	const char **header_values;

	/* filled by the delivery report */
	bool		done;
	rd_kafka_resp_err_t err;
} CqrsMessage;

extern rd_kafka_t *cqrs_kafka_create(int batch_bytes, char *errbuf, size_t errlen);
extern int	cqrs_kafka_topic_limit(rd_kafka_t *rk, const char *topic, int timeout_ms);
extern int	cqrs_kafka_message_size(const CqrsMessage *msg);
extern void cqrs_kafka_destroy(rd_kafka_t *rk, int timeout_ms);
extern rd_kafka_resp_err_t cqrs_kafka_produce(rd_kafka_t *rk, CqrsMessage *msg);
extern CqrsFailureClass cqrs_kafka_classify(rd_kafka_resp_err_t err);
extern bool cqrs_kafka_fatal(rd_kafka_t *rk, char *errbuf, size_t errlen);
extern bool cqrs_kafka_config_changed(void);

#endif							/* CQRS_KAFKA_H */
