/*-------------------------------------------------------------------------
 *
 * sink.h
 *	  The sink: the read side's consumer.  Sinks declared in SQL
 *	  (sink_catalog.c) are applied by the sink workers (sink_worker.c), a
 *	  batch or a held event per transaction (sink_apply.c), by a handler or
 *	  a declarative route (sink_route.c), with their state in shared memory
 *	  (sink_stats.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_SINK_H
#define CQRS_SINK_H

#include <librdkafka/rdkafka.h>

#include "executor/spi.h"
#include "fmgr.h"
#include "utils/timestamp.h"

/* WARNING codes of the sink (the relay's are CQ001 to CQ003) */
#define CQRS_ERRCODE_SINK_DLT_FAILED	MAKE_SQLSTATE('C','Q','0','1','0')
#define CQRS_ERRCODE_SINK_WAITING		MAKE_SQLSTATE('C','Q','0','1','1')

/* The value of x-failure-source in the sink's dead-letter records. */
#define CQRS_SINK_FAILURE_SOURCE	"SINK_HANDLER"

#define CQRS_SINK_NAMELEN		64	/* 63 characters and a terminator */
#define CQRS_SINK_MAX_WORKERS	64

/* Settings, defined in cqrs_sync.c */
extern char *cqrs_sink_database;
extern int	cqrs_sink_workers;
extern int	cqrs_sink_batch_size;

/* ---- a sink as the catalog declares it, and the worker's state of it ---- */

/* One partition assigned to this worker. */
typedef struct SinkPart
{
	char	   *topic;
	int32		partition;
	int64		position;		/* next offset to apply, as the database says */
	int32		epoch;			/* the position's epoch when it was read */
	bool		known;			/* a cqrs_sink_offset row exists */
	bool		resync;			/* drop what was fetched, seek to the position */
	bool		move;			/* first move the stored position from
								 * move_from to move_to (outside Kafka's
								 * offsets: consumer_error()) */
	int64		move_from;
	int64		move_to;
	int64		fetched;		/* offset after the last message fetched */
	TimestampTz oldest_unapplied;	/* Kafka time of the first message held */
	int64		asked_high;		/* high watermark asked of Kafka while
								 * fetching is paused (0: not asked) */
	int			shm_slot;		/* sink_stats.c's slot, -1 if none */
} SinkPart;

/* One message fetched and not yet applied. */
typedef struct SinkMsg
{
	rd_kafka_message_t *rkm;
	int			part;			/* index in Sink.parts */
} SinkMsg;

typedef struct Sink
{
	/* the definition (sink_catalog.c) */
	char		name[CQRS_SINK_NAMELEN];
	int			ntopics;
	char	  **topics;
	char	   *handler_name;	/* its signature, qualified; NULL: the route */
	Oid			handler;		/* handler_name's function (InvalidOid: none) */
	char	   *run_as_name;
	char	   *consumer;
	char	   *group_id;
	bool		paused;
	int			max_retries;
	int			retry_backoff_ms;
	char	   *dlt_topic;		/* NULL: topic || dlt_suffix */
	char	   *dlt_suffix;
	bool		start_latest;
	char	   *search_path;
	char	   *version_column; /* NULL: the setting's value */
	char	   *route_target;	/* the route, when handler is invalid */
	char	   *route_version;
	char	   *route_delete;	/* JSON text: a field name or an object */
	uint32		shape;			/* hash of what the consumer depends on */
	TimestampTz changed_at;		/* paused, resumed, rewound */
	TimestampTz created_at;		/* a sink of this name created again: another */

	/* resolved in the worker (sink_apply.c) */
	Oid			run_as;
	bool		usable;			/* handler, role and route resolved */
	char		problem[256];	/* why not */
	FmgrInfo	handler_finfo;
	struct SinkRoute *route;	/* sink_route.c */

	/* the consumer (sink_worker.c) */
	MemoryContext cxt;
	rd_kafka_t *rk;
	bool		seen;			/* still in the catalog */
	bool		subscribed;
	bool		kafka_paused;	/* partitions paused in librdkafka */
	TimestampTz watermarks_asked_at;	/* when asked_high was last asked */
	rd_kafka_topic_partition_list_t *pending_assign;	/* from the callback */
	bool		revoked;		/* the callback revoked the assignment */
	bool		assigned;
	bool		reassign;		/* a partition stopped at an offset Kafka
								 * lacks: assign again (a seek is refused) */
	int			nparts;
	SinkPart   *parts;
	int			nbatch;
	SinkMsg    *batch;
	int			batch_cap;

	/* waiting after a transient failure */
	int			failures;
	TimestampTz retry_at;
	int			held_last;		/* events the last batch held */
	bool		inbox_dups;		/* the inbox held some of the last ids */
	bool		kafka_commit_due;	/* positions not yet committed to Kafka */
	TimestampTz kafka_committed_at; /* when they last were */
	TimestampTz resync_retry_at;	/* flagged partitions not sought before */
} Sink;

