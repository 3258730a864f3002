/*-------------------------------------------------------------------------
 *
 * sink_worker.c
 *	  The sink workers ("cqrs_sync sink"): their loop, their Kafka consumers
 *	  and the consumer groups' rebalances, the producer of dead letters, and
 *	  replays read from dead-letter topics.
 *
 *	  cqrs_sync.sink_workers workers run in cqrs_sync.sink_database.  Worker
 *	  0 is registered at start-up and starts the others (dynamic background
 *	  workers) as the setting asks, also after a reload; a worker whose
 *	  number is no longer wanted leaves its groups and exits for good.  Every
 *	  worker runs one consumer per sink, a member of the sink's consumer
 *	  group: Kafka's group protocol shares the partitions between the
 *	  workers of this server and those of other servers.
 *
 *	  On assignment the worker reads the partitions' positions from the
 *	  database (cqrs_sink_offset), not Kafka's committed offsets, and starts
 *	  there; librdkafka's rebalance callback only records the assignment
 *	  (it runs inside rd_kafka_consumer_poll(), where nothing may elog), the
 *	  worker reads the positions and calls rd_kafka_assign() afterwards.
 *	  After each committed batch it commits the new positions to Kafka too
 *	  (asynchronously), so that Kafka's lag tools see them; nothing reads
 *	  them back.
 *
 *	  The loop waits on its latch (a sink changed, an operator replayed an
 *	  event), librdkafka's event pipe (messages, rebalances, delivery
 *	  reports, logs) and postmaster death.  Each turn it reads the catalog if
 *	  it changed, serves the consumers (a batch per sink, up to
 *	  cqrs_sync.sink_batch_size messages: what is there, without waiting for
 *	  more), applies the batches (sink_apply.c), tries due held events again,
 *	  and publishes its state.  A transient failure leaves the batch in
 *	  memory, pauses the sink's partitions in librdkafka (no more fetching;
 *	  the consumer stays in its group) and tries again after a growing
 *	  pause; its state says "waiting for database" and a WARNING (SQLSTATE
 *	  CQ011) and a notification on cqrs_sync_alert go out.  It exits with
 *	  code 1 on SIGTERM, after leaving its groups.
 *
 *	  Dead letters go through an idempotent producer of the worker's own,
 *	  kept as the relay keeps its producer (DESIGN.md section 5): its
 *	  batch.size within the smallest max.message.bytes known of the
 *	  dead-letter topics (topics.c), a batch refused as too large produced
 *	  again in smaller ones, and the producer re-created after a fatal
 *	  error.  Only the dead-letter topic's refusal of the dead letter itself
 *	  makes it DLT_FAILED.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <setjmp.h>

#include "access/xact.h"
#include "common/base64.h"
#include "executor/spi.h"
#include "libpq/pqsignal.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cqrs_sync.h"
#include "kafka.h"
#include "shmem.h"
#include "sink.h"
#include "sink_worker.h"
#include "topics.h"
#include "util.h"

PGDLLEXPORT void cqrs_sink_main(Datum main_arg);

/* The catalog is read at least this often (ms). */
#define CATALOG_MS			5000
/* Held events are looked for at least this often (ms). */
#define RETRY_POLL_MS		5000
/*
 * A Kafka transport error within this time means "waiting for broker", until
 * a message is fetched.  librdkafka reports a repeated error of a broker once
 * per 30 s: a shorter window would say "running" for most of an outage.
 */
#define BROKER_ERROR_MS		45000
/* Longest pause after transient failures (ms). */
#define MAX_BACKOFF_MS		5000
/* How long a replay waits for its message (ms). */
#define FETCH_TIMEOUT_MS	30000
/*
 * While fetching is paused, the high watermarks are asked of Kafka this often
 * (ms), and the worker waits this long for the answer (ms).
 */
#define WATERMARKS_MS		5000
#define WATERMARKS_TIMEOUT_MS	500
/* How long a position beyond Kafka's offsets waits for them to be asked (ms). */
#define RESET_OFFSETS_TIMEOUT_MS	5000
/*
 * The positions are committed to Kafka (for its lag tools only) at most this
 * often (ms), and when a sink's partitions are revoked or its consumer closed:
 * a commit per batch cost the broker an offset commit per transaction.
 */
#define KAFKA_COMMIT_MS		1000

static int	my_index = 0;
static char *connected_db = NULL;
static List *sinks = NIL;		/* Sink *, in TopMemoryContext */
static bool ext_ready = false;
static uint64 catalog_gen = 0;
static TimestampTz next_catalog_at = 0;
static TimestampTz next_retry_at = 0;
static TimestampTz retry_error_until = 0;
static TimestampTz broker_error_at = 0;
static char broker_error[CQRS_ERROR_LEN];
static bool said_waiting_extension = false;
static WaitEventSet *wait_set = NULL;
static MemoryContext turn_cxt = NULL;

/* the producer of dead letters, and what is in flight */
typedef struct DeadLetterSend
{
	SinkDeadLetter *dl;
	CqrsMessage msg;
	int			cap;			/* room in names, values and sizes */
	const char **names;
	const char **values;
	int		   *sizes;
} DeadLetterSend;

/* librdkafka's batch.size default, the largest the dead letters use */
#define DEFAULT_BATCH_BYTES 1000000

static rd_kafka_t *dlt_producer = NULL;
static int	dlt_batch_bytes = DEFAULT_BATCH_BYTES;	/* the producer's batch.size */
static int	dlt_wanted_batch_bytes = DEFAULT_BATCH_BYTES;
static TimestampTz dlt_rebuild_since = 0;	/* a smaller batch.size waits */
static List *dl_in_flight = NIL;	/* DeadLetterSend * */
static List *dl_to_send = NIL;	/* SinkDeadLetter * not produced yet */
static TimestampTz producer_retry_at = 0;
static int	dlt_fatal_streak = 0;	/* fatal errors, nothing delivered between */
static MemoryContext dl_cxt = NULL;

/* the reader of replays */
static rd_kafka_t *reader = NULL;
static SinkDeadLetter *fetching = NULL;
static TimestampTz fetch_deadline = 0;

static void set_worker_state(void);
static void commit_to_kafka(Sink *sink, bool wait);
static void start_replay(void);

/*
 * Register worker 0; called from _PG_init during shared_preload_libraries.
 * It starts the others.
 */
void
cqrs_sink_register(void)
{
	cqrs_register_worker("cqrs_sink_main", "cqrs_sync sink", 1);
}

/* Worker 0: start the workers the setting asks for that do not run. */
static void
launch_workers(void)
{
	TimestampTz now = GetCurrentTimestamp();

	sink_worker_set_wanted(cqrs_sink_workers);
	for (int i = 1; i < Min(cqrs_sink_workers, CQRS_SINK_MAX_WORKERS); i++)
	{
		BackgroundWorker worker;

		if (!sink_worker_needs_launch(i, now))
			continue;
		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = 1;
		strlcpy(worker.bgw_library_name, "cqrs_sync", BGW_MAXLEN);
		strlcpy(worker.bgw_function_name, "cqrs_sink_main", BGW_MAXLEN);
		snprintf(worker.bgw_name, BGW_MAXLEN, "cqrs_sync sink %d", i);
		strlcpy(worker.bgw_type, "cqrs_sync sink", BGW_MAXLEN);
		worker.bgw_main_arg = Int32GetDatum(i);
		if (!RegisterDynamicBackgroundWorker(&worker, NULL))
			ereport(WARNING,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("cqrs_sync sink: could not start sink worker %d", i),
					 errhint("Raise max_worker_processes, or lower cqrs_sync.sink_workers.")));
	}
}

static void
sink_detach_shmem(int code, Datum arg)
{
	sink_worker_release(my_index);
}

static void
pin_settings(void)
{
	/*
	 * Not default_transaction_read_only: a database made read-only makes the
	 * sink wait (and alert) until it is writable again.
	 */
	static const char *const pins[][2] = {
		{"default_transaction_isolation", "read committed"},
		{"default_transaction_deferrable", "off"},
		{"statement_timeout", "0"},
		{"lock_timeout", "5s"},
		{"idle_in_transaction_session_timeout", "0"},
		{"idle_session_timeout", "0"},
		{"search_path", "pg_catalog, pg_temp"},
		{"session_replication_role", "origin"},
		{"check_function_bodies", "on"},
		/* compiling its small statements would cost more than running them */
		{"jit", "off"},
	};

	/*
	 * As session settings: they outrank those of ALTER DATABASE/ROLE SET and
	 * the configuration file, and leave a handler's call free to set its own
	 * (the sink's search_path, a function's SET clause); what it sets ends
	 * with the call (sink_apply.c).
	 */
	for (int i = 0; i < lengthof(pins); i++)
		SetConfigOption(pins[i][0], pins[i][1], PGC_SUSET, PGC_S_SESSION);
}

