/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Shared memory of cqrs_sync.
 *
 * The in-flight registry solves the one ordering problem a polling relay
 * cannot see: outbox ids are taken at insert, not at commit, so a row with
 * a higher id of some key can become visible while a lower id of the same
 * key is still uncommitted.  Every backend that enqueues publishes in its
 * slot, before it takes an id, its keys' hashes; after it took its first id,
 * that id.  The slot is cleared when the transaction ends, after its commit
 * became visible.
 *
 * The relay reads the outbox sequence's high-water mark first, then the
 * slots, then scans visible rows up to that mark with a snapshot taken after
 * the slots were read.  Any row r it sees was given its id before the mark
 * was read; a transaction holding a lower id of the same key took that id
 * earlier still, so it had registered before the relay read the slots and is
 * either visible in the scan (committed) or shows in a slot.  The relay holds
 * exactly the keys of such slots for ids above the slot's lowest id, and
 * remembers every slot it saw (slot, generation) so that, when that
 * transaction ends, it goes back to the transaction's lowest id (see
 * relay_order.c).  A long or wide transaction delays its own keys: the first
 * CQRS_SLOT_EXACT keys are kept exactly, more in a Bloom filter large enough
 * that 10,000 keys hold a foreign key with a probability of about 0.5%.
 *
 * A backend that discards an outbox row registers the row's key and id the
 * same way, increments discard_seq, and then checks the ids the relay has in
 * flight.  The relay reads discard_seq before it reads the registry, and
 * again after it published the ids it is about to produce; if it moved, the
 * claimed rows are dropped and scanned again (a Dekker-style handshake: each
 * side writes, then reads the other's).  So either the discard sees that the
 * row is in flight and refuses, or the relay sees the discard: in the
 * registry (still in progress), or as a deleted row (committed).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "common/hashfn.h"
#include "miscadmin.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"

#include "shmem.h"

CqrsShared *cqrs_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* This backend's registration in the current transaction. */
static bool my_slot_active = false;
static bool my_slot_overflowed = false;
static bool my_slot_discarding = false;

static Size
cqrs_shmem_size(void)
{
	return add_size(offsetof(CqrsShared, slots),
					mul_size(MaxBackends, sizeof(CqrsInflightSlot)));
}

static void
cqrs_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(cqrs_shmem_size());
	RequestNamedLWLockTranche("cqrs_sync", 3);
}

