/*-------------------------------------------------------------------------
 *
 * relay_record.c
 *	  Recording the relay's outcomes in the outbox, and its alerts.
 *
 * In the relay's transaction (relay_worker.c), before it claims more rows:
 * acknowledged rows become SENT (or are deleted with
 * cqrs_sync.delete_on_sent), failed ones get their retry time and error,
 * dead-lettered ones DEAD_LETTERED, and those the dead-letter topic refused
 * DLT_FAILED, each kind with one statement for all its rows.  Every failed
 * dead-letter publish of a row adds one to its dlt_retry_count (operator
 * retries do not reset it) and leaves a DLT_PUBLISH_FAILED row with its
 * error in cqrs_outbox_audit, in the same statement.  Alerts go out
 * in the same transaction as NOTIFYs on channel cqrs_sync_alert, with JSON
 * payloads of bounded size that carry ids, topic and error, never keys or
 * payloads.  Log lines and counters follow once the transaction committed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "cqrs_sync.h"
#include "relay.h"
#include "shmem.h"
#include "util.h"

/* longest error text in an alert (the payload limit is 8000 bytes) */
#define ALERT_ERROR_BYTES 1000

static SPIPlanPtr sent_plan = NULL;
static SPIPlanPtr sent_delete_plan = NULL;
static SPIPlanPtr fail_plan = NULL;
static SPIPlanPtr dead_plan = NULL;
static SPIPlanPtr dltfail_plan = NULL;

/* What the plans return (they audit from version 0.2.0 on) */
static int	fail_plan_ok;
static int	dltfail_plan_ok;

/* Alerts waiting for the next transaction (e.g. a partition stalled). */
static List *queued_alerts = NIL;

static void
free_plan(SPIPlanPtr *plan)
{
	if (*plan != NULL)
		SPI_freeplan(*plan);
	*plan = NULL;
}

/*
 * Prepare the plans for the outbox and, when it can take the relay's
 * entries, the audit trail (NULL: before version 0.2.0).
 */
void
record_prepare(const char *outbox, const char *audit)
{
	Oid			sent_types[2] = {INT8ARRAYOID, TIMESTAMPTZOID};
	Oid			fail_types[5] = {INT8ARRAYOID, INT4ARRAYOID, FLOAT8ARRAYOID, TEXTARRAYOID,
	INT4ARRAYOID};
	char	   *update;
	Oid			dead_types[3] = {INT8ARRAYOID, INT4ARRAYOID, TEXTARRAYOID};

	/* one by one: a prepare below may fail, and leave the rest unset */
	free_plan(&sent_plan);
	free_plan(&sent_delete_plan);
	free_plan(&fail_plan);
	free_plan(&dead_plan);
	free_plan(&dltfail_plan);
	sent_plan = cqrs_keep_plan(psprintf(
										"UPDATE %s SET status = 'SENT', sent_at = $2,"
										" next_attempt_at = NULL, last_error = NULL"
										" WHERE id = ANY ($1) AND status = 'PENDING'", outbox),
							   2, sent_types);
	sent_delete_plan = cqrs_keep_plan(psprintf(
											   "DELETE FROM %s WHERE id = ANY ($1) AND status = 'PENDING'",
											   outbox),
									  1, sent_types);
	/* $5: 1 when the row's dead-letter publish failed (it stays PENDING) */
	update = psprintf("UPDATE %s o SET retry_count = o.retry_count + f.inc,"
					  " dlt_retry_count = o.dlt_retry_count + f.dlt_inc,"
					  " next_attempt_at = CASE WHEN f.delay_ms > 0"
					  " THEN now() + f.delay_ms * interval '1 millisecond' END,"
					  " last_error = f.err"
					  " FROM unnest($1, $2, $3, $4, $5) AS f(id, inc, delay_ms, err, dlt_inc)"
					  " WHERE o.id = f.id AND o.status = 'PENDING'", outbox);
	if (audit)
	{
		fail_plan = cqrs_keep_plan(psprintf(
											"WITH u AS (%s RETURNING o.id, o.event_id, o.topic, o.key, o.status,"
											"                      f.err, f.dlt_inc)"
											" INSERT INTO %s (action, outbox_id, event_id, topic, key, status, reason)"
											" SELECT 'DLT_PUBLISH_FAILED', id, event_id, topic, key, status, err"
											"   FROM u WHERE dlt_inc > 0", update, audit),
								   5, fail_types);
		fail_plan_ok = SPI_OK_INSERT;
	}
	else
	{
		fail_plan = cqrs_keep_plan(update, 5, fail_types);
		fail_plan_ok = SPI_OK_UPDATE;
	}
	dead_plan = cqrs_keep_plan(psprintf(
										"UPDATE %s o SET status = 'DEAD_LETTERED', retry_count = f.cnt,"
										" last_error = coalesce(f.err, 'unknown error'), next_attempt_at = NULL,"
										" purge_approved_by = NULL, purge_approved_at = NULL"
										" FROM unnest($1, $2, $3) AS f(id, cnt, err)"
										" WHERE o.id = f.id AND o.status = 'PENDING'", outbox),
							   3, dead_types);
	update = psprintf("UPDATE %s o SET status = 'DLT_FAILED', retry_count = f.cnt,"
					  " dlt_retry_count = o.dlt_retry_count + 1,"
					  " last_error = coalesce(f.err, 'unknown error'), next_attempt_at = NULL,"
					  " purge_approved_by = NULL, purge_approved_at = NULL"
					  " FROM unnest($1, $2, $3) AS f(id, cnt, err)"
					  " WHERE o.id = f.id AND o.status = 'PENDING'", outbox);
	if (audit)
	{
		dltfail_plan = cqrs_keep_plan(psprintf(
											   "WITH u AS (%s RETURNING o.id, o.event_id, o.topic, o.key,"
											   "                      o.dlt_retry_count, f.err),"
											   " a AS (INSERT INTO %s (action, outbox_id, event_id, topic, key, status, reason)"
											   "       SELECT 'DLT_PUBLISH_FAILED', id, event_id, topic, key, 'DLT_FAILED', err"
											   "         FROM u)"
											   " SELECT id, dlt_retry_count FROM u", update, audit),
									  3, dead_types);
		dltfail_plan_ok = SPI_OK_SELECT;
	}
	else
	{
		dltfail_plan = cqrs_keep_plan(psprintf("%s RETURNING o.id, o.dlt_retry_count", update),
									  3, dead_types);
		dltfail_plan_ok = SPI_OK_UPDATE_RETURNING;
	}
}