static const char *
effective_database(void)
{
	return (cqrs_sink_database && cqrs_sink_database[0] != '\0') ? cqrs_sink_database : cqrs_database;
}

static long
backoff_ms(int failures)
{
	return Min(MAX_BACKOFF_MS, 100L << Min(failures, 6));
}

/* ---- consumers -------------------------------------------------------------------- */

/* librdkafka's rebalance callback: record, no elog (see the file's header). */
static void
rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *partitions,
		  void *opaque)
{
	Sink	   *sink = (Sink *) opaque;

	if (sink->pending_assign)
	{
		rd_kafka_topic_partition_list_destroy(sink->pending_assign);
		sink->pending_assign = NULL;
	}
	if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS)
		sink->pending_assign = rd_kafka_topic_partition_list_copy(partitions);
	else
	{
		/* revoked (or a rebalance error): give the partitions up at once */
		if (sink->kafka_commit_due)
			commit_to_kafka(sink, false);
		rd_kafka_assign(rk, NULL);
		sink->revoked = true;
	}
}

static void
drop_batch(Sink *sink, int part)
{
	int			kept = 0;

	for (int i = 0; i < sink->nbatch; i++)
	{
		if (part < 0 || sink->batch[i].part == part)
			rd_kafka_message_destroy(sink->batch[i].rkm);
		else
			sink->batch[kept++] = sink->batch[i];
	}
	sink->nbatch = kept;
	for (int p = 0; p < sink->nparts; p++)
		if (part < 0 || p == part)
		{
			sink->parts[p].oldest_unapplied = 0;
			sink->parts[p].fetched = -1;
		}
}

/*
 * The assignment is gone (revoked, or the consumer closed).  librdkafka keeps
 * the pause flags of its partitions all the same: handle_assignment() sets
 * them again.
 */
static void
clear_parts(Sink *sink)
{
	drop_batch(sink, -1);
	for (int p = 0; p < sink->nparts; p++)
		sink_part_detach(sink->parts[p].shm_slot);
	sink->nparts = 0;
	sink->assigned = false;
	sink->kafka_paused = false;
}

static void
close_consumer(Sink *sink)
{
	if (sink->rk == NULL)
		return;
	if (sink->kafka_commit_due)
		commit_to_kafka(sink, true);
	clear_parts(sink);
	cqrs_kafka_destroy_consumer(sink->rk, 5000);
	sink->rk = NULL;
	sink->subscribed = false;
	if (sink->pending_assign)
	{
		rd_kafka_topic_partition_list_destroy(sink->pending_assign);
		sink->pending_assign = NULL;
	}
	sink->revoked = false;
	cqrs_kafka_emit_logs("cqrs_sync sink");
}

static void
free_sink(Sink *sink)
{
	close_consumer(sink);
	MemoryContextDelete(sink->cxt);	/* the route's too */
}

static bool
open_consumer(Sink *sink)
{
	char		errbuf[1024];
	char		client_id[128];
	rd_kafka_topic_partition_list_t *topics;
	rd_kafka_resp_err_t err;

	if (sink->rk != NULL)
		return true;
	snprintf(client_id, sizeof(client_id), "cqrs_sync-sink-%s-%d", sink->name, my_index);
	sink->rk = cqrs_kafka_create_consumer(sink->group_id, client_id, sink, rebalance,
										  errbuf, sizeof(errbuf));
	if (sink->rk == NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("cqrs_sync sink \"%s\": %s", sink->name, errbuf),
				 errhint("Fix cqrs_sync.brokers or cqrs_sync.kafka_config_file and reload the configuration.")));
		sink_worker_set_state(my_index, SINK_STATE_NO_CONSUMER, errbuf);
		return false;
	}
	topics = rd_kafka_topic_partition_list_new(sink->ntopics);
	for (int t = 0; t < sink->ntopics; t++)
		rd_kafka_topic_partition_list_add(topics, sink->topics[t], RD_KAFKA_PARTITION_UA);
	err = rd_kafka_subscribe(sink->rk, topics);
	rd_kafka_topic_partition_list_destroy(topics);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("cqrs_sync sink \"%s\": could not subscribe to its topics: %s",
						sink->name, rd_kafka_err2str(err))));
		close_consumer(sink);
		return false;
	}
	sink->subscribed = true;
	ereport(LOG,
			(errmsg("cqrs_sync sink \"%s\": consuming %d topic(s) in consumer group \"%s\"",
					sink->name, sink->ntopics, sink->group_id)));
	return true;
}

/*
 * Pause or resume the partitions of list (the whole assignment) in
 * librdkafka, whatever kafka_paused said.  Used as is only right after
 * rd_kafka_assign(), before anything of the assignment was fetched;
 * elsewhere kafka_pause() changes what is not in that state already.
 */
static void
kafka_set_paused(Sink *sink, rd_kafka_topic_partition_list_t *list, bool pause)
{
	if (pause)
		rd_kafka_pause_partitions(sink->rk, list);
	else
		rd_kafka_resume_partitions(sink->rk, list);
	sink->kafka_paused = pause;
	/* paused: ask for the watermarks at the next turn */
	sink->watermarks_asked_at = 0;
}

/* Pause or resume the sink's partitions in librdkafka (fetching). */
static void
kafka_pause(Sink *sink, bool pause)
{
	rd_kafka_topic_partition_list_t *list;

	if (sink->rk == NULL || !sink->assigned || sink->kafka_paused == pause)
		return;
	if (rd_kafka_assignment(sink->rk, &list) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return;
	kafka_set_paused(sink, list, pause);
	rd_kafka_topic_partition_list_destroy(list);
}

/* A new assignment: read the positions, then rd_kafka_assign(). */
static void
handle_assignment(Sink *sink)
{
	rd_kafka_topic_partition_list_t *list = sink->pending_assign;
	MemoryContext old;
	rd_kafka_resp_err_t err;

	if (GetCurrentTimestamp() < sink->retry_at)
		return;
	clear_parts(sink);
	old = MemoryContextSwitchTo(sink->cxt);
	if (sink->parts)
		pfree(sink->parts);
	sink->parts = palloc0(sizeof(SinkPart) * Max(list->cnt, 1));
	for (int i = 0; i < list->cnt; i++)
	{
		SinkPart   *p = &sink->parts[i];

		p->topic = pstrdup(list->elems[i].topic);
		p->partition = list->elems[i].partition;
		p->fetched = -1;
		p->shm_slot = -1;
	}
	sink->nparts = list->cnt;
	MemoryContextSwitchTo(old);

	if (!sink_read_positions(sink, list))
	{
		sink->nparts = 0;
		sink->failures++;
		sink->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), backoff_ms(sink->failures));
		sink_worker_set_state(my_index, SINK_STATE_WAITING_DATABASE,
							  "could not read the positions of an assignment");
		return;
	}
	sink->failures = 0;
	sink->retry_at = 0;
	err = rd_kafka_assign(sink->rk, list);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		ereport(LOG,
				(errmsg("cqrs_sync sink \"%s\": could not take its assignment: %s",
						sink->name, rd_kafka_err2str(err))));
		sink->nparts = 0;
		return;
	}

	/*
	 * librdkafka keeps the pause flag rd_kafka_pause_partitions() set on a
	 * partition when the partition is revoked and assigned again (2.0.2
	 * does; test 231_sink_rebalance_paused).  A partition paused while the
	 * sink waited, given back by a rebalance, would never be fetched again,
	 * and kafka_pause() would not resume it: clear_parts() said "not
	 * paused".  So the whole new assignment is resumed, or paused for a
	 * paused sink, whatever librdkafka remembers of it.
	 */
	kafka_set_paused(sink, list, sink->paused);
	rd_kafka_topic_partition_list_destroy(list);
	sink->pending_assign = NULL;
	sink->assigned = true;
	sink->reassign = false;
	for (int i = 0; i < sink->nparts; i++)
		sink->parts[i].shm_slot = sink_part_attach(my_index, sink->name, sink->parts[i].topic,
												   sink->parts[i].partition);
	ereport(DEBUG1,
			(errmsg("cqrs_sync sink \"%s\": assigned %d partition(s)", sink->name, sink->nparts)));
}

