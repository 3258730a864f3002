/*-------------------------------------------------------------------------
 *
 * relay_order.c
 *	  Per-key order of the relay (DESIGN.md section 4): which scanned row may
 *	  be produced now, and where the scan must go back to when a reason to
 *	  wait ends.
 *
 * The relay scans the outbox with a cursor: each claim reads PENDING rows
 * above it, in id order, and moves it up.  A row that may not go now is
 * "held": the scan walks past it, and its key is held from that id on, so
 * that no later row of the key overtakes it.  A hold lasts until its reason
 * ends; then the scan goes back ("revisits") to the lowest id concerned and
 * sees the rows again, in id order.  The reasons, and their ends:
 *
 *	- an earlier row of the key may still commit: a transaction in the
 *	  in-flight registry (shmem.c) holds the key with a lower id.  Every
 *	  registered transaction the relay sees is watched; when it has ended,
 *	  the scan revisits from its lowest id (or, when that was not yet known,
 *	  from above the high-water mark read before it was first seen), or
 *	  from the lowest row held because of it if that is lower (one still
 *	  taking its first id holds every row of its keys, also rows below the
 *	  ids it will take), so rows it committed below the cursor are never
 *	  skipped, and rows of its keys that were walked past are seen again;
 *	- the row waits for a retry (next_attempt_at): until that time;
 *	- an earlier row of the key failed and its failure is not yet recorded;
 *	- a later row of the key is in flight (the row was re-scanned): until the
 *	  key has nothing in flight;
 *	- its topic is paused or its partition stalled (relay_pipeline.c);
 *	- a cqrs_discard() of the row (or an earlier one) may commit: registered
 *	  like an enqueue, watched like one.
 *
 * A revisit from id P forgets every hold at or above P (the rescan derives
 * them again) and keeps those below P, whose reasons still stand.  Rows in
 * flight are skipped by the rescan.
 *
 * A rescan reads every row from P to the cursor, most of them long sent.
 * Revisits for reasons that end one key's wait (a retry's time, a failure's
 * recording, the last row in flight acknowledged) keep that key held until
 * they are done, so they may wait: they spend a budget of such rows
 * (REVISIT_ROWS_PER_S, in bursts of up to REVISIT_BURST), and those that
 * come while it is spent are done together once it allows.  Without it, a
 * trickle of failing events (every retry's time is a revisit) made the relay
 * read the rows behind the cursor again dozens of times a second.  Revisits
 * whose rows no hold keeps back (a registered transaction that ended, an
 * operator's retry, a claim that failed) are done at the next claim.
 *
 * Acknowledgements: an idempotent producer keeps a partition's messages in
 * order, so later rows of a key are produced while earlier ones are in
 * flight.  If an earlier one then fails, the later ones that were already in
 * flight may still be written: they are "REDO" rows, kept PENDING and sent
 * again after the failed row, so that Kafka's last copy of each event is in
 * id order (a consumer can see B, A, B; it deduplicates by event_id).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "utils/memutils.h"

#include "relay.h"
#include "shmem.h"

/* ---- per-key state ---------------------------------------------------------- */

typedef struct KeyState
{
	uint64		holdhash;		/* hash key */
	char		status;			/* simplehash */
	bool		hold_behind;	/* held behind a later row in flight */
	int32		ninflight;		/* rows of the key in flight */
	int64		max_inflight;	/* highest id of the key in flight */
	int64		hold_from;		/* lowest id held; PG_INT64_MAX: none */
	int64		wait_id;		/* lowest id waiting for a retry; 0: none */
	TimestampTz retry_at;		/* when wait_id may go */
	int64		failing_id;		/* failure reported, not yet recorded; 0: none */
	int64		redo_from;		/* acks above this ... */
	int64		redo_upto;		/* ... and up to this are REDO; 0: none */
	int32		nredo;			/* REDO rows acknowledged, not yet recorded */
	int64		redo_low;		/* the lowest of them; 0: none */
} KeyState;

#define SH_PREFIX		keys
#define SH_ELEMENT_TYPE KeyState
#define SH_KEY_TYPE		uint64
#define SH_KEY			holdhash
#define SH_HASH_KEY(tb, key) ((uint32) ((key) ^ ((key) >> 32)))
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE		static inline
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

/* ---- the registry as of the last claim --------------------------------------- */

