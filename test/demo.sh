#!/usr/bin/env bash
# test/demo.sh -- the cqrs_sync demo, one command on a fresh machine.
#
# Installs what is missing, builds and installs the extension, starts a
# throwaway PostgreSQL 15 cluster and a real Kafka broker on loopback,
# creates a small "community" write model whose transactions enqueue events,
# runs a workload, shows the outbox draining into Kafka, and the sink
# applying the stream to a read model in a second database exactly once.
#
# Environment: DEMO_SECONDS (workload length, default 10), DEMO_CLIENTS
# (default 4), CQRS_DEMO_KEEP=1 leaves the cluster and broker running.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# The demo uses its own ports, so it never touches a test run's servers.
export PGPORT="${DEMO_PGPORT:-55433}" KAFKA_PORT="${DEMO_KAFKA_PORT:-19094}"
. "$HERE/lib.sh"

SECONDS_TO_RUN="${DEMO_SECONDS:-10}"
CLIENTS="${DEMO_CLIENTS:-4}"
TOPIC=community.boards

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing missing packages, building and installing cqrs_sync"
bash "$HERE/setup-deps.sh"
make -C "$CQRS_REPO" -s
if cqrs_is_root; then make -C "$CQRS_REPO" -s install; else sudo make -C "$CQRS_REPO" -s install; fi

cleanup() {
    if [ "${CQRS_DEMO_KEEP:-0}" = 1 ]; then
        echo "CQRS_DEMO_KEEP=1: cluster (port $PGPORT) and broker (port $KAFKA_PORT) left running"
        return
    fi
    bash "$HERE/pg/cluster.sh" stop || true
    bash "$HERE/kafka/broker.sh" stop || true
}
trap cleanup EXIT

say "Starting a real Kafka broker (KRaft) on 127.0.0.1:$KAFKA_PORT and PostgreSQL 15 on port $PGPORT"
bash "$HERE/kafka/broker.sh" start >/dev/null
bash "$HERE/kafka/topic.sh" create "$TOPIC" 4 >/dev/null
eval "$(bash "$HERE/pg/cluster.sh" start)"
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
BROKER="127.0.0.1:$KAFKA_PORT"

say "CREATE EXTENSION cqrs_sync and the community write model"
"${PSQL[@]}" -c "CREATE EXTENSION cqrs_sync"
"${PSQL[@]}" -f "$HERE/demo/write_model.sql"
"${PSQL[@]}" -c "SELECT count(create_board('Board ' || g, 'Welcome to board ' || g)) AS boards_created FROM generate_series(1, 200) g" -P footer=off
"${PSQL[@]}" -c "SELECT pid, backend_type, wait_event FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'"

say "A transaction that rolls back leaves no event behind"
"${PSQL[@]}" <<'SQL'
BEGIN;
SELECT create_board('never committed', 'this board and its event vanish') AS board_id \gset
ROLLBACK;
SELECT count(*) AS events_of_rolled_back_board FROM cqrs_outbox WHERE payload->>'title' = 'never committed';
SQL

say "Workload: $CLIENTS clients like, comment and edit boards for $SECONDS_TO_RUN s (pgbench)"
"$PG_BINDIR/pgbench" -n -c "$CLIENTS" -j 2 -T "$SECONDS_TO_RUN" -f "$HERE/demo/workload.pgbench" postgres \
    >"$CQRS_TEST_DIR/demo-pgbench.log" 2>&1 &
bench=$!
while kill -0 "$bench" 2>/dev/null; do
    "${PSQL[@]}" -At -F ' ' -c "SELECT format('outbox: %s pending, %s sent; oldest pending %s s; relay sent %s', pending, sent, round(oldest_pending_age_seconds::numeric, 3), relay_events_sent) FROM cqrs_outbox_stats()"
    sleep 2
done
wait "$bench" || { cat "$CQRS_TEST_DIR/demo-pgbench.log"; exit 1; }
grep -E "number of transactions actually processed|tps" "$CQRS_TEST_DIR/demo-pgbench.log" | sed 's/^/pgbench: /'

say "The outbox drains into Kafka"
for _ in $(seq 1 100); do
    [ "$("${PSQL[@]}" -Atc "SELECT pending FROM cqrs_outbox_stats()")" = 0 ] && break
    sleep 0.3