/*
 * Partitions rewound (or read again): seek to their stored positions.  If the
 * positions cannot be read now, the partitions stay flagged (their messages
 * are dropped as they come) and sink_turn() tries again a second later.
 */
static void
resync(Sink *sink, bool all)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(Max(sink->nparts, 1));
	rd_kafka_error_t *error;

	if (sink->reassign)
		all = true;				/* an assignment names every partition */
	for (int p = 0; p < sink->nparts; p++)
		if (all || sink->parts[p].resync)
		{
			sink->parts[p].resync = true;
			drop_batch(sink, p);
			rd_kafka_topic_partition_list_add(list, sink->parts[p].topic, sink->parts[p].partition);
		}

	/*
	 * A sink that waited with a batch it no longer has waits for nothing:
	 * fetch again (a next batch that fails waits again).
	 */
	if (sink->nbatch == 0 && sink->failures > 0)
	{
		sink->failures = 0;
		sink->retry_at = 0;
		if (!sink->paused)
			kafka_pause(sink, false);
	}

	sink->resync_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
	if (list->cnt > 0 && sink_read_positions(sink, list))
	{
		if (sink->reassign)
		{
			rd_kafka_resp_err_t err = rd_kafka_assign(sink->rk, list);

			if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			{
				ereport(LOG,
						(errmsg("cqrs_sync sink \"%s\": could not assign its partitions again: %s",
								sink->name, rd_kafka_err2str(err))));
				rd_kafka_topic_partition_list_destroy(list);
				return;
			}
			sink->reassign = false;

			/*
			 * The same partitions, assigned again: their pause flags stay in
			 * librdkafka (see handle_assignment()).  Every batch was dropped
			 * above, so the sink waits for nothing: it fetches, unless an
			 * operator paused it.
			 */
			kafka_set_paused(sink, list, sink->paused);
		}
		else
		{
			error = rd_kafka_seek_partitions(sink->rk, list, 0);
			if (error)
				rd_kafka_error_destroy(error);
		}
		for (int p = 0; p < sink->nparts; p++)
			if (all || sink->parts[p].resync)
			{
				sink->parts[p].resync = false;
				sink->parts[p].fetched = -1;
			}
	}
	rd_kafka_topic_partition_list_destroy(list);
}

static int
part_of(Sink *sink, rd_kafka_message_t *rkm, int hint)
{
	const char *topic = rd_kafka_topic_name(rkm->rkt);

	if (hint >= 0 && hint < sink->nparts && sink->parts[hint].partition == rkm->partition &&
		strcmp(sink->parts[hint].topic, topic) == 0)
		return hint;
	for (int p = 0; p < sink->nparts; p++)
		if (sink->parts[p].partition == rkm->partition && strcmp(sink->parts[p].topic, topic) == 0)
			return p;
	return -1;
}

static void
note_broker_error(const char *text)
{
	broker_error_at = GetCurrentTimestamp();
	strlcpy(broker_error, text, sizeof(broker_error));
}

/* The stored position goes to `to` when the partition is next read (resync()) */
static void
move_stored_position(SinkPart *sp, int64 to)
{
	sp->move = true;
	sp->move_from = sp->position;
	sp->move_to = to;
}

/* A message carrying an error instead of data. */
static void
consumer_error(Sink *sink, rd_kafka_message_t *rkm, int part)
{
	char		text[512];

	snprintf(text, sizeof(text), "%s: %s", rd_kafka_err2name(rkm->err), rd_kafka_message_errstr(rkm));
	cqrs_kafka_redact(text);
	if (rkm->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET && part >= 0)
	{
		SinkPart   *sp = &sink->parts[part];
		int64		low,
					high;
		rd_kafka_resp_err_t qerr;

		/*
		 * librdkafka stopped fetching the partition: it goes on only when
		 * assigned again (resync()), from the stored position.  Where that
		 * position is outside Kafka's offsets now, it moves to the earliest
		 * offset first.  Beyond the end, the topic was deleted and created
		 * again, or truncated: the messages there now were not applied (or,
		 * after a truncation, are applied again: duplicates by event_id),
		 * and without the move they would be dropped as below the stored
		 * position.  Before the start, retention removed messages the sink
		 * had not applied.
		 */
		sink->reassign = true;
		sp->resync = true;
		qerr = rd_kafka_query_watermark_offsets(sink->rk, sp->topic, sp->partition,
												&low, &high, RESET_OFFSETS_TIMEOUT_MS);
		if (qerr != RD_KAFKA_RESP_ERR_NO_ERROR)
			ereport(LOG,
					(errmsg("cqrs_sync sink \"%s\": position " INT64_FORMAT " of %s[%d] is not in Kafka, and its offsets could not be asked: %s",
							sink->name, sp->position, sp->topic, sp->partition,
							rd_kafka_err2str(qerr)),
					 errdetail("The sink assigns the partition again in a second.")));
		else if (sp->position > high)
		{
			ereport(WARNING,
					(errcode(CQRS_ERRCODE_SINK_WAITING),
					 errmsg("cqrs_sync sink \"%s\": position " INT64_FORMAT " of %s[%d] is beyond the partition's end " INT64_FORMAT "; continuing from its earliest offset " INT64_FORMAT,
							sink->name, sp->position, sp->topic, sp->partition, high, low),
					 errdetail("The topic was deleted and created again, or truncated by an unclean leader election. Events already applied are skipped as duplicates by their event_id.")));
			move_stored_position(sp, low);
		}
		else if (sp->position < low)
		{
			ereport(WARNING,
					(errcode(CQRS_ERRCODE_SINK_WAITING),
					 errmsg("cqrs_sync sink \"%s\": position " INT64_FORMAT " of %s[%d] is no longer in Kafka; continuing from its earliest offset " INT64_FORMAT,
							sink->name, sp->position, sp->topic, sp->partition, low),
					 errdetail("Messages between them were removed by the topic's retention before the sink applied them.")));
			move_stored_position(sp, low);
		}
	}
	else if (rkm->err == RD_KAFKA_RESP_ERR__TRANSPORT || rkm->err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN ||
			 rkm->err == RD_KAFKA_RESP_ERR__RESOLVE)
		note_broker_error(text);
	else
		ereport(LOG, (errmsg("cqrs_sync sink \"%s\": %s", sink->name, text)));
}

/*
 * Serve a sink's consumer: rebalances, and messages into the batch until it
 * is full or nothing more is there.  Returns true if it stopped because the
 * batch was full (more may be waiting).
 */
static bool
serve_consumer(Sink *sink)
{
	int			hint = -1;

	if (sink->rk == NULL)
		return false;
	for (;;)
	{
		rd_kafka_message_t *rkm;
		int			p;

		if (sink->revoked)
		{
			sink->revoked = false;
			clear_parts(sink);
		}
		if (sink->pending_assign)
		{
			handle_assignment(sink);
			if (sink->pending_assign)
				return false;	/* try again later */
		}
		/* a batch is cqrs_sync.sink_batch_size messages, whatever came before */
		if (sink->nbatch >= Max(1, cqrs_sink_batch_size) && sink->failures == 0)
			return true;
		if (sink->nbatch >= sink->batch_cap)
		{
			/* waiting (partitions paused), or a larger batch size: room */
			sink->batch_cap *= 2;
			sink->batch = repalloc(sink->batch, sizeof(SinkMsg) * sink->batch_cap);
		}
		rkm = rd_kafka_consumer_poll(sink->rk, 0);
		if (rkm == NULL)
			return false;
		p = (rkm->rkt != NULL && rkm->partition >= 0) ? part_of(sink, rkm, hint) : -1;
		if (rkm->err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			consumer_error(sink, rkm, p);
			rd_kafka_message_destroy(rkm);
			continue;
		}
		broker_error_at = 0;	/* a broker answered */
		if (p < 0 || sink->parts[p].resync || sink->paused)
		{
			/* not ours (any more), or to be fetched again */
			rd_kafka_message_destroy(rkm);
			continue;
		}
		hint = p;
		if (sink->parts[p].oldest_unapplied == 0)
		{
			rd_kafka_timestamp_type_t tstype;
			int64		ts = rd_kafka_message_timestamp(rkm, &tstype);

			sink->parts[p].oldest_unapplied = ts >= 0 ?
				time_t_to_timestamptz(ts / 1000) + (ts % 1000) * 1000 : GetCurrentTimestamp();
		}
		sink->parts[p].fetched = rkm->offset + 1;
		sink->batch[sink->nbatch].rkm = rkm;
		sink->batch[sink->nbatch].part = p;
		sink->nbatch++;
	}
}

