/*-------------------------------------------------------------------------
 *
 * cleanup_worker.c
 *	  Retention: the cleanup pass, cqrs_cleanup(), cqrs_prune_read_side()
 *	  and the cleanup background worker.
 *
 * One pass:
 *
 * 1. Purge: DEAD_LETTERED and DLT_FAILED rows an operator approved
 *	  (cqrs_approve_purge()) more than cqrs_sync.purge_grace ago, and
 *	  enqueued more than cqrs_sync.dlt_retention ago, are deleted, each
 *	  leaving a PURGE row in cqrs_outbox_audit, in the same statement.  A
 *	  partial index on approved rows finds them.
 * 2. SENT: rows acknowledged more than cqrs_sync.sent_retention ago are
 *	  deleted.  The pass walks the outbox in id order, one window of
 *	  cqrs_sync.cleanup_batch_size rows per statement, and deletes the
 *	  expired SENT rows of each window.  It stops after the window holding
 *	  the first row enqueued after the cutoff: ids are handed out in time
 *	  order (the sequence has CACHE 1) and a row is enqueued no earlier than
 *	  its transaction started (created_at) and sent no earlier than it was
 *	  enqueued, so no row after it can have been sent before the cutoff.  A
 *	  pass therefore needs no index on sent_at (which would slow down every
 *	  UPDATE to SENT).
 *
 *	  Where it starts.  Below the point where the last pass stopped, what is
 *	  left is failed rows (deleted by the purge only), and rows that may
 *	  still need deleting: PENDING ones, and SENT ones within the retention.
 *	  The pass remembers that point (cqrs_cleanup_state.walk_from) and the
 *	  ids of those rows below it (walk_pending, up to WALK_PENDING_MAX); the
 *	  next pass looks the listed rows up by id and walks on from the point,
 *	  so old failed rows nobody approved are read once, not at every pass.
 *	  cqrs_retry() and cqrs_retry_dlt_failed() move the point back to the
 *	  rows they retry, and once a day a pass walks from id 0, so that rows
 *	  changed by hand are not missed either.
 *
 *	  The point never moves past an id that a running transaction may hold:
 *	  ids are taken at insert, not at commit, so a row with a low id can
 *	  become visible after the walk passed it.  Each pass reads the id
 *	  sequence and the time; once every transaction that could hold an
 *	  outbox id then (one of this database that has an xid or runs a
 *	  statement) has ended, the ids up to that value are settled.
 *
 *	  A window is always cqrs_sync.cleanup_batch_size rows; a per-call
 *	  budget that is nearly spent limits the rows deleted, not the rows
 *	  read, so a cluster of failed rows is never read one row per statement.
 * 3. Read side: inbox entries, delta memory and tombstones older than
 *	  cqrs_sync.inbox_retention, and those of dropped tables (whatever the
 *	  retention), are deleted in batches, within the same budget.
 *	  cqrs_prune_read_side() runs this step alone.
 *
 * PENDING rows are never deleted.  Failed rows locked by someone else (an
 * operator retrying or discarding them) are skipped (SKIP LOCKED) and left
 * for the next pass; a SENT row is checked again when it is deleted, and
 * left alone if it changed.
 *
 * The cleanup worker runs every statement of a pass in its own short
 * transaction.  cqrs_cleanup() and cqrs_prune_read_side(), functions, run
 * in their caller's transaction, which they cannot commit: they delete in
 * the same batches, but stop after cqrs_sync.cleanup_max_rows_per_call rows
 * so that transaction stays bounded, and say whether they finished.  All
 * pause cqrs_sync.cleanup_delay after each batch that deleted rows, so that
 * a long pass (a backlog of expired rows) takes only a share of the machine
 * from the relay: deleting writes WAL (a full-page image per page after a
 * checkpoint) that the relay's commits then wait for.
 *
 * Every pass is counted in shared memory (cleanup_stats.c, the view
 * cqrs_stats_cleanup): the worker's when it ends, a function's when its
 * caller's transaction commits; a failed one as an error with its message.
 * The worker waits at most 5 seconds for a lock (lock_timeout): a pass
 * blocked by a long transaction fails, and says so, instead of waiting
 * unseen.
 *
 * A database still on version 0.1.0 of the extension (before ALTER
 * EXTENSION ... UPDATE) has no cqrs_cleanup_state and no delta memory: the
 * walk then starts at id 0 every pass, as 0.1.0's did.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "storage/proc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "apply.h"
#include "cleanup_stats.h"
#include "cleanup_worker.h"
#include "cqrs_sync.h"
#include "util.h"

PG_FUNCTION_INFO_V1(cqrs_cleanup);
PG_FUNCTION_INFO_V1(cqrs_prune_read_side);
PGDLLEXPORT void cqrs_cleanup_main(Datum main_arg);

/* Rows below the walk's starting point it remembers by id, at most */
#define WALK_PENDING_MAX	1000

/* A pass walks from id 0 when the last such pass is older than this */
#define FULL_WALK_INTERVAL_S	(24 * 3600)

/* Settings */
int			cqrs_cleanup_interval_s = 60;
int			cqrs_sent_retention_s = 24 * 3600;
int			cqrs_dlt_retention_s = 7 * 24 * 3600;
int			cqrs_purge_grace_s = 3600;
int			cqrs_cleanup_batch_size = 2000;
int			cqrs_cleanup_max_rows_per_call = 500000;
int			cqrs_cleanup_delay_ms = 10;

/* What a pass deleted */
typedef struct CleanupResult
{
	int64		sent;
	int64		dead_lettered;
	int64		dlt_failed;
	int64		read_side;
	bool		complete;		/* false: stopped early, rows remain */
	bool		interrupted;	/* the worker stopped it to shut down */
} CleanupResult;

/*
 * Plans, prepared once per process for the extension's schema and tables
 * (rebuilt when ALTER EXTENSION ... UPDATE added tables).  NULL when the
 * installed version has no such table.
 */
typedef struct CleanupPlans
{
	Oid			ext;
	Oid			state_relid;	/* cqrs_cleanup_state (0.2.0) */
	Oid			delta_relid;	/* cqrs_delta_inbox (0.2.0) */
	SPIPlanPtr	purge;
	SPIPlanPtr	sent_window;
	SPIPlanPtr	sent_listed;
	SPIPlanPtr	state_get;
	SPIPlanPtr	state_put;
	SPIPlanPtr	id_sample;
	SPIPlanPtr	oldest_xact;
	SPIPlanPtr	prune_inbox;
	SPIPlanPtr	prune_delta;
	SPIPlanPtr	prune_tombstones;
	SPIPlanPtr	prune_gone_tombstones;
	SPIPlanPtr	prune_gone_delta;
} CleanupPlans;

static CleanupPlans plans;

