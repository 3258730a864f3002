#!/usr/bin/env bash
# test/bench/cleanup_bench.sh -- what the cleanup costs the relay.
#
# The relay drains a backlog of BENCH_ROWS (200,000) PENDING rows of ~300-byte
# JSON over 1,000 keys, committed in one transaction, into a real Kafka
# broker; events/s from COMMIT returned until the relay recorded its last
# acknowledgement (cqrs_outbox_stats().relay_last_success_at).  The outbox
# is pre-filled with BENCH_PREFILL (1,000,000) SENT rows two days old, and
# the drain runs in three modes:
#
#   idle      no cleanup (cqrs_sync.cleanup_interval = 0): the baseline;
#   function  a session calls SELECT * FROM cqrs_cleanup() back to back
#             with cqrs_sync.sent_retention = 0 (the pg_cron path at full
#             speed: it deletes the pre-filled rows and every row the relay
#             marks SENT, each call in one transaction);
#   function1s  the same, one call a second (pg_cron >= 1.5 with a
#             '1 second' schedule);
#   worker    the cleanup worker with cqrs_sync.cleanup_interval = 1s and
#             sent_retention = 0 (a transaction per batch, pausing
#             cqrs_sync.cleanup_delay between batches).
#
# Each mode runs BENCH_RUNS (3) times, interleaved; the summary gives the
# medians and each mode's cost against the baseline.  Figures, not
# assertions.
#
# Environment: PGPORT (55438), KAFKA_PORT (19104), CQRS_TEST_DIR, BENCH_ROWS,
# BENCH_PREFILL, BENCH_RUNS, BENCH_MODES ("idle function worker"),
# BENCH_PG_CONF (extra postgresql.conf lines, e.g. "cqrs_sync.cleanup_delay = 0"),
# BENCH_SKIP_BUILD=1 (use the installed cqrs_sync).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
export PGPORT="${PGPORT:-55438}" KAFKA_PORT="${KAFKA_PORT:-19104}"
. "$HERE/../lib.sh"

ROWS="${BENCH_ROWS:-200000}"
PREFILL="${BENCH_PREFILL:-1000000}"
RUNS="${BENCH_RUNS:-3}"
read -r -a MODES <<<"${BENCH_MODES:-idle function worker}"

bash "$HERE/../setup-deps.sh" >/dev/null
if [ "${BENCH_SKIP_BUILD:-}" != 1 ]; then
    make -C "$CQRS_REPO" -s
    if cqrs_is_root; then make -C "$CQRS_REPO" -s install; else sudo make -C "$CQRS_REPO" -s install; fi
fi

loop_pid=
cleanup() {
    [ -n "$loop_pid" ] && kill "$loop_pid" 2>/dev/null || true
    bash "$HERE/../pg/cluster.sh" stop || true
    bash "$HERE/../kafka/broker.sh" stop || true
}
trap cleanup EXIT
bash "$HERE/../kafka/broker.sh" start >/dev/null
eval "$(CQRS_PG_EXTRA_CONF="cqrs_sync.cleanup_interval = 0
max_wal_size = '4GB'
${BENCH_PG_CONF:-}" bash "$HERE/../pg/cluster.sh" start)"
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
"${PSQL[@]}" -c "CREATE EXTENSION cqrs_sync"

