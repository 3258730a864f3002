"""Commit-to-consumer latency of cqrs_sync at a steady event rate.

Writer threads call cqrs_enqueue() in autocommit mode (one event per
transaction) on a fixed schedule and note when COMMIT returned; a Kafka
consumer notes when each event arrived.  Latency = arrival - commit return,
which includes the relay's wake-up, produce, broker ack and the consumer's
fetch: an upper bound of commit-to-ack.

usage: latency.py DSN BROKERS TOPIC RATE SECONDS
"""
import json
import sys
import threading
import time
import uuid

import psycopg
from confluent_kafka import Consumer

from steady_writers import pct, run_writers

dsn, brokers = sys.argv[1], sys.argv[2]
topic = f"{sys.argv[3]}.{uuid.uuid4().hex[:8]}"   # fresh topic: no old messages
rate, seconds = float(sys.argv[4]), float(sys.argv[5])
WARMUP = 2.0
PAD = "x" * 200

arrived = {}
lock = threading.Lock()
stop = threading.Event()


def consumer(ready):
    cons = Consumer({"bootstrap.servers": brokers, "group.id": "lat-" + uuid.uuid4().hex,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     "fetch.wait.max.ms": 50})
    cons.subscribe([topic], on_assign=lambda c, p: ready.set())
    while not stop.is_set():
        m = cons.poll(0.05)
        if m is None or m.error():
            continue
        t = time.monotonic()
        c = json.loads(m.value())["c"]
        with lock:
            arrived.setdefault(c, t)
    cons.close()


ready = threading.Event()
ct = threading.Thread(target=consumer, args=(ready,))
ct.start()
ready.wait(30)
time.sleep(1)
committed, committed_wall, t0 = run_writers(
    dsn, topic, rate, seconds,
    lambda c, i: {"c": c, "type": "CommentAdded", "board_id": i % 1000,
                  "author": f"user-{i % 97}", "body": PAD})
elapsed = time.monotonic() - t0
time.sleep(2)
stop.set()
ct.join()

lat = sorted((arrived[c] - t) * 1000 for c, t in committed.items()
             if c in arrived and t - t0 > WARMUP)
missing = sum(1 for c in committed if c not in arrived)
print(f"latency: {len(committed)} events in {elapsed:.1f} s ({len(committed) / elapsed:.0f}/s), "
      f"{missing} not received")
# commit -> SENT: sent_at is when the relay recorded Kafka's acknowledgement
with psycopg.connect(dsn) as conn:
    sent = dict(conn.execute("SELECT payload->>'c', extract(epoch FROM sent_at)::float8 "
                             "FROM cqrs_outbox WHERE topic = %s AND sent_at IS NOT NULL",
                             (topic,)).fetchall())
ack = sorted((sent[c] - committed_wall[c]) * 1000 for c, t in committed.items()
             if c in sent and t - t0 > WARMUP)
print(f"latency: commit->SENT recorded ms (sent_at; outcomes are recorded in batches, <= 10 ms late)  "
      f"p50 {pct(ack, 50):.2f}  p90 {pct(ack, 90):.2f}  "
      f"p99 {pct(ack, 99):.2f}  max {ack[-1]:.2f}  (n={len(ack)})")
print(f"latency: commit->consumer ms  p50 {pct(lat, 50):.2f}  p90 {pct(lat, 90):.2f}  "
      f"p99 {pct(lat, 99):.2f}  max {lat[-1]:.2f}  (n={len(lat)})")