/* The worker said once that the extension is missing. */
static bool said_missing = false;

/* Without the extension, the worker looks for it this often at most. */
#define EXTENSION_WAIT_MS 5000

void
cqrs_cleanup_init(void)
{
	DefineCustomIntVariable("cqrs_sync.cleanup_interval",
							"Time between two passes of the cleanup worker.",
							"0 turns the worker off (it then idles until the setting changes), for sites that schedule cqrs_cleanup() with pg_cron instead.",
							&cqrs_cleanup_interval_s,
							60, 0, INT_MAX / 1000,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.sent_retention",
							"How long SENT outbox rows are kept after Kafka acknowledged them (sent_at).",
							"The cleanup pass deletes older SENT rows. 0 deletes them at the next pass; -1 keeps them for ever.",
							&cqrs_sent_retention_s,
							24 * 3600, -1, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.dlt_retention",
							"Minimum age (since created_at) of a DEAD_LETTERED or DLT_FAILED outbox row before the cleanup pass purges it.",
							"Failed rows are purged only after an operator approved them with cqrs_approve_purge(), and cqrs_sync.purge_grace after the approval; every purge leaves a PURGE row in cqrs_outbox_audit. 0 purges approved rows at the first pass after the grace period; -1 never purges.",
							&cqrs_dlt_retention_s,
							7 * 24 * 3600, -1, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.purge_grace",
							"Time after its approval before the cleanup pass purges an approved failed outbox row.",
							"Time to change one's mind: until then cqrs_cancel_purge() or cqrs_retry() cancels the approval. It applies however old the row is (cqrs_sync.dlt_retention counts from created_at).",
							&cqrs_purge_grace_s,
							3600, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.cleanup_batch_size",
							"Outbox rows the cleanup pass reads and deletes per statement; also inbox entries, delta memory and tombstones.",
							"The cleanup worker commits after every statement, so it holds row locks and a snapshot for one batch only; small batches also spread the write-ahead log the deletes produce.",
							&cqrs_cleanup_batch_size,
							2000, 1, 1000000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.cleanup_delay",
							"Pause of the cleanup pass after each batch that deleted rows.",
							"Bounds the share of CPU and write-ahead log a long pass (a backlog of expired rows) takes from the relay and the applications, as vacuum_cost_delay does for vacuum; 0 runs passes at full speed.",
							&cqrs_cleanup_delay_ms,
							10, 0, 10000,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cqrs_sync.cleanup_max_rows_per_call",
							"Rows one call of cqrs_cleanup() or cqrs_prune_read_side() deletes at most.",
							"A function runs in its caller's transaction and cannot commit between batches; this bounds that transaction. Outbox rows, inbox entries, delta memory and tombstones count alike. A call that stops early says so (cqrs_cleanup() returns complete = false) and the next call continues. 0 means no limit. The cleanup worker commits after every batch and is not limited.",
							&cqrs_cleanup_max_rows_per_call,
							500000, 0, INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
}

/*
 * Register the cleanup worker; called from _PG_init during
 * shared_preload_libraries.
 */
void
cqrs_cleanup_register(void)
{
	cqrs_register_worker("cqrs_cleanup_main", "cqrs_sync cleanup", 5);
}

static void
free_plans(void)
{
	SPIPlanPtr *all[] = {&plans.purge, &plans.sent_window, &plans.sent_listed,
		&plans.state_get, &plans.state_put, &plans.id_sample, &plans.oldest_xact,
		&plans.prune_inbox, &plans.prune_delta, &plans.prune_tombstones,
	&plans.prune_gone_tombstones, &plans.prune_gone_delta};

	for (int i = 0; i < lengthof(all); i++)
	{
		if (*all[i])
			SPI_freeplan(*all[i]);
		*all[i] = NULL;
	}
	plans.ext = InvalidOid;
}

/*
 * Prepare the statements for the extension's current schema and tables.
 * Returns false when the extension does not exist in this database.  Inside
 * a transaction, SPI connected.  Every name is schema-qualified: the worker
 * and the SECURITY DEFINER functions all run with search_path = pg_catalog.
 */
static bool
ensure_plans(void)
{
	Oid			ext = get_extension_oid("cqrs_sync", true);
	const char *schema_name;
	const char *s;
	Oid			nsp;
	Oid			state_relid;
	Oid			delta_relid;
	Oid			purge_types[4] = {INT8OID, TIMESTAMPTZOID, INT4OID, TIMESTAMPTZOID};
	Oid			window_types[4] = {INT8OID, TIMESTAMPTZOID, INT4OID, INT4OID};
	Oid			listed_types[3] = {INT8ARRAYOID, TIMESTAMPTZOID, INT4OID};
	Oid			put_types[9] = {INT8OID, INT8OID, INT8ARRAYOID, INT8OID, INT8OID,
	TIMESTAMPTZOID, BOOLOID, INT8OID, BOOLOID};
	Oid			prune_types[2] = {TIMESTAMPTZOID, INT4OID};

	if (!OidIsValid(ext))
		return false;
	schema_name = cqrs_extension_schema(ext);
	nsp = get_namespace_oid(schema_name, false);
	state_relid = get_relname_relid("cqrs_cleanup_state", nsp);
	delta_relid = get_relname_relid("cqrs_delta_inbox", nsp);
	if (ext == plans.ext && state_relid == plans.state_relid &&
		delta_relid == plans.delta_relid)
		return true;

	free_plans();
	s = quote_identifier(schema_name);

	/*
	 * Rows are joined through "id = ANY (ARRAY(...))": a pkey look-up per id
	 * whatever the estimates (a nested loop over a CTE is quadratic).
	 *
	 * $1: last id of the previous batch, $2: cutoff (created_at), $3: batch
	 * size, $4: grace cutoff (approved at or before it).  Returns the rows locked,
	 * the last of them, and the rows purged per status.
	 */
	plans.purge = cqrs_keep_plan(psprintf(
										  "WITH c AS ("
										  " SELECT id FROM %s.cqrs_outbox"
										  "  WHERE purge_approved_at IS NOT NULL AND id > $1"
										  "    AND status IN ('DEAD_LETTERED', 'DLT_FAILED') AND created_at < $2"
										  "    AND purge_approved_at <= $4"
										  "  ORDER BY id LIMIT $3"
										  "  FOR UPDATE SKIP LOCKED),"
										  " d AS ("
										  " DELETE FROM %s.cqrs_outbox o"
										  "  WHERE o.id = ANY (ARRAY(SELECT id FROM c)) AND o.purge_approved_at <= $4"
										  "    AND o.status IN ('DEAD_LETTERED', 'DLT_FAILED') AND o.created_at < $2"
										  "  RETURNING o.id, o.event_id, o.topic, o.key, o.status, o.last_error,"
										  "            o.purge_approved_by, o.payload),"
										  " a AS ("
										  " INSERT INTO %s.cqrs_outbox_audit"
										  "        (action, outbox_id, event_id, topic, key, status, reason, approver, payload)"
										  " SELECT 'PURGE', id, event_id, topic, key, status, last_error, purge_approved_by, payload"
										  "   FROM d ORDER BY id"
										  " RETURNING status)"
										  " SELECT (SELECT count(*) FROM c), (SELECT max(id) FROM c),"
										  "        count(*) FILTER (WHERE status = 'DEAD_LETTERED'),"
										  "        count(*) FILTER (WHERE status = 'DLT_FAILED')"
										  "   FROM a", s, s, s),
								 4, purge_types);

	/*
	 * One window of the walk.  $1: the window starts after this id, $2:
	 * cutoff (sent_at), $3: window size, $4: rows it may delete.  Rows are
	 * deleted by ctid (no second index look-up) and not locked first (a lock
	 * is one more WAL record per row): nobody else updates SENT rows.  A row
	 * changed since the window was read has a new ctid and is left alone.
	 *
	 * Returns the rows deleted, the rows in the window, the last id the
	 * window accounts for (its last row, or the last row deleted when $4
	 * stopped it), whether that part reached a row enqueued after the
	 * cutoff, and the ids in it of rows that may need deleting later
	 * (PENDING rows, and SENT rows not due yet or beyond $4).  (A due row
	 * whose ctid changed under the delete is not listed: nobody updates
	 * SENT rows, and the daily walk from id 0 would find it.)
	 */
	plans.sent_window = cqrs_keep_plan(psprintf(
												"WITH w AS MATERIALIZED ("
												" SELECT ctid, id, status, sent_at, created_at FROM %s.cqrs_outbox"
												"  WHERE id > $1 ORDER BY id LIMIT $3),"
												" due AS MATERIALIZED ("
												" SELECT ctid, id FROM w WHERE status = 'SENT' AND sent_at < $2"
												"  ORDER BY id LIMIT $4),"
												" d AS ("
												" DELETE FROM %s.cqrs_outbox o"
												"  WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM due))"
												"    AND o.status = 'SENT' AND o.sent_at < $2"
												"  RETURNING o.id),"
												" f AS ("
												" SELECT CASE WHEN (SELECT count(*) FROM w WHERE status = 'SENT' AND sent_at < $2) > $4"
												"             THEN (SELECT max(id) FROM due) ELSE (SELECT max(id) FROM w) END AS upto)"
												" SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM w), f.upto,"
												"        coalesce((SELECT bool_or(created_at >= $2) FROM w WHERE id <= f.upto), false),"
												"        ARRAY(SELECT w.id FROM w WHERE w.id <= f.upto"
												"                AND (w.status = 'PENDING' OR (w.status = 'SENT'"
												"                     AND (NOT w.sent_at < $2 OR w.id > (SELECT coalesce(max(id), 0) FROM due))))"
												"              ORDER BY w.id)"
												"   FROM f", s, s),
									   4, window_types);

	if (OidIsValid(state_relid))
	{
		/*
		 * The rows the last pass listed: $1 their ids, $2 cutoff, $3 rows it
		 * may delete.  Returns the rows deleted and the ids of those that
		 * may still need deleting (PENDING rows, SENT rows not due yet or
		 * beyond $3).
		 */
		plans.sent_listed = cqrs_keep_plan(psprintf(
													"WITH l AS MATERIALIZED ("
													" SELECT ctid, id, status, sent_at FROM %s.cqrs_outbox"
													"  WHERE id = ANY ($1)),"
													" due AS MATERIALIZED ("
													" SELECT ctid, id FROM l WHERE status = 'SENT' AND sent_at < $2"
													"  ORDER BY id LIMIT $3),"
													" d AS ("
													" DELETE FROM %s.cqrs_outbox o"
													"  WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM due))"
													"    AND o.status = 'SENT' AND o.sent_at < $2"
													"  RETURNING o.id)"
													" SELECT (SELECT count(*) FROM d),"
													"        ARRAY(SELECT l.id FROM l WHERE l.status = 'PENDING' OR (l.status = 'SENT'"
													"                AND (NOT l.sent_at < $2 OR l.id > (SELECT coalesce(max(id), 0) FROM due)))"
													"              ORDER BY l.id)",
													s, s),
										   3, listed_types);
		plans.state_get = cqrs_keep_plan(psprintf(
												  "SELECT walk_from, walk_pending, settled_id, id_sample, id_sampled_at,"
												  "       full_walk_at IS NULL OR full_walk_at < pg_catalog.now() - pg_catalog.make_interval(secs => %d),"
												  "       retries"
												  "  FROM %s.cqrs_cleanup_state",
												  FULL_WALK_INTERVAL_S, s),
										 0, NULL);

		/*
		 * $1: walk_from when the pass read it, $2: the new one, $3: the rows
		 * listed, $4: settled id, $5, $6: the id sample and its time, $7:
		 * the pass walked from id 0, $8: the retries counted when the pass
		 * read the row, $9: the id sequence went back (settled_id starts
		 * over).  A retry (cqrs_retry(), cqrs_retry_dlt_failed()) lowers
		 * walk_from to the row it put back and counts itself: if one did
		 * while the pass ran, the pass may have read that row as failed and
		 * walked past it without listing it, so walk_from stays where the
		 * retry put it (or lower).  A pass that ran meanwhile may have
		 * saved a lower start too: the lower one wins.
		 *
		 * The row is locked with SKIP LOCKED: a retry not committed yet, or
		 * a cqrs_cleanup() in a transaction still open, holds it, and then
		 * the pass saves nothing (the state it read stays right, only less
		 * advanced) instead of waiting for that transaction.
		 */
		plans.state_put = cqrs_keep_plan(psprintf(
												  "UPDATE %s.cqrs_cleanup_state SET"
												  " walk_from = CASE WHEN walk_from = $1 AND retries = $8 THEN $2"
												  "                  ELSE LEAST(walk_from, $2) END,"
												  " walk_pending = $3,"
												  " settled_id = CASE WHEN $9 THEN $4 ELSE GREATEST(settled_id, $4) END,"
												  " id_sample = $5, id_sampled_at = $6,"
												  " full_walk_at = CASE WHEN $7 THEN pg_catalog.now() ELSE full_walk_at END"
												  " WHERE EXISTS (SELECT FROM %s.cqrs_cleanup_state FOR UPDATE SKIP LOCKED)",
												  s, s),
										 9, put_types);
		/* the last id issued: a sequence not called yet has issued none */
		plans.id_sample = cqrs_keep_plan(psprintf("SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END"
												  " FROM %s.cqrs_outbox_id_seq", s),
										 0, NULL);

		/*
		 * The oldest transaction that may hold an outbox id not yet visible:
		 * one of this database (only those can insert into its outbox) that
		 * has an xid or runs a statement (an insert has its id before its
		 * xid, within the statement); and whether one exists here whose start
		 * is unknown: a prepared transaction, or a session with
		 * track_activities off (no xact_start, no state) that has an xid or
		 * a snapshot (runs a statement, or a transaction that took one).
		 */
		plans.oldest_xact = cqrs_keep_plan("SELECT min(a.xact_start) FILTER (WHERE a.backend_xid IS NOT NULL OR a.state = 'active'),"
										   "       coalesce(bool_or(a.state = 'disabled'"
										   "                        AND (a.backend_xid IS NOT NULL OR a.backend_xmin IS NOT NULL)), false)"
										   "       OR EXISTS (SELECT FROM pg_catalog.pg_prepared_xacts p"
										   "                   WHERE p.database = pg_catalog.current_database())"
										   "  FROM pg_catalog.pg_stat_activity a"
										   " WHERE a.datid = (SELECT oid FROM pg_catalog.pg_database"
										   "                   WHERE datname = pg_catalog.current_database())"
										   "   AND a.pid <> pg_catalog.pg_backend_pid()"
										   "   AND a.backend_type <> 'autovacuum worker'",
										   0, NULL);
	}

	/* Read side: $1 cutoff, $2 batch size.  Returns the rows deleted. */
	plans.prune_inbox = cqrs_keep_plan(psprintf(
												"WITH d AS (DELETE FROM %s.cqrs_inbox WHERE ctid = ANY (ARRAY("
												" SELECT ctid FROM %s.cqrs_inbox WHERE processed_at < $1"
												"  ORDER BY processed_at LIMIT $2)) RETURNING 1)"
												" SELECT count(*) FROM d", s, s),
									   2, prune_types);
	plans.prune_tombstones = cqrs_keep_plan(psprintf(
													 "WITH d AS (DELETE FROM %s.cqrs_tombstone WHERE ctid = ANY (ARRAY("
													 " SELECT ctid FROM %s.cqrs_tombstone WHERE deleted_at < $1"
													 "  ORDER BY deleted_at LIMIT $2)) RETURNING 1)"
													 " SELECT count(*) FROM d", s, s),
											2, prune_types);

	/*
	 * Tombstones of dropped tables, whatever their age (a table created
	 * later may get the dropped one's OID): the targets are found by a skip
	 * scan of the primary key.  $1: batch size.
	 */
	plans.prune_gone_tombstones = cqrs_keep_plan(psprintf(
														  "WITH RECURSIVE t(target) AS ("
														  " SELECT min(target::pg_catalog.oid) FROM %s.cqrs_tombstone"
														  " UNION ALL"
														  " SELECT (SELECT min(tb.target::pg_catalog.oid) FROM %s.cqrs_tombstone tb"
														  "          WHERE tb.target > t.target)"
														  "   FROM t WHERE t.target IS NOT NULL),"
														  " gone AS (SELECT target FROM t WHERE target IS NOT NULL"
														  "   AND NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = t.target)),"
														  " d AS (DELETE FROM %s.cqrs_tombstone WHERE ctid = ANY (ARRAY("
														  "  SELECT ctid FROM %s.cqrs_tombstone"
														  "   WHERE target::pg_catalog.oid = ANY (ARRAY(SELECT target FROM gone)) LIMIT $1))"
														  "  RETURNING 1)"
														  " SELECT count(*) FROM d", s, s, s, s),
												 1, &prune_types[1]);
	if (OidIsValid(delta_relid))
	{
		plans.prune_delta = cqrs_keep_plan(psprintf(
													"WITH d AS (DELETE FROM %s.cqrs_delta_inbox WHERE ctid = ANY (ARRAY("
													" SELECT ctid FROM %s.cqrs_delta_inbox WHERE processed_at < $1"
													"  ORDER BY processed_at LIMIT $2)) RETURNING 1)"
													" SELECT count(*) FROM d", s, s),
										   2, prune_types);
		/* (consumer, target) pairs by a skip scan of the primary key */
		plans.prune_gone_delta = cqrs_keep_plan(psprintf(
														 "WITH RECURSIVE p(consumer, target) AS ("
														 " (SELECT consumer, target FROM %s.cqrs_delta_inbox ORDER BY consumer, target LIMIT 1)"
														 " UNION ALL"
														 " SELECT n.consumer, n.target FROM p, LATERAL ("
														 "  SELECT di.consumer, di.target FROM %s.cqrs_delta_inbox di"
														 "   WHERE (di.consumer, di.target) > (p.consumer, p.target)"
														 "   ORDER BY di.consumer, di.target LIMIT 1) n),"
														 " gone AS (SELECT consumer, target FROM p"
														 "   WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = p.target)),"
														 " d AS (DELETE FROM %s.cqrs_delta_inbox WHERE ctid = ANY (ARRAY("
														 "  SELECT di.ctid FROM %s.cqrs_delta_inbox di JOIN gone g"
														 "   ON di.consumer = g.consumer AND di.target = g.target LIMIT $1))"
														 "  RETURNING 1)"
														 " SELECT count(*) FROM d", s, s, s, s),
												1, &prune_types[1]);
	}
	plans.state_relid = state_relid;
	plans.delta_relid = delta_relid;
	plans.ext = ext;
	return true;
}

static int64
get_int8(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/* An int8[] result column as an array allocated in cxt; *n its length */
static int64 *
get_int8_array(HeapTuple tup, TupleDesc desc, int col, int *n, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);
	Datum	   *elems;
	int64	   *res;

	*n = 0;
	if (isnull)
		return NULL;
	deconstruct_array(DatumGetArrayTypeP(d), INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &elems, NULL, n);
	res = MemoryContextAlloc(cxt, sizeof(int64) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
		res[i] = DatumGetInt64(elems[i]);
	return res;
}

static Datum
int8_array_datum(int64 *ids, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		elems[i] = Int64GetDatum(ids[i]);
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

/*
 * A pass.  With own_xacts (the worker), every statement runs in its own
 * transaction, started here; else all run in the caller's transaction,
 * with SPI connected.
 */
typedef struct PassState
{
	bool		own_xacts;
	MemoryContext cxt;			/* for what outlives a batch's transaction */
	int64		budget;			/* rows left to delete; < 0: no limit */
	bool		pause;			/* the last batch deleted rows */
} PassState;

static void
batch_begin(PassState *ps, const char *activity)
{
	if (!ps->own_xacts)
	{
		CHECK_FOR_INTERRUPTS();
		return;
	}
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
batch_end(PassState *ps)
{
	if (!ps->own_xacts)
		return;
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
}

/*
 * Before a batch: pause cqrs_sync.cleanup_delay if the previous batch
 * deleted rows (reading is cheap; deleting writes WAL the relay's commits
 * then wait for).  The worker stops when asked to shut down: returns true.
 */
static bool
stop_requested(PassState *ps)
{
	if (ps->pause && cqrs_cleanup_delay_ms > 0 &&
		!(ps->own_xacts && ShutdownRequestPending))
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 cqrs_cleanup_delay_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	ps->pause = false;
	if (!ps->own_xacts)
	{
		/* a cancel or statement_timeout stops cqrs_cleanup() here */
		CHECK_FOR_INTERRUPTS();
		return false;
	}
	if (!PostmasterIsAlive())
		proc_exit(1);
	return ShutdownRequestPending;
}

/* How many rows the next batch may delete; 0: the budget is spent. */
static int
batch_limit(PassState *ps)
{
	if (ps->budget < 0)
		return cqrs_cleanup_batch_size;
	return (int) Min((int64) cqrs_cleanup_batch_size, ps->budget);
}

static void
spend(PassState *ps, int64 n)
{
	if (ps->budget >= 0)
		ps->budget = Max(ps->budget - n, 0);
}

/*
 * Starts a batch: returns how many rows it may delete, or 0 when the pass
 * stops here (the budget is spent: res->complete = false; or the worker is
 * shutting down).
 */
static int
next_batch(PassState *ps, CleanupResult *res, const char *activity)
{
	int			limit = batch_limit(ps);

	if (limit == 0)
	{
		res->complete = false;
		return 0;
	}
	if (stop_requested(ps))
	{
		res->interrupted = true;
		return 0;
	}
	batch_begin(ps, activity);
	return limit;
}

/* Ends a batch that deleted n rows (the next one pauses first if n > 0) */
static void
finish_batch(PassState *ps, int64 n)
{
	spend(ps, n);
	batch_end(ps);
	ps->pause = (n > 0);
}

static void
run_checked(SPIPlanPtr plan, Datum *args, const char *what)
{
	int			ret = SPI_execute_plan(plan, args, NULL, false, 0);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cqrs_sync cleanup: %s failed: %s", what,
			 SPI_result_code_string(ret));
}

static void
purge_failed(PassState *ps, TimestampTz cutoff, TimestampTz grace_cutoff,
			 CleanupResult *res)
{
	int64		after = 0;

	for (;;)
	{
		int			limit = next_batch(ps, res, "cqrs_sync cleanup: purging approved failed rows");
		Datum		args[4];
		int64		locked;

		if (limit == 0)
			return;
		args[0] = Int64GetDatum(after);
		args[1] = TimestampTzGetDatum(cutoff);
		args[2] = Int32GetDatum(limit);
		args[3] = TimestampTzGetDatum(grace_cutoff);
		run_checked(plans.purge, args, "purging failed rows");
		locked = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		after = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		res->dead_lettered += get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
		res->dlt_failed += get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
		finish_batch(ps, locked);

		if (locked < limit)
			return;
	}
}

/* Where the SENT walk starts, and what it remembers (cqrs_cleanup_state) */
typedef struct WalkState
{
	bool		kept;			/* the table exists (0.2.0) */
	int64		walk_from;		/* as read */
	int64	   *pending;		/* listed ids below walk_from */
	int			npending;
	int64		settled;		/* ids up to this one are settled */
	int64		sample;			/* this pass's id sample ... */
	TimestampTz sampled_at;		/* ... and its time */
	bool		full;			/* walk from id 0 */
	int64		retries;		/* retries counted when read */
	bool		restarted;		/* the id sequence went back */
} WalkState;

/*
 * Reads the walk's state and settles ids (see the top of the file): the
 * sequence's value and the time are read first, then the transactions
 * running; any of them that holds an id up to that value started before
 * that time.
 */
static void
walk_begin(PassState *ps, WalkState *ws)
{
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	bool		old_sample_null;
	int64		old_sample;
	TimestampTz old_sampled_at = 0;
	Datum		d;
	bool		unknown;
	TimestampTz oldest = 0;
	bool		none_running;

	memset(ws, 0, sizeof(*ws));
	ws->full = true;
	if (plans.state_get == NULL)
		return;
	ws->kept = true;

	batch_begin(ps, "cqrs_sync cleanup: reading where to start");
	run_checked(plans.state_get, NULL, "reading cqrs_cleanup_state");
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	ws->walk_from = get_int8(tup, desc, 1);
	ws->pending = get_int8_array(tup, desc, 2, &ws->npending, ps->cxt);
	ws->settled = get_int8(tup, desc, 3);
	old_sample = get_int8(tup, desc, 4);
	d = SPI_getbinval(tup, desc, 5, &old_sample_null);
	if (!old_sample_null)
		old_sampled_at = DatumGetTimestampTz(d);
	ws->full = DatumGetBool(SPI_getbinval(tup, desc, 6, &isnull));
	ws->retries = get_int8(tup, desc, 7);

	run_checked(plans.id_sample, NULL, "reading the outbox id sequence");
	ws->sample = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	ws->sampled_at = GetCurrentTimestamp();

	/*
	 * The id sequence went back (TRUNCATE ... RESTART IDENTITY): the ids
	 * remembered were of rows that are gone, and new rows take ids below
	 * walk_from.  Start over: walk from id 0, and settle ids anew.
	 */
	if (!old_sample_null && ws->sample < old_sample)
	{
		ws->restarted = true;
		ws->full = true;
		ws->settled = 0;
		ws->npending = 0;
	}

	/* as of now, also in a transaction that read them before */
	pgstat_clear_snapshot();
	run_checked(plans.oldest_xact, NULL, "reading the running transactions");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &none_running);
	if (!none_running)
		oldest = DatumGetTimestampTz(d);
	unknown = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	batch_end(ps);

	if (unknown)
		return;					/* nothing settles while one exists */
	if (none_running || oldest > ws->sampled_at)
		ws->settled = Max(ws->settled, ws->sample);
	else if (!old_sample_null && !ws->restarted && oldest > old_sampled_at)
		ws->settled = Max(ws->settled, old_sample);
}

static int
int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : (x > y ? 1 : 0);
}

/* Saves where the next walk starts and the rows it must look up. */
static void
walk_end(PassState *ps, WalkState *ws, int64 next_from, int64 *listed, int nlisted)
{
	Datum		args[9];
	int			n = 0;

	if (!ws->kept)
		return;

	/* ids at or after the start are walked again anyway */
	qsort(listed, nlisted, sizeof(int64), int64_cmp);
	for (int i = 0; i < nlisted; i++)
	{
		if (listed[i] >= next_from)
			break;
		if (n > 0 && listed[n - 1] == listed[i])
			continue;
		if (n == WALK_PENDING_MAX)
		{
			/* too many to list: the next walk starts at the first one left */
			next_from = listed[i];
			break;
		}
		listed[n++] = listed[i];
	}

	batch_begin(ps, "cqrs_sync cleanup: saving where to start");
	args[0] = Int64GetDatum(ws->walk_from);
	args[1] = Int64GetDatum(next_from);
	args[2] = int8_array_datum(listed, n);
	args[3] = Int64GetDatum(ws->settled);
	args[4] = Int64GetDatum(ws->sample);
	args[5] = TimestampTzGetDatum(ws->sampled_at);
	args[6] = BoolGetDatum(ws->full);
	args[7] = Int64GetDatum(ws->retries);
	args[8] = BoolGetDatum(ws->restarted);
	if (SPI_execute_plan(plans.state_put, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cqrs_sync cleanup: saving cqrs_cleanup_state failed");
	if (SPI_processed == 0)
		ereport(DEBUG1,
				(errmsg("cqrs_sync cleanup: cqrs_cleanup_state is locked by another transaction, the next pass starts where this one did")));
	batch_end(ps);
}

static void
delete_sent(PassState *ps, TimestampTz cutoff, CleanupResult *res)
{
	WalkState	ws;
	int64		after;
	int64	   *listed;
	int			nlisted = 0;
	int			maxlisted;
	int			window = cqrs_cleanup_batch_size;

	walk_begin(ps, &ws);
	maxlisted = ws.npending + WALK_PENDING_MAX + window;
	listed = MemoryContextAlloc(ps->cxt, sizeof(int64) * maxlisted);
	after = ws.full ? 0 : ws.walk_from - 1;

	/*
	 * The rows listed by the last pass, looked up by id, a batch at a time
	 * until fewer than a batch are due.  (If the budget runs out first, the
	 * state is left as it was: the next pass looks them up again.)
	 */
	if (!ws.full && ws.npending > 0)
	{
		memcpy(listed, ws.pending, sizeof(int64) * ws.npending);
		nlisted = ws.npending;
		for (;;)
		{
			int			limit = next_batch(ps, res, "cqrs_sync cleanup: deleting expired SENT rows");
			Datum		args[3];
			int64		deleted;
			int64	   *left;
			int			nleft;

			if (limit == 0)
				return;
			args[0] = int8_array_datum(listed, nlisted);
			args[1] = TimestampTzGetDatum(cutoff);
			args[2] = Int32GetDatum(limit);
			run_checked(plans.sent_listed, args, "deleting listed SENT rows");
			deleted = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			left = get_int8_array(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &nleft,
								  CurrentMemoryContext);
			memcpy(listed, left, sizeof(int64) * nleft);
			nlisted = nleft;
			res->sent += deleted;
			finish_batch(ps, deleted);
			if (deleted < limit || nlisted == 0)
				break;
		}
	}

	/* the walk */
	for (;;)
	{
		int			limit = next_batch(ps, res, "cqrs_sync cleanup: deleting expired SENT rows");
		Datum		args[4];
		int64		deleted;
		int64		visited;
		int64		upto;
		bool		isnull;
		bool		reached_cutoff;
		int64	   *left;
		int			nleft;

		if (limit == 0)
			break;
		args[0] = Int64GetDatum(after);
		args[1] = TimestampTzGetDatum(cutoff);
		args[2] = Int32GetDatum(window);
		args[3] = Int32GetDatum(limit);
		run_checked(plans.sent_window, args, "deleting SENT rows");
		deleted = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		visited = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		upto = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
		reached_cutoff = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
													SPI_tuptable->tupdesc, 4, &isnull));
		left = get_int8_array(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 5, &nleft,
							  CurrentMemoryContext);
		if (ws.kept && nleft > 0)
		{
			/*
			 * Beyond what can be listed, keep the first ones: walk_end()
			 * starts the next walk at the first one it cannot list.
			 */
			nleft = Min(nleft, maxlisted - nlisted);
			memcpy(listed + nlisted, left, sizeof(int64) * nleft);
			nlisted += nleft;
		}
		res->sent += deleted;
		finish_batch(ps, deleted);

		if (visited == 0)
			break;
		after = upto;
		if (visited < window || reached_cutoff)
			break;
	}

	walk_end(ps, &ws, Min(after + 1, ws.settled + 1), listed, nlisted);
}

/* One step of the read side's pruning: batches of plan until done */
static void
prune_step(PassState *ps, SPIPlanPtr plan, TimestampTz cutoff, bool with_cutoff,
		   CleanupResult *res)
{
	if (plan == NULL)
		return;
	for (;;)
	{
		int			limit = next_batch(ps, res, "cqrs_sync cleanup: pruning the inbox and tombstones");
		Datum		args[2];
		int64		deleted;

		if (limit == 0)
			return;
		if (with_cutoff)
		{
			args[0] = TimestampTzGetDatum(cutoff);
			args[1] = Int32GetDatum(limit);
		}
		else
			args[0] = Int32GetDatum(limit);
		run_checked(plan, args, "pruning the read side");
		deleted = get_int8(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		res->read_side += deleted;
		finish_batch(ps, deleted);
		if (deleted < limit)
			return;
	}
}

/*
 * Tombstones and delta memory of dropped tables, whatever their age and the
 * retention (0 included): a table created later may get a dropped one's OID.
 */
static void
prune_dropped(PassState *ps, CleanupResult *res)
{
	prune_step(ps, plans.prune_gone_tombstones, 0, false, res);
	prune_step(ps, plans.prune_gone_delta, 0, false, res);
}

/*
 * Inbox entries, delta memory and tombstones from before cutoff, and those
 * of dropped tables.
 */
static void
prune_read_side(PassState *ps, TimestampTz cutoff, CleanupResult *res)
{
	prune_step(ps, plans.prune_inbox, cutoff, true, res);
	prune_step(ps, plans.prune_delta, cutoff, true, res);
	prune_step(ps, plans.prune_tombstones, cutoff, true, res);
	prune_dropped(ps, res);
}

static TimestampTz
cutoff_for(TimestampTz now, int retention_s)
{
	return now - (TimestampTz) retention_s * USECS_PER_SEC;
}

/* The start of a pass: the transaction's start in a function (as now()) */
static TimestampTz
pass_start(PassState *ps)
{
	return ps->own_xacts ? GetCurrentTimestamp() : GetCurrentTransactionStartTimestamp();
}

/*
 * Run a pass; plans must be ready.  Settings are read once, at the start.
 */
static void
run_pass(PassState *ps, CleanupResult *res)
{
	TimestampTz now = pass_start(ps);
	int			sent_retention = cqrs_sent_retention_s;
	int			dlt_retention = cqrs_dlt_retention_s;
	int			grace = cqrs_purge_grace_s;
	int			read_retention = cqrs_inbox_retention;	/* 0: for ever */

	memset(res, 0, sizeof(*res));
	res->complete = true;

	/*
	 * The grace counts on the clock: approvals are stamped with the time
	 * they were made (clock_timestamp()), not with their transaction's start.
	 */
	if (dlt_retention >= 0)
		purge_failed(ps, cutoff_for(now, dlt_retention),
					 cutoff_for(GetCurrentTimestamp(), grace), res);
	if (sent_retention >= 0)
		delete_sent(ps, cutoff_for(now, sent_retention), res);
	if (read_retention > 0)
		prune_read_side(ps, cutoff_for(now, read_retention), res);
	else
		prune_dropped(ps, res);
}

/*
 * A pass in a function, in its caller's transaction: SPI connected, at most
 * cqrs_sync.cleanup_max_rows_per_call rows.
 */
static void
function_pass_begin(PassState *ps, CleanupResult *res)
{
	int64		limit = cqrs_cleanup_max_rows_per_call;

	SPI_connect();
	if (!ensure_plans())
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"cqrs_sync\" does not exist")));
	ps->own_xacts = false;
	ps->cxt = CurrentMemoryContext;
	ps->budget = (limit > 0) ? limit : -1;
	ps->pause = false;
	memset(res, 0, sizeof(*res));
	res->complete = true;
}

