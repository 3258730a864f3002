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

on_schedule(rate, seconds, start, step) calls step(i) at start + i / rate
until seconds after start (the writers' schedule; kafka_latency.py's too).

consume_arrivals(brokers, topic, ready, done, out) is the probes' Kafka
consumer: it notes each event's arrival (its payload's "c"), sets ready when
the event "warmup" arrived, and once done is set reads until every event
named in the set that out then delivers arrived, or 10 s, and sends the
arrivals back on out: {c: (monotonic time, wall-clock time, the message's
Kafka CreateTime in ms)}.  The relay leaves CreateTime to librdkafka, which
stamps the moment the message was produced: the wall-clock pair splits a
latency into before and after the produce (to the millisecond).

WARMUP: the seconds both probes run before they count (see below).

Only the standard library is imported at the top: kafka_latency.py runs
parts of this module in Debian's python3, which has no psycopg.
"""
import json
import os
import threading
import time
import uuid

WRITERS = 4

# The first WARMUP seconds (env BENCH_WARMUP, default 180) run the same load
# but are not counted: a freshly started broker's JVM answers far slower until
# its request path is compiled.  In one sandbox at 1k/s, commit->consumer p50
# was 50, 24 and 15 ms in the first three half-minutes after a broker start,
# 4.7 ms after three minutes and 0.9-1.3 ms after four.  Production brokers
# are warm; the measured SECONDS come after the warm-up.
WARMUP = float(os.environ.get("BENCH_WARMUP", "180"))


PAD = "x" * 200


def probe_payload(c, i):
    """latency.py's events (and kafka_latency.py's, so that both are alike)."""
    return {"c": c, "type": "CommentAdded", "board_id": i % 1000,
            "author": f"user-{i % 97}", "body": PAD}


def pct(vals, p):
    return vals[min(len(vals) - 1, int(p / 100.0 * len(vals)))]


def on_schedule(rate, seconds, start, step):
    i = 0
    while True:
        due = start + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        if time.monotonic() - start > seconds:
            return
        step(i)
        i += 1


def write_steadily(dsn, topic, rate, seconds, n, start, make_payload, note):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        def enqueue(i):
            c = f"{n}-{i}"
            conn.execute("SELECT cqrs_enqueue(%s, %s, %s::jsonb)",
                         (topic, f"key-{i % 1000}", json.dumps(make_payload(c, i))))
            note(c)

        on_schedule(rate / WRITERS, seconds, start + n / rate, enqueue)


def consume_arrivals(brokers, topic, ready, done, out):
    from confluent_kafka import Consumer

    cons = Consumer({"bootstrap.servers": brokers, "group.id": "probe-" + uuid.uuid4().hex,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     "fetch.wait.max.ms": 50})
    cons.subscribe([topic])
    arrived = {}
    deadline = None
    while True:
        m = cons.poll(0.05)
        t = time.monotonic()
        if m is not None and not m.error():
            c = json.loads(m.value())["c"]
            arrived.setdefault(c, (t, time.time(), m.timestamp()[1]))
            if c == "warmup":
                ready.set()
        if done.is_set():
            if deadline is None:
                deadline = t + 10.0
                expected = out.recv()
            if t > deadline or expected <= arrived.keys():
                break
    cons.close()
    out.send(arrived)
    out.close()


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