static void
cqrs_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	cqrs_shared = ShmemInitStruct("cqrs_sync", cqrs_shmem_size(), &found);
	if (!found)
	{
		LWLockPadded *locks = GetNamedLWLockTranche("cqrs_sync");

		memset(cqrs_shared, 0, cqrs_shmem_size());
		cqrs_shared->relay_latch = NULL;
		cqrs_shared->relay_pid = 0;
		cqrs_shared->relay_dboid = InvalidOid;
		pg_atomic_init_u64(&cqrs_shared->rescan_from, 0);
		pg_atomic_init_u64(&cqrs_shared->early_begun, 0);
		pg_atomic_init_u64(&cqrs_shared->early_ended, 0);
		pg_atomic_init_u64(&cqrs_shared->early_lsn, 0);
		pg_atomic_init_u64(&cqrs_shared->events_sent, 0);
		pg_atomic_init_u64(&cqrs_shared->events_failed, 0);
		pg_atomic_init_u64(&cqrs_shared->batches, 0);
		pg_atomic_init_u64(&cqrs_shared->producer_restarts, 0);
		pg_atomic_init_u64(&cqrs_shared->dead_lettered, 0);
		pg_atomic_init_u64(&cqrs_shared->dlt_failed, 0);
		pg_atomic_init_u64(&cqrs_shared->transactions, 0);
		for (int p = 0; p < CQRS_NPHASES; p++)
			pg_atomic_init_u64(&cqrs_shared->phase_us[p], 0);
		pg_atomic_init_u64(&cqrs_shared->acks, 0);
		pg_atomic_init_u64(&cqrs_shared->ack_wait_us, 0);
		SpinLockInit(&cqrs_shared->mutex);
		cqrs_shared->relay_state = CQRS_RELAY_RUNNING;
		cqrs_shared->dlt_lock = &locks[0].lock;
		cqrs_shared->inflight_lock = &locks[1].lock;
		cqrs_shared->monitor_pid = 0;
		cqrs_shared->monitor_latch = NULL;
		pg_atomic_init_u32(&cqrs_shared->dlt_refresh, 0);
		cqrs_shared->cleanup_lock = &locks[2].lock;
		cqrs_shared->cleanup_pid = 0;
		cqrs_shared->cleanup_dboid = InvalidOid;
		for (int i = 0; i < CQRS_CLEANUP_DBS; i++)
		{
			CqrsCleanupSlot *c = &cqrs_shared->cleanup[i];

			c->dboid = InvalidOid;
			pg_atomic_init_u64(&c->passes, 0);
			pg_atomic_init_u64(&c->errors, 0);
			pg_atomic_init_u64(&c->deleted_sent, 0);
			pg_atomic_init_u64(&c->deleted_dead_lettered, 0);
			pg_atomic_init_u64(&c->deleted_dlt_failed, 0);
			pg_atomic_init_u64(&c->deleted_read_side, 0);
		}
		pg_atomic_init_u64(&cqrs_shared->discard_seq, 0);
		cqrs_shared->nslots = MaxBackends;
		for (int i = 0; i < MaxBackends; i++)
		{
			CqrsInflightSlot *slot = &cqrs_shared->slots[i];

			pg_atomic_init_u64(&slot->gen, 0);
			pg_atomic_init_u64(&slot->min_id, CQRS_SLOT_IDLE);
			pg_atomic_init_u32(&slot->nkeys, 0);
			pg_atomic_init_u32(&slot->discarding, 0);
			for (int k = 0; k < CQRS_SLOT_EXACT; k++)
				pg_atomic_init_u64(&slot->keys[k], 0);
			for (int w = 0; w < CQRS_BLOOM_WORDS; w++)
				pg_atomic_init_u64(&slot->bloom[w], 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Install the shared memory hooks; called from _PG_init when the library is
 * preloaded.
 */
void
cqrs_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = cqrs_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = cqrs_shmem_startup;
}

uint64
cqrs_key_hash(const char *key, int len)
{
	if (key == NULL)
		return UINT64CONST(0x9e3779b97f4a7c15);	/* all NULL keys alike */
	return hash_bytes_extended((const unsigned char *) key, len, 0);
}

static CqrsInflightSlot *
my_slot(void)
{
	if (cqrs_shared == NULL || MyBackendId <= 0 ||
		MyBackendId > cqrs_shared->nslots)
		return NULL;
	return &cqrs_shared->slots[MyBackendId - 1];
}

/* The Bloom filter bit of a key hash for hash function i. */
static inline uint32
bloom_bit(uint64 keyhash, int i)
{
	/* double hashing from both halves of the (good) 64-bit hash */
	uint32		h1 = (uint32) keyhash;
	uint32		h2 = (uint32) (keyhash >> 32) | 1;

	return (h1 + (uint32) i * h2) % CQRS_BLOOM_BITS;
}

static void
bloom_add(CqrsInflightSlot *slot, uint64 keyhash)
{
	for (int i = 0; i < CQRS_BLOOM_HASHES; i++)
	{
		uint32		bit = bloom_bit(keyhash, i);

		pg_atomic_fetch_or_u64(&slot->bloom[bit / 64], UINT64CONST(1) << (bit % 64));
	}
}

/* Start this transaction's registration, if not done yet. */
static void
register_xact(CqrsInflightSlot *slot)
{
	if (my_slot_active)
		return;
	pg_atomic_fetch_add_u64(&slot->gen, 1);
	pg_atomic_write_u32(&slot->nkeys, 0);
	pg_atomic_write_u64(&slot->min_id, CQRS_SLOT_REGISTERING);
	my_slot_active = true;
	my_slot_overflowed = false;
}

static void
add_key(CqrsInflightSlot *slot, uint64 keyhash)
{
	uint32		n = pg_atomic_read_u32(&slot->nkeys);

	if (n == CQRS_SLOT_OVERFLOW)
	{
		bloom_add(slot, keyhash);
		return;
	}
	for (uint32 k = 0; k < n; k++)
		if (pg_atomic_read_u64(&slot->keys[k]) == keyhash)
			return;
	if (n < CQRS_SLOT_EXACT)
	{
		pg_atomic_write_u64(&slot->keys[n], keyhash);
		pg_write_barrier();
		pg_atomic_write_u32(&slot->nkeys, n + 1);
		return;
	}
	/* too many keys to list: every key so far into the filter, then switch */
	for (uint32 k = 0; k < n; k++)
		bloom_add(slot, pg_atomic_read_u64(&slot->keys[k]));
	bloom_add(slot, keyhash);
	pg_write_barrier();
	pg_atomic_write_u32(&slot->nkeys, CQRS_SLOT_OVERFLOW);
	my_slot_overflowed = true;
}

/*
 * Announce that this transaction is about to take an outbox id for a key
 * with this hash.  Must be called before the id is taken.
 */
void
cqrs_inflight_add_key(uint64 keyhash)
{
	CqrsInflightSlot *slot = my_slot();

	if (slot == NULL)
		return;
	register_xact(slot);
	add_key(slot, keyhash);
	/* the keys and the slot state must be visible before the id is taken */
	pg_memory_barrier();
}

/* Record the first (lowest) id this transaction took. */
void
cqrs_inflight_set_min(int64 id)
{
	CqrsInflightSlot *slot = my_slot();

	if (slot == NULL)
		return;
	if (pg_atomic_read_u64(&slot->min_id) == CQRS_SLOT_REGISTERING)
		pg_atomic_write_u64(&slot->min_id, (uint64) id);
}

/*
 * This transaction discards outbox row id of a key with this hash: the relay
 * must not produce that row (nor later rows of its key) while it may still
 * commit.  The caller checks cqrs_inflight_ids_contains(id) afterwards.
 */
void
cqrs_inflight_register_discard(uint64 keyhash, int64 id)
{
	CqrsInflightSlot *slot = my_slot();
	uint64		cur;

	if (slot == NULL)
		return;
	register_xact(slot);
	add_key(slot, keyhash);
	cur = pg_atomic_read_u64(&slot->min_id);
	if (cur == CQRS_SLOT_REGISTERING || (uint64) id < cur)
		pg_atomic_write_u64(&slot->min_id, (uint64) id);
	if (!my_slot_discarding)
	{
		pg_atomic_write_u32(&slot->discarding, 1);
		my_slot_discarding = true;
	}
	/* registered, then counted, then the relay's ids are read */
	pg_memory_barrier();
	pg_atomic_fetch_add_u64(&cqrs_shared->discard_seq, 1);
	pg_memory_barrier();
}

/* Transaction end: the transaction is visible (or gone) now. */
void
cqrs_inflight_clear(void)
{
	CqrsInflightSlot *slot = my_slot();

	if (slot == NULL || !my_slot_active)
		return;
	pg_atomic_write_u64(&slot->min_id, CQRS_SLOT_IDLE);
	pg_write_barrier();
	pg_atomic_write_u32(&slot->nkeys, 0);
	if (my_slot_overflowed)
		for (int w = 0; w < CQRS_BLOOM_WORDS; w++)
			pg_atomic_write_u64(&slot->bloom[w], 0);
	if (my_slot_discarding)
		pg_atomic_write_u32(&slot->discarding, 0);
	my_slot_active = false;
	my_slot_overflowed = false;
	my_slot_discarding = false;
}

/*
 * Copy the active slots into out[] (at most max).  out[i].bloom must point
 * to CQRS_BLOOM_WORDS words of the caller's memory.  The caller must have
 * read the sequence's high-water mark before calling this.
 */
int
cqrs_inflight_snapshot(CqrsInflight *out, int max)
{
	int			n = 0;

	if (cqrs_shared == NULL)
		return 0;

	pg_memory_barrier();
	for (int i = 0; i < cqrs_shared->nslots && n < max; i++)
	{
		CqrsInflightSlot *slot = &cqrs_shared->slots[i];
		CqrsInflight *o = &out[n];
		uint64		min_id = pg_atomic_read_u64(&slot->min_id);
		uint32		nkeys;

		if (min_id == CQRS_SLOT_IDLE)
			continue;
		pg_read_barrier();
		o->slot = i;
		o->gen = pg_atomic_read_u64(&slot->gen);
		o->min_id = (min_id == CQRS_SLOT_REGISTERING) ? 0 : min_id;
		nkeys = pg_atomic_read_u32(&slot->nkeys);
		pg_read_barrier();
		if (nkeys == CQRS_SLOT_OVERFLOW)
		{
			o->nkeys = CQRS_SLOT_OVERFLOW;
			for (int w = 0; w < CQRS_BLOOM_WORDS; w++)
				o->bloom[w] = pg_atomic_read_u64(&slot->bloom[w]);
		}
		else
		{
			o->nkeys = (int) Min(nkeys, CQRS_SLOT_EXACT);
			for (int k = 0; k < o->nkeys; k++)
				o->keys[k] = pg_atomic_read_u64(&slot->keys[k]);
		}

		/*
		 * A slot that went idle while being read belonged to a transaction
		 * whose commit is visible now: dropping it is safe.  One that was
		 * re-registered meanwhile holds a mix of two transactions' keys: it
		 * is kept, which can only hold more than needed.
		 */
		pg_read_barrier();
		if (pg_atomic_read_u64(&slot->min_id) == CQRS_SLOT_IDLE)
			continue;
		n++;
	}
	return n;
}

/* Does a copied slot hold this key? */
bool
cqrs_inflight_slot_has_key(const CqrsInflight *slot, uint64 keyhash)
{
	if (slot->nkeys == CQRS_SLOT_OVERFLOW)
	{
		for (int i = 0; i < CQRS_BLOOM_HASHES; i++)
		{
			uint32		bit = bloom_bit(keyhash, i);

			if ((slot->bloom[bit / 64] & (UINT64CONST(1) << (bit % 64))) == 0)
				return false;
		}
		return true;
	}
	for (int k = 0; k < slot->nkeys; k++)
		if (slot->keys[k] == keyhash)
			return true;
	return false;
}

/* Is the transaction that registered as (slot, gen) still in progress? */
bool
cqrs_inflight_slot_alive(int slot, uint64 gen)
{
	CqrsInflightSlot *s = &cqrs_shared->slots[slot];

	if (pg_atomic_read_u64(&s->min_id) == CQRS_SLOT_IDLE)
		return false;
	pg_read_barrier();
	return pg_atomic_read_u64(&s->gen) == gen;
}

/* ---- ids in flight ------------------------------------------------------- */

static inline uint32
id_home(int64 id)
{
	/* the finalizer of splitmix64: consecutive ids spread over the table */
	uint64		h = (uint64) id;

	h = (h ^ (h >> 30)) * UINT64CONST(0xbf58476d1ce4e5b9);
	h = (h ^ (h >> 27)) * UINT64CONST(0x94d049bb133111eb);
	h ^= h >> 31;
	return (uint32) (h & (CQRS_INFLIGHT_IDS - 1));
}

/*
 * The relay's own view of the table it alone writes: how many ids it holds,
 * and a bound on the highest.  A claim mostly reads ids above every id in
 * flight; those need no probe of the table (a cache miss each).
 */
static int	local_count = 0;
static int64 local_max_id = 0;

/* Add ids (relay only).  Never more than CQRS_INFLIGHT_IDS / 2 are present. */
void
cqrs_inflight_ids_add(const int64 *ids, int n)
{
	int64	   *tab = cqrs_shared->inflight_ids;

	LWLockAcquire(cqrs_shared->inflight_lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		uint32		pos = id_home(ids[i]);

		while (tab[pos] != 0 && tab[pos] != ids[i])
			pos = (pos + 1) & (CQRS_INFLIGHT_IDS - 1);
		if (tab[pos] == 0)
			local_count++;
		tab[pos] = ids[i];
		local_max_id = Max(local_max_id, ids[i]);
	}
	LWLockRelease(cqrs_shared->inflight_lock);
}

/* Remove ids (relay only), keeping every probe chain intact. */
void
cqrs_inflight_ids_remove(const int64 *ids, int n)
{
	int64	   *tab = cqrs_shared->inflight_ids;
	const uint32 mask = CQRS_INFLIGHT_IDS - 1;

	LWLockAcquire(cqrs_shared->inflight_lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		uint32		pos = id_home(ids[i]);
		uint32		next;

		while (tab[pos] != 0 && tab[pos] != ids[i])
			pos = (pos + 1) & mask;
		if (tab[pos] == 0)
			continue;
		/* backward-shift deletion */
		for (;;)
		{
			tab[pos] = 0;
			next = (pos + 1) & mask;
			for (;;)
			{
				uint32		home;

				if (tab[next] == 0)
					goto removed;
				home = id_home(tab[next]);
				/* can the entry at next move to the hole at pos? */
				if (((next - home) & mask) >= ((next - pos) & mask))
					break;
				next = (next + 1) & mask;
			}
			tab[pos] = tab[next];
			pos = next;
		}
removed:
		local_count--;
	}
	if (local_count == 0)
		local_max_id = 0;
	LWLockRelease(cqrs_shared->inflight_lock);
}

/* The relay starts with nothing in flight. */
void
cqrs_inflight_ids_reset(void)
{
	LWLockAcquire(cqrs_shared->inflight_lock, LW_EXCLUSIVE);
	memset(cqrs_shared->inflight_ids, 0, sizeof(cqrs_shared->inflight_ids));
	local_count = 0;
	local_max_id = 0;
	LWLockRelease(cqrs_shared->inflight_lock);
}

/* Lookup by the relay, the table's only writer: no lock needed. */
bool
cqrs_inflight_ids_contains_local(int64 id)
{
	int64	   *tab = cqrs_shared->inflight_ids;
	uint32		pos;

	if (id > local_max_id)
		return false;
	pos = id_home(id);
	while (tab[pos] != 0)
	{
		if (tab[pos] == id)
			return true;
		pos = (pos + 1) & (CQRS_INFLIGHT_IDS - 1);
	}
	return false;
}

bool
cqrs_inflight_ids_contains(int64 id)
{
	int64	   *tab = cqrs_shared->inflight_ids;
	uint32		pos = id_home(id);
	bool		found = false;

	LWLockAcquire(cqrs_shared->inflight_lock, LW_SHARED);
	while (tab[pos] != 0)
	{
		if (tab[pos] == id)
		{
			found = true;
			break;
		}
		pos = (pos + 1) & (CQRS_INFLIGHT_IDS - 1);
	}
	LWLockRelease(cqrs_shared->inflight_lock);
	return found;
}

/* ---- commits visible before they are durable ----------------------------- */

/* Synchronous standbys are configured: commits may wait for them. */
bool
cqrs_sync_standbys_configured(void)
{
	return max_wal_senders > 0 &&
		SyncRepStandbyNames != NULL && SyncRepStandbyNames[0] != '\0';
}

/*
 * A transaction that wrote outbox rows and will commit without waiting for
 * its commit to be flushed (or to reach the synchronous standbys) says so
 * before it commits: before its rows can become visible.
 */
void
cqrs_early_commit_begin(void)
{
	pg_atomic_fetch_add_u64(&cqrs_shared->early_begun, 1);
}

/* ... and once it committed (lsn: its commit's end) or aborted (invalid). */
void
cqrs_early_commit_end(XLogRecPtr lsn)
{
	if (!XLogRecPtrIsInvalid(lsn))
	{
		uint64		cur = pg_atomic_read_u64(&cqrs_shared->early_lsn);

		while (cur < lsn &&
			   !pg_atomic_compare_exchange_u64(&cqrs_shared->early_lsn, &cur, lsn))
			;
	}
	pg_atomic_fetch_add_u64(&cqrs_shared->early_ended, 1);
}

/*
 * The relay, before it takes the snapshot of a scan: how many early commits
 * ended, and the highest commit end among them.
 */
uint64
cqrs_early_commits_mark(XLogRecPtr *lsn)
{
	uint64		ended = pg_atomic_read_u64(&cqrs_shared->early_ended);

	pg_read_barrier();
	*lsn = pg_atomic_read_u64(&cqrs_shared->early_lsn);
	return ended;
}

/*
 * The relay, after it took the snapshot: a WAL position up to which every
 * commit the snapshot sees must be durable before its rows are produced.
 *
 * When no early commit began since the mark was taken, every early commit
 * the snapshot can see had ended by then (ended never exceeds begun), so the
 * highest of their ends is the bound.  Otherwise one may still be between its
 * commit and its end: the position of the WAL now bounds every commit the
 * snapshot sees.  Writers that wait for their commit need no flush at all:
 * their commit was durable before anyone could see it.
 */
XLogRecPtr
cqrs_early_commits_bound(uint64 mark, XLogRecPtr lsn)
{
	pg_memory_barrier();
	if (pg_atomic_read_u64(&cqrs_shared->early_begun) == mark)
		return lsn;
	return cqrs_wal_inserted_end();
}

/*
 * The end of the WAL inserted so far: a position XLogFlush() can reach.
 *
 * GetXLogInsertRecPtr() gives where the next record will start.  On a page
 * boundary (right after a segment switch, say) that lies past the next page's
 * header, which is not written until a record is: a flush up to there fails
 * ("xlog flush request ... is not satisfied") until another session writes
 * WAL.  Every record inserted so far ends at or before the boundary.
 */
XLogRecPtr
cqrs_wal_inserted_end(void)
{
	XLogRecPtr	ptr = GetXLogInsertRecPtr();

	if (XLogSegmentOffset(ptr, wal_segment_size) == SizeOfXLogLongPHD)
		ptr -= SizeOfXLogLongPHD;
	else if (ptr % XLOG_BLCKSZ == SizeOfXLogShortPHD)
		ptr -= SizeOfXLogShortPHD;
	return ptr;
}

/* ---- the relay's latch, counters and state -------------------------------- */

/* Wake the relay (at commit of a transaction that enqueued). */
void
cqrs_wake_relay(void)
{
	Latch	   *latch;

	if (cqrs_shared == NULL)
		return;
	latch = cqrs_shared->relay_latch;
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * The relay dead-lettered rows: the monitor worker measures the dead-letter
 * topics soon (at most once a second), not only at its next poll, so that a
 * new dead letter shows in cqrs_dlt_depth, and pages, at once.
 */
void
cqrs_wake_monitor(void)
{
	Latch	   *latch;

	if (cqrs_shared == NULL)
		return;
	pg_atomic_write_u32(&cqrs_shared->dlt_refresh, 1);
	pg_memory_barrier();
	latch = cqrs_shared->monitor_latch;
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * An operator made rows PENDING again, from id from on: the relay's scan goes
 * back there at its next wake.
 */
void
cqrs_request_rescan(int64 from)
{
	uint64		cur;

	if (cqrs_shared == NULL)
		return;
	cur = pg_atomic_read_u64(&cqrs_shared->rescan_from);
	while (cur == 0 || cur > (uint64) from)
		if (pg_atomic_compare_exchange_u64(&cqrs_shared->rescan_from, &cur, (uint64) from))
			break;
	cqrs_wake_relay();
}

void
cqrs_relay_note_failure(const char *msg, uint64 nfailed)
{
	TimestampTz now = GetCurrentTimestamp();

	pg_atomic_fetch_add_u64(&cqrs_shared->events_failed, nfailed);
	SpinLockAcquire(&cqrs_shared->mutex);
	strlcpy(cqrs_shared->last_error, msg, CQRS_ERROR_LEN);
	cqrs_shared->last_error_at = now;
	SpinLockRelease(&cqrs_shared->mutex);
}

void
cqrs_relay_note_success(uint64 nsent)
{
	TimestampTz now = GetCurrentTimestamp();

	pg_atomic_fetch_add_u64(&cqrs_shared->events_sent, nsent);
	pg_atomic_fetch_add_u64(&cqrs_shared->batches, 1);
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->last_success_at = now;
	SpinLockRelease(&cqrs_shared->mutex);
}

/* What the relay is doing (running, paused on a topic, waiting for Kafka). */
void
cqrs_relay_set_state(CqrsRelayState state, const char *topic, const char *reason)
{
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->relay_state = state;
	strlcpy(cqrs_shared->paused_topic, topic ? topic : "", CQRS_TOPIC_NAMELEN);
	strlcpy(cqrs_shared->paused_reason, reason ? reason : "", CQRS_ERROR_LEN);
	SpinLockRelease(&cqrs_shared->mutex);
}

/* The partitions whose keys the relay holds ("" when none), and how many. */
void
cqrs_relay_set_stalled(const char *text, int count)
{
	SpinLockAcquire(&cqrs_shared->mutex);
	strlcpy(cqrs_shared->stalled, text ? text : "", CQRS_STALLED_LEN);
	cqrs_shared->stalled_count = count;
	SpinLockRelease(&cqrs_shared->mutex);
}

void
cqrs_relay_add_phase(CqrsRelayPhase phase, int64 us)
{
	if (us > 0)
		pg_atomic_fetch_add_u64(&cqrs_shared->phase_us[phase], (uint64) us);
}