/*
 * Commit the positions to Kafka too, for its lag tools (nothing reads them
 * back); wait: until Kafka answered.  No elog: the rebalance callback calls
 * it.
 */
static void
commit_to_kafka(Sink *sink, bool wait)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(Max(sink->nparts, 1));

	sink->kafka_commit_due = false;
	sink->kafka_committed_at = GetCurrentTimestamp();

	for (int p = 0; p < sink->nparts; p++)
		if (sink->parts[p].known && sink->parts[p].position > 0)
			rd_kafka_topic_partition_list_add(list, sink->parts[p].topic,
											  sink->parts[p].partition)->offset = sink->parts[p].position;
	if (list->cnt > 0)
		(void) rd_kafka_commit(sink->rk, list, wait ? 0 : 1);
	rd_kafka_topic_partition_list_destroy(list);
}

/*
 * While its partitions are paused in librdkafka (a paused sink, or one that
 * waits), nothing is fetched and librdkafka's cached watermarks stand still:
 * ask Kafka for the high watermarks (the latest offsets, one request per
 * broker), every WATERMARKS_MS at most, so that the lag shows what waits.
 */
static void
ask_watermarks(Sink *sink)
{
	TimestampTz now = GetCurrentTimestamp();
	rd_kafka_topic_partition_list_t *list;

	if (sink->rk == NULL || sink->nparts == 0 ||
		!TimestampDifferenceExceeds(sink->watermarks_asked_at, now, WATERMARKS_MS))
		return;
	sink->watermarks_asked_at = now;
	list = rd_kafka_topic_partition_list_new(sink->nparts);
	for (int p = 0; p < sink->nparts; p++)
		rd_kafka_topic_partition_list_add(list, sink->parts[p].topic,
										  sink->parts[p].partition)->offset = RD_KAFKA_OFFSET_END;
	/* (a broker away: the last answer stays) */
	if (rd_kafka_offsets_for_times(sink->rk, list, WATERMARKS_TIMEOUT_MS) == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		for (int p = 0; p < sink->nparts; p++)
		{
			rd_kafka_topic_partition_t *tp =
				rd_kafka_topic_partition_list_find(list, sink->parts[p].topic,
												   sink->parts[p].partition);

			if (tp && tp->err == RD_KAFKA_RESP_ERR_NO_ERROR && tp->offset > sink->parts[p].asked_high)
				sink->parts[p].asked_high = tp->offset;
		}
	}
	rd_kafka_topic_partition_list_destroy(list);
}

/* Kafka's watermarks and what waits, for cqrs_sink_stats. */
static void
publish_parts(Sink *sink)
{
	if (sink->kafka_paused)
		ask_watermarks(sink);
	for (int p = 0; p < sink->nparts; p++)
	{
		SinkPart   *part = &sink->parts[p];
		int64_t		low = -1,
					high = -1;

		if (part->shm_slot < 0)
			continue;
		if (sink->rk)
			(void) rd_kafka_get_watermark_offsets(sink->rk, part->topic, part->partition, &low, &high);
		if (part->asked_high > high)
			high = part->asked_high;
		sink_part_update(part->shm_slot, high, low,
						 part->fetched >= 0 ? part->fetched : (part->known ? part->position : -1),
						 part->oldest_unapplied);
	}
}

/* The sink could not apply its batch: wait, keep the batch, alert. */
static void
sink_waits(Sink *sink, const char *error)
{
	char		text[CQRS_ERROR_LEN];

	snprintf(text, sizeof(text), "sink \"%s\": %s", sink->name, error);
	if (sink->failures == 0)
	{
		ereport(WARNING,
				(errcode(CQRS_ERRCODE_SINK_WAITING),
				 errmsg("cqrs_sync sink \"%s\" cannot apply its events and waits: %s", sink->name, error),
				 errdetail("Nothing is skipped, dead-lettered or applied twice; the events are applied once the database accepts them again."),
				 errhint("See the section CqrsSyncSinkWaiting of the runbook.")));
		/* an alert for listeners (it may fail too: the database is sick) */
		PG_TRY();
		{
			StringInfoData json;

			initStringInfo(&json);
			appendStringInfoString(&json, "{\"alert\":\"sink_waiting\",\"sink\":");
			escape_json(&json, sink->name);
			appendStringInfoString(&json, ",\"error\":");
			escape_json(&json, error);
			appendStringInfoChar(&json, '}');
			SetCurrentStatementStartTimestamp();
			StartTransactionCommand();
			cqrs_notify_alert("sink", json.data);
			CommitTransactionCommand();
		}
		PG_CATCH();
		{
			FlushErrorState();
			AbortCurrentTransaction();
		}
		PG_END_TRY();
	}
	sink->failures++;
	sink->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), backoff_ms(sink->failures));
	sink_worker_set_state(my_index, SINK_STATE_WAITING_DATABASE, text);
	kafka_pause(sink, true);
}

/* Apply the sink's batch, if it has one and may. */
static void
apply(Sink *sink)
{
	char		errbuf[CQRS_ERROR_LEN];
	bool		any_resync = false;

	if (sink->nbatch == 0 || GetCurrentTimestamp() < sink->retry_at)
		return;
	errbuf[0] = '\0';
	switch (sink_apply_batch(sink, errbuf, sizeof(errbuf)))
	{
		case SINK_APPLIED:
			if (sink->failures > 0)
				ereport(LOG,
						(errmsg("cqrs_sync sink \"%s\" applies events again", sink->name)));
			sink->failures = 0;
			sink->retry_at = 0;
			for (int p = 0; p < sink->nparts; p++)
			{
				any_resync |= sink->parts[p].resync;
				if (!sink->parts[p].resync)
					sink->parts[p].oldest_unapplied = 0;
			}
			drop_batch(sink, -1);
			/* committed to Kafka by sink_turn(), at most every KAFKA_COMMIT_MS */
			sink->kafka_commit_due = true;
			if (any_resync)
				resync(sink, false);
			if (!sink->paused)
				kafka_pause(sink, false);
			/* it held events: they are due after the sink's backoff */
			if (sink->held_last > 0)
				next_retry_at = Min(next_retry_at, TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																			   sink->max_retries == 0 ? 0 :
																			   sink->retry_backoff_ms));
			break;
		case SINK_WAIT:
			sink_waits(sink, errbuf);
			break;
		case SINK_GONE:
			/* dropped or paused meanwhile: the catalog says which */
			drop_batch(sink, -1);
			next_catalog_at = 0;
			if (sink->paused)
				kafka_pause(sink, true);
			break;
	}
	publish_parts(sink);
}

/* ---- the catalog -------------------------------------------------------------------- */

/*
 * Copy the definition of src (from the catalog) into dst's memory: not its
 * pause nor its changed_at, which read_catalog() acts on.
 */
static void
copy_definition(Sink *dst, const Sink *src)
{
	MemoryContext old = MemoryContextSwitchTo(dst->cxt);

	strlcpy(dst->name, src->name, sizeof(dst->name));
	dst->ntopics = src->ntopics;
	dst->topics = palloc(sizeof(char *) * src->ntopics);
	for (int t = 0; t < src->ntopics; t++)
		dst->topics[t] = pstrdup(src->topics[t]);
	dst->handler_name = src->handler_name ? pstrdup(src->handler_name) : NULL;
	dst->handler = src->handler;
	dst->run_as_name = pstrdup(src->run_as_name);
	dst->consumer = pstrdup(src->consumer);
	dst->group_id = pstrdup(src->group_id);
	dst->max_retries = src->max_retries;
	dst->retry_backoff_ms = src->retry_backoff_ms;
	dst->dlt_topic = src->dlt_topic ? pstrdup(src->dlt_topic) : NULL;
	dst->dlt_suffix = pstrdup(src->dlt_suffix);
	dst->start_latest = src->start_latest;
	dst->search_path = pstrdup(src->search_path);
	dst->version_column = src->version_column ? pstrdup(src->version_column) : NULL;
	dst->route_target = src->route_target ? pstrdup(src->route_target) : NULL;
	dst->route_version = pstrdup(src->route_version);
	dst->route_delete = src->route_delete ? pstrdup(src->route_delete) : NULL;
	dst->shape = src->shape;
	dst->created_at = src->created_at;
	MemoryContextSwitchTo(old);
}

