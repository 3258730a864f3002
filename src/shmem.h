/*-------------------------------------------------------------------------
 *
 * shmem.h
 *	  Shared memory of cqrs_sync: the in-flight enqueue registry that keeps
 *	  per-key order across out-of-order commits, the ids the relay has in
 *	  flight (so that cqrs_discard() never races a send), the relay's latch,
 *	  counters, phase timers and state, the dead-letter topic depths and how
 *	  fresh they are, and the cleanup's counters per database.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_SHMEM_H
#define CQRS_SHMEM_H

#include "access/xlogdefs.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

/*
 * Keys of one enqueuing transaction: the first CQRS_SLOT_EXACT distinct key
 * hashes exactly; beyond that, a Bloom filter of CQRS_BLOOM_BITS bits and
 * CQRS_BLOOM_HASHES hashes per key (10,000 keys hold a foreign key with a
 * probability of about 0.5%).
 */
#define CQRS_SLOT_EXACT			16
#define CQRS_BLOOM_WORDS		2048
#define CQRS_BLOOM_BITS			(CQRS_BLOOM_WORDS * 64)
#define CQRS_BLOOM_HASHES		4

/* min_id of a slot: no enqueue in progress / enqueue taking its first id */
#define CQRS_SLOT_IDLE			((uint64) 0)
#define CQRS_SLOT_REGISTERING	PG_UINT64_MAX

/* nkeys of a slot whose keys overflowed into the Bloom filter */
#define CQRS_SLOT_OVERFLOW		(CQRS_SLOT_EXACT + 1)

/*
 * One slot per backend.  A backend that enqueues (or discards an outbox row)
 * publishes here, before it takes an outbox id, the hashes of its
 * transaction's keys and, once known, the lowest id involved.  gen changes
 * with every transaction that registers, so the relay can tell that a
 * transaction it saw has ended.  The slot is cleared when the transaction
 * ends (after its commit became visible).
 */
typedef struct CqrsInflightSlot
{
	pg_atomic_uint64 gen;
	pg_atomic_uint64 min_id;
	pg_atomic_uint32 nkeys;		/* exact keys, or CQRS_SLOT_OVERFLOW */
	pg_atomic_uint32 discarding;	/* the transaction discards a row */
	pg_atomic_uint64 keys[CQRS_SLOT_EXACT];
	pg_atomic_uint64 bloom[CQRS_BLOOM_WORDS];
} CqrsInflightSlot;

/* What the relay copies out of an active slot. */
typedef struct CqrsInflight
{
	int			slot;			/* index in CqrsShared.slots */
	uint64		gen;
	uint64		min_id;			/* 0 when not yet known: holds all ids */
	int			nkeys;			/* exact keys, or CQRS_SLOT_OVERFLOW */
	uint64		keys[CQRS_SLOT_EXACT];
	uint64	   *bloom;			/* CQRS_BLOOM_WORDS words when overflowed */
} CqrsInflight;

#define CQRS_ERROR_LEN 512
#define CQRS_TOPIC_NAMELEN 250		/* Kafka's 249 and a terminator */
#define CQRS_DLT_MAX 256			/* DLT partitions whose depth is kept */
#define CQRS_STALLED_LEN 512		/* text of the stalled partitions */

/* The relay's window of rows in flight is at most this (batch_size's max). */
#define CQRS_MAX_WINDOW			100000
/* Slots of the shared table of ids in flight: a power of two > 2 x window. */
#define CQRS_INFLIGHT_IDS		(1 << 18)

/* What the relay is doing, for cqrs_stats_relay. */
typedef enum CqrsRelayState
{
	CQRS_RELAY_RUNNING = 0,
	CQRS_RELAY_PAUSED,			/* holding a topic after a configuration error */
	CQRS_RELAY_WAITING_BROKER,	/* nothing acknowledged for a while */
	CQRS_RELAY_PARTITION_STALLED,	/* some partitions hold their keys */
	CQRS_RELAY_RECORDING_FAILED,	/* outcomes cannot be written; retrying */
	CQRS_RELAY_NO_PRODUCER,		/* the producer cannot be created */
	CQRS_RELAY_WAITING_STANDBY	/* rows wait for synchronous standbys */
} CqrsRelayState;

