#!/usr/bin/env bash
# test/bench/stats_bench.sh -- how long cqrs_outbox_stats() and the exporter
# views take on a large outbox of mixed status (goal: under 100 ms on 50
# million rows; the exporter calls cqrs_outbox_stats() twice per scrape).  A figure,
# not an assertion.  Its own throwaway cluster; no broker needed (the relay
# is off: the rows are made directly).
#
# The mix: 1% PENDING (a backlog: the newest rows, with the relay's mark at
# the first of them, as the relay leaves it), 0.1% DEAD_LETTERED, 0.1%
# DLT_FAILED (with their errors), the rest SENT; ~200-byte JSON payloads;
# 1,000 keys.  Rows are made in chunks of BENCH_CHUNK with event_id in id order
# (the unique index then grows at its end: the stats never read it, and random
# uuids would make a 50M-row load take hours here), with fsync and autovacuum
# off while loading, then VACUUM ANALYZE (which autovacuum does on a live
# outbox).  Prints, per query, the times of 5 warm calls, the first call after
# a restart (cold shared buffers), the 0.1.0 way (count(*) of the whole table)
# for comparison, and how far the SENT estimate is from the exact count.  The
# first call of a session also loads its caches: the median is the figure.
#
# Environment: BENCH_ROWS (1000000; 50000000 for the issue's figure),
# BENCH_CHUNK (5000000), BENCH_CALLS (calls per query, 5), BENCH_PGPORT (55435), BENCH_KEEP=1 keeps the cluster
# (and its data: CQRS_TEST_DIR/pg-PORT) for another run, which then skips
# the load if the outbox already holds BENCH_ROWS rows.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
export PGPORT="${BENCH_PGPORT:-55435}"
. "$HERE/../lib.sh"
ROWS="${BENCH_ROWS:-1000000}"
CHUNK="${BENCH_CHUNK:-5000000}"
CALLS="${BENCH_CALLS:-5}"

bash "$HERE/../setup-deps.sh"
make -C "$CQRS_REPO" -s
if cqrs_is_root; then make -C "$CQRS_REPO" -s install; else sudo make -C "$CQRS_REPO" -s install; fi

if [ "${BENCH_KEEP:-}" != 1 ]; then
    trap 'bash "$HERE/../pg/cluster.sh" stop || true' EXIT
fi
eval "$(CQRS_PG_EXTRA_CONF="cqrs_sync.relay_enabled = off
cqrs_sync.cleanup_interval = 0
autovacuum = off
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_size = '16GB'
checkpoint_timeout = '1h'
shared_buffers = '1GB'
maintenance_work_mem = '1GB'" bash "$HERE/../pg/cluster.sh" start)"
DATA="$CQRS_TEST_DIR/pg-$PGPORT/data"
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
"${PSQL[@]}" -c "CREATE EXTENSION IF NOT EXISTS cqrs_sync"

have=$("${PSQL[@]}" -At -c "SELECT coalesce(max(id), 0) FROM cqrs_outbox")
if [ "$have" -lt "$ROWS" ]; then
    start=$SECONDS
    for ((from = have + 1; from <= ROWS; from += CHUNK)); do
        to=$((from + CHUNK - 1))
        [ "$to" -le "$ROWS" ] || to=$ROWS
        "${PSQL[@]}" -c "INSERT INTO cqrs_outbox (event_id, topic, key, payload, status, sent_at, created_at,
                                     last_error)
            SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                   'bench.stats', 'k' || (g % 1000), jsonb_build_object('n', g, 'body', repeat('x', 200)),
                   CASE WHEN g > $ROWS * 0.99 THEN 'PENDING' WHEN g % 1000 = 0 THEN 'DEAD_LETTERED'
                        WHEN g % 997 = 0 THEN 'DLT_FAILED' ELSE 'SENT' END::cqrs_outbox_status,
                   now(), now() - interval '1 hour',
                   CASE WHEN g <= $ROWS * 0.99 AND (g % 1000 = 0 OR g % 997 = 0) THEN 'failed' END
              FROM generate_series($from, $to) g"
        echo "loaded $to of $ROWS rows ($((SECONDS - start)) s)"
    done
    "${PSQL[@]}" -c "UPDATE cqrs_relay_mark
                       SET scan_from = (SELECT min(id) FROM cqrs_outbox WHERE id > $ROWS * 0.99)"
    "${PSQL[@]}" -c "VACUUM ANALYZE cqrs_outbox"
    echo "load and VACUUM ANALYZE: $((SECONDS - start)) s"
fi
"${PSQL[@]}" -At -F ' ' -c "SELECT format('outbox: %s rows (pg_class estimate), %s MiB table, %s MiB indexes', reltuples::bigint, pg_table_size('cqrs_outbox') / 1048576, pg_indexes_size('cqrs_outbox') / 1048576) FROM pg_class WHERE oid = 'cqrs_outbox'::regclass"

# times in ms of the statements of a psql script, sorted
timed() {
    "${PSQL[@]}" -At <<SQL | grep '^Time' | awk '{print $2}' | sort -n | tr '\n' ' '
\\timing on
$1
SQL
}

QUERIES=("SELECT * FROM cqrs_outbox_stats()" "SELECT * FROM cqrs_stats_outbox" "SELECT * FROM cqrs_stats_relay")
for q in "${QUERIES[@]}"; do
    t="$(timed "$(for ((i = 0; i < CALLS; i++)); do printf '%s \\g /dev/null\n' "$q"; done)")"
    echo "$q: ms over $CALLS calls in one session, sorted: $t(median $(tr ' ' '\n' <<<"$t" | grep . | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'))"
done

# the first call after a restart: shared buffers cold (the OS cache is not
# dropped: other processes share this machine)
cqrs_as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" restart -w -m fast -l "$CQRS_TEST_DIR/pg-$PGPORT/postgresql.log" >/dev/null
echo "first cqrs_outbox_stats() after a restart, ms: $(timed "SELECT * FROM cqrs_outbox_stats() \\g /dev/null")"

# what 0.1.0 did (a count of the whole table), and the SENT estimate's error
echo "0.1.0's count of the whole table, ms (2 calls): $(timed "SELECT count(*) FROM cqrs_outbox \\g /dev/null
SELECT count(*) FROM cqrs_outbox \\g /dev/null")"
"${PSQL[@]}" -At -F ' ' -c "SELECT format('SENT: estimated %s, exact %s (%s%%); PENDING %s, DEAD_LETTERED %s, DLT_FAILED %s (exact)',
                                          s.sent, e.sent, round(100.0 * (s.sent - e.sent) / greatest(e.sent, 1), 2),
                                          s.pending, s.dead_lettered, s.dlt_failed)
                                     FROM cqrs_outbox_stats() s,
                                          (SELECT count(*) AS sent FROM cqrs_outbox WHERE status = 'SENT') e"
