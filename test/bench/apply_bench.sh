#!/usr/bin/env bash
# test/bench/apply_bench.sh -- events/s applied through the read-side helpers
# by one session (pgbench -c 1), against a running cluster:
#
#   PGHOST=/tmp PGPORT=55441 test/bench/apply_bench.sh
#
# The events are generated before each run into apply_bench_events (random
# UUID event ids, like the outbox's; board rows as JSON; increasing
# versions), so the figures measure the consumer's work, not the making of
# events.  A consumer applies each event in its transaction:
#   upsert: cqrs_mark_processed() and, if new, cqrs_upsert() of a board row
#           (random key out of 100,000 existing boards);
#   delta:  cqrs_apply_delta() of a like (deduplicates by itself).
# Shapes: 1 event per transaction (one statement, autocommit; and the
# BEGIN; mark; upsert; COMMIT form, three more round trips), and 100 events
# per transaction (one statement over the batch; and 100 statements sent in
# one pipeline).  Each run starts from the same state: 100,000 boards, no
# inbox entries of the benchmark.  Figures, not assertions; the settings
# that matter most are printed with them.
#
# Environment: PGHOST, PGPORT, PGUSER (the usual libpq variables);
# BENCH_DB (cqrs_apply_bench, created if missing; the script owns its
# tables and the inbox entries and delta memory of consumers named
# apply-bench*), BENCH_ROLE (run the events as this role, a member of
# cqrs_sync_reader, as a read service does; default: the connecting user),
# BENCH_SECONDS (10), BENCH_KEYS (100000), BENCH_ONLY (a regular expression:
# only the runs whose label matches).
set -euo pipefail

DB="${BENCH_DB:-cqrs_apply_bench}"
SECS="${BENCH_SECONDS:-10}"
KEYS="${BENCH_KEYS:-100000}"
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -d "$DB")
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if ! psql -X -At -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    createdb "$DB"
fi
"${PSQL[@]}" <<SQL
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS cqrs_sync;
DROP TABLE IF EXISTS apply_bench_board, apply_bench_events;
DROP SEQUENCE IF EXISTS apply_bench_next;
CREATE TABLE apply_bench_board (
    id       bigint PRIMARY KEY,
    title    text,
    body     text,
    likes    bigint NOT NULL DEFAULT 0,
    comments bigint NOT NULL DEFAULT 0,
    version  bigint NOT NULL DEFAULT 0
);
CREATE TABLE apply_bench_events (
    seq      bigint PRIMARY KEY,
    event_id text NOT NULL,
    board_id bigint NOT NULL,
    row      jsonb NOT NULL
);
CREATE SEQUENCE apply_bench_next;
SQL

# A read service's role, if asked for: the helpers then check its privileges
# and its ownership of the consumers, as they do in production.
ROLE="${BENCH_ROLE:-}"
if [ -n "$ROLE" ]; then
    "${PSQL[@]}" <<SQL
SET client_min_messages = warning;
DO \$\$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
        CREATE ROLE $ROLE NOLOGIN;
    END IF;
END \$\$;
GRANT cqrs_sync_reader TO $ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON apply_bench_board TO $ROLE;
GRANT SELECT ON apply_bench_events TO $ROLE;
GRANT USAGE, UPDATE ON SEQUENCE apply_bench_next TO $ROLE;
SQL
fi

# Fresh state for a run: the boards, N new events, no inbox entries.
prepare() { # number-of-events
    "${PSQL[@]}" <<SQL
TRUNCATE apply_bench_board, apply_bench_events;
INSERT INTO apply_bench_board (id, title, body)
SELECT g, 'title ' || g, 'body of board ' || g FROM generate_series(1, $KEYS) g;
INSERT INTO apply_bench_events
SELECT g, gen_random_uuid()::text, k,
       jsonb_build_object('id', k, 'title', 'title ' || g, 'body', 'body of board ' || k)
  FROM (SELECT g, (random() * ($KEYS - 1))::bigint + 1 AS k
          FROM generate_series(1, $1) g) s;
DELETE FROM cqrs_inbox WHERE consumer LIKE 'apply-bench%';
-- the memory of cqrs_apply_delta() (version 0.2.0; 0.1.0 kept it in the inbox)
DO \$\$ BEGIN
    IF to_regclass('cqrs_delta_inbox') IS NOT NULL THEN
        DELETE FROM cqrs_delta_inbox WHERE consumer LIKE 'apply-bench%';
    END IF;
END \$\$;
ALTER SEQUENCE apply_bench_next RESTART;
VACUUM ANALYZE apply_bench_board, apply_bench_events, cqrs_inbox, cqrs_tombstone;
CHECKPOINT;
SQL
}