done
"${PSQL[@]}" -x -c "SELECT * FROM cqrs_outbox_stats()"
"${PSQL[@]}" -c "SELECT payload->>'type' AS event, count(*), round(avg(extract(epoch FROM sent_at - created_at)) * 1000, 1) AS avg_ms_to_kafka FROM cqrs_outbox GROUP BY 1 ORDER BY 2 DESC"

say "What Kafka holds on topic $TOPIC"
outbox_count=$("${PSQL[@]}" -Atc "SELECT count(*) FROM cqrs_outbox")
kafka_count=$(kcat -C -b "$BROKER" -t "$TOPIC" -o beginning -e -q -f '%k\n' 2>/dev/null | wc -l)
echo "events committed in the outbox: $outbox_count; messages in Kafka: $kafka_count"
echo "three messages of board 7 (key, headers, value):"
kcat -C -b "$BROKER" -t "$TOPIC" -o beginning -e -q -f '  key=%k  headers=%h\n  value=%s\n' 2>/dev/null |
    grep -A1 '^  key=7 ' | head -6 || true
[ "$outbox_count" = "$kafka_count" ] || { echo "mismatch between outbox and Kafka" >&2; exit 1; }

say "Read side: the sink applies the stream to the board_detail read model (database community_read)"
"${PSQL[@]}" -c "CREATE DATABASE community_read"
RPSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d community_read)
"${RPSQL[@]}" -c "CREATE EXTENSION cqrs_sync"
"${RPSQL[@]}" -f "$HERE/demo/read_model.sql"
# The sink workers run in the read database (a reload moves them there).
"${PSQL[@]}" -c "ALTER SYSTEM SET cqrs_sync.sink_database = 'community_read'" -c "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 1 100); do
    [ "$("${PSQL[@]}" -Atc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync sink' AND datname = 'community_read'")" = 1 ] && break
    sleep 0.2
done
"${RPSQL[@]}" -c "SELECT cqrs_sink_create('board-view', ARRAY['$TOPIC'], 'community_sink(cqrs_event)')"
# wait until the sink stored positions for every message of the topic
wait_applied() { # messages
    for _ in $(seq 1 300); do
        [ "$("${RPSQL[@]}" -Atc "SELECT coalesce(sum(applied + duplicates), 0) FROM cqrs_sink_offset WHERE sink = 'board-view'")" = "$1" ] && return 0
        sleep 0.2
    done
    echo "the sink did not catch up" >&2
    return 1
}
compare() {
    "${PSQL[@]}" -At -F ' ' -c "SELECT format('write model: %s boards, %s likes, %s comments', (SELECT count(*) FROM boards), (SELECT count(*) FROM likes), (SELECT count(*) FROM comments))"
    "${RPSQL[@]}" -At -F ' ' -c "SELECT format('read model:  %s boards, %s likes, %s comments', count(*), sum(likes), sum(comments)) FROM board_page"
}
wait_applied "$kafka_count"
compare
"${RPSQL[@]}" -c "SELECT sink, \"partition\", \"position\", high_watermark, lag, lag_seconds, applied, duplicates FROM cqrs_sink_stats ORDER BY 2"
echo "the same stream delivered a second time (cqrs_sink_rewind to the beginning: every event read again):"
"${RPSQL[@]}" -c "SELECT * FROM cqrs_sink_rewind('board-view', '-infinity')" >/dev/null
wait_applied "$((2 * kafka_count))"
compare
"${RPSQL[@]}" -At -c "SELECT format('sink board-view: %s events applied, %s skipped as duplicates', sum(applied), sum(duplicates)) FROM cqrs_sink_stats"
"${RPSQL[@]}" -c "SELECT board_id, title, likes, comments, version FROM board_page ORDER BY likes DESC, board_id LIMIT 5"
w=$("${PSQL[@]}" -At -c "SELECT (SELECT count(*) FROM likes) || '/' || (SELECT count(*) FROM comments)")
r=$("${RPSQL[@]}" -At -c "SELECT sum(likes) || '/' || sum(comments) FROM board_page")
[ "$w" = "$r" ] || { echo "read model differs from the write model: $r vs $w" >&2; exit 1; }

say "Done"
echo "Every committed event reached Kafka once, in order per board, with its event_id header;"
echo "the sink applied it to the read model exactly once, and reading the stream twice left the"
echo "read model equal to the write model."
