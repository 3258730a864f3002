/*-------------------------------------------------------------------------
 *
 * relay.h
 *	  Private declarations of the outbox relay, shared by its files:
 *
 *	  relay_worker.c	the worker: its loop, settings, transactions, error
 *						recovery, and the producer's life cycle
 *	  relay_pipeline.c	the pipeline: claiming rows, producing them,
 *						serving delivery reports, dead-lettering, stalls
 *	  relay_order.c		per-key order: which rows may go now, and where the
 *						scan must go back to when a reason to wait ends
 *	  relay_record.c	recording outcomes in the outbox, and alerts
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_RELAY_H
#define CQRS_RELAY_H

#include "executor/spi.h"
#include "lib/ilist.h"
#include "utils/timestamp.h"

#include "kafka.h"
#include "topics.h"

/* SQLSTATEs of the relay's alerts (class CQ: cqrs_sync) */
#define CQRS_ERRCODE_DLT_FAILED			MAKE_SQLSTATE('C','Q','0','0','1')
#define CQRS_ERRCODE_TOPIC_PAUSED		MAKE_SQLSTATE('C','Q','0','0','2')
#define CQRS_ERRCODE_PARTITION_STALLED	MAKE_SQLSTATE('C','Q','0','0','3')

/* What became of a row the relay produced. */
typedef enum RelayOutcome
{
	RO_NONE = 0,				/* still in flight */
	RO_SENT,					/* acknowledged: mark SENT (or delete) */
	RO_REDO,					/* acknowledged, but an earlier row of its key
								 * failed: stays PENDING, sent again after it */
	RO_RETRY,					/* failed: stays PENDING, tried after delay_ms */
	RO_DEAD,					/* its dead letter was acknowledged */
	RO_DLT_FAILED				/* the dead-letter topic refused it too */
} RelayOutcome;

struct RelayClaim;

/* One outbox row in the relay's hands, from claim to recorded outcome. */
typedef struct RelayRow
{
	CqrsMessage msg;			/* first: the delivery report's opaque */
	struct RelayClaim *claim;	/* whose memory it lives in */
	uint64		keyhash;		/* the key's hash, as the registry has it */
	uint64		holdhash;		/* hash of (topic, key): the unit of order */
	int			retry_count;
	TimestampTz produced_at;
	const char *topic;			/* its topic (msg.topic becomes the DLT's) */
	bool		dlt;			/* msg is now its dead letter */
	bool		published;		/* its id is in the shared table */
	bool		stalled_counted;	/* in n_stalled_inflight (relay_pipeline.c) */
	RelayOutcome outcome;
	int			inc;			/* retry budget spent (RO_RETRY) */
	int			delay_ms;		/* RO_RETRY */
	char	   *error;			/* why it failed */
	char	   *dlt_error;		/* why its dead letter failed */
	bool		dlt_attempt_failed; /* it was published to its dead-letter
									 * topic, which refused it or failed */
	bool		newly_paused;	/* its failure paused its topic */
	bool		failure_noted;	/* relay_order.c knows of its failure */
	dlist_node	node;			/* in flight, or reported, or done */
} RelayRow;

/* Rows claimed together share one memory context. */
typedef struct RelayClaim
{
	MemoryContext cxt;
	int			nopen;			/* rows not yet recorded */
	int			nrows;			/* rows claimed (the memory it keeps) */
	uint64		discard_seq;	/* cqrs_shared->discard_seq before the scan */
} RelayClaim;

/* ---- relay_worker.c ---- */
extern rd_kafka_t *relay_producer;
extern int	relay_producer_batch_bytes;
extern bool relay_batch_refused(int size, int limit);

/* ---- relay_pipeline.c ---- */
extern void pipeline_init(void);
extern void pipeline_reset(void);
extern void pipeline_prepare(Oid outbox, Oid seq, const char *mark);
extern int	pipeline_window(void);
extern int	pipeline_room(void);
extern int	pipeline_inflight(void);
extern bool pipeline_has_reports(void);
extern TimestampTz pipeline_oldest_report(void);
extern TimestampTz pipeline_reports_may_wait(void);
extern bool pipeline_has_claimed(void);
extern bool pipeline_more_ready(void);
extern bool pipeline_idle(void);
extern bool pipeline_awaiting_reports(void);
extern bool pipeline_only_stalled(void);
extern bool pipeline_only_inflight(void);
extern void pipeline_committed(void);
extern TimestampTz pipeline_last_ack(void);
extern int64 pipeline_cursor(void);
extern TimestampTz pipeline_timers(TimestampTz now);
extern int	pipeline_claim(int limit, TimestampTz now);
extern XLogRecPtr pipeline_claimed_lsn(void);
extern void pipeline_claim_commit(void);
extern void pipeline_claim_abort(void);
extern void pipeline_produce_claimed(void);
extern void pipeline_serve_reports(void);
extern void pipeline_abandon_inflight(rd_kafka_resp_err_t err);
extern void pipeline_check_stalls(TimestampTz now, List **newly);
extern bool pipeline_broker_waiting(TimestampTz now);
extern dlist_head *pipeline_done_rows(void);
extern void pipeline_recorded(void);
extern void pipeline_learn_limit(const char *topic, CqrsAnswer answer, int limit, int compacted);
extern bool pipeline_needs_mark(void);
extern void pipeline_read_mark(void);
extern void pipeline_write_mark(TimestampTz now);

/* ---- relay_order.c ---- */
typedef enum OrderVerdict
{
	ORDER_GO,					/* produce it now */
	ORDER_HOLD,					/* it waits; the scan walks past it */
	ORDER_SKIP					/* it is in flight already */
} OrderVerdict;

extern void order_init(int nslots);
extern void order_reset(void);
extern void order_start_at(int64 from);
extern int64 order_floor(void);
extern int64 order_read_registry(int64 hw, int64 cursor);
extern int64 order_scan_start(int64 cursor);
extern void order_revisit(int64 from);
extern bool order_revisit_pending(int64 cursor);
extern OrderVerdict order_judge(RelayRow *row, bool waiting, TimestampTz next_attempt_at);
extern void order_hold(RelayRow *row);
extern void order_produced(RelayRow *row);
extern RelayOutcome order_acked(RelayRow *row);
extern bool order_failed(RelayRow *row, bool was_inflight);
extern bool order_blocked(RelayRow *row);
extern bool order_failed_first(RelayRow *row);
extern void order_recorded(RelayRow *row);
extern TimestampTz order_expire(TimestampTz now, int64 cursor);

/* ---- relay_record.c ---- */
extern void record_prepare(const char *outbox, const char *audit);
extern int	record_outcomes(dlist_head *rows, TimestampTz acked_at);
extern void record_after_commit(dlist_head *rows);
extern void record_queue_alert(const char *json);
extern bool record_alerts_queued(void);
extern void record_forget_alerts(void);

#endif							/* CQRS_RELAY_H */