/* What applying a batch came to. */
typedef enum SinkOutcome
{
	SINK_APPLIED,				/* committed */
	SINK_WAIT,					/* transient: try again later, spend nothing */
	SINK_GONE					/* the sink was dropped or paused meanwhile */
} SinkOutcome;

/* A dead letter to publish (sink_apply.c decides, sink_worker.c produces). */
typedef struct SinkDeadLetter
{
	int64		held_id;
	char		sink[CQRS_SINK_NAMELEN];
	char	   *dlt_topic;
	char	   *topic;
	int32		partition;
	int64		offset;
	char	   *key;
	bytea	   *value;
	char	   *headers_json;	/* the original headers */
	bytea	   *raw_key;		/* the key's bytes, when not text (else NULL) */
	char	   *raw_headers;	/* the headers exactly (cqrs_sink_held.raw_headers) */
	char	   *event_id;
	int			attempts;
	char	   *last_error;
} SinkDeadLetter;

/* sink_catalog.c */
extern bool sink_extension_ready(void);
extern char *sink_ext_schema(void);
extern List *sink_catalog_load(MemoryContext cxt);
extern void sink_catalog_forget(void);
extern Sink *sink_find(List *sinks, const char *name);

/* sink_apply.c */
extern void sink_resolve(Sink *sink);
extern SinkOutcome sink_apply_batch(Sink *sink, char *errbuf, size_t errlen);
extern bool sink_read_positions(Sink *sink, rd_kafka_topic_partition_list_t *parts);
extern int	sink_retry_due(List *sinks, List **dead_letters, TimestampTz *next_due,
						   char *errbuf, size_t errlen);
extern void sink_record_dead_letter(SinkDeadLetter *dl, bool ok, int32 dlt_partition,
									int64 dlt_offset, const char *error);
extern List *sink_fetch_requests(List *sinks);
extern void sink_record_fetched(Sink *sink, int64 held_id, rd_kafka_message_t *rkm,
								const char *error);
extern void sink_apply_reset(void);
extern void sink_forget_dead_letters(void);
extern volatile sig_atomic_t sink_in_user_code;
extern void sink_enter_user_code(void);
extern bool sink_error_is_transient(int sqlerrcode);

/* sink_route.c */
typedef struct SinkRoute SinkRoute;
extern SinkRoute *sink_route_prepare(const char *sink_name, Oid relid, const char *version,
									 const char *delete_spec, MemoryContext parent);
extern void sink_route_free(SinkRoute *route);
extern bool sink_route_valid(SinkRoute *route);
extern void sink_route_apply(SinkRoute *route, const char *sink_name, Datum payload);

/* sink_stats.c */
typedef enum SinkWorkerState
{
	SINK_STATE_STOPPED = 0,
	SINK_STATE_IDLE,			/* no sink, or no extension yet */
	SINK_STATE_RUNNING,
	SINK_STATE_WAITING_DATABASE,	/* a transient database error */
	SINK_STATE_WAITING_BROKER,	/* Kafka unreachable */
	SINK_STATE_NO_CONSUMER		/* the consumer cannot be created */
} SinkWorkerState;

extern void cqrs_sink_shmem_init(void);
extern bool sink_shmem_ready(void);
extern bool sink_worker_claim(int index);
extern void sink_worker_release(int index);
extern void sink_worker_set_state(int index, SinkWorkerState state, const char *error);
extern void sink_worker_set_counts(int index, int nsinks, int nparts);
extern void sink_worker_set_wanted(int wanted);
extern bool sink_worker_needs_launch(int index, TimestampTz now);
extern uint64 sink_catalog_generation(void);
extern int	sink_part_attach(int worker, const char *sink, const char *topic, int32 partition);
extern void sink_part_update(int slot, int64 high, int64 low, int64 fetched,
							 TimestampTz oldest_unapplied);
extern void sink_part_detach(int slot);

#endif							/* CQRS_SINK_H */
