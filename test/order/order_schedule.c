/*-------------------------------------------------------------------------
 *
 * order_schedule.c
 *	  Test module: drives the relay's per-key order (src/relay_order.c)
 *	  through a written schedule of claims, produces, acknowledgements,
 *	  failures and recordings, and prints what it decided and what a Kafka
 *	  partition would hold.
 *
 * Some schedules the order must survive need a delivery report to come at
 * an exact moment relative to a retry's time, a dead letter's recording or
 * a claim: Kafka cannot be made to answer in that order on purpose.  This
 * module calls the functions relay_pipeline.c calls, in the order it calls
 * them, with rows kept in memory instead of the outbox: a claim walks the
 * rows above order_scan_start()'s answer in id order, skips those in flight
 * (the pipeline's shared table of ids, from produce to recording), and asks
 * order_judge(); a produce asks order_blocked() for each claimed row; a
 * report goes to order_acked() or order_failed(); a recording to
 * order_recorded().  The in-flight registry is the real one (shmem.c): a
 * transaction of another session that enqueues holds rows here too.
 *
 * The functions come from cqrs_sync.so, which the server preloads; this
 * library is loaded after it and resolves them there.  Each backend has its
 * own copy of their state.  Test infrastructure: built by
 * test/order/build.sh, never installed.
 *
 *	  SELECT * FROM cqrs_test_order_schedule($$
 *		row 1 k
 *		row 2 k
 *		claim
 *		produce
 *		fail 1 retry 10000
 *		ack 2
 *		record
 *		kafka
 *	  $$);
 *
 * Each call starts a new schedule (the order forgets everything, as after
 * the relay's start), unless its first line is "continue": then it goes on
 * with the schedule of the backend's previous call.
 *
 * Commands, one per line ('#' starts a comment); a report for a row that is
 * not in flight (the order kept it back) prints "not in flight" and changes
 * nothing:
 *	  row ID KEY			a committed PENDING row (topic "t")
 *	  claim					a claim (the registry is read, then the rows)
 *	  abort					the last claim's transaction failed
 *	  produce				produce the claimed rows, in id order
 *	  ack ID				ID's report: acknowledged
 *	  fail ID retry MS		ID's report: failed, to be retried after MS
 *							(0 for a row that failed behind its key's
 *							first failure, as the pipeline does)
 *	  fail ID dlt			ID's report: failed for good; its dead letter
 *							is produced (in flight)
 *	  dltack ID				its dead letter was acknowledged
 *	  record				record every outcome, in the order they came
 *	  time MS				MS milliseconds pass
 *	  kafka					print the partition: the rows acknowledged, in
 *							the order they were produced, and whether the
 *							last copies of each key's rows are in id order
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "relay.h"
#include "shmem.h"

PG_MODULE_MAGIC;

#define MAX_ROWS	64
#define MAX_LOG		256
#define TOPIC		"t"

typedef enum RowStatus
{
	RS_PENDING,
	RS_SENT,
	RS_DEAD
} RowStatus;

typedef struct TestRow
{
	RelayRow	rr;				/* what relay_order.c sees */
	char		key[32];
	RowStatus	status;
	TimestampTz next_at;		/* next_attempt_at; 0: none */
	bool		claimed;
	bool		inflight;		/* in the pipeline's table of ids */
	bool		dlt;			/* its dead letter is in flight */
	bool		done;			/* its outcome waits to be recorded */
	int			done_seq;
	int			produce_seq;	/* of its last produce */
} TestRow;

typedef struct LogEntry
{
	int			seq;
	int64		id;
} LogEntry;

static TestRow rows[MAX_ROWS];
static int	nrows;
static int64 cursor;
static int64 cursor_before;		/* before the last claim (abort) */
static int64 last_start;
static int	produce_seq;
static int	done_seq;
static LogEntry kafka_log[MAX_LOG];
static int	nlog;
static TimestampTz base;
static int64 elapsed_ms;

PG_FUNCTION_INFO_V1(cqrs_test_order_schedule);