static void
function_pass_end(CleanupResult *res, const char *function, const char *hint)
{
	SPI_finish();
	if (!res->complete)
		ereport(NOTICE,
				(errmsg("%s stopped after " INT64_FORMAT " rows, more expired rows may remain",
						function, (int64) cqrs_cleanup_max_rows_per_call),
				 errdetail("cqrs_sync.cleanup_max_rows_per_call limits the rows one call deletes, so that the caller's transaction stays short."),
				 errhint("%s", hint)));
}

/*
 * cqrs_cleanup(OUT sent bigint, OUT dead_lettered bigint, OUT dlt_failed
 * bigint, OUT read_side bigint, OUT complete boolean) RETURNS record
 *
 * One cleanup pass in the caller's transaction (SECURITY DEFINER).
 */
Datum
cqrs_cleanup(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	PassState	ps;
	CleanupResult res;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};
	TimestampTz start = GetCurrentTimestamp();
	MemoryContext cxt = CurrentMemoryContext;
	CqrsCleanupCounts counts;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	/* the layout of 0.1.0 and 0.2.0; a new one gets a new symbol */
	cqrs_check_row_layout("cqrs_cleanup", tupdesc, lengthof(values));

	/*
	 * The walk takes the outbox's id sequence and the running transactions
	 * as they are now; a snapshot older than that could miss rows they
	 * committed, and the walk would pass them.
	 */
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("cqrs_cleanup() must run in a READ COMMITTED transaction"),
				 errdetail("Its walk over SENT rows starts from what was committed when it runs; a transaction snapshot taken earlier would make it pass rows committed since."),
				 errhint("Run it in its own transaction at READ COMMITTED, for example with BEGIN ISOLATION LEVEL READ COMMITTED.")));

	/* a pass that fails is counted as an error, with its message */
	PG_TRY();
	{
		function_pass_begin(&ps, &res);
		run_pass(&ps, &res);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		cqrs_cleanup_stats_error(start, GetCurrentTimestamp(), edata->message);
		FreeErrorData(edata);
		PG_RE_THROW();
	}
	PG_END_TRY();
	function_pass_end(&res, "cqrs_cleanup",
					  "Call cqrs_cleanup() again, or let the cleanup worker (cqrs_sync.cleanup_interval) catch up; it commits after every batch.");

	/* a pass that succeeded counts if its transaction commits */
	counts.sent = res.sent;
	counts.dead_lettered = res.dead_lettered;
	counts.dlt_failed = res.dlt_failed;
	counts.read_side = res.read_side;
	cqrs_cleanup_stats_pass_at_commit(start, GetCurrentTimestamp(), &counts);

	values[0] = Int64GetDatum(res.sent);
	values[1] = Int64GetDatum(res.dead_lettered);
	values[2] = Int64GetDatum(res.dlt_failed);
	values[3] = Int64GetDatum(res.read_side);
	values[4] = BoolGetDatum(res.complete);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc),
													  values, nulls)));
}