#define CQRS_RELAY_NSTATES 7

/* Depth of one dead-letter topic partition, as last seen. */
typedef struct CqrsDltPartition
{
	char		topic[CQRS_TOPIC_NAMELEN];
	int32		partition;
	int64		low;
	int64		high;
	TimestampTz checked_at;
} CqrsDltPartition;

/*
 * The cleanup's counters of one database (cqrs_stats_cleanup): passes of
 * its cleanup worker and cqrs_cleanup() calls whose transaction committed.
 * A slot belongs to a database from its first pass; when every slot is
 * taken, the one whose last pass is the oldest is given to the next
 * database.  The counters are atomics; a slot's owner and times, and the
 * error text, change under cleanup_lock (exclusive).
 */
#define CQRS_CLEANUP_DBS 16

typedef struct CqrsCleanupSlot
{
	Oid			dboid;			/* InvalidOid: free */
	pg_atomic_uint64 passes;	/* succeeded */
	pg_atomic_uint64 errors;	/* failed */
	pg_atomic_uint64 deleted_sent;
	pg_atomic_uint64 deleted_dead_lettered;
	pg_atomic_uint64 deleted_dlt_failed;
	pg_atomic_uint64 deleted_read_side;
	TimestampTz last_pass_start;	/* of the last pass that ended */
	TimestampTz last_pass_end;
	TimestampTz last_success_at;	/* end of the last successful pass */
	TimestampTz last_error_at;
	char		last_error[CQRS_ERROR_LEN];
} CqrsCleanupSlot;

/* Time the relay spent per phase, in microseconds (cqrs_stats_relay). */
typedef enum CqrsRelayPhase
{
	CQRS_PHASE_RECORD = 0,		/* writing outcomes (SENT, retries, ...) */
	CQRS_PHASE_CLAIM,			/* high-water mark, registry, scan, copy */
	CQRS_PHASE_COMMIT,			/* committing the relay's transaction */
	CQRS_PHASE_FLUSH,			/* WAL flushes before producing */
	CQRS_PHASE_PRODUCE,			/* handing messages to librdkafka */
	CQRS_PHASE_POLL,			/* serving delivery reports */
	CQRS_NPHASES
} CqrsRelayPhase;