typedef struct RegKey
{
	uint64		keyhash;
	char		status;
	bool		shared;			/* listed by more than one slot */
	int			slot;			/* the (first) slot listing it */
	uint64		min_id;			/* lowest min_id of the slots holding it; 0 =
								 * all */
} RegKey;

#define SH_PREFIX		regkeys
#define SH_ELEMENT_TYPE RegKey
#define SH_KEY_TYPE		uint64
#define SH_KEY			keyhash
#define SH_HASH_KEY(tb, key) ((uint32) ((key) ^ ((key) >> 32)))
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE		static inline
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

static MemoryContext order_cxt = NULL;
static keys_hash *keystates = NULL;
static regkeys_hash *regkeys = NULL;

static CqrsInflight *snap = NULL;	/* the registry's active slots */
static int	nsnap = 0;
static uint64 *snap_gen = NULL; /* gen per slot in snap, 0 = inactive */
static int	nslots = 0;
static CqrsInflight **overflowed = NULL;	/* slots whose keys are a filter */
static int	noverflowed = 0;

/*
 * Registered transactions the relay has seen, one per slot at most: the
 * generation (0: none) and the lowest id it may hold.
 */
static uint64 *watched_gen = NULL;
static int64 *watched_revisit = NULL;

static int64 prev_hw = 0;		/* high-water mark of the previous claim */
static int64 revisit_from = PG_INT64_MAX;

/*
 * Revisits that may wait for the budget (see above): from held_from on.  The
 * budget is a bucket of rows to read, filled at REVISIT_ROWS_PER_S up to
 * REVISIT_BURST (a rescan reads at most that many at once): a burst is some
 * 25 ms of the relay's time when the rows are in shared buffers, and while
 * the budget is spent these rescans take about 1% of a core.
 */
#define REVISIT_ROWS_PER_S	10000
#define REVISIT_BURST		50000
static int64 held_from = PG_INT64_MAX;
static double revisit_budget = REVISIT_BURST;
static TimestampTz budget_at = 0;	/* when it was last filled */
static int	ntimers = 0;		/* keys with a retry_at */
static TimestampTz next_timer = 0;

void
order_init(int n)
{
	order_cxt = AllocSetContextCreate(TopMemoryContext, "cqrs_sync relay order",
									  ALLOCSET_DEFAULT_SIZES);
	nslots = n;
	snap = MemoryContextAllocZero(order_cxt, sizeof(CqrsInflight) * n);
	for (int i = 0; i < n; i++)
		snap[i].bloom = MemoryContextAlloc(order_cxt, sizeof(uint64) * CQRS_BLOOM_WORDS);
	snap_gen = MemoryContextAllocZero(order_cxt, sizeof(uint64) * n);
	overflowed = MemoryContextAllocZero(order_cxt, sizeof(CqrsInflight *) * n);
	watched_gen = MemoryContextAllocZero(order_cxt, sizeof(uint64) * n);
	watched_revisit = MemoryContextAllocZero(order_cxt, sizeof(int64) * n);
	order_reset();
}

/* Forget everything: the next scan starts from the beginning. */
void
order_reset(void)
{
	if (keystates)
		keys_destroy(keystates);
	keystates = keys_create(order_cxt, 1024, NULL);
	if (regkeys)
		regkeys_destroy(regkeys);
	regkeys = regkeys_create(order_cxt, 256, NULL);
	nsnap = 0;
	noverflowed = 0;
	memset(watched_gen, 0, sizeof(uint64) * nslots);
	prev_hw = 0;
	revisit_from = PG_INT64_MAX;
	held_from = PG_INT64_MAX;
	revisit_budget = REVISIT_BURST;
	budget_at = 0;
	ntimers = 0;
	next_timer = 0;
}

/*
 * The scan starts at id from (the relay's mark): transactions it sees as
 * still taking their first id take ids from there on.
 */
void
order_start_at(int64 from)
{
	prev_hw = Max(from - 1, 0);
}

/*
 * The lowest id the scan may still have to come back to for a reason of
 * order's: a revisit not yet done, a row held or waiting for a retry or for
 * its failure's recording, or a row a watched transaction may still commit.
 * (Rows in flight and rows of paused topics are the pipeline's.)
 */