static bool
same_definition(const Sink *a, const Sink *b)
{
#define SAME_STR(f) ((a->f == NULL && b->f == NULL) || (a->f && b->f && strcmp(a->f, b->f) == 0))
	return a->shape == b->shape && SAME_STR(handler_name) && a->handler == b->handler &&
		SAME_STR(run_as_name) &&
		SAME_STR(consumer) && a->max_retries == b->max_retries &&
		a->retry_backoff_ms == b->retry_backoff_ms && SAME_STR(dlt_topic) &&
		SAME_STR(dlt_suffix) && a->start_latest == b->start_latest && SAME_STR(search_path) &&
		SAME_STR(version_column) && SAME_STR(route_target) && SAME_STR(route_version) &&
		SAME_STR(route_delete);
#undef SAME_STR
}

/* A sink gone from the catalog, or created again: stop it and forget it. */
static void
drop_sink(Sink *s)
{
	ereport(LOG, (errmsg("cqrs_sync sink \"%s\" dropped", s->name)));
	free_sink(s);
}

static Sink *
new_sink(const Sink *def)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync sink",
											  ALLOCSET_DEFAULT_SIZES);
	Sink	   *s = MemoryContextAllocZero(cxt, sizeof(Sink));

	s->cxt = cxt;
	copy_definition(s, def);
	s->paused = def->paused;
	s->changed_at = def->changed_at;
	s->batch_cap = Max(1, cqrs_sink_batch_size);
	s->batch = MemoryContextAlloc(cxt, sizeof(SinkMsg) * s->batch_cap);
	ereport(LOG, (errmsg("cqrs_sync sink \"%s\" found", s->name)));
	return s;
}

/* Read the sinks again and start, change or stop consumers to match. */
static void
read_catalog(void)
{
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "cqrs_sync sink catalog",
											  ALLOCSET_DEFAULT_SIZES);
	List	   *defs = NIL;
	ListCell   *lc;
	MemoryContext oldcxt = CurrentMemoryContext;
	bool		ok = true;

	catalog_gen = sink_catalog_generation();
	next_catalog_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), CATALOG_MS);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "cqrs_sync sink: reading the sinks");
		ext_ready = sink_extension_ready();
		if (ext_ready)
			defs = sink_catalog_load(tmp);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata = cqrs_catch_and_abort(oldcxt);

		ereport(LOG, (errmsg("cqrs_sync sink: could not read the sinks: %s", edata->message)));
		sink_worker_set_state(my_index, SINK_STATE_WAITING_DATABASE, edata->message);
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(oldcxt);
	if (!ok)
	{
		MemoryContextDelete(tmp);
		return;
	}

	if (!ext_ready)
	{
		if (!said_waiting_extension)
			ereport(LOG,
					(errmsg("cqrs_sync sink: extension \"cqrs_sync\" does not exist in database \"%s\", waiting",
							connected_db),
					 errhint("Run CREATE EXTENSION cqrs_sync in database \"%s\".", connected_db)));
		said_waiting_extension = true;
	}
	else
		said_waiting_extension = false;

	foreach(lc, sinks)
		((Sink *) lfirst(lc))->seen = false;
	foreach(lc, defs)
	{
		Sink	   *def = lfirst(lc);
		Sink	   *s = sink_find(sinks, def->name);

		/*
		 * Dropped and created again (in one transaction, or both since the
		 * last read): another sink, with none of the old one's positions.
		 */
		if (s != NULL && s->created_at != def->created_at)
		{
			sinks = list_delete_ptr(sinks, s);
			drop_sink(s);
			s = NULL;
		}
		if (s == NULL)
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			s = new_sink(def);
			sinks = lappend(sinks, s);
			MemoryContextSwitchTo(old);
		}
		else
		{
			/*
			 * A change of definition (a reload changes the defaults of every
			 * sink) may come in the same read as a pause, a resume or a
			 * rewind: those are acted on below all the same.
			 */
			if (!same_definition(s, def))
			{
				bool		reconnect = (s->shape != def->shape);

				if (reconnect)
					close_consumer(s);
				sink_route_free(s->route);
				s->route = NULL;
				s->usable = false;
				copy_definition(s, def);
				ereport(LOG, (errmsg("cqrs_sync sink \"%s\" changed", s->name)));
			}
			if (s->paused != def->paused)
			{
				s->paused = def->paused;
				s->changed_at = def->changed_at;
				ereport(LOG, (errmsg("cqrs_sync sink \"%s\" %s", s->name,
									 s->paused ? "paused" : "resumed")));
				if (s->paused)
				{
					drop_batch(s, -1);
					kafka_pause(s, true);
				}
				else if (s->assigned)
				{
					/* from the stored positions, whatever was fetched before */
					resync(s, true);
					kafka_pause(s, false);
				}
			}
			else if (s->changed_at != def->changed_at)
			{
				/* a rewind moved positions: fetch again from there */
				s->changed_at = def->changed_at;
				if (s->assigned && !s->paused)
					resync(s, true);
			}
		}
		s->seen = true;
	}
	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		if (!s->seen)
		{
			sinks = foreach_delete_current(sinks, lc);
			drop_sink(s);
		}
	}
	MemoryContextDelete(tmp);
	next_retry_at = 0;
}

/* ---- dead letters -------------------------------------------------------------------- */

/* One more header of a dead letter (size -1: value is a C string). */
static void
add_header(DeadLetterSend *send, const char *name, const char *value, int size)
{
	int			n = send->msg.nheaders;

	if (n == send->cap)
	{
		send->cap = Max(16, send->cap * 2);
		send->names = send->names ? repalloc(send->names, sizeof(char *) * send->cap) :
			palloc(sizeof(char *) * send->cap);
		send->values = send->values ? repalloc(send->values, sizeof(char *) * send->cap) :
			palloc(sizeof(char *) * send->cap);
		send->sizes = send->sizes ? repalloc(send->sizes, sizeof(int) * send->cap) :
			palloc(sizeof(int) * send->cap);
	}
	send->names[n] = name;
	send->values[n] = value;
	send->sizes[n] = size;
	send->msg.nheaders = n + 1;
}

/* A base64 string's bytes (NULL if it is not base64). */
static char *
base64_bytes(JsonbValue *v, int *len)
{
	int			room = pg_b64_dec_len(v->val.string.len) + 1;
	char	   *bytes = palloc(room);

	*len = pg_b64_decode(v->val.string.val, v->val.string.len, bytes, room);
	if (*len < 0)
		return NULL;
	bytes[*len] = '\0';
	return bytes;
}

/*
 * The event's own headers, as the dead letter carries them: exactly as
 * Kafka held them (raw_headers: their order, a name given twice, null and
 * binary values, event_id among them), or for an event held without them
 * (by hand) every member of its JSON headers, with event_id added by the
 * producer.
 */
static void
dead_letter_headers(DeadLetterSend *send)
{
	SinkDeadLetter *dl = send->dl;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *name = NULL;
	int			elem = 0;
	int			len;

	if (dl->raw_headers == NULL)
	{
		send->msg.event_id = dl->event_id;
		if (dl->headers_json == NULL)
			return;
		it = JsonbIteratorInit(&DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
																   CStringGetDatum(dl->headers_json)))->root);
		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok == WJB_KEY)
				name = pnstrdup(v.val.string.val, v.val.string.len);
			else if (tok == WJB_VALUE && name != NULL && strcmp(name, "event_id") != 0)
			{
				if (v.type == jbvString)
					add_header(send, name, pnstrdup(v.val.string.val, v.val.string.len), -1);
				else if (v.type == jbvNull)
					add_header(send, name, NULL, -1);
			}
		}
		return;
	}

	/* [[name, value], ...] in base64 (a pair that is not, edited by hand, is left out) */
	it = JsonbIteratorInit(&DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
															   CStringGetDatum(dl->raw_headers)))->root);
	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		if (tok == WJB_BEGIN_ARRAY)
		{
			elem = 0;
			name = NULL;
		}
		else if (tok == WJB_ELEM && elem++ == 0 && v.type == jbvString)
			name = base64_bytes(&v, &len);
		else if (tok == WJB_ELEM && name != NULL)
		{
			if (v.type == jbvString)
			{
				char	   *value = base64_bytes(&v, &len);

				if (value != NULL)
					add_header(send, name, value, len);
			}
			else if (v.type == jbvNull)
				add_header(send, name, NULL, -1);
			name = NULL;
		}
	}
}

/* An answer about a dead-letter topic's limit (cqrs_kafka_collect_limits). */
static void
dlt_learn_limit(const char *topic, CqrsAnswer answer, int limit, int compacted)
{
	(void) cqrs_topic_learn_limit(topic, answer, limit, compacted);
}