q() { "${PSQL[@]}" -At -c "$1"; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; PostgreSQL $("$PG_BINDIR/postgres" -V | awk '{print $3}'), Kafka 3.9.1 on loopback"
echo "relay: batch_size $(q 'SHOW cqrs_sync.batch_size'); cleanup: batch_size $(q 'SHOW cqrs_sync.cleanup_batch_size'), max_rows_per_call $(q 'SHOW cqrs_sync.cleanup_max_rows_per_call'), worker delay $(q 'SHOW cqrs_sync.cleanup_delay')"
echo "backlog $ROWS rows, outbox pre-filled with $PREFILL SENT rows"

# warm up: topic creation, producer connection
sent0="$(cqrs_relay_sent)"
q "SELECT count(cqrs_enqueue('bench.cleanup', 'key-' || g, '{}')) FROM generate_series(1, 1000) g" >/dev/null
cqrs_wait_sent "$sent0" 1000 0.1

set_conf() { # interval retention
    q "ALTER SYSTEM SET cqrs_sync.cleanup_interval = '$1'" >/dev/null
    q "ALTER SYSTEM SET cqrs_sync.sent_retention = '$2'" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
}

declare -A RATES RATIOS
RATE_IDLE=
run() { # mode run
    local mode="$1" n="$2" t0 t1 rate left av0 av1
    set_conf 0 1d
    q "TRUNCATE cqrs_outbox" >/dev/null
    q "INSERT INTO cqrs_outbox (topic, key, payload, status, created_at, sent_at)
       SELECT 'bench.cleanup', 'key-' || (g % 1000),
              jsonb_build_object('type', 'CommentAdded', 'seq', g, 'body', repeat('x', 180)),
              'SENT', now() - interval '2 days' + g * interval '1 ms',
              now() - interval '2 days' + g * interval '1 ms' + interval '5 ms'
         FROM generate_series(1, $PREFILL) g" >/dev/null
    q "VACUUM ANALYZE cqrs_outbox" >/dev/null
    q "CHECKPOINT" >/dev/null
    sleep 1
    av0=$(q "SELECT autovacuum_count FROM pg_stat_user_tables WHERE relid = 'cqrs_outbox'::regclass")
    sent0="$(cqrs_relay_sent)"

    t0=$("${PSQL[@]}" -At <<SQL
SELECT count(cqrs_enqueue('bench.cleanup', 'key-' || (g % 1000),
       jsonb_build_object('type', 'CommentAdded', 'board_id', g % 1000, 'seq', g,
                          'author', 'user-' || (g % 97), 'body', repeat('x', 180),
                          'at', now()::text))) FROM generate_series(1, $ROWS) g \\g /dev/null
SELECT extract(epoch FROM clock_timestamp());
SQL
)
    # the cleanup starts with the drain (the relay starts at COMMIT)
    case "$mode" in
        function)
            # back to back, one session, until killed
            { echo "SET cqrs_sync.sent_retention = 0;"
              echo "SET client_min_messages = warning;"
              yes 'SELECT * FROM cqrs_cleanup();'; } |
                "$PG_BINDIR/psql" -X -q -d postgres >/dev/null 2>&1 &
            loop_pid=$!
            ;;
        function1s)
            # as pg_cron with a '1 second' schedule would (pg_cron >= 1.5)
            { echo "SET cqrs_sync.sent_retention = 0;"
              echo "SET client_min_messages = warning;"
              yes 'SELECT * FROM cqrs_cleanup(); SELECT pg_sleep(1);'; } |
                "$PG_BINDIR/psql" -X -q -d postgres >/dev/null 2>&1 &
            loop_pid=$!
            ;;
        worker) set_conf 1s 0 ;;
    esac

    cqrs_wait_sent "$sent0" "$ROWS" 0.02
    t1=$(q "SELECT extract(epoch FROM relay_last_success_at) FROM cqrs_outbox_stats()")
    left=$(q "SELECT count(*) FROM cqrs_outbox WHERE status = 'SENT' AND sent_at < now() - interval '1 day'")
    av1=$(q "SELECT autovacuum_count FROM pg_stat_user_tables WHERE relid = 'cqrs_outbox'::regclass")

    if [ -n "$loop_pid" ]; then
        kill "$loop_pid" 2>/dev/null || true
        wait "$loop_pid" 2>/dev/null || true
        loop_pid=
    fi
    set_conf 0 1d

    rate=$(awk -v r="$ROWS" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", r / (b - a) }')
    RATES[$mode]+="$rate "
    [ "$mode" = idle ] && RATE_IDLE=$rate
    RATIOS[$mode]+="$(awk -v r="$rate" -v b="${RATE_IDLE:-$rate}" 'BEGIN { printf "%.4f", r / b }') "
    printf 'run %d %-10s: %d events in %.2f s: %6d events/s; pre-filled rows left: %7d of %d; autovacuums of the outbox: %d; load %s\n' \
        "$n" "$mode" "$ROWS" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$rate" "$left" "$PREFILL" \
        "$((av1 - av0))" "$(cut -d' ' -f1 /proc/loadavg)"
}

# one drain to warm up (not counted)
run idle 0 >/dev/null
RATES=() RATIOS=()
for n in $(seq 1 "$RUNS"); do
    for mode in "${MODES[@]}"; do
        run "$mode" "$n"
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
base=$(echo "${RATES[idle]}" | median)
echo "summary (median of $RUNS runs; cost = median of each run's rate against the idle run just before it):"
for mode in "${MODES[@]}"; do
    m=$(echo "${RATES[$mode]}" | median)
    r=$(echo "${RATIOS[$mode]}" | median)
    awk -v mode="$mode" -v m="$m" -v b="$base" -v r="$r" -v all="${RATES[$mode]}" \
        'BEGIN { printf "  %-10s %6d events/s  (%+.1f%% vs idle median; paired %+.1f%%; runs: %s)\n", mode, m, (m - b) * 100 / b, (r - 1) * 100, all }'
done