static TimestampTz
vnow(void)
{
	return base + elapsed_ms * 1000;
}

static TestRow *
find_row(int64 id)
{
	for (int i = 0; i < nrows; i++)
		if (rows[i].rr.msg.id == id)
			return &rows[i];
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("no row " INT64_FORMAT " in the schedule", id)));
	return NULL;
}

static int
by_id(const void *a, const void *b)
{
	int64		x = ((const TestRow *) a)->rr.msg.id;
	int64		y = ((const TestRow *) b)->rr.msg.id;

	return (x > y) - (x < y);
}

static const char *
outcome_name(RelayOutcome o)
{
	switch (o)
	{
		case RO_SENT:
			return "SENT";
		case RO_REDO:
			return "REDO";
		case RO_RETRY:
			return "RETRY";
		case RO_DEAD:
			return "DEAD";
		case RO_DLT_FAILED:
			return "DLT_FAILED";
		default:
			return "NONE";
	}
}

static void
cmd_row(int64 id, const char *key, StringInfo out)
{
	TestRow    *r;

	if (nrows == MAX_ROWS)
		elog(ERROR, "too many rows");
	r = &rows[nrows++];
	memset(r, 0, sizeof(*r));
	strlcpy(r->key, key, sizeof(r->key));
	r->rr.msg.id = id;
	r->rr.msg.topic = TOPIC;
	r->rr.topic = TOPIC;
	r->rr.msg.key = r->key;
	r->rr.msg.keylen = strlen(r->key);
	r->rr.keyhash = cqrs_key_hash(r->key, r->rr.msg.keylen);
	r->rr.holdhash = hash_combine64(cqrs_key_hash(TOPIC, strlen(TOPIC)), r->rr.keyhash);
	r->status = RS_PENDING;
	/* the rows stay in id order, as the primary key walks them */
	qsort(rows, nrows, sizeof(TestRow), by_id);
}

/* pipeline_claim() and pipeline_claim_commit(), without the outbox */
static void
cmd_claim(StringInfo out)
{
	int64		hw = 0;
	int64		start;

	for (int i = 0; i < nrows; i++)
		hw = Max(hw, rows[i].rr.msg.id);
	(void) order_read_registry(hw, cursor);
	(void) order_expire(vnow(), cursor);	/* pipeline_timers() */
	start = order_scan_start(cursor);
	last_start = start;
	cursor_before = cursor;
	appendStringInfo(out, "claim above " INT64_FORMAT ":", start);
	for (int i = 0; i < nrows; i++)
	{
		TestRow    *r = &rows[i];
		bool		waiting;
		OrderVerdict v;

		if (r->rr.msg.id <= start || r->status != RS_PENDING)
			continue;
		if (r->inflight)
		{
			appendStringInfo(out, " " INT64_FORMAT " skip", r->rr.msg.id);
			continue;
		}
		waiting = (r->next_at != 0 && r->next_at > vnow());
		v = order_judge(&r->rr, waiting, r->next_at);
		appendStringInfo(out, " " INT64_FORMAT " %s", r->rr.msg.id,
						 v == ORDER_GO ? "go" : v == ORDER_HOLD ? "hold" : "skip");
		if (v == ORDER_GO)
			r->claimed = true;
	}
	cursor = Max(hw, start);
}

/* pipeline_claim_abort() */
static void
cmd_abort(StringInfo out)
{
	for (int i = 0; i < nrows; i++)
		rows[i].claimed = false;
	cursor = cursor_before;
	order_revisit(last_start + 1);
	appendStringInfo(out, "claim aborted");
}

/* pipeline_produce_claimed() */
static void
cmd_produce(StringInfo out)
{
	appendStringInfoString(out, "produce:");
	for (int i = 0; i < nrows; i++)
	{
		TestRow    *r = &rows[i];

		if (!r->claimed)
			continue;
		r->claimed = false;
		if (order_blocked(&r->rr))
		{
			order_hold(&r->rr);
			appendStringInfo(out, " " INT64_FORMAT " held", r->rr.msg.id);
			continue;
		}
		order_produced(&r->rr);
		r->inflight = true;
		r->produce_seq = ++produce_seq;
		appendStringInfo(out, " " INT64_FORMAT, r->rr.msg.id);
	}
}

