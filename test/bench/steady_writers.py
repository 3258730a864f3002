"""Writers that call cqrs_enqueue() at a steady rate, for the latency probes.

write_steadily(dsn, topic, rate, seconds, n, start, make_payload, note) is
one writer: an autocommit session enqueueing one event per transaction on a
fixed schedule (rate / WRITERS events/s, staggered by its number n, from the
monotonic time start) and calling note(c) when COMMIT returned for the event
named c.  make_payload(c, i) returns the event's payload as a dict (the i-th
event of its writer); its key is key-<i % 1000>.  latency.py runs WRITERS of
them in processes of their own.

run_writers(dsn, topic, rate, seconds, make_payload) runs WRITERS of them in
threads (sink_latency.py) and returns when they are done: (committed,
committed_wall, t0), for each c the monotonic and wall-clock time COMMIT
returned, and the monotonic start.

WARMUP: the seconds both probes run before they count (see below).
"""
import json
import os
import threading
import time

import psycopg

WRITERS = 4

# The first WARMUP seconds (env BENCH_WARMUP, default 180) run the same load
# but are not counted: a freshly started broker's JVM answers far slower until
# its request path is compiled.  In one sandbox at 1k/s, commit->consumer p50
# was 50, 24 and 15 ms in the first three half-minutes after a broker start,
# 4.7 ms after three minutes and 0.9-1.3 ms after four.  Production brokers
# are warm; the measured SECONDS come after the warm-up.
WARMUP = float(os.environ.get("BENCH_WARMUP", "180"))


def pct(vals, p):
    return vals[min(len(vals) - 1, int(p / 100.0 * len(vals)))]


def write_steadily(dsn, topic, rate, seconds, n, start, make_payload, note):
    per = rate / WRITERS
    start += n / rate
    with psycopg.connect(dsn, autocommit=True) as conn:
        i = 0
        while True:
            due = start + i / per
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            if time.monotonic() - start > seconds:
                break
            c = f"{n}-{i}"
            conn.execute("SELECT cqrs_enqueue(%s, %s, %s::jsonb)",
                         (topic, f"key-{i % 1000}", json.dumps(make_payload(c, i))))
            note(c)
            i += 1


def run_writers(dsn, topic, rate, seconds, make_payload):
    committed = {}
    committed_wall = {}
    lock = threading.Lock()

    def note(c):
        t = time.monotonic()
        with lock:
            committed[c] = t
            committed_wall[c] = time.time()

    t0 = time.monotonic()
    ws = [threading.Thread(target=write_steadily,
                           args=(dsn, topic, rate, seconds, n, t0, make_payload, note))
          for n in range(WRITERS)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    return committed, committed_wall, t0
