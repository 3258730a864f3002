#!/usr/bin/env bash
# test/bench/stats_bench.sh -- how long cqrs_outbox_stats() and the exporter
# views take on a 1,000,000-row outbox of mixed status (goal: under 100 ms).
# A figure, not an assertion.  Its own throwaway cluster; no broker needed
# (the relay is off: the rows are made directly).
#
# Environment: BENCH_ROWS (1000000), BENCH_PGPORT (55435).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
export PGPORT="${BENCH_PGPORT:-55435}"
. "$HERE/../lib.sh"
ROWS="${BENCH_ROWS:-1000000}"

bash "$HERE/../setup-deps.sh"
make -C "$CQRS_REPO" -s
if cqrs_is_root; then make -C "$CQRS_REPO" -s install; else sudo make -C "$CQRS_REPO" -s install; fi

trap 'bash "$HERE/../pg/cluster.sh" stop || true' EXIT
eval "$(CQRS_PG_EXTRA_CONF="cqrs_sync.relay_enabled = off" bash "$HERE/../pg/cluster.sh" start)"
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
"${PSQL[@]}" -c "CREATE EXTENSION cqrs_sync"
"${PSQL[@]}" -c "INSERT INTO cqrs_outbox (topic, key, payload, status, sent_at, created_at)
    SELECT 'bench.stats', 'k' || (g % 1000), jsonb_build_object('n', g, 'body', repeat('x', 200)),
           CASE WHEN g % 1000 = 0 THEN 'DEAD_LETTERED' WHEN g % 997 = 0 THEN 'DLT_FAILED'
                WHEN g % 100 = 1 THEN 'PENDING' ELSE 'SENT' END::cqrs_outbox_status,
           now(), now() - interval '1 hour'
      FROM generate_series(1, $ROWS) g"
"${PSQL[@]}" -c "VACUUM ANALYZE cqrs_outbox"
"${PSQL[@]}" -At -F ' ' -c "SELECT format('outbox: %s rows, %s MiB table, %s MiB indexes', count(*), pg_table_size('cqrs_outbox') / 1048576, pg_indexes_size('cqrs_outbox') / 1048576) FROM cqrs_outbox"

for q in "SELECT * FROM cqrs_outbox_stats()" "SELECT * FROM cqrs_stats_outbox" "SELECT * FROM cqrs_stats_relay"; do
    times=$("${PSQL[@]}" -At <<SQL | grep '^Time' | awk '{print $2}' | sort -n | tr '\n' ' '
\\timing on
$q \\g /dev/null
$q \\g /dev/null
$q \\g /dev/null
$q \\g /dev/null
$q \\g /dev/null
SQL
)
    echo "$q: ms over 5 calls, sorted: $times"
done