int64
order_floor(void)
{
	keys_iterator it;
	KeyState   *ks;
	int64		floor = Min(revisit_from, held_from);

	keys_start_iterate(keystates, &it);
	while ((ks = keys_iterate(keystates, &it)) != NULL)
	{
		floor = Min(floor, ks->hold_from);
		if (ks->wait_id != 0)
			floor = Min(floor, ks->wait_id);
		if (ks->failing_id != 0)
			floor = Min(floor, ks->failing_id);
		if (ks->redo_upto != 0)
			floor = Min(floor, ks->redo_from);
	}
	for (int slot = 0; slot < nslots; slot++)
		if (watched_gen[slot] != 0)
			floor = Min(floor, watched_revisit[slot]);
	return floor;
}

static KeyState *
key_get(uint64 holdhash)
{
	bool		found;
	KeyState   *ks = keys_insert(keystates, holdhash, &found);

	if (!found)
	{
		ks->hold_behind = false;
		ks->ninflight = 0;
		ks->max_inflight = 0;
		ks->hold_from = PG_INT64_MAX;
		ks->wait_id = 0;
		ks->retry_at = 0;
		ks->failing_id = 0;
		ks->redo_from = 0;
		ks->redo_upto = 0;
		ks->nredo = 0;
		ks->redo_low = 0;
	}
	return ks;
}

/* Drop a key's state when nothing is left in it. */
static void
key_tidy(KeyState *ks)
{
	if (ks->ninflight == 0 && ks->hold_from == PG_INT64_MAX && ks->wait_id == 0 &&
		ks->failing_id == 0 && ks->redo_upto == 0 && ks->nredo == 0)
		keys_delete_item(keystates, ks);
}

static void
key_hold(KeyState *ks, int64 id)
{
	if (id < ks->hold_from)
		ks->hold_from = id;
}

static void
key_set_timer(KeyState *ks, int64 id, TimestampTz at)
{
	if (ks->wait_id == 0)
		ntimers++;
	if (ks->wait_id == 0 || id < ks->wait_id)
		ks->wait_id = id;
	if (ks->retry_at == 0 || at < ks->retry_at)
		ks->retry_at = at;
	if (next_timer == 0 || at < next_timer)
		next_timer = at;
}

/* ---- revisits ----------------------------------------------------------------- */

/* Rows from id from on must be scanned again. */
void
order_revisit(int64 from)
{
	if (from < revisit_from)
		revisit_from = Max(from, 1);
}

/*
 * The key's rows from id from on must be scanned again.  The key is held from
 * there until then, so the rescan may wait for the budget (order_expire()).
 */
static void
revisit_key(KeyState *ks, int64 from)
{
	from = Max(from, 1);
	key_hold(ks, from);
	if (from < held_from)
		held_from = from;
}

/* Must the next claim go back to or below the cursor? */
bool
order_revisit_pending(int64 cursor)
{
	return revisit_from <= cursor;
}

/*
 * Where the next scan starts (it reads ids above the returned value).  A
 * pending revisit moves it back and forgets the holds it will derive again.
 * A revisit from just above the cursor moves nothing back, but still forgets
 * the holds above it: those a claim took while it scanned, before it failed
 * (pipeline_claim_abort()).  Their reasons may have ended since without a
 * revisit, and the scan derives again those that stand.
 */
int64
order_scan_start(int64 cursor)
{
	keys_iterator it;
	KeyState   *ks;
	int64		from = revisit_from;

	if (from > cursor + 1)
		return cursor;
	revisit_from = PG_INT64_MAX;
	/* the rescan reads the rows of waiting revisits from there on too */
	if (held_from >= from)
		held_from = PG_INT64_MAX;
	if (keystates->members == 0)
		return from - 1;

	keys_start_iterate(keystates, &it);
	while ((ks = keys_iterate(keystates, &it)) != NULL)
	{
		if (ks->hold_from >= from)
		{
			ks->hold_from = PG_INT64_MAX;
			ks->hold_behind = false;
		}
		if (ks->wait_id >= from)
		{
			ks->wait_id = 0;
			ks->retry_at = 0;
			ntimers--;
		}
		/* deleting the current element is allowed while iterating */
		key_tidy(ks);
	}
	return from - 1;
}

/* Revisit where a retry's time has come; returns when the next one comes. */
static TimestampTz
expire_timers(TimestampTz now)
{
	keys_iterator it;
	KeyState   *ks;

	if (ntimers == 0)
	{
		next_timer = 0;
		return 0;
	}
	if (next_timer != 0 && now < next_timer)
		return next_timer;

	next_timer = 0;
	keys_start_iterate(keystates, &it);
	while ((ks = keys_iterate(keystates, &it)) != NULL)
	{
		if (ks->wait_id == 0)
			continue;
		if (ks->retry_at <= now)
		{
			revisit_key(ks, ks->wait_id);
			ks->wait_id = 0;
			ks->retry_at = 0;
			ntimers--;
			key_tidy(ks);
		}
		else if (next_timer == 0 || ks->retry_at < next_timer)
			next_timer = ks->retry_at;
	}
	return next_timer;
}