# --- scripts: each takes the next event(s) from apply_bench_events -------------
ONE="FROM apply_bench_events e WHERE e.seq = (SELECT nextval('apply_bench_next'))"
BATCH="FROM (SELECT nextval('apply_bench_next') AS b) n, apply_bench_events e
 WHERE e.seq BETWEEN n.b * 100 - 99 AND n.b * 100"

cat >"$WORK/upsert_1.sql" <<SQL
SELECT CASE WHEN cqrs_mark_processed('apply-bench', e.event_id)
            THEN cqrs_upsert('apply_bench_board', e.row, e.seq) END
  $ONE;
SQL

cat >"$WORK/upsert_1_txn.sql" <<SQL
SELECT e.event_id, e.row, e.seq $ONE \gset
BEGIN;
SELECT cqrs_mark_processed('apply-bench', :event_id);
SELECT cqrs_upsert('apply_bench_board', :row, :seq);
COMMIT;
SQL

cat >"$WORK/upsert_100.sql" <<SQL
SELECT count(*) FILTER (WHERE applied) FROM (
    SELECT CASE WHEN cqrs_mark_processed('apply-bench', e.event_id)
                THEN cqrs_upsert('apply_bench_board', e.row, e.seq) END AS applied
      $BATCH
     ORDER BY e.seq) s;
SQL

{
    echo '\startpipeline'
    echo 'BEGIN;'
    for _ in $(seq 1 100); do
        echo "SELECT CASE WHEN cqrs_mark_processed('apply-bench', e.event_id)" \
            "THEN cqrs_upsert('apply_bench_board', e.row, e.seq) END $ONE;"
    done
    echo 'COMMIT;'
    echo '\endpipeline'
} >"$WORK/upsert_100_pipeline.sql"

cat >"$WORK/delta_1.sql" <<SQL
SELECT cqrs_apply_delta('apply_bench_board', jsonb_build_object('id', e.board_id),
                        '{"likes": 1}', 'apply-bench-delta', e.event_id)
  $ONE;
SQL

cat >"$WORK/delta_100.sql" <<SQL
SELECT count(*) FILTER (WHERE applied) FROM (
    SELECT cqrs_apply_delta('apply_bench_board', jsonb_build_object('id', e.board_id),
                            '{"likes": 1}', 'apply-bench-delta', e.event_id) AS applied
      $BATCH
     ORDER BY e.seq) s;
SQL

# --- runs -----------------------------------------------------------------------
run() { # label script events-per-transaction events-per-statement max-events/s [pgbench options...]
    local label="$1" script="$2" per="$3" step="$4" cap="$5"
    shift 5
    local events=$((SECS * cap)) out tps used
    [[ "$label" =~ ${BENCH_ONLY:-.} ]] || return 0
    prepare "$events"
    out="$(PGOPTIONS="${ROLE:+-c role=$ROLE}" pgbench -n -c 1 -T "$SECS" -f "$WORK/$script" "$@" "$DB" 2>&1)" || {
        echo "$out" >&2
        exit 1
    }
    tps="$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | tail -n 1)"
    used="$("${PSQL[@]}" -At -c "SELECT last_value * $step FROM apply_bench_next")"
    if [ "$used" -gt "$events" ]; then
        echo "$label: ran out of events ($used > $events); raise the cap in $0" >&2
        exit 1
    fi
    awk -v l="$label" -v t="$tps" -v p="$per" \
        'BEGIN { printf "%-60s %8.0f events/s  (%.0f tx/s)\n", l, t * p, t }'
}

setting() { psql -X -At -d "$DB" -c "SHOW $1"; }
echo "PostgreSQL $(setting server_version), $(nproc) cores; fsync=$(setting fsync)," \
    "synchronous_commit=$(setting synchronous_commit), wal_sync_method=$(setting wal_sync_method)," \
    "shared_buffers=$(setting shared_buffers); $SECS s per run, 1 session${ROLE:+, as role $ROLE}"
run "upsert, 1 event/transaction (1 statement)"                upsert_1.sql              1   1 10000 -M prepared
run "upsert, 1 event/transaction (BEGIN; mark; upsert; COMMIT)" upsert_1_txn.sql         1   1 10000 -M prepared
run "upsert, 100 events/transaction (1 statement)"             upsert_100.sql          100 100 80000 -M prepared
run "upsert, 100 events/transaction (100 statements, pipeline)" upsert_100_pipeline.sql 100   1 80000 -M prepared
run "apply_delta, 1 event/transaction"                         delta_1.sql               1   1 10000 -M prepared
run "apply_delta, 100 events/transaction (1 statement)"        delta_100.sql           100 100 80000 -M prepared
