"""Writers that call cqrs_enqueue() at a steady rate, for the latency probes
(sink_latency.py; latency.py runs its writers in processes of their own).

run_writers(dsn, topic, rate, seconds, make_payload) starts WRITERS threads,
each an autocommit session enqueueing one event per transaction on a fixed
schedule (rate / WRITERS events/s each, staggered), and returns when they
are done.  make_payload(c, i) returns the event's payload as a dict for the
event named c (the i-th of its writer); its key is key-<i % 1000>.  Returns
(committed, committed_wall, t0): for each c the monotonic and wall-clock
time COMMIT returned, and the monotonic start.
"""
import json
import threading
import time

import psycopg

WRITERS = 4


def pct(vals, p):
    return vals[min(len(vals) - 1, int(p / 100.0 * len(vals)))]


def run_writers(dsn, topic, rate, seconds, make_payload):
    committed = {}
    committed_wall = {}
    lock = threading.Lock()

    def writer(n):
        per = rate / WRITERS
        with psycopg.connect(dsn, autocommit=True) as conn:
            start = time.monotonic() + n / rate
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
                t = time.monotonic()
                with lock:
                    committed[c] = t
                    committed_wall[c] = time.time()
                i += 1

    t0 = time.monotonic()
    ws = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    return committed, committed_wall, t0