/* The batch.size the producer must have: within every topic limit known. */
static int
dlt_batch_wanted(void)
{
	int			min_limit = cqrs_topics_min_limit();

	if (min_limit > 0 && min_limit < dlt_wanted_batch_bytes)
		dlt_wanted_batch_bytes = min_limit;
	return dlt_wanted_batch_bytes;
}

/*
 * Is a dead letter's size error its record batch's fault rather than its
 * own?  librdkafka never splits a batch, and Kafka refuses a batch larger
 * than the topic's max.message.bytes with every message in it, though each
 * would fit alone (DESIGN.md section 5).  The topic's limit is asked again.
 * A dead letter that fits alone, in a batch that can get smaller, lowers
 * batch.size and goes again: returns true (cqrs_kafka_smaller_batch, the
 * relay's rule too).
 */
static bool
dlt_batch_too_large(DeadLetterSend *send)
{
	CqrsTopic  *topic;
	int			smaller;

	if (send->msg.err != RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE &&
		send->msg.err != RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE)
		return false;
	topic = cqrs_topic(send->dl->dlt_topic);
	cqrs_topic_want_limit(dlt_producer, topic, true);
	smaller = cqrs_kafka_smaller_batch(cqrs_kafka_message_size(&send->msg),
									   topic->limit, dlt_batch_bytes,
									   dlt_wanted_batch_bytes);
	if (smaller == 0)
		return false;
	dlt_wanted_batch_bytes = smaller;
	return true;
}

/*
 * Record the delivery reports served: DEAD_LETTERED, DLT_FAILED when the
 * dead-letter topic refused the dead letter itself, or to be produced again.
 */
static void
take_reports(void)
{
	ListCell   *lc;
	MemoryContext oldcxt = MemoryContextSwitchTo(dl_cxt);

	foreach(lc, dl_in_flight)
	{
		DeadLetterSend *send = lfirst(lc);
		char		text[256];
		CqrsFailureClass class;

		if (!send->msg.done)
			continue;
		dl_in_flight = foreach_delete_current(dl_in_flight, lc);
		if (send->msg.err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			dlt_fatal_streak = 0;
			sink_record_dead_letter(send->dl, true,
									(int32) pg_atomic_read_u32(&send->msg.partition) - 1,
									send->msg.offset, NULL);
			continue;
		}
		class = cqrs_kafka_classify(send->msg.err);
		cqrs_kafka_error_text(send->msg.err, text, sizeof(text));
		if (dlt_batch_too_large(send))
			dl_to_send = lappend(dl_to_send, send->dl);
		else if (class == CQRS_FAIL_MESSAGE || class == CQRS_FAIL_CONFIG)
			sink_record_dead_letter(send->dl, false, -1, -1, text);
		else
		{
			/* transient, or the producer's end (purged, fatal): again */
			dl_to_send = lappend(dl_to_send, send->dl);
		}
	}
	MemoryContextSwitchTo(oldcxt);
}

/*
 * Destroy the producer (fatal, batch.size to change, a stop).  Purging its
 * queues fires the reports of what was in flight (_PURGE_* errors); those,
 * and any dead letter left without a report, go again with the next
 * producer: the producer's end is no refusal of the dead-letter topic.
 */
static void
destroy_dlt_producer(void)
{
	MemoryContext oldcxt;
	ListCell   *lc;

	if (dlt_producer == NULL)
		return;
	cqrs_topics_forget_producer();
	cqrs_kafka_destroy(dlt_producer, 0);
	dlt_producer = NULL;
	take_reports();
	oldcxt = MemoryContextSwitchTo(dl_cxt);
	foreach(lc, dl_in_flight)
		dl_to_send = lappend(dl_to_send, ((DeadLetterSend *) lfirst(lc))->dl);
	list_free(dl_in_flight);
	dl_in_flight = NIL;
	MemoryContextSwitchTo(oldcxt);
	cqrs_kafka_emit_logs("cqrs_sync sink");
}

/*
 * After a fatal error (rd_kafka_fatal_error(), e.g. the idempotent
 * producer's OUT_OF_ORDER_SEQUENCE_NUMBER) the producer refuses every
 * message with _FATAL, for good: destroy it, whenever the error came (in a
 * poll or between two); the next one is created when a dead letter is due.
 * Returns true if it was fatal.
 */
static bool
dlt_producer_fatal(void)
{
	char		errbuf[CQRS_ERROR_LEN];
	int			pause_ms;

	if (!cqrs_kafka_fatal(dlt_producer, errbuf, sizeof(errbuf)))
		return false;

	/*
	 * A fatal error that every new producer meets (an InitProducerId refused
	 * for good) waits 1 s, 2 s, ... up to a minute between producers, until
	 * one delivers a dead letter; as the relay's (relay_worker.c).
	 */
	pause_ms = cqrs_kafka_fatal_pause_ms(++dlt_fatal_streak);
	ereport(WARNING,
			(errcode(ERRCODE_CONNECTION_FAILURE),
			 errmsg("cqrs_sync sink: fatal Kafka producer error: %s", errbuf),
			 pause_ms == 0 ?
			 errdetail("The producer of dead letters is re-created; the dead letters it did not deliver are produced again.") :
			 errdetail("The producer of dead letters is re-created in %d s (fatal error %d in a row, nothing delivered since); the dead letters it did not deliver are produced again.",
					   pause_ms / 1000, dlt_fatal_streak)));
	destroy_dlt_producer();
	if (pause_ms > 0)
		producer_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), pause_ms);
	return true;
}

/* Produce the dead letters sink_retry_due() decided, and those to go again. */
static void
send_dead_letters(void)
{
	char		errbuf[1024];
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext oldcxt;

	if (dl_to_send == NIL)
		return;
	/* (fatal since it was last served: nothing it produced could go) */
	(void) dlt_producer_fatal();

	/*
	 * batch.size is a property of the producer: re-create it for a smaller
	 * one once nothing is in flight, and produce nothing until then; but
	 * not for longer than CQRS_RESIZE_WAIT_MS (a dead letter to a partition
	 * without a leader stays in flight, and would hold every other one): then
	 * the producer goes, and what it had not delivered goes again with the
	 * next one.
	 */
	if (dlt_producer != NULL && dlt_batch_wanted() != dlt_batch_bytes)
	{
		if (dl_in_flight != NIL)
		{
			if (dlt_rebuild_since == 0)
				dlt_rebuild_since = now;
			if (now < TimestampTzPlusMilliseconds(dlt_rebuild_since, CQRS_RESIZE_WAIT_MS))
				return;
		}
		dlt_rebuild_since = 0;
		ereport(LOG,
				(errmsg("cqrs_sync sink: producer of dead letters: batch.size lowered from %d to %d bytes",
						dlt_batch_bytes, dlt_wanted_batch_bytes),
				 errdetail("A dead-letter topic accepts smaller record batches: its max.message.bytes, or a batch Kafka refused as too large.")));
		destroy_dlt_producer();
	}
	if (dlt_producer == NULL && now < producer_retry_at)
		return;
	oldcxt = MemoryContextSwitchTo(dl_cxt);
	if (dlt_producer == NULL)
	{
		dlt_batch_bytes = dlt_batch_wanted();
		dlt_producer = cqrs_kafka_create(CQRS_KAFKA_RELAY, dlt_batch_bytes,
										 errbuf, sizeof(errbuf));
		if (dlt_producer == NULL)
		{
			ereport(WARNING,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("cqrs_sync sink: could not create the producer of dead letters: %s", errbuf)));
			producer_retry_at = TimestampTzPlusMilliseconds(now, 5000);
			MemoryContextSwitchTo(oldcxt);
			return;
		}
	}
	while (dl_to_send != NIL)
	{
		SinkDeadLetter *dl = linitial(dl_to_send);
		CqrsTopic  *topic = cqrs_topic(dl->dlt_topic);
		DeadLetterSend *send;
		rd_kafka_resp_err_t err;

		/*
		 * The topic's limit counts for batch.size.  The first dead letters
		 * of a topic wait for it, briefly (topics.c), rather than go in a
		 * batch it would refuse; the others wait behind them.
		 */
		cqrs_topic_want_limit(dlt_producer, topic, false);
		if (cqrs_topic_paused(topic, now))
			break;

		send = palloc0(sizeof(DeadLetterSend));
		send->dl = dl;
		send->msg.id = dl->held_id;
		send->msg.topic = dl->dlt_topic;
		if (dl->raw_key)
		{
			send->msg.key = VARDATA_ANY(dl->raw_key);
			send->msg.keylen = VARSIZE_ANY_EXHDR(dl->raw_key);
		}
		else
		{
			send->msg.key = dl->key;
			send->msg.keylen = dl->key ? strlen(dl->key) : 0;
		}
		send->msg.value = dl->value ? VARDATA(dl->value) : NULL;
		send->msg.valuelen = dl->value ? VARSIZE(dl->value) - VARHDRSZ : 0;
		if (cqrs_topic_refuses_keyless(topic, send->msg.key))
		{
			dl_to_send = list_delete_first(dl_to_send);
			pfree(send);
			sink_record_dead_letter(dl, false, -1, -1, CQRS_KEYLESS_TO_COMPACTED);
			continue;
		}

		/* the original headers, and where it came from and why it is here */
		dead_letter_headers(send);
		add_header(send, "x-original-topic", dl->topic, -1);
		add_header(send, "x-original-partition", psprintf("%d", dl->partition), -1);
		add_header(send, "x-original-offset", psprintf(INT64_FORMAT, dl->offset), -1);
		add_header(send, "x-failure-source", CQRS_SINK_FAILURE_SOURCE, -1);
		add_header(send, "x-retry-count", psprintf("%d", dl->attempts), -1);
		add_header(send, "x-last-error", pnstrdup(dl->last_error, Min(strlen(dl->last_error), 1000)), -1);
		add_header(send, "x-sink", dl->sink, -1);
		send->msg.header_names = send->names;
		send->msg.header_values = send->values;
		send->msg.header_sizes = send->sizes;

		err = cqrs_kafka_produce(dlt_producer, &send->msg);
		if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;				/* later */
		if (err == RD_KAFKA_RESP_ERR__FATAL)
		{
			/* fatal meanwhile: it goes with the next producer */
			(void) dlt_producer_fatal();
			break;
		}
		dl_to_send = list_delete_first(dl_to_send);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			char		text[256];

			cqrs_kafka_error_text(err, text, sizeof(text));
			sink_record_dead_letter(dl, false, -1, -1, text);
			continue;
		}
		dl_in_flight = lappend(dl_in_flight, send);
	}
	MemoryContextSwitchTo(oldcxt);
}