/*
 * Revisits that came for a reason of a key's (held_from): the next claim goes
 * back for them once the budget allows the rows from there to the cursor.
 * Returns when it will (0: nothing waits, or it may go now).
 */
static TimestampTz
release_held(TimestampTz now, int64 cursor)
{
	double		cost;

	if (held_from == PG_INT64_MAX)
		return 0;
	if (budget_at != 0 && now > budget_at)
		revisit_budget = Min(REVISIT_BURST, revisit_budget +
							 (double) (now - budget_at) * REVISIT_ROWS_PER_S / USECS_PER_SEC);
	budget_at = now;
	/* a revisit at once goes back that far already: these ride along, free */
	if (revisit_from <= held_from)
		return 0;
	cost = Min(Max(cursor - held_from + 1, 0), REVISIT_BURST);
	if (revisit_budget < cost)
		return now + 1 +
			(TimestampTz) ((cost - revisit_budget) * USECS_PER_SEC / REVISIT_ROWS_PER_S);
	revisit_budget -= cost;
	order_revisit(held_from);
	held_from = PG_INT64_MAX;
	return 0;
}

/*
 * Revisits whose time has come: retries due, and revisits that waited for
 * the budget (cursor: the scan's).  Returns when the next one comes (0:
 * none).
 */
TimestampTz
order_expire(TimestampTz now, int64 cursor)
{
	TimestampTz next = expire_timers(now);
	TimestampTz held = release_held(now, cursor);

	if (held != 0 && (next == 0 || held < next))
		next = held;
	return next;
}

/* ---- the registry --------------------------------------------------------------- */

static void
index_slot_keys(CqrsInflight *s)
{
	if (s->nkeys == CQRS_SLOT_OVERFLOW)
	{
		overflowed[noverflowed++] = s;
		return;
	}
	for (int k = 0; k < s->nkeys; k++)
	{
		bool		found;
		RegKey	   *rk = regkeys_insert(regkeys, s->keys[k], &found);

		if (!found)
		{
			rk->shared = false;
			rk->slot = s->slot;
			rk->min_id = s->min_id;
		}
		else
		{
			rk->shared = true;
			if (s->min_id < rk->min_id)
				rk->min_id = s->min_id;
		}
	}
}

/*
 * Read the in-flight registry (after the high-water mark hw, before the
 * scan's snapshot).  Transactions seen before that are gone now may have
 * committed rows below the cursor: the scan revisits from their lowest id.
 * Returns the number of registered transactions.
 */
int64
order_read_registry(int64 hw, int64 cursor)
{
	int			n = cqrs_inflight_snapshot(snap, nslots);

	regkeys_reset(regkeys);
	noverflowed = 0;
	memset(snap_gen, 0, sizeof(uint64) * nslots);
	for (int i = 0; i < n; i++)
	{
		snap_gen[snap[i].slot] = snap[i].gen;
		index_slot_keys(&snap[i]);
	}
	nsnap = n;

	for (int slot = 0; slot < nslots; slot++)
	{
		/* a transaction that ended since it was seen */
		if (watched_gen[slot] != 0 && watched_gen[slot] != snap_gen[slot])
		{
			if (watched_revisit[slot] <= cursor)
				order_revisit(watched_revisit[slot]);
			watched_gen[slot] = 0;
		}
	}
	for (int i = 0; i < n; i++)
	{
		int			slot = snap[i].slot;

		/* a transaction seen for the first time */
		if (watched_gen[slot] == snap[i].gen)
			continue;
		watched_gen[slot] = snap[i].gen;
		/* it registered after the previous claim read the registry: ids > prev_hw */
		watched_revisit[slot] = snap[i].min_id != 0 ?
			(int64) snap[i].min_id : prev_hw + 1;
	}
	prev_hw = hw;
	return n;
}

/*
 * A row is held because of this registered transaction: when it ends, the
 * scan must go back at least to the row, whatever ids the transaction took
 * itself.  (One that was still taking its first id holds every row of its
 * keys, also rows below its own ids.)
 */
static void
watch_held(int slot, int64 id)
{
	if (id < watched_revisit[slot])
		watched_revisit[slot] = id;
}