/* Execute a kept plan whose outcome must be expected. */
static void
run_plan(SPIPlanPtr plan, Datum *args, int expected, const char *what)
{
	int			ret = SPI_execute_plan(plan, args, NULL, false, 0);

	if (ret != expected)
		elog(ERROR, "cqrs_sync relay: %s failed: %s", what, SPI_result_code_string(ret));
}

/* Build an array of the given element type from n datums. */
static Datum
make_array(Datum *elems, int n, Oid elemtype)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_array(elems, n, elemtype, typlen, typbyval, typalign));
}

/* The text recorded as a row's last_error. */
static char *
row_error(RelayRow *row)
{
	char		buf[512];
	const char *err = row->error ? row->error :
		cqrs_kafka_error_text(row->msg.err, buf, sizeof(buf));

	if (row->dlt_error)
		return psprintf("%s; %s", err, row->dlt_error);
	return pstrdup(err);
}

/* Append "key":"escaped text (at most max bytes)" to an alert. */
static void
append_text(StringInfo buf, const char *key, const char *text, int max)
{
	int			len = pg_mbcliplen(text, strlen(text), max);
	char	   *clip = pnstrdup(text, len);

	appendStringInfo(buf, ",\"%s\":", key);
	escape_json(buf, clip);
	pfree(clip);
}

/* Send an alert (in the current transaction). */
static void
notify(StringInfo payload)
{
	cqrs_notify_alert("relay", payload->data);
}

/* Queue an alert for the relay's next transaction (a JSON object). */
void
record_queue_alert(const char *json)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	queued_alerts = lappend(queued_alerts, pstrdup(json));
	MemoryContextSwitchTo(old);
}

bool
record_alerts_queued(void)
{
	return queued_alerts != NIL;
}

/* The extension was dropped: its alerts have nowhere to go. */
void
record_forget_alerts(void)
{
	list_free_deep(queued_alerts);
	queued_alerts = NIL;
}

/*
 * Record the outcomes of the done rows, in the relay's transaction.  Returns
 * the number of outbox rows written (for the relay's count of recorded rows
 * not yet flushed).
 */