/* Serve the producer of dead letters: reports, topic limits, a fatal error. */
static void
serve_producer(void)
{
	if (dlt_producer == NULL)
		return;
	cqrs_kafka_serve(dlt_producer);
	cqrs_kafka_collect_limits(dlt_learn_limit);
	take_reports();
	/* a fatal error, whenever it came: between polls as well as in one */
	(void) dlt_producer_fatal();
	if (dl_in_flight == NIL && dl_to_send == NIL)
		MemoryContextReset(dl_cxt);
}

/* ---- replays ------------------------------------------------------------------------- */

/* Start reading the message of the next replay request, if there is one. */
static void
start_replay(void)
{
	List	   *req;
	char		errbuf[1024];
	rd_kafka_topic_partition_list_t *list;

	req = sink_fetch_requests(sinks);
	if (req == NIL)
		return;
	if (reader == NULL)
	{
		/* a group id it never joins (no subscription): assign() only */
		reader = cqrs_kafka_create_consumer("cqrs_sync.replay", "cqrs_sync-sink-replay", NULL, NULL,
											errbuf, sizeof(errbuf));
		if (reader == NULL)
		{
			ereport(WARNING,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("cqrs_sync sink: could not create the reader of replays: %s", errbuf)));
			return;
		}
	}
	{
		SinkDeadLetter *r = linitial(req);
		SinkDeadLetter *copy = MemoryContextAllocZero(TopMemoryContext, sizeof(SinkDeadLetter));

		copy->held_id = r->held_id;
		strlcpy(copy->sink, r->sink, sizeof(copy->sink));
		copy->dlt_topic = MemoryContextStrdup(TopMemoryContext, r->dlt_topic);
		copy->partition = r->partition;
		copy->offset = r->offset;
		fetching = copy;
	}
	list = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(list, fetching->dlt_topic,
									  fetching->partition)->offset = fetching->offset;
	(void) rd_kafka_assign(reader, list);
	rd_kafka_topic_partition_list_destroy(list);
	fetch_deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), FETCH_TIMEOUT_MS);
}

/* Serve the reader: the message of the replay request being read. */
static void
serve_replays(void)
{
	TimestampTz now = GetCurrentTimestamp();
	Sink	   *sink;

	if (fetching == NULL)
		return;
	sink = sink_find(sinks, fetching->sink);
	for (;;)
	{
		rd_kafka_message_t *rkm = rd_kafka_consumer_poll(reader, 0);
		char		error[512];

		if (rkm == NULL)
		{
			if (now < fetch_deadline && sink != NULL)
				return;
			snprintf(error, sizeof(error),
					 "no message at offset " INT64_FORMAT " of %s[%d] within %d s",
					 fetching->offset, fetching->dlt_topic, fetching->partition, FETCH_TIMEOUT_MS / 1000);
			if (sink != NULL)
				sink_record_fetched(sink, fetching->held_id, NULL, error);
		}
		else if (rkm->err != RD_KAFKA_RESP_ERR_NO_ERROR && rkm->rkt == NULL)
		{
			/* not about the partition being read */
			rd_kafka_message_destroy(rkm);
			continue;
		}
		else if (rkm->err != RD_KAFKA_RESP_ERR_NO_ERROR || rkm->offset != fetching->offset)
		{
			if (rkm->err == RD_KAFKA_RESP_ERR_NO_ERROR)
				snprintf(error, sizeof(error), "offset " INT64_FORMAT " of %s[%d] holds no message",
						 fetching->offset, fetching->dlt_topic, fetching->partition);
			else
				snprintf(error, sizeof(error), "%s", rd_kafka_message_errstr(rkm));
			if (sink != NULL)
				sink_record_fetched(sink, fetching->held_id, NULL, error);
			rd_kafka_message_destroy(rkm);
		}
		else
		{
			if (sink != NULL)
				sink_record_fetched(sink, fetching->held_id, rkm, NULL);
			rd_kafka_message_destroy(rkm);
		}
		(void) rd_kafka_assign(reader, NULL);
		pfree(fetching->dlt_topic);
		pfree(fetching);
		fetching = NULL;
		next_retry_at = 0;
		return;
	}
}

/* ---- the loop ------------------------------------------------------------------------- */

static void
retry_held(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next_due;
	char		errbuf[CQRS_ERROR_LEN];
	int			n;
	MemoryContext old;

	if (now < retry_error_until)
	{
		/*
		 * The last try failed as a whole: not again before retry_error_until.
		 * A catalog read or the end of a replay fetch may have set
		 * next_retry_at to 0 meanwhile, and sink_turn() would go on at once
		 * until then: a busy loop.
		 */
		next_retry_at = Max(next_retry_at, retry_error_until);
		return;
	}
	if (now < next_retry_at)
		return;
	if (!ext_ready || sinks == NIL)
	{
		next_retry_at = TimestampTzPlusMilliseconds(now, RETRY_POLL_MS);
		return;
	}
	old = MemoryContextSwitchTo(dl_cxt);
	n = sink_retry_due(sinks, &dl_to_send, &next_due, errbuf, sizeof(errbuf));
	MemoryContextSwitchTo(old);
	if (n < 0)
	{
		ereport(LOG, (errmsg("cqrs_sync sink: could not try held events again: %s", errbuf)));
		retry_error_until = next_retry_at = TimestampTzPlusMilliseconds(now, 1000);
		return;
	}
	if (n >= 1)
		next_retry_at = 0;		/* the next of their keys may be due now */
	else if (next_due != 0)
		next_retry_at = Max(next_due, TimestampTzPlusMilliseconds(now, 10));
	else
		next_retry_at = TimestampTzPlusMilliseconds(now, RETRY_POLL_MS);
	/* replay requests are held events too */
	if (fetching == NULL)
		start_replay();
}

