#!/usr/bin/env bash
# test/bench/run.sh (make bench) -- relay benchmark against a real broker.
#
# (a) drain: a backlog of 200,000 PENDING rows of ~300-byte JSON over 1,000
#     keys, committed in one transaction; events/s from COMMIT returned until
#     the last row is SENT (acknowledged by Kafka and recorded); after (b), so
#     that the broker is warm, as for the machine limit;
# (b) latency: commit-to-consumer p50/p99 at a steady 1,000 events/s, from
#     the consumer's receipt (and from sent_at, the recorded outcome), and
#     the floor of that figure on this machine at that moment: Kafka alone
#     (test/bench/kafka_latency.py: the relay's librdkafka and producer
#     settings, the same consumer, no database);
# (c) the relay's CPU per event and where its time goes (cqrs_stats_relay's
#     phase timers) in each run, and this machine's limits measured in the
#     same run (test/bench/machine_limit.sh: kcat's idempotent producer, the
#     relay's SQL without Kafka), and the drain rates divided by the slower
#     of the two;
# (d) how busy the whole machine was during each latency run, and its steal
#     time: the tail latencies are read against it.
# Figures, not assertions: timing belongs here, not in the tests.
#
# Environment: BENCH_ROWS (200000), BENCH_RATE (1000), BENCH_SECONDS (30,
# measured after BENCH_WARMUP (180) seconds of the same load, which warm the
# fresh broker's JVM; see steady_writers.py), BENCH_RUNS (3 drain runs).
set -euo pipefail

export PGPORT="${BENCH_PGPORT:-55434}" KAFKA_PORT="${BENCH_KAFKA_PORT:-19096}"
. "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"

ROWS="${BENCH_ROWS:-200000}"
RATE="${BENCH_RATE:-1000}"
SECS="${BENCH_SECONDS:-30}"
RUNS="${BENCH_RUNS:-3}"

bench_start
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
"${PSQL[@]}" -c "CREATE EXTENSION cqrs_sync"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; PostgreSQL $("$PG_BINDIR/postgres" -V | awk '{print $3}'), Kafka 3.9.1 on loopback"
echo "relay: batch_size $("${PSQL[@]}" -Atc 'SHOW cqrs_sync.batch_size')"

RELAY_PID="$("${PSQL[@]}" -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'")"
# relay_cpu: "all librdkafka" clock ticks, the process's and its librdkafka
# threads' (named rdk:*; the main thread is the rest)
relay_cpu() {
    echo "$(awk '{print $14 + $15}' "/proc/$RELAY_PID/stat")" \
         "$(cat "/proc/$RELAY_PID/task/"*/stat 2>/dev/null | awk '$2 ~ /^\(rdk:/ { t += $14 + $15 } END { print t + 0 }')"
}
# machine_cpu: "busy idle steal" clock ticks of the whole machine, all cores
# (busy: user, nice, system, irq, softirq; idle counts iowait; steal: time
# the host ran something else while a virtual CPU wanted to run)
machine_cpu() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6, $9; exit }' /proc/stat
}
# machine_report LABEL CPU0: how busy the machine was since the mark; every
# process on the event's path shares these cores, so read tail latencies
# against this line
machine_report() {
    awk -v label="$1" -v c0="$2" -v c1="$(machine_cpu)" -v tick="$(getconf CLK_TCK)" 'BEGIN {
        split(c0, p, " "); split(c1, q, " ");
        busy = (q[1] - p[1]) / tick; idle = (q[2] - p[2]) / tick; steal = (q[3] - p[3]) / tick;
        all = busy + idle + steal;
        printf "%s: the machine was busy %.0f of %.0f core-seconds (%.0f%%); steal %.1f s\n",
               label, busy, all, (all > 0 ? 100 * busy / all : 0), steal }'
}
PHASES="SELECT concat_ws(' ', record_seconds, claim_seconds, commit_seconds, flush_seconds,
                         produce_seconds, poll_seconds, acks, ack_wait_seconds, transactions)
          FROM cqrs_relay_state()"
# relay_report LABEL EVENTS CPU0 PHASES0: CPU per event and seconds per phase since the marks
relay_report() {
    local now cpu1
    now="$("${PSQL[@]}" -Atc "$PHASES")"
    cpu1="$(relay_cpu)"
    awk -v label="$1" -v n="$2" -v c0="$3" -v c1="$cpu1" -v tick="$(getconf CLK_TCK)" \
        -v a="$4" -v b="$now" 'BEGIN {
        split(a, x, " "); split(b, y, " "); split(c0, p, " "); split(c1, q, " ");
        acks = y[7] - x[7];
        printf "%s: relay CPU %.2f s, %.1f us per event (librdkafka threads %.1f); %d transactions; mean produce->report %.2f ms\n",
               label, (q[1] - p[1]) / tick, (q[1] - p[1]) / tick * 1e6 / n, (q[2] - p[2]) / tick * 1e6 / n,
               y[9] - x[9], (acks > 0 ? (y[8] - x[8]) * 1000 / acks : 0);
        printf "%s: seconds per phase: record %.2f, claim %.2f, commit %.2f, flush %.2f, produce %.2f, poll %.2f\n",
               label, y[1] - x[1], y[2] - x[2], y[3] - x[3], y[4] - x[4], y[5] - x[5], y[6] - x[6] }'
}

"${PSQL[@]}" -c "TRUNCATE cqrs_outbox"
cpu0="$(relay_cpu)"; ph0="$("${PSQL[@]}" -Atc "$PHASES")"; m0="$(machine_cpu)"
"$VENV/bin/python" "$HERE/latency.py" "host=$PGHOST port=$PGPORT user=$PGUSER dbname=postgres" \
    "127.0.0.1:$KAFKA_PORT" bench.latency "$RATE" "$SECS"
