"""This machine's floor for commit-to-consumer latency: Kafka alone.

The same broker, the same consumer as latency.py, and a producer with the
relay's librdkafka (Debian's python3-confluent-kafka is built on the same
Debian librdkafka) and the relay's producer settings (idempotent, acks=all,
linger.ms=0), producing one ~300-byte event at a time on the same steady
schedule, without a database.  Latency = consumer arrival - the moment the
event was handed to librdkafka (one CLOCK_MONOTONIC for all processes).  No
relay can deliver faster than this on the same machine at the same moment:
run it right after latency.py (which also warms the broker's JVM) and
compare within the run.

usage: kafka_latency.py BROKERS TOPIC RATE SECONDS  (SECONDS measured after WARMUP_FLOOR, default 10)
"""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid

from steady_writers import consume_arrivals, on_schedule, pct, probe_payload

DEBIAN_PYTHON = "/usr/bin/python3"     # its python3-confluent-kafka is built on the relay's librdkafka
if sys.argv[1] != "--produce":
    brokers = sys.argv[1]
    topic = f"{sys.argv[2]}.{uuid.uuid4().hex[:8]}"
    rate, seconds = float(sys.argv[3]), float(sys.argv[4])
WARMUP = float(os.environ.get("WARMUP_FLOOR", "10"))


def line(c, i):
    """latency.py's event i: its key and value."""
    return f"key-{i % 1000}", json.dumps(probe_payload(c, i))


def produce(brokers, topic, rate, seconds):
    """The producer, in Debian's python3 (the relay's librdkafka): repeats the
    warm-up event until told "go" on stdin, then produces on schedule and
    prints {c: monotonic time handed to librdkafka} as JSON."""
    import select
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True,
                  "acks": "all", "linger.ms": 0})
    # the first produce to a new topic can fail while the broker creates it
    while not select.select([sys.stdin], [], [], 0.5)[0]:
        p.produce(topic, line("warmup", 0)[1], key="key-0")
        p.poll(0)
    sys.stdin.readline()
    sent = {}
    mark = []                   # [(cpu, count)] when the warm-up ended
    t0 = time.monotonic() + 0.5

    def send(i):
        if not mark and time.monotonic() - t0 > WARMUP:
            mark.append((librdkafka_cpu(), i))
        c = f"f-{i}"
        key, value = line(c, i)
        sent[c] = time.monotonic()
        p.produce(topic, value, key=key)
        p.poll(0)

    on_schedule(rate, WARMUP + seconds, t0, send)
    cpu = (librdkafka_cpu() - mark[0][0]) / (len(sent) - mark[0][1])
    p.flush(30)
    print(json.dumps({"t0": t0, "end": time.monotonic(), "sent": sent, "cpu": cpu}), flush=True)


def librdkafka_cpu():
    """CPU seconds of this process's librdkafka threads (named rdk:*)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith("rdk:"):
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])    # utime, stime
        except FileNotFoundError:
            pass
    return total / tick


if __name__ == "__main__" and sys.argv[1] == "--produce":
    produce(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    sys.exit(0)

ctx = mp.get_context("fork")
ready, done = ctx.Event(), ctx.Event()
cons_end, here = ctx.Pipe()
cp = ctx.Process(target=consume_arrivals, args=(brokers, topic, ready, done, cons_end), daemon=True)
cp.start()
child = subprocess.Popen([DEBIAN_PYTHON, __file__, "--produce", brokers, topic, str(rate), str(seconds)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
if not ready.wait(60):
    child.kill()
    sys.exit("kafka floor: no warm-up event arrived within 60 s")
child.stdin.write("go\n")
child.stdin.flush()
res = json.loads(child.stdout.readline())
child.wait(30)
t0, sent = res["t0"], res["sent"]
elapsed = res["end"] - t0
done.set()
here.send(set(sent))
arrived = here.recv()
cp.join()

lat = sorted((arrived[c][0] - t) * 1000 for c, t in sent.items() if c in arrived and t - t0 > WARMUP)
missing = sorted((c for c in sent if c not in arrived), key=lambda c: int(c[2:]))
print(f"kafka floor: {len(sent)} events in {elapsed:.1f} s ({len(sent) / elapsed:.0f}/s), "
      f"{len(missing)} not received within 10 s of the last" + (f" ({missing[:5]})" if missing else ""))
print(f"kafka floor: produce->consumer ms (no database, relay's producer settings)  "
      f"p50 {pct(lat, 50):.2f}  p90 {pct(lat, 90):.2f}  p99 {pct(lat, 99):.2f}  max {lat[-1]:.2f}  (n={len(lat)})")
print(f"kafka floor: the producer's librdkafka threads used {res['cpu'] * 1e6:.1f} us of CPU per event")