/* Does this registered transaction hold a row of the key with this id? */
static inline bool
slot_holds(const CqrsInflight *s, int64 id)
{
	return s->min_id == 0 || (int64) s->min_id <= id;
}

/*
 * May a transaction still in flight commit an earlier row of this key?  If
 * so, each such transaction is told that the row waits for it.
 */
static bool
registry_holds(int64 id, uint64 keyhash)
{
	RegKey	   *rk;
	bool		held = false;

	if (nsnap == 0)
		return false;
	rk = regkeys_lookup(regkeys, keyhash);
	if (rk != NULL && (rk->min_id == 0 || (int64) rk->min_id <= id))
	{
		held = true;
		if (!rk->shared)
			watch_held(rk->slot, id);
		else
		{
			/* listed by several transactions (rare): find them */
			for (int i = 0; i < nsnap; i++)
			{
				CqrsInflight *s = &snap[i];

				if (s->nkeys == CQRS_SLOT_OVERFLOW || !slot_holds(s, id))
					continue;
				for (int k = 0; k < s->nkeys; k++)
					if (s->keys[k] == keyhash)
					{
						watch_held(s->slot, id);
						break;
					}
			}
		}
	}
	for (int i = 0; i < noverflowed; i++)
	{
		CqrsInflight *s = overflowed[i];

		if (slot_holds(s, id) && cqrs_inflight_slot_has_key(s, keyhash))
		{
			held = true;
			watch_held(s->slot, id);
		}
	}
	return held;
}

/* ---- rows ------------------------------------------------------------------------- */

/*
 * May this scanned row (visible, PENDING, its topic not paused) be produced
 * now?  waiting: its next_attempt_at is in the future.
 */
OrderVerdict
order_judge(RelayRow *row, bool waiting, TimestampTz next_attempt_at)
{
	int64		id = row->msg.id;
	KeyState   *ks;

	/* the shared table is written by this process only: no lock to read */
	if (cqrs_inflight_ids_contains_local(id))
		return ORDER_SKIP;

	ks = keys_lookup(keystates, row->holdhash);
	if (waiting)
	{
		ks = key_get(row->holdhash);
		key_hold(ks, id);
		key_set_timer(ks, id, next_attempt_at);
		return ORDER_HOLD;
	}
	if (registry_holds(id, row->keyhash))
	{
		key_hold(key_get(row->holdhash), id);
		return ORDER_HOLD;
	}
	if (ks == NULL)
		return ORDER_GO;
	if (ks->hold_from < id)
		return ORDER_HOLD;

	/*
	 * A REDO row goes again once its outcome is recorded (until then it is
	 * "in flight" to the scan, which skips it): no later row of its key may
	 * go before it.  A rescan forgets holds, not this.
	 */
	if (ks->nredo > 0 && id > ks->redo_low)
	{
		key_hold(ks, id);
		return ORDER_HOLD;
	}
	if (ks->failing_id != 0 && id > ks->failing_id)
	{
		key_hold(ks, id);
		return ORDER_HOLD;
	}
	if (ks->ninflight > 0 && ks->max_inflight > id)
	{
		key_hold(ks, id);
		ks->hold_behind = true;
		return ORDER_HOLD;
	}
	return ORDER_GO;
}

/*
 * Just before producing a claimed row: has an earlier row of its key failed,
 * or been held, since the claim?  Then it waits (held) instead.
 */
bool
order_blocked(RelayRow *row)
{
	KeyState   *ks = keys_lookup(keystates, row->holdhash);

	if (ks == NULL)
		return false;
	if (ks->hold_from < row->msg.id)
		return true;			/* an earlier row of the key waits now */
	if (ks->failing_id == 0 || row->msg.id < ks->failing_id)
		return false;
	key_hold(ks, row->msg.id);
	return true;
}

/* The row waits for a reason of the pipeline's (paused, stalled). */
void
order_hold(RelayRow *row)
{
	key_hold(key_get(row->holdhash), row->msg.id);
}

void
order_produced(RelayRow *row)
{
	KeyState   *ks = key_get(row->holdhash);

	ks->ninflight++;
	if (row->msg.id > ks->max_inflight)
		ks->max_inflight = row->msg.id;
}

/* The key has nothing in flight any more. */
static void
key_drained(KeyState *ks)
{
	ks->redo_upto = 0;
	ks->redo_from = 0;
	ks->max_inflight = 0;
	if (ks->hold_behind && ks->hold_from != PG_INT64_MAX)
		revisit_key(ks, ks->hold_from);
	ks->hold_behind = false;
}

