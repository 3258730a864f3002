/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Shared memory of cqrs_sync.
 *
 * The in-flight registry solves the one ordering problem a polling relay
 * cannot see: outbox ids are taken at insert, not at commit, so a row with
 * a higher id of some key can become visible while a lower id of the same
 * key is still uncommitted.  Every backend that enqueues publishes in its
 * slot, before it takes an id, a filter of its keys' hashes; after it took
 * its first id, that id.  The slot is cleared when the transaction ends.
 *
 * The relay reads the outbox sequence's high-water mark first, then the
 * slots, then scans visible rows up to that mark.  Any row r it sees was
 * given its id before the mark was read; a transaction holding a lower id
 * of the same key took that id earlier still, so it had registered before
 * the relay read the slots and is either visible in the scan (committed) or
 * shows in a slot.  The relay holds exactly the keys of such slots for ids
 * above the slot's lowest id.  A long transaction delays only its own keys
 * (and, through filter collisions, rarely a few others).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"

#include "shmem.h"

CqrsShared *cqrs_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Does this backend's slot hold an enqueue of the current transaction? */
static bool my_slot_active = false;

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
	RequestNamedLWLockTranche("cqrs_sync", 1);
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
		cqrs_shared->relay_latch = NULL;
		cqrs_shared->relay_pid = 0;
		pg_atomic_init_u64(&cqrs_shared->events_sent, 0);
		pg_atomic_init_u64(&cqrs_shared->events_failed, 0);
		pg_atomic_init_u64(&cqrs_shared->batches, 0);
		pg_atomic_init_u64(&cqrs_shared->producer_restarts, 0);
		pg_atomic_init_u64(&cqrs_shared->dead_lettered, 0);
		pg_atomic_init_u64(&cqrs_shared->dlt_failed, 0);
		SpinLockInit(&cqrs_shared->mutex);
		cqrs_shared->last_success_at = 0;
		cqrs_shared->last_error_at = 0;
		cqrs_shared->last_error[0] = '\0';
		cqrs_shared->relay_state = CQRS_RELAY_RUNNING;
		cqrs_shared->paused_topic[0] = '\0';
		cqrs_shared->paused_reason[0] = '\0';
		cqrs_shared->dlt_lock = &(GetNamedLWLockTranche("cqrs_sync"))->lock;
		cqrs_shared->ndlt = 0;
		cqrs_shared->nslots = MaxBackends;
		for (int i = 0; i < MaxBackends; i++)
		{
			CqrsInflightSlot *slot = &cqrs_shared->slots[i];

			pg_atomic_init_u64(&slot->min_id, CQRS_SLOT_IDLE);
			for (int w = 0; w < CQRS_KEYFILTER_WORDS; w++)
				pg_atomic_init_u64(&slot->filter[w], 0);
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

/* Two filter bits per key, from both halves of the hash. */
static inline void
filter_bits(uint64 keyhash, int *b1, int *b2)
{
	*b1 = (int) (keyhash % CQRS_KEYFILTER_BITS);
	*b2 = (int) ((keyhash >> 32) % CQRS_KEYFILTER_BITS);
}

/*
 * Announce that this transaction is about to take an outbox id for a key
 * with this hash.  Must be called before the id is taken.
 */
void
cqrs_inflight_add_key(uint64 keyhash)
{
	CqrsInflightSlot *slot = my_slot();
	int			b1,
				b2;

	if (slot == NULL)
		return;

	filter_bits(keyhash, &b1, &b2);
	pg_atomic_fetch_or_u64(&slot->filter[b1 / 64], UINT64CONST(1) << (b1 % 64));
	pg_atomic_fetch_or_u64(&slot->filter[b2 / 64], UINT64CONST(1) << (b2 % 64));
	if (!my_slot_active)
	{
		pg_atomic_write_u64(&slot->min_id, CQRS_SLOT_REGISTERING);
		my_slot_active = true;
	}
	/* the filter and the slot state must be visible before the id is taken */
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

/* Transaction end: the transaction is visible (or gone) now. */
void
cqrs_inflight_clear(void)
{
	CqrsInflightSlot *slot = my_slot();

	if (slot == NULL || !my_slot_active)
		return;
	pg_atomic_write_u64(&slot->min_id, CQRS_SLOT_IDLE);
	pg_write_barrier();
	for (int w = 0; w < CQRS_KEYFILTER_WORDS; w++)
		pg_atomic_write_u64(&slot->filter[w], 0);
	my_slot_active = false;
}

/*
 * Copy the active slots.  The caller must have read the sequence's
 * high-water mark before calling this.
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
		uint64		min_id = pg_atomic_read_u64(&slot->min_id);

		if (min_id == CQRS_SLOT_IDLE)
			continue;
		pg_read_barrier();
		out[n].min_id = (min_id == CQRS_SLOT_REGISTERING) ? 0 : min_id;
		for (int w = 0; w < CQRS_KEYFILTER_WORDS; w++)
			out[n].filter[w] = pg_atomic_read_u64(&slot->filter[w]);
		n++;
	}
	return n;
}

/* Must the row (id, key) wait for a transaction still in flight? */
bool
cqrs_inflight_holds(const CqrsInflight *snap, int n, int64 id, uint64 keyhash)
{
	int			b1,
				b2;

	filter_bits(keyhash, &b1, &b2);
	for (int i = 0; i < n; i++)
	{
		if (snap[i].min_id != 0 && (int64) snap[i].min_id > id)
			continue;
		if ((snap[i].filter[b1 / 64] & (UINT64CONST(1) << (b1 % 64))) &&
			(snap[i].filter[b2 / 64] & (UINT64CONST(1) << (b2 % 64))))
			return true;
	}
	return false;
}

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