int
record_outcomes(dlist_head *rows, TimestampTz acked_at)
{
	int			nrows = 0;
	Datum	   *sent_ids;
	Datum	   *f_ids,
			   *f_inc,
			   *f_delay,
			   *f_err,
			   *f_dlt;
	Datum	   *d_ids,
			   *d_cnt,
			   *d_err;
	Datum	   *x_ids,
			   *x_cnt,
			   *x_err;
	int			nsent = 0,
				nfail = 0,
				ndead = 0,
				nxfail = 0;
	dlist_iter	it;
	ListCell   *lc;

	dlist_foreach(it, rows)
		nrows++;
	if (nrows == 0 && queued_alerts == NIL)
		return 0;

	sent_ids = palloc(sizeof(Datum) * Max(nrows, 1));
	f_ids = palloc(sizeof(Datum) * Max(nrows, 1));
	f_inc = palloc(sizeof(Datum) * Max(nrows, 1));
	f_delay = palloc(sizeof(Datum) * Max(nrows, 1));
	f_err = palloc(sizeof(Datum) * Max(nrows, 1));
	f_dlt = palloc(sizeof(Datum) * Max(nrows, 1));
	d_ids = palloc(sizeof(Datum) * Max(nrows, 1));
	d_cnt = palloc(sizeof(Datum) * Max(nrows, 1));
	d_err = palloc(sizeof(Datum) * Max(nrows, 1));
	x_ids = palloc(sizeof(Datum) * Max(nrows, 1));
	x_cnt = palloc(sizeof(Datum) * Max(nrows, 1));
	x_err = palloc(sizeof(Datum) * Max(nrows, 1));

	dlist_foreach(it, rows)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);

		switch (row->outcome)
		{
			case RO_SENT:
				sent_ids[nsent++] = Int64GetDatum(row->msg.id);
				break;
			case RO_RETRY:
				f_ids[nfail] = Int64GetDatum(row->msg.id);
				f_inc[nfail] = Int32GetDatum(row->inc);
				f_delay[nfail] = Float8GetDatum((double) row->delay_ms);
				f_err[nfail] = CStringGetTextDatum(row_error(row));
				f_dlt[nfail] = Int32GetDatum(row->dlt_attempt_failed ? 1 : 0);
				nfail++;
				break;
			case RO_DEAD:
				d_ids[ndead] = Int64GetDatum(row->msg.id);
				d_cnt[ndead] = Int32GetDatum(row->retry_count + 1);
				d_err[ndead] = CStringGetTextDatum(row_error(row));
				ndead++;
				break;
			case RO_DLT_FAILED:
				x_ids[nxfail] = Int64GetDatum(row->msg.id);
				x_cnt[nxfail] = Int32GetDatum(row->retry_count + 1);
				x_err[nxfail] = CStringGetTextDatum(row_error(row));
				nxfail++;
				break;
			default:
				/* REDO: stays PENDING as it is */
				break;
		}
	}

	if (nsent > 0)
	{
		Datum		args[2] = {make_array(sent_ids, nsent, INT8OID),
		TimestampTzGetDatum(acked_at)};

		/* cqrs_sync.delete_on_sent: a delivered row is not kept at all */
		if (cqrs_delete_on_sent)
			run_plan(sent_delete_plan, args, SPI_OK_DELETE, "deleting SENT rows");
		else
			run_plan(sent_plan, args, SPI_OK_UPDATE, "marking rows SENT");
	}
	if (nfail > 0)
	{
		Datum		args[5] = {make_array(f_ids, nfail, INT8OID),
			make_array(f_inc, nfail, INT4OID),
			make_array(f_delay, nfail, FLOAT8OID),
			make_array(f_err, nfail, TEXTOID),
		make_array(f_dlt, nfail, INT4OID)};

		run_plan(fail_plan, args, fail_plan_ok, "recording failures");
	}
	if (ndead > 0)
	{
		Datum		args[3] = {make_array(d_ids, ndead, INT8OID),
			make_array(d_cnt, ndead, INT4OID),
		make_array(d_err, ndead, TEXTOID)};

		run_plan(dead_plan, args, SPI_OK_UPDATE, "recording dead-lettered rows");
	}
	if (nxfail > 0)
	{
		Datum		args[3] = {make_array(x_ids, nxfail, INT8OID),
			make_array(x_cnt, nxfail, INT4OID),
		make_array(x_err, nxfail, TEXTOID)};
		HTAB	   *counts;
		HASHCTL		ctl;

		run_plan(dltfail_plan, args, dltfail_plan_ok, "recording DLT_FAILED rows");

		/* one alert per row: ids, topic and error; never its key */
		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(int64) * 2;
		ctl.hcxt = CurrentMemoryContext;
		counts = hash_create("cqrs_sync dlt_retry_count", 64, &ctl,
							 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		isnull;
			int64		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
														 SPI_tuptable->tupdesc, 1, &isnull));
			int64	   *e = hash_search(counts, &id, HASH_ENTER, NULL);

			e[1] = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i],
											   SPI_tuptable->tupdesc, 2, &isnull));
		}
		dlist_foreach(it, rows)
		{
			RelayRow   *row = dlist_container(RelayRow, node, it.cur);
			int64	   *e;
			StringInfoData buf;

			if (row->outcome != RO_DLT_FAILED)
				continue;
			e = hash_search(counts, &row->msg.id, HASH_FIND, NULL);
			if (e == NULL)
				continue;		/* no longer PENDING: an operator acted */
			initStringInfo(&buf);
			appendStringInfo(&buf, "{\"alert\":\"dlt_failed\",\"outbox_id\":" INT64_FORMAT,
							 row->msg.id);
			append_text(&buf, "event_id", row->msg.event_id, 64);
			append_text(&buf, "topic", row->topic, CQRS_TOPIC_MAXLEN);
			appendStringInfo(&buf, ",\"dlt_retry_count\":" INT64_FORMAT, e[1]);
			append_text(&buf, "error", row_error(row), ALERT_ERROR_BYTES);
			appendStringInfoChar(&buf, '}');
			notify(&buf);
		}
	}

	/* a topic newly paused: one alert */
	dlist_foreach(it, rows)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);
		StringInfoData buf;

		if (!row->newly_paused)
			continue;
		initStringInfo(&buf);
		appendStringInfoString(&buf, "{\"alert\":\"topic_paused\"");
		append_text(&buf, "topic", row->topic, CQRS_TOPIC_MAXLEN);
		append_text(&buf, "error", row_error(row), ALERT_ERROR_BYTES);
		appendStringInfo(&buf, ",\"paused_for_ms\":%d}", row->msg.tstate->pause_ms);
		notify(&buf);
	}

	foreach(lc, queued_alerts)
	{
		StringInfoData buf;

		initStringInfo(&buf);
		appendStringInfoString(&buf, (char *) lfirst(lc));
		notify(&buf);
	}
	return nsent + nfail + ndead + nxfail;
}