/* A successful report: SENT, or REDO behind an earlier failure of its key. */
RelayOutcome
order_acked(RelayRow *row)
{
	KeyState   *ks = keys_lookup(keystates, row->holdhash);
	RelayOutcome outcome = RO_SENT;
	int64		id = row->msg.id;

	if (ks == NULL)
		return RO_SENT;
	ks->ninflight--;
	if (ks->redo_upto != 0 && id > ks->redo_from && id <= ks->redo_upto)
	{
		outcome = RO_REDO;
		key_hold(ks, id);
		if (ks->nredo++ == 0 || id < ks->redo_low)
			ks->redo_low = id;
	}
	if (ks->ninflight <= 0)
	{
		ks->ninflight = 0;
		key_drained(ks);
	}
	key_tidy(ks);
	return outcome;
}

/*
 * A failed report (or a failure before producing).  Later rows of the key
 * wait until the failure is recorded; those already in flight become REDO
 * when acknowledged.  Returns true when this is the key's earliest failure
 * (false: a later row failed behind it, and goes again right after it).
 */
bool
order_failed(RelayRow *row, bool was_inflight)
{
	KeyState   *ks = key_get(row->holdhash);
	int64		id = row->msg.id;
	bool		first;

	if (was_inflight && ks->ninflight > 0)
		ks->ninflight--;
	first = (ks->failing_id == 0 || id < ks->failing_id);
	if (first)
		ks->failing_id = id;
	else
		key_hold(ks, id);
	if (ks->redo_upto == 0 || id < ks->redo_from)
		ks->redo_from = id;
	ks->redo_upto = Max(ks->redo_upto, ks->max_inflight);
	/*
	 * Nothing of the key in flight: no REDO to expect, and the rows held
	 * behind the rows in flight are seen again, as after a last
	 * acknowledgement.
	 */
	if (ks->ninflight == 0)
		key_drained(ks);
	return first;
}

/* Is the row its key's earliest unrecorded failure? */
bool
order_failed_first(RelayRow *row)
{
	KeyState   *ks = keys_lookup(keystates, row->holdhash);

	return ks != NULL && ks->failing_id == row->msg.id;
}

/*
 * The row's outcome is in the outbox now.  A retry waits for its time (its
 * key held from it); a dead-lettered or DLT_FAILED row frees its key.
 */
void
order_recorded(RelayRow *row)
{
	KeyState   *ks = keys_lookup(keystates, row->holdhash);
	int64		id = row->msg.id;

	/*
	 * A REDO row is PENDING, to go again after the failed row: a rescan that
	 * came while it was still in flight skipped it and holds nothing for it
	 * any more, so the scan goes back to it.  (If the failed row still
	 * waits, its hold keeps this one back.)
	 */
	if (ks == NULL)
	{
		if (row->outcome == RO_REDO)
			order_revisit(id);
		return;
	}
	if (row->outcome == RO_REDO)
	{
		revisit_key(ks, id);
		if (ks->nredo > 0 && --ks->nredo == 0)
		{
			/* the rows held behind the REDO rows are seen again after them */
			ks->redo_low = 0;
			if (ks->hold_from != PG_INT64_MAX)
				revisit_key(ks, ks->hold_from);
		}
	}
	if (ks->failing_id == id)
		ks->failing_id = 0;
	switch (row->outcome)
	{
		case RO_RETRY:
			key_hold(ks, id);
			if (row->delay_ms <= 0)
				revisit_key(ks, id);
			else
				key_set_timer(ks, id,
							  TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														  row->delay_ms));
			break;
		case RO_DEAD:
		case RO_DLT_FAILED:

			/*
			 * The failed row left the topic for good: rows of its key still
			 * in flight are in order without it, and need not go again.
			 * Unless an earlier row of theirs still has to be written: a
			 * failure not yet recorded, a retry waiting for its time, a row
			 * held (behind them, say).
			 */
			if (ks->failing_id == 0 && ks->wait_id == 0 &&
				(ks->hold_from == PG_INT64_MAX || ks->hold_from > ks->redo_upto))
			{
				ks->redo_upto = 0;
				ks->redo_from = 0;
			}
			if (ks->hold_from != PG_INT64_MAX)
				revisit_key(ks, ks->hold_from);
			break;
		default:
			break;
	}
	key_tidy(ks);
}