static void
finish(TestRow *r, RelayOutcome o)
{
	r->rr.outcome = o;
	r->done = true;
	r->done_seq = ++done_seq;
}

static void
cmd_ack(int64 id, StringInfo out)
{
	TestRow    *r = find_row(id);
	RelayOutcome o;

	/* a step the order made impossible is said, so that the rest still runs */
	if (!r->inflight || r->done || r->dlt)
	{
		appendStringInfo(out, "ack " INT64_FORMAT ": not in flight", id);
		return;
	}
	if (nlog == MAX_LOG)
		elog(ERROR, "too many messages");
	kafka_log[nlog].seq = r->produce_seq;
	kafka_log[nlog++].id = id;
	o = order_acked(&r->rr);
	finish(r, o);
	appendStringInfo(out, "ack " INT64_FORMAT ": %s", id, outcome_name(o));
}

/* handle_failure(), for a message error */
static void
cmd_fail(int64 id, const char *what, int ms, StringInfo out)
{
	TestRow    *r = find_row(id);
	bool		first;

	if (!r->inflight || r->done || r->dlt)
	{
		appendStringInfo(out, "fail " INT64_FORMAT ": not in flight", id);
		return;
	}
	first = order_failed(&r->rr, true);
	if (strcmp(what, "dlt") == 0)
		r->dlt = true;
	else
	{
		r->rr.delay_ms = first ? ms : 0;
		finish(r, RO_RETRY);
	}
	appendStringInfo(out, "fail " INT64_FORMAT ": %s failure%s", id,
					 first ? "first" : "later",
					 r->dlt ? ", dead letter in flight" : "");
}

static void
cmd_dltack(int64 id, StringInfo out)
{
	TestRow    *r = find_row(id);

	if (!r->dlt || r->done)
	{
		appendStringInfo(out, "dead letter " INT64_FORMAT ": not in flight", id);
		return;
	}
	finish(r, RO_DEAD);
	appendStringInfo(out, "dead letter " INT64_FORMAT " acknowledged", id);
}

/* relay_record.c's statements, then pipeline_recorded() */
static void
cmd_record(StringInfo out)
{
	appendStringInfoString(out, "record:");
	for (int seq = 1; seq <= done_seq; seq++)
		for (int i = 0; i < nrows; i++)
		{
			TestRow    *r = &rows[i];

			if (!r->done || r->done_seq != seq)
				continue;
			switch (r->rr.outcome)
			{
				case RO_SENT:
					r->status = RS_SENT;
					break;
				case RO_DEAD:
					r->status = RS_DEAD;
					break;
				case RO_RETRY:
					r->next_at = r->rr.delay_ms > 0 ?
						TimestampTzPlusMilliseconds(GetCurrentTimestamp(), r->rr.delay_ms) : 0;
					break;
				default:
					r->next_at = 0;
					break;
			}
			order_recorded(&r->rr);
			appendStringInfo(out, " " INT64_FORMAT " %s", r->rr.msg.id,
							 outcome_name(r->rr.outcome));
			r->done = false;
			r->dlt = false;
			r->inflight = false;
			r->rr.outcome = RO_NONE;
		}
	done_seq = 0;
}

static int
by_seq(const void *a, const void *b)
{
	return ((const LogEntry *) a)->seq - ((const LogEntry *) b)->seq;
}

/* Does a later entry of the log hold another copy of entry i's row? */
static bool
later_copy_of(LogEntry *log, int n, int i)
{
	for (int j = i + 1; j < n; j++)
		if (log[j].id == log[i].id)
			return true;
	return false;
}

/*
 * What the partition holds, and whether the last copies of each key's rows
 * are in id order.
 */
