/*-------------------------------------------------------------------------
 *
 * shmem.h
 *	  Shared memory of cqrs_sync: the in-flight enqueue registry that keeps
 *	  per-key order across out-of-order commits, the relay's latch, and the
 *	  relay's counters.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_SHMEM_H
#define CQRS_SHMEM_H

#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

/* Bits of the per-transaction key filter (a small Bloom filter). */
#define CQRS_KEYFILTER_WORDS	8
#define CQRS_KEYFILTER_BITS		(CQRS_KEYFILTER_WORDS * 64)

/* min_id of a slot: no enqueue in progress / enqueue taking its first id */
#define CQRS_SLOT_IDLE			((uint64) 0)
#define CQRS_SLOT_REGISTERING	PG_UINT64_MAX

/*
 * One slot per backend.  A backend that enqueues publishes here, before it
 * takes an outbox id, the hashes of the keys its transaction writes and
 * (once known) the lowest id it took.  It clears the slot at commit/abort.
 */
typedef struct CqrsInflightSlot
{
	pg_atomic_uint64 min_id;
	pg_atomic_uint64 filter[CQRS_KEYFILTER_WORDS];
} CqrsInflightSlot;

/* What the relay copies out of an active slot. */
typedef struct CqrsInflight
{
	uint64		min_id;			/* 0 when not yet known: holds all ids */
	uint64		filter[CQRS_KEYFILTER_WORDS];
} CqrsInflight;

#define CQRS_ERROR_LEN 512
#define CQRS_TOPIC_NAMELEN 250		/* Kafka's 249 and a terminator */
#define CQRS_DLT_MAX 256			/* DLT partitions whose depth is kept */

/* What the relay is doing, for cqrs_stats_relay. */
typedef enum CqrsRelayState
{
	CQRS_RELAY_RUNNING = 0,
	CQRS_RELAY_PAUSED,			/* holding a topic after a configuration error */
	CQRS_RELAY_WAITING_BROKER	/* a batch waits for an unreachable broker */
} CqrsRelayState;

/* Depth of one dead-letter topic partition, as the relay last saw it. */
typedef struct CqrsDltPartition
{
	char		topic[CQRS_TOPIC_NAMELEN];
	int32		partition;
	int64		low;
	int64		high;
	TimestampTz checked_at;
} CqrsDltPartition;

typedef struct CqrsShared
{
	/* relay worker */
	Latch	   *relay_latch;	/* NULL when no relay is running */
	pid_t		relay_pid;

	/* relay counters since server start */
	pg_atomic_uint64 events_sent;
	pg_atomic_uint64 events_failed;
	pg_atomic_uint64 batches;
	pg_atomic_uint64 producer_restarts;
	pg_atomic_uint64 dead_lettered;
	pg_atomic_uint64 dlt_failed;

	slock_t		mutex;			/* protects the fields below */
	TimestampTz last_success_at;
	TimestampTz last_error_at;
	char		last_error[CQRS_ERROR_LEN];
	int			relay_state;	/* CqrsRelayState */
	char		paused_topic[CQRS_TOPIC_NAMELEN];
	char		paused_reason[CQRS_ERROR_LEN];

	/* dead-letter topic depth, written by the relay */
	LWLock	   *dlt_lock;
	int			ndlt;
	CqrsDltPartition dlt[CQRS_DLT_MAX];

	int			nslots;
	CqrsInflightSlot slots[FLEXIBLE_ARRAY_MEMBER];
} CqrsShared;

extern CqrsShared *cqrs_shared;

extern void cqrs_shmem_init(void);

extern uint64 cqrs_key_hash(const char *key, int len);
extern void cqrs_inflight_add_key(uint64 keyhash);
extern void cqrs_inflight_set_min(int64 id);
extern void cqrs_inflight_clear(void);
extern int	cqrs_inflight_snapshot(CqrsInflight *out, int max);
extern bool cqrs_inflight_holds(const CqrsInflight *snap, int n,
								int64 id, uint64 keyhash);

extern void cqrs_wake_relay(void);
extern void cqrs_relay_note_failure(const char *msg, uint64 nfailed);
extern void cqrs_relay_note_success(uint64 nsent);
extern void cqrs_relay_set_state(CqrsRelayState state, const char *topic,
								 const char *reason);

#endif							/* CQRS_SHMEM_H */
