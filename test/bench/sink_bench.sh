#!/usr/bin/env bash
# test/bench/sink_bench.sh (part of make bench) -- the sink against a real
# broker (issue 14):
# (a) throughput: BENCH_SINK_EVENTS events (~100-byte JSON over
#     BENCH_SINK_KEYS keys, 8 partitions, each with an event_id header) are
#     in Kafka before a sink with a one-upsert handler (PL/pgSQL:
#     PERFORM cqrs_upsert(...)) is created; events/s from the first position
#     stored to the last (and including the consumer group's join), with one
#     sink worker and with two; then the same events through a declarative
#     route (no function: the payload is the row), with one and two workers;
# (b) latency: write COMMIT (cqrs_enqueue() in autocommit, on the write
#     database) -> row visible in the read model (the sink's handler upserts
#     and notifies; notifications arrive only after its commit) at a steady
#     BENCH_RATE events/s, p50/p99, through the relay and the sink;
# (c) the sink worker's CPU per event in each run.
# Figures, not assertions.
#
# Environment: BENCH_SINK_EVENTS (200000), BENCH_SINK_KEYS (10000),
# BENCH_RATE (1000), BENCH_SECONDS (30, measured after BENCH_WARMUP (180)
# seconds of the same load; see steady_writers.py), BENCH_SINK_PGPORT (55436),
# BENCH_SINK_KAFKA_PORT (19100).
set -euo pipefail

export PGPORT="${BENCH_SINK_PGPORT:-55436}" KAFKA_PORT="${BENCH_SINK_KAFKA_PORT:-19100}"
. "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"

EVENTS="${BENCH_SINK_EVENTS:-200000}"
KEYS="${BENCH_SINK_KEYS:-10000}"
RATE="${BENCH_RATE:-1000}"
SECS="${BENCH_SECONDS:-30}"
WARMUP="${BENCH_WARMUP:-180}"
export BENCH_WARMUP="$WARMUP"

bench_start
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
RPSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d bench_read)
PRODUCER="$(bash "$HERE/../kafka/ctool.sh" event_producer)"