static void
set_worker_state(void)
{
	ListCell   *lc;
	int			nparts = 0;
	bool		waiting = false;
	bool		no_consumer = false;
	const char *why = NULL;

	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		nparts += s->nparts;
		if (s->failures > 0)
			waiting = true;
		if (s->rk == NULL)
			no_consumer = true;
		if (!s->usable && s->problem[0] != '\0')
			why = s->problem;
	}
	sink_worker_set_counts(my_index, list_length(sinks), nparts);
	if (waiting)
		return;					/* sink_waits() said so */
	if (broker_error_at != 0 &&
		!TimestampDifferenceExceeds(broker_error_at, GetCurrentTimestamp(), BROKER_ERROR_MS))
		sink_worker_set_state(my_index, SINK_STATE_WAITING_BROKER, broker_error);
	else if (no_consumer)
		sink_worker_set_state(my_index, SINK_STATE_NO_CONSUMER, NULL);
	else if (why != NULL)
		sink_worker_set_state(my_index, SINK_STATE_WAITING_DATABASE, why);
	else
		sink_worker_set_state(my_index, sinks == NIL ? SINK_STATE_IDLE : SINK_STATE_RUNNING, NULL);
}

/* Leave the groups, flush dead letters briefly. */
static void
stop_everything(void)
{
	ListCell   *lc;

	foreach(lc, sinks)
		close_consumer(lfirst(lc));
	if (reader)
	{
		cqrs_kafka_destroy_consumer(reader, 1000);
		reader = NULL;
		fetching = NULL;
	}
	if (dlt_producer)
	{
		rd_kafka_flush(dlt_producer, 1000);
		serve_producer();
		destroy_dlt_producer();
		/* unreported dead letters are produced again when next due */
		list_free(dl_in_flight);
		dl_in_flight = NIL;
		dl_to_send = NIL;
		MemoryContextReset(dl_cxt);
		sink_forget_dead_letters();
	}
}

static void
reload_settings(void)
{
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (strcmp(connected_db, effective_database()) != 0)
	{
		ereport(LOG,
				(errmsg("cqrs_sync sink: cqrs_sync.sink_database changed to \"%s\"; restarting",
						effective_database())));
		stop_everything();
		proc_exit(1);
	}
	if (cqrs_kafka_config_changed())
	{
		ereport(LOG,
				(errmsg("cqrs_sync sink: Kafka settings changed, re-creating the consumers"),
				 errdetail("Each sink starts again from its stored positions.")));
		stop_everything();
		/* what was learned of the dead-letter topics may be wrong now */
		cqrs_topics_forget_limits();
		dlt_wanted_batch_bytes = DEFAULT_BATCH_BYTES;
	}
	if (my_index == 0)
		launch_workers();
	next_catalog_at = 0;
}

/* One turn.  Returns how long it may sleep (ms; 0: go on at once). */
static long
sink_turn(void)
{
	ListCell   *lc;
	bool		more = false;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz wake;
	char		errbuf[CQRS_ERROR_LEN];

	/* no user code runs here (one that failed did not say so) */
	sink_in_user_code = false;

	if (catalog_gen != sink_catalog_generation() || now >= next_catalog_at)
		read_catalog();

	cqrs_kafka_drain_events();
	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		if (s->rk == NULL && !open_consumer(s))
			continue;
		if (s->nbatch > 0 && now < s->retry_at)
		{
			/* waiting: keep serving the group (its partitions are paused) */
			(void) serve_consumer(s);
			continue;
		}
		more |= serve_consumer(s);
		apply(s);
		if (s->nbatch > 0 && s->failures == 0)
			more = true;
		if (s->assigned && !s->paused && now >= s->resync_retry_at)
		{
			for (int p = 0; p < s->nparts; p++)
				if (s->parts[p].resync)
				{
					resync(s, false);
					break;
				}
		}
	}
	serve_producer();
	if (cqrs_kafka_take_error(errbuf, sizeof(errbuf)) &&
		(strstr(errbuf, "_TRANSPORT") || strstr(errbuf, "_ALL_BROKERS_DOWN") ||
		 strstr(errbuf, "_RESOLVE")))
		note_broker_error(errbuf);
	cqrs_kafka_emit_logs("cqrs_sync sink");

	retry_held();
	/* new dead letters, and those to go again (new producer, smaller batch) */
	send_dead_letters();
	serve_producer();
	serve_replays();
	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		if (s->kafka_commit_due && s->rk != NULL &&
			TimestampDifferenceExceeds(s->kafka_committed_at, now, KAFKA_COMMIT_MS))
			commit_to_kafka(s, false);
		publish_parts(s);
	}
	set_worker_state();

	if (more || next_retry_at == 0)
		return 0;
	now = GetCurrentTimestamp();
	wake = Min(next_catalog_at, next_retry_at);
	foreach(lc, sinks)
	{
		Sink	   *s = lfirst(lc);

		if ((s->nbatch > 0 || s->pending_assign) && s->retry_at > now)
			wake = Min(wake, s->retry_at);
		if (s->kafka_commit_due)
			wake = Min(wake, TimestampTzPlusMilliseconds(s->kafka_committed_at, KAFKA_COMMIT_MS));
	}
	if (fetching != NULL || dl_in_flight != NIL || dl_to_send != NIL)
		wake = Min(wake, TimestampTzPlusMilliseconds(now, 100));
	return Max(1, Min(1000, (wake - now) / 1000 + 1));
}

static void
sink_wait(long timeout_ms)
{
	WaitEvent	events[3];

	(void) WaitEventSetWait(wait_set, timeout_ms, events, lengthof(events), PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * SIGTERM: the loop stops at its next turn (stop_everything()).  A handler
 * or route running now is interrupted (as die() does), so that a slow one
 * does not hold a shutdown or DROP DATABASE ... WITH (FORCE) back: its
 * transaction is rolled back.
 */
static void
sink_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	ShutdownRequestPending = true;
	if (sink_in_user_code && !proc_exit_inprogress)
	{
		InterruptPending = true;
		ProcDiePending = true;
	}
	SetLatch(MyLatch);
	errno = save_errno;
}

/* User code starts: a shutdown requested already interrupts it at once. */
void
sink_enter_user_code(void)
{
	sink_in_user_code = true;
	if (ShutdownRequestPending && !proc_exit_inprogress)
	{
		InterruptPending = true;
		ProcDiePending = true;
	}
}

void
cqrs_sink_main(Datum main_arg)
{
	sigjmp_buf	local_sigjmp_buf;

	my_index = DatumGetInt32(main_arg);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, sink_sigterm);
	BackgroundWorkerUnblockSignals();

	if (!sink_shmem_ready() || my_index < 0 || my_index >= CQRS_SINK_MAX_WORKERS)
		proc_exit(0);
	/* not wanted (any more), or started twice: go for good */
	if ((my_index > 0 && my_index >= cqrs_sink_workers) || !sink_worker_claim(my_index))
		proc_exit(0);
	before_shmem_exit(sink_detach_shmem, (Datum) 0);

	connected_db = MemoryContextStrdup(TopMemoryContext, effective_database());
	BackgroundWorkerInitializeConnection(connected_db, NULL, 0);
	pin_settings();
	dl_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync sink dead letters",
								   ALLOCSET_DEFAULT_SIZES);
	turn_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync sink turn",
									 ALLOCSET_DEFAULT_SIZES);

	ereport(LOG,
			(errmsg("cqrs_sync sink worker %d started in database \"%s\", brokers \"%s\"",
					my_index, connected_db, cqrs_brokers)));
	if (my_index == 0)
		launch_workers();

	wait_set = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(wait_set, WL_SOCKET_READABLE, cqrs_kafka_event_fd(), NULL, NULL);

	/*
	 * An error outside the sink's own transactions (they catch theirs) comes
	 * back here: roll back, pause, go on.  The batches stay in memory.
	 */
	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		ErrorData  *edata;

		error_context_stack = NULL;
		HOLD_INTERRUPTS();
		edata = cqrs_report_and_abort(TopMemoryContext);
		sink_worker_set_state(my_index, SINK_STATE_WAITING_DATABASE, edata->message);
		FreeErrorData(edata);
		RESUME_INTERRUPTS();
		MemoryContextReset(turn_cxt);
		pg_usleep(1000000L);
	}
	PG_exception_stack = &local_sigjmp_buf;

	while (!ShutdownRequestPending)
	{
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			reload_settings();
			if (my_index > 0 && my_index >= cqrs_sink_workers)
			{
				ereport(LOG,
						(errmsg("cqrs_sync sink worker %d is no longer wanted (cqrs_sync.sink_workers = %d); leaving",
								my_index, cqrs_sink_workers)));
				stop_everything();
				proc_exit(0);
			}
		}
		MemoryContextSwitchTo(turn_cxt);
		sleep_ms = sink_turn();
		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(turn_cxt);
		if (ShutdownRequestPending)
			break;
		sink_wait(sleep_ms);
	}

	stop_everything();
	ereport(LOG, (errmsg("cqrs_sync sink worker %d shutting down", my_index)));
	proc_exit(1);
}