typedef struct CqrsShared
{
	/* relay worker */
	Latch	   *relay_latch;	/* NULL when no relay is running */
	pid_t		relay_pid;
	Oid			relay_dboid;	/* the database it runs in */
	pg_atomic_uint64 rescan_from;	/* operators made rows PENDING from it on; 0: none */

	/*
	 * Commits of outbox rows that become visible before they are durable
	 * (synchronous_commit = off, or local while synchronous standbys are
	 * configured, or a wait for them cancelled).  Their writer counts itself in early_begun before it
	 * commits and in early_ended after it committed (raising early_lsn to its
	 * commit's end) or aborted.  See cqrs_early_commits_bound().
	 */
	pg_atomic_uint64 early_begun;
	pg_atomic_uint64 early_ended;
	pg_atomic_uint64 early_lsn;

	/* relay counters since server start */
	pg_atomic_uint64 events_sent;
	pg_atomic_uint64 events_failed;
	pg_atomic_uint64 batches;
	pg_atomic_uint64 producer_restarts;
	pg_atomic_uint64 dead_lettered;
	pg_atomic_uint64 dlt_failed;
	pg_atomic_uint64 transactions;
	pg_atomic_uint64 phase_us[CQRS_NPHASES];
	pg_atomic_uint64 acks;		/* delivery reports served */
	pg_atomic_uint64 ack_wait_us;	/* sum of produce -> report times */

	slock_t		mutex;			/* protects the fields below */
	TimestampTz last_success_at;
	TimestampTz last_error_at;
	char		last_error[CQRS_ERROR_LEN];
	int			relay_state;	/* CqrsRelayState */
	char		paused_topic[CQRS_TOPIC_NAMELEN];
	char		paused_reason[CQRS_ERROR_LEN];
	char		stalled[CQRS_STALLED_LEN];	/* "topic[p], ..." */
	int			stalled_count;	/* how many (the text may be cut short) */
	int64		ack_wait_max_us;	/* longest produce -> report in the last
									 * minute */
	int64		window;			/* rows in flight */

	/* dead-letter topic depth, written by the monitor worker */
	LWLock	   *dlt_lock;
	int			ndlt;
	CqrsDltPartition dlt[CQRS_DLT_MAX];
	TimestampTz dlt_round_at;	/* the last round Kafka answered (under
								 * dlt_lock, as the rest of the round) */
	int			dlt_topics;		/* topics watched in that round */
	char		dlt_error[CQRS_ERROR_LEN];	/* why the last round (or a
											 * partition) failed; "" */

	/* monitor worker (under dlt_lock) */
	pid_t		monitor_pid;
	Latch	   *monitor_latch;
	pg_atomic_uint32 dlt_refresh;	/* the relay asks for a round now */

	/* cleanup worker and the cleanup's counters (under cleanup_lock) */
	LWLock	   *cleanup_lock;
	pid_t		cleanup_pid;
	Oid			cleanup_dboid;
	CqrsCleanupSlot cleanup[CQRS_CLEANUP_DBS];

	/*
	 * Ids the relay has handed (or is about to hand) to the producer and not
	 * yet recorded: open addressing, linear probing, 0 = empty.  Written by
	 * the relay only, under inflight_lock exclusive; read by cqrs_discard().
	 */
	LWLock	   *inflight_lock;
	pg_atomic_uint64 discard_seq;	/* incremented by every discard */
	int64		inflight_ids[CQRS_INFLIGHT_IDS];

	int			nslots;
	CqrsInflightSlot slots[FLEXIBLE_ARRAY_MEMBER];
} CqrsShared;

extern PGDLLIMPORT CqrsShared *cqrs_shared;

extern void cqrs_shmem_init(void);

/* the in-flight registry: enqueuing (and discarding) backends */
extern uint64 cqrs_key_hash(const char *key, int len);
extern void cqrs_inflight_add_key(uint64 keyhash);
extern void cqrs_inflight_set_min(int64 id);
extern void cqrs_inflight_register_discard(uint64 keyhash, int64 id);
extern void cqrs_inflight_clear(void);

/* the in-flight registry: the relay */
extern int	cqrs_inflight_snapshot(CqrsInflight *out, int max);
extern bool cqrs_inflight_slot_has_key(const CqrsInflight *slot, uint64 keyhash);
extern bool cqrs_inflight_slot_alive(int slot, uint64 gen);

/* ids in flight, published by the relay */
extern void cqrs_inflight_ids_add(const int64 *ids, int n);
extern void cqrs_inflight_ids_remove(const int64 *ids, int n);
extern void cqrs_inflight_ids_reset(void);
extern bool cqrs_inflight_ids_contains(int64 id);
extern bool cqrs_inflight_ids_contains_local(int64 id);

/* commits visible before they are durable: writers, and the relay */
extern bool cqrs_sync_standbys_configured(void);
extern void cqrs_early_commit_begin(void);
extern void cqrs_early_commit_end(XLogRecPtr lsn);
extern uint64 cqrs_early_commits_mark(XLogRecPtr *lsn);
extern XLogRecPtr cqrs_early_commits_bound(uint64 mark, XLogRecPtr lsn);
extern XLogRecPtr cqrs_wal_inserted_end(void);

extern void cqrs_wake_relay(void);
extern void cqrs_request_rescan(int64 from);
extern void cqrs_relay_note_failure(const char *msg, uint64 nfailed);
extern void cqrs_relay_note_success(uint64 nsent);
extern void cqrs_relay_set_state(CqrsRelayState state, const char *topic,
								 const char *reason);
extern void cqrs_relay_set_stalled(const char *text, int count);
extern void cqrs_relay_add_phase(CqrsRelayPhase phase, int64 us);
extern void cqrs_wake_monitor(void);

#endif							/* CQRS_SHMEM_H */