/* cqrs_sync.inbox_retention as an interval, e.g. "7 days" */
static Interval *
retention_interval(void)
{
	Interval   *iv = palloc0(sizeof(Interval));

	iv->time = (int64) cqrs_inbox_retention * USECS_PER_SEC;
	return DatumGetIntervalP(DirectFunctionCall1(interval_justify_hours,
												 IntervalPGetDatum(iv)));
}

/*
 * start - older; -infinity for an interval reaching before the earliest
 * timestamp (4713 BC), which nothing is older than.
 */
static TimestampTz
older_than_cutoff(TimestampTz start, Interval *older)
{
	int64		days = (int64) older->month * DAYS_PER_MONTH + older->day +
		older->time / USECS_PER_DAY;
	TimestampTz cutoff;

	if (days > (int64) 6000 * 366)
	{
		TIMESTAMP_NOBEGIN(cutoff);
		return cutoff;
	}
	return DatumGetTimestampTz(DirectFunctionCall2(timestamptz_mi_interval,
												   TimestampTzGetDatum(start),
												   IntervalPGetDatum(older)));
}

/*
 * cqrs_prune_read_side(older_than interval DEFAULT NULL) RETURNS bigint
 *
 * The read side's step of a pass alone, in the caller's transaction
 * (SECURITY DEFINER): deletes inbox entries, delta memory and tombstones
 * older than older_than (default cqrs_sync.inbox_retention, which is also
 * the least it accepts: 0 there keeps them for ever), and those of dropped
 * tables, within cqrs_sync.cleanup_max_rows_per_call.  Returns the number
 * of rows deleted.
 */