# the write database is postgres (the relay); the sink runs in bench_read
"${PSQL[@]}" -c "CREATE EXTENSION cqrs_sync" -c "CREATE DATABASE bench_read"
"${RPSQL[@]}" <<'SQL'
CREATE EXTENSION cqrs_sync;
CREATE TABLE bench_board (id bigint PRIMARY KEY, title text, version bigint) WITH (fillfactor = 70);
CREATE FUNCTION bench_apply(e cqrs_event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cqrs_upsert('bench_board', jsonb_build_object('id', e.payload->'id', 'title', e.payload->'title'),
                        (e.payload->>'v')::bigint);
END
$$;
CREATE FUNCTION bench_apply_notify(e cqrs_event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cqrs_upsert('bench_board', jsonb_build_object('id', e.payload->'id', 'title', e.payload->'title'),
                        (e.payload->>'v')::bigint);
    PERFORM pg_notify('sink_bench', e.payload->>'c');
END
$$;
SQL
"${PSQL[@]}" -c "ALTER SYSTEM SET cqrs_sync.sink_database = 'bench_read'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 3

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; PostgreSQL $("$PG_BINDIR/postgres" -V | awk '{print $3}'), Kafka 3.9.1 on loopback; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "sink: batch_size $("${PSQL[@]}" -Atc 'SHOW cqrs_sync.sink_batch_size'), synchronous_commit $("${PSQL[@]}" -Atc 'SHOW synchronous_commit')"

ticks="$(getconf CLK_TCK)"
sink_cpu() { # total CPU ticks of the running sink workers
    local t=0 pid
    for pid in $("${PSQL[@]}" -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink'"); do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
now() { date +%s.%N; }

# ---- (a) throughput ----------------------------------------------------------
python3 - "$EVENTS" "$KEYS" >"$CQRS_TEST_DIR/sink-bench-events.txt" <<'PY'
import sys, uuid
n, keys = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    k = i % keys
    print(f'k{k}\t{uuid.uuid4()}\t{{"id":{k},"title":"board {k} edit {i}","v":{i + 1}}}')
PY
for run in handler:1 handler:2 route:1 route:2; do
    kind="${run%:*}" workers="${run#*:}"
    if [ "$kind" = handler ]; then
        handler="'bench_apply(cqrs_event)'" options='{}' what="one-upsert PL/pgSQL handler"
    else
        handler=NULL options='{"route": {"target": "bench_board", "version": "v"}}' what="declarative route"
    fi
    name="bench-$kind-$workers"
    topic="bench.sink.$kind.$workers.$$"
    bash "$HERE/../kafka/topic.sh" create "$topic" 8 >/dev/null 2>&1
    "$PRODUCER" -b "$BROKER" -t "$topic" -f "$CQRS_TEST_DIR/sink-bench-events.txt" >/dev/null
    "${PSQL[@]}" -c "ALTER SYSTEM SET cqrs_sync.sink_workers = $workers" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 2
    "${RPSQL[@]}" -c "TRUNCATE bench_board"
    cpu0="$(sink_cpu)"
    t_create="$(now)"
    "${RPSQL[@]}" -c "SELECT cqrs_sink_create('$name', ARRAY['$topic'], $handler, '$options')" >/dev/null
    while [ "$("${RPSQL[@]}" -Atc "SELECT coalesce(sum(applied), 0) > 0 FROM cqrs_sink_offset WHERE sink = '$name'")" != t ]; do
        sleep 0.02
    done
    t_first="$(now)"
    while [ "$("${RPSQL[@]}" -Atc "SELECT coalesce(sum(applied + duplicates), 0) FROM cqrs_sink_offset WHERE sink = '$name'")" != "$EVENTS" ]; do
        sleep 0.05
    done
    t_last="$(now)"
    cpu1="$(sink_cpu)"
    "${RPSQL[@]}" -c "SELECT cqrs_sink_pause('$name')" >/dev/null
    awk -v n="$EVENTS" -v w="$workers" -v a="$t_create" -v f="$t_first" -v b="$t_last" \
        -v c="$((cpu1 - cpu0))" -v tick="$ticks" -v what="$what" 'BEGIN {
        printf "sink throughput, %d worker(s): %d events (%s) in %.2f s after the first batch: %d events/s (%.2f s including the group join: %d events/s); sink CPU %.1f us per event\n",
               w, n, what, b - f, n / (b - f), b - a, n / (b - a), c / tick * 1e6 / n }'
done
"${PSQL[@]}" -c "ALTER SYSTEM SET cqrs_sync.sink_workers = 1" -c "SELECT pg_reload_conf()" >/dev/null

# ---- (b) latency ------------------------------------------------------------------
topic="bench.sinklat.$$"
bash "$HERE/../kafka/topic.sh" create "$topic" 8 >/dev/null 2>&1
"${RPSQL[@]}" -c "SELECT cqrs_sink_create('latency', ARRAY['$topic'], 'bench_apply_notify(cqrs_event)', '{\"start\": \"latest\"}')" >/dev/null
sleep 8   # the group's first assignment
cpu0="$(sink_cpu)"
"$VENV/bin/python" "$HERE/sink_latency.py" "host=$PGHOST port=$PGPORT user=$PGUSER dbname=postgres" \
    "host=$PGHOST port=$PGPORT user=$PGUSER dbname=bench_read" "$topic" "$RATE" "$SECS"
cpu1="$(sink_cpu)"
n="$("${RPSQL[@]}" -Atc "SELECT sum(applied) FROM cqrs_sink_offset WHERE sink = 'latency'")"
awk -v n="$n" -v c="$((cpu1 - cpu0))" -v tick="$ticks" -v s="$((SECS + ${WARMUP%.*}))" 'BEGIN {
    printf "sink latency run: %d events applied; sink CPU %.1f us per event, %.0f%% of a core\n",
           n, c / tick * 1e6 / n, c / tick / s * 100 }'