/*
 * The outcomes are committed: counters, log lines and warnings, and the
 * rows leave the pipeline.
 */
void
record_after_commit(dlist_head *rows)
{
	dlist_iter	it;
	int			nsent = 0,
				nfail = 0,
				ndead = 0;
	char	   *first_error = NULL;

	list_free_deep(queued_alerts);
	queued_alerts = NIL;

	dlist_foreach(it, rows)
	{
		RelayRow   *row = dlist_container(RelayRow, node, it.cur);

		switch (row->outcome)
		{
			case RO_SENT:
				nsent++;
				break;
			case RO_RETRY:
				nfail++;
				if (first_error == NULL)
				{
					char	   *err = row_error(row);

					first_error = psprintf("outbox id " INT64_FORMAT " (topic \"%s\"): %s",
										   row->msg.id, row->topic, err);
					pfree(err);
				}
				break;
			case RO_DEAD:
				ndead++;
				break;
			case RO_DLT_FAILED:
				{
					char	   *err = row_error(row);

					cqrs_relay_note_failure(err, 1);
					pg_atomic_fetch_add_u64(&cqrs_shared->dlt_failed, 1);
					ereport(WARNING,
							(errcode(CQRS_ERRCODE_DLT_FAILED),
							 errmsg("cqrs_sync relay: outbox row " INT64_FORMAT " could not be dead-lettered; it is DLT_FAILED",
									row->msg.id),
							 errdetail("Topic \"%s\", event %s: %s", row->topic,
									   row->msg.event_id, err),
							 errhint("Remove the cause, then call cqrs_retry(" INT64_FORMAT ") or cqrs_retry_dlt_failed(); cqrs_discard() drops it with a reason.",
									 row->msg.id)));
					pfree(err);
					break;
				}
			default:
				break;
		}
		if (row->newly_paused)
		{
			char	   *err = row_error(row);

			ereport(WARNING,
					(errcode(CQRS_ERRCODE_TOPIC_PAUSED),
					 errmsg("cqrs_sync relay: topic \"%s\" is paused: %s",
							row->topic, err),
					 errdetail("Its rows stay PENDING without spending their retry budget; the relay tries again with a growing pause of up to a minute."),
					 errhint("Check that the topic exists and that the relay's Kafka principal may write to it.")));
			pfree(err);
		}
	}

	if (nsent > 0)
		cqrs_relay_note_success(nsent);
	if (ndead > 0)
	{
		pg_atomic_fetch_add_u64(&cqrs_shared->dead_lettered, ndead);
		/* the dead letters are in their topics: measured, and paged, now */
		cqrs_wake_monitor();
		ereport(LOG,
				(errmsg("cqrs_sync relay: %d message(s) dead-lettered after %d failed attempts or more",
						ndead, cqrs_max_retries + 1)));
	}
	if (nfail > 0)
	{
		cqrs_relay_note_failure(first_error, nfail);
		ereport(LOG,
				(errmsg("cqrs_sync relay: %d message(s) failed, first %s", nfail, first_error),
				 errdetail("The rows stay PENDING and are tried again after a backoff; later rows of their keys wait.")));
		pfree(first_error);
	}
}
