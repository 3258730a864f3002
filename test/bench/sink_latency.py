"""Write COMMIT -> read model visible, through the relay and the sink.

Writer threads call cqrs_enqueue() on the write database in autocommit mode
(one event per transaction) on a fixed schedule and note when COMMIT
returned.  The sink's handler on the read database upserts the event's row
and sends pg_notify('sink_bench', <event>); a notification is delivered only
when the sink's transaction has committed, so its arrival at a listening
session of the read database is when the row became visible there.
Latency = arrival - commit return: the relay's wake-up and produce, the
broker, the sink's fetch, its transaction and commit.

usage: sink_latency.py WRITE_DSN READ_DSN TOPIC RATE SECONDS  (measured SECONDS after BENCH_WARMUP)
"""
import sys
import threading
import time

import psycopg

from steady_writers import WARMUP, pct, run_writers

write_dsn, read_dsn, topic = sys.argv[1], sys.argv[2], sys.argv[3]
rate, seconds = float(sys.argv[4]), float(sys.argv[5])
PAD = "x" * 200

visible = {}
lock = threading.Lock()
stop = threading.Event()


def listener(ready):
    with psycopg.connect(read_dsn, autocommit=True) as conn:
        conn.execute("LISTEN sink_bench")
        ready.set()
        while not stop.is_set():
            for note in conn.notifies(timeout=0.2):
                t = time.monotonic()
                with lock:
                    visible.setdefault(note.payload, t)


ready = threading.Event()
lt = threading.Thread(target=listener, args=(ready,))
lt.start()
ready.wait(30)
time.sleep(1)
# versions increase with time: every event's upsert applies
committed, _, t0 = run_writers(
    write_dsn, topic, rate, WARMUP + seconds,
    lambda c, i: {"c": c, "id": i % 1000, "title": f"t{c}", "v": int(time.time() * 1e6), "body": PAD})
elapsed = time.monotonic() - t0
time.sleep(3)
stop.set()
lt.join()

lat = sorted((visible[c] - t) * 1000 for c, t in committed.items() if c in visible and t - t0 > WARMUP)
missing = sum(1 for c in committed if c not in visible)
print(f"sink latency: {len(committed)} events in {elapsed:.1f} s ({len(committed) / elapsed:.0f}/s), "
      f"{missing} not visible")
print(f"sink latency: write COMMIT -> read model visible ms  p50 {pct(lat, 50):.2f}  p90 {pct(lat, 90):.2f}  "
      f"p99 {pct(lat, 99):.2f}  max {lat[-1]:.2f}  (n={len(lat)})")