Datum
cqrs_prune_read_side(PG_FUNCTION_ARGS)
{
	Interval   *retention = retention_interval();
	Interval   *older;
	Interval	zero;
	TimestampTz start;
	TimestampTz cutoff;
	PassState	ps;
	CleanupResult res;

	memset(&zero, 0, sizeof(zero));
	if (PG_ARGISNULL(0))
	{
		/* retention 0 keeps everything but what dropped tables left */
		older = (cqrs_inbox_retention > 0) ? retention : NULL;
	}
	else
	{
		older = PG_GETARG_INTERVAL_P(0);
		if (DatumGetBool(DirectFunctionCall2(interval_lt, IntervalPGetDatum(older),
											 IntervalPGetDatum(&zero))))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("older_than must not be negative")));
		if (cqrs_inbox_retention <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("cqrs_sync.inbox_retention is 0: inbox entries, delta memory and tombstones are kept for ever"),
					 errhint("A superuser sets a retention with ALTER SYSTEM SET cqrs_sync.inbox_retention and a reload.")));
		/*
		 * The cutoff itself, not the interval: an interval comparison counts
		 * a month as 30 days, so '-120 mons 3607 days' compares as 7 days
		 * while the calendar puts its cutoff 45 days ahead.  At most the
		 * retention back, on the calendar or in seconds (a week after a
		 * change to summer time, '7 days' are 167 hours).
		 */
		start = GetCurrentTransactionStartTimestamp();
		cutoff = older_than_cutoff(start, older);
		if (cutoff > start - (int64) cqrs_inbox_retention * USECS_PER_SEC &&
			cutoff > older_than_cutoff(start, retention))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("older_than must not be less than cqrs_sync.inbox_retention (%s)",
							DatumGetCString(DirectFunctionCall1(interval_out,
																IntervalPGetDatum(retention)))),
					 errdetail("An event redelivered after its inbox entry was pruned is applied again, and an upsert older than a pruned tombstone brings the row back."),
					 errhint("Prune older entries only, or have a superuser lower cqrs_sync.inbox_retention.")));
	}

	function_pass_begin(&ps, &res);
	if (older == NULL)
		prune_dropped(&ps, &res);
	else
		prune_read_side(&ps, older_than_cutoff(pass_start(&ps), older), &res);
	function_pass_end(&res, "cqrs_prune_read_side", "Call cqrs_prune_read_side() again.");
	PG_RETURN_INT64(res.read_side);
}

