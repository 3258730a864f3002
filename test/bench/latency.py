"""Commit-to-consumer latency of cqrs_sync at a steady event rate.

Writer processes call cqrs_enqueue() in autocommit mode (one event per
transaction) on a fixed schedule and note when COMMIT returned; a Kafka
consumer, in a process of its own, notes when each event arrived (one
CLOCK_MONOTONIC for all processes; no thread waits for another's GIL).
Latency = arrival - commit return, which includes the relay's wake-up, the
produce, the broker's ack and the consumer's fetch: an upper bound of
commit-to-ack.  One event is sent and received before the measurement, so
that the topic exists and the consumer is assigned; after the writers stop,
the consumer waits up to 10 s for every event.

usage: latency.py DSN BROKERS TOPIC RATE SECONDS  (measured SECONDS after BENCH_WARMUP)
"""
import json
import multiprocessing as mp
import sys
import time
import uuid

import psycopg

from steady_writers import (WARMUP, WRITERS, consume_arrivals, pct, probe_payload as payload,
                            write_steadily)

dsn, brokers = sys.argv[1], sys.argv[2]
topic = f"{sys.argv[3]}.{uuid.uuid4().hex[:8]}"   # fresh topic: no old messages
rate, seconds = float(sys.argv[4]), float(sys.argv[5])


def writer(n, t0, out):
    """Writer n from t0; sends back {c: (monotonic, wall)} of its commits."""
    committed = {}
    write_steadily(dsn, topic, rate, WARMUP + seconds, n, t0, payload,
                   lambda c: committed.__setitem__(c, (time.monotonic(), time.time())))
    out.send(committed)
    out.close()


ctx = mp.get_context("fork")
ready, done = ctx.Event(), ctx.Event()
cons_end, here = ctx.Pipe()
cp = ctx.Process(target=consume_arrivals, args=(brokers, topic, ready, done, cons_end))
cp.start()
# the topic exists and the consumer reads it before the clock starts
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("SELECT cqrs_enqueue(%s, 'key-0', %s::jsonb)", (topic, json.dumps(payload("warmup", 0))))
if not ready.wait(60):
    sys.exit("latency: the warm-up event did not arrive within 60 s")

t0 = time.monotonic() + 0.5
pipes = []
ws = []
for n in range(WRITERS):
    a, b = ctx.Pipe()
    w = ctx.Process(target=writer, args=(n, t0, b))
    w.start()
    pipes.append(a)
    ws.append(w)
committed = {}
for a in pipes:
    committed.update(a.recv())
for w in ws:
    w.join()
elapsed = time.monotonic() - t0
done.set()
here.send(set(committed))
arrived = here.recv()
cp.join()

# per event: (commit monotonic, commit wall clock, arrival monotonic, arrival wall clock, CreateTime ms)
measured = [(t, w) + arrived[c] for c, (t, w) in committed.items() if c in arrived and t - t0 > WARMUP]
lat = sorted((a - t) * 1000 for t, _, a, _, _ in measured)
# the same split at the produce, by the message's CreateTime (wall clock, ms)
to_produce = sorted(ct - w * 1000 for _, w, _, _, ct in measured)
after_produce = sorted(aw * 1000 - ct for _, _, _, aw, ct in measured)
missing = sum(1 for c in committed if c not in arrived)
print(f"latency: {len(committed)} events in {elapsed:.1f} s ({len(committed) / elapsed:.0f}/s), "
      f"{missing} not received within 10 s of the last commit")
# commit -> SENT: sent_at is when the relay recorded Kafka's acknowledgement
with psycopg.connect(dsn) as conn:
    sent = dict(conn.execute("SELECT payload->>'c', extract(epoch FROM sent_at)::float8 "
                             "FROM cqrs_outbox WHERE topic = %s AND sent_at IS NOT NULL",
                             (topic,)).fetchall())
ack = sorted((sent[c] - w) * 1000 for c, (t, w) in committed.items()
             if c in sent and t - t0 > WARMUP)
print(f"latency: commit->SENT recorded ms (sent_at; outcomes are recorded in batches, <= 10 ms late)  "
      f"p50 {pct(ack, 50):.2f}  p90 {pct(ack, 90):.2f}  "
      f"p99 {pct(ack, 99):.2f}  max {ack[-1]:.2f}  (n={len(ack)})")
print(f"latency: commit->consumer ms  p50 {pct(lat, 50):.2f}  p90 {pct(lat, 90):.2f}  "
      f"p99 {pct(lat, 99):.2f}  max {lat[-1]:.2f}  (n={len(lat)})")
print(f"latency: the same split at the produce (Kafka CreateTime, 1 ms resolution): "
      f"commit->produce p50 {pct(to_produce, 50):.1f}  p99 {pct(to_produce, 99):.1f}  "
      f"max {to_produce[-1]:.1f};  produce->consumer p50 {pct(after_produce, 50):.1f}  "
      f"p99 {pct(after_produce, 99):.1f}  max {after_produce[-1]:.1f}")