relay_report "latency run" "$("${PSQL[@]}" -Atc "SELECT count(*) FROM cqrs_outbox WHERE topic LIKE 'bench.latency.%'")" "$cpu0" "$ph0"
machine_report "latency run" "$m0"
"${PSQL[@]}" -At -F ' ' -c "
    SELECT format('latency: enqueue->SENT recorded ms  p50 %s  p99 %s (server clock, includes the commit)',
                  round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) * 1000)::numeric, 2),
                  round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) * 1000)::numeric, 2))
      FROM cqrs_outbox WHERE topic LIKE 'bench.latency.%'
       AND created_at > (SELECT min(created_at) + interval '2 s' FROM cqrs_outbox)"
# the floor for the figures above: Kafka alone, the relay's librdkafka and
# producer settings, the same consumer and schedule, no database
m0="$(machine_cpu)"
"$VENV/bin/python" "$HERE/kafka_latency.py" "127.0.0.1:$KAFKA_PORT" bench.floor "$RATE" "$SECS"
machine_report "kafka floor" "$m0"
# the drains after the latency runs: against a broker whose JVM is warm, as
# for the machine limit below (a broker that has just started is many times
# slower for its first minutes)
DRAINS=()    # "N events/s" per drain run, set against the machine limit at the end
for run in $(seq 1 "$RUNS"); do
    "${PSQL[@]}" -c "TRUNCATE cqrs_outbox"
    sent0="$(cqrs_relay_sent)"
    cpu0="$(relay_cpu)"; ph0="$("${PSQL[@]}" -Atc "$PHASES")"
    t0=$("${PSQL[@]}" -At <<SQL
SELECT count(cqrs_enqueue('bench.drain', 'key-' || (g % 1000),
       jsonb_build_object('type', 'CommentAdded', 'board_id', g % 1000, 'seq', g,
                          'author', 'user-' || (g % 97), 'body', repeat('x', 180),
                          'at', now()::text))) FROM generate_series(1, $ROWS) g \\g /dev/null
SELECT extract(epoch FROM clock_timestamp());
SQL
)
    cqrs_wait_sent "$sent0" "$ROWS"
    line="$("${PSQL[@]}" -At -F ' ' -c "
        SELECT format('drain run %s: %s events, avg %s bytes, %s s from COMMIT to last SENT: %s events/s',
                      $run, count(*), round(avg(octet_length(payload::text))),
                      round((extract(epoch FROM max(sent_at)) - $t0)::numeric, 2),
                      round(count(*) / (extract(epoch FROM max(sent_at)) - $t0)))
          FROM cqrs_outbox")"
    echo "$line"
    DRAINS+=("${line##*: }")
    relay_report "drain run $run" "$ROWS" "$cpu0" "$ph0"
done

# the same backlog with cqrs_sync.delete_on_sent: rows are deleted at their
# acknowledgement instead of updated to SENT (measured by wall clock)
"${PSQL[@]}" -c "TRUNCATE cqrs_outbox" -c "ALTER SYSTEM SET cqrs_sync.delete_on_sent = on" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
sent0="$(cqrs_relay_sent)"
t0=$("${PSQL[@]}" -At <<SQL
SELECT count(cqrs_enqueue('bench.drain', 'key-' || (g % 1000),
       jsonb_build_object('type', 'CommentAdded', 'board_id', g % 1000, 'seq', g,
                          'author', 'user-' || (g % 97), 'body', repeat('x', 180),
                          'at', now()::text))) FROM generate_series(1, $ROWS) g \\g /dev/null
SELECT extract(epoch FROM clock_timestamp());
SQL
)
cqrs_wait_sent "$sent0" "$ROWS" 0.02
t1=$(date +%s.%N)
awk -v n="$ROWS" -v a="$t0" -v b="$t1" 'BEGIN { printf "drain with delete_on_sent: %d events, %.2f s from COMMIT to the last row deleted (polled every 20 ms): %d events/s\n", n, b - a, n / (b - a) }'
"${PSQL[@]}" -c "ALTER SYSTEM RESET cqrs_sync.delete_on_sent" -c "SELECT pg_reload_conf()" >/dev/null

awk '/^(VmRSS|VmHWM|RssAnon)/ {printf "%s %.0f MiB  ", $1, $2/1024} END {print "(relay; RssAnon is its own memory, VmRSS counts shared buffers it touched)"}' "/proc/$RELAY_PID/status"
LIMITS="$(ROWS="$ROWS" bash "$HERE/machine_limit.sh" "127.0.0.1:$KAFKA_PORT")"
echo "$LIMITS"
# the drains against the slower of the two limits of marking rows SENT:
# Kafka's producer and PostgreSQL's scan + UPDATE
awk -v drains="${DRAINS[*]}" '
    /^machine limit, producer/ { kafka = $(NF - 1) }
    /^machine limit, sql \(scan \+ update/ { sql = $(NF - 1) }
    END {
        limit = (kafka < sql) ? kafka : sql
        if (limit <= 0) { print "drain / machine limit: no machine limit measured"; exit }
        n = split(drains, d, " ")
        out = ""
        for (i = 1; i < n; i += 2)
            out = out sprintf("%s%.2f", (out == "" ? "" : ", "), d[i] / limit)
        printf "drain / machine limit (%.0f/s, the slower of producer and SQL): %s\n", limit, out
    }' <<<"$LIMITS"