/*
 * The worker's pass: plans checked in a transaction of their own, then one
 * transaction per statement.  Returns false when the extension is missing.
 */
static bool
worker_pass(CleanupResult *res, MemoryContext pass_ctx)
{
	PassState	ps;
	bool		ready;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	ready = ensure_plans();
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	if (!ready)
		return false;

	ps.own_xacts = true;
	ps.cxt = pass_ctx;
	ps.budget = -1;
	ps.pause = false;
	run_pass(&ps, res);
	pgstat_report_stat(true);
	return true;
}

/*
 * A worker pass; an error is reported and rolled back, and the next pass
 * comes at the next interval.  Returns false when the extension does not
 * exist (yet) in the database.
 */
static bool
guarded_pass(MemoryContext pass_ctx)
{
	volatile bool found = true;

	CleanupResult res;
	MemoryContext old = MemoryContextSwitchTo(pass_ctx);
	TimestampTz start = GetCurrentTimestamp();

	PG_TRY();
	{
		if (!worker_pass(&res, pass_ctx))
		{
			if (!said_missing)
				ereport(LOG,
						(errmsg("cqrs_sync cleanup: extension \"cqrs_sync\" does not exist in database \"%s\", waiting",
								cqrs_database),
						 errhint("Run CREATE EXTENSION cqrs_sync in database \"%s\".",
								 cqrs_database)));
			said_missing = true;
			found = false;
		}
		else
		{
			said_missing = false;
			if (!res.interrupted)
			{
				CqrsCleanupCounts counts;

				counts.sent = res.sent;
				counts.dead_lettered = res.dead_lettered;
				counts.dlt_failed = res.dlt_failed;
				counts.read_side = res.read_side;
				cqrs_cleanup_stats_pass(start, GetCurrentTimestamp(), &counts);
			}
			if (res.dead_lettered + res.dlt_failed > 0)
				ereport(LOG,
						(errmsg("cqrs_sync cleanup: purged " INT64_FORMAT " approved DEAD_LETTERED and " INT64_FORMAT " approved DLT_FAILED rows",
								res.dead_lettered, res.dlt_failed),
						 errdetail("Each purge is recorded in cqrs_outbox_audit.")));
			ereport(DEBUG1,
					(errmsg("cqrs_sync cleanup: deleted " INT64_FORMAT " SENT rows, pruned " INT64_FORMAT " inbox entries and tombstones",
							res.sent, res.read_side)));
		}
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		edata = cqrs_report_and_abort(pass_ctx);
		cqrs_cleanup_stats_error(start, GetCurrentTimestamp(), edata->message);
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	MemoryContextReset(pass_ctx);
	return found;
}

/*
 * Session settings the worker's passes depend on, whatever ALTER DATABASE
 * or ALTER ROLE set: names resolve only where the plans say, statements do
 * not time out, and a lock held by someone else fails the pass after 5
 * seconds (an error it counts and reports) instead of blocking it unseen.
 */
static void
pin_settings(void)
{
	static const char *const pins[][2] = {
		{"search_path", "pg_catalog, pg_temp"},
		{"default_transaction_read_only", "off"},
		{"default_transaction_isolation", "read committed"},
		{"statement_timeout", "0"},
		{"lock_timeout", "5s"},
		{"idle_in_transaction_session_timeout", "0"},
		{"session_replication_role", "origin"},
	};

	for (int i = 0; i < lengthof(pins); i++)
		SetConfigOption(pins[i][0], pins[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}

void
cqrs_cleanup_main(Datum main_arg)
{
	MemoryContext pass_ctx;
	TimestampTz last_start = 0;
	bool		waiting = false;	/* for CREATE EXTENSION */

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cqrs_database, NULL, 0);

	/* every name in the plans is qualified; operators come from here */
	pin_settings();
	cqrs_cleanup_stats_worker_started();

	pass_ctx = AllocSetContextCreate(TopMemoryContext, "cqrs_sync cleanup pass",
									 ALLOCSET_DEFAULT_SIZES);

	ereport(LOG,
			(errmsg("cqrs_sync cleanup worker started in database \"%s\", interval %d s",
					cqrs_database, cqrs_cleanup_interval_s)));

	while (!ShutdownRequestPending)
	{
		long		timeout = -1;
		int			events = WL_LATCH_SET | WL_EXIT_ON_PM_DEATH;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (cqrs_cleanup_interval_s > 0)
		{
			TimestampTz now = GetCurrentTimestamp();
			int			interval_ms = cqrs_cleanup_interval_s * 1000;
			TimestampTz due;

			/* the first pass comes soon after CREATE EXTENSION */
			if (waiting)
				interval_ms = Min(interval_ms, EXTENSION_WAIT_MS);
			due = TimestampTzPlusMilliseconds(last_start, interval_ms);
			if (last_start == 0 || now >= due)
			{
				last_start = now;
				waiting = !guarded_pass(pass_ctx);
				pgstat_report_activity(STATE_IDLE, NULL);
				continue;		/* re-check signals and the schedule */
			}
			timeout = (long) ((due - now + 999) / 1000);
			events |= WL_TIMEOUT;
		}

		(void) WaitLatch(MyLatch, events, timeout, PG_WAIT_EXTENSION);
	}

	ereport(LOG, (errmsg("cqrs_sync cleanup worker shutting down")));
	proc_exit(1);
}