static void
cmd_kafka(StringInfo out)
{
	LogEntry	log[MAX_LOG];
	bool		ordered = true;

	memcpy(log, kafka_log, sizeof(LogEntry) * nlog);
	qsort(log, nlog, sizeof(LogEntry), by_seq);
	appendStringInfoString(out, "kafka:");
	for (int i = 0; i < nlog; i++)
		appendStringInfo(out, " " INT64_FORMAT, log[i].id);
	/* a key's last copies, in log order, must come in id order */
	for (int i = 0; i < nlog; i++)
	{
		if (later_copy_of(log, nlog, i))
			continue;
		for (int j = i + 1; j < nlog; j++)
			if (!later_copy_of(log, nlog, j) && log[j].id < log[i].id &&
				strcmp(find_row(log[j].id)->key, find_row(log[i].id)->key) == 0)
				ordered = false;
	}
	appendStringInfoString(out, ordered ? " (last copies in id order)" :
						   " (OUT OF ORDER)");
}

Datum
cqrs_test_order_schedule(PG_FUNCTION_ARGS)
{
	char	   *script = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	static bool initialized = false;
	char	   *line;
	char	   *save;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	if (!initialized)
	{
		order_init(cqrs_shared->nslots);
		initialized = true;
	}
	script += strspn(script, " \t\n");
	if (strncmp(script, "continue", 8) == 0 && (script[8] == '\n' || script[8] == '\0'))
		script += 8;
	else
	{
		order_reset();
		nrows = 0;
		cursor = 0;
		last_start = 0;
		cursor_before = 0;
		produce_seq = 0;
		done_seq = 0;
		nlog = 0;
		base = GetCurrentTimestamp();
		elapsed_ms = 0;
	}

	for (line = strtok_r(script, "\n", &save); line != NULL;
		 line = strtok_r(NULL, "\n", &save))
	{
		char		cmd[16];
		char		arg[32];
		char		what[16];
		long long	id;
		int			ms = 0;
		int			n;
		StringInfoData out;
		Datum		value;
		bool		isnull = false;
		char	   *hash = strchr(line, '#');

		if (hash)
			*hash = '\0';
		n = sscanf(line, "%15s %lld %31s %d", cmd, &id, arg, &ms);
		if (n <= 0)
			continue;
		initStringInfo(&out);
		if (strcmp(cmd, "row") == 0 && n >= 3)
		{
			cmd_row(id, arg, &out);
			continue;
		}
		else if (strcmp(cmd, "claim") == 0)
			cmd_claim(&out);
		else if (strcmp(cmd, "abort") == 0)
			cmd_abort(&out);
		else if (strcmp(cmd, "produce") == 0)
			cmd_produce(&out);
		else if (strcmp(cmd, "ack") == 0 && n >= 2)
			cmd_ack(id, &out);
		else if (strcmp(cmd, "fail") == 0 && n >= 3)
		{
			strlcpy(what, arg, sizeof(what));
			if (strcmp(what, "dlt") != 0 && (strcmp(what, "retry") != 0 || n < 4))
				elog(ERROR, "fail ID retry MS, or fail ID dlt");
			cmd_fail(id, what, ms, &out);
		}
		else if (strcmp(cmd, "dltack") == 0 && n >= 2)
			cmd_dltack(id, &out);
		else if (strcmp(cmd, "record") == 0)
			cmd_record(&out);
		else if (strcmp(cmd, "time") == 0 && n >= 2)
		{
			elapsed_ms += id;
			appendStringInfo(&out, "time +%lld ms", id);
		}
		else if (strcmp(cmd, "kafka") == 0)
			cmd_kafka(&out);
		else
			ereport(ERROR,
					(errcode(ERRCODE_SYNTAX_ERROR),
					 errmsg("bad schedule line \"%s\"", line)));
		value = CStringGetTextDatum(out.data);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &value, &isnull);
		pfree(out.data);
	}
	PG_RETURN_NULL();
}
