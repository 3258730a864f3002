#!/usr/bin/env bash
# test/bench/machine_limit.sh -- this machine's limits for an outbox relay, to
# set the relay's drain rate against (figures, not assertions):
#
#   producer: kcat, librdkafka's idempotent producer with acks=all, sending
#             ROWS messages of the drain benchmark's size over 1,000 keys to a
#             fresh topic of the broker (msg/s from the first to the last
#             acknowledgement, kcat's own figure);
#   sql:      the relay's own statements without Kafka: the scan of PENDING
#             rows above a cursor (5,000 a time, payload as text) and the
#             UPDATE to SENT by id, in one transaction per batch, over a
#             backlog of ROWS rows (rows/s), on a copy of cqrs_outbox (same
#             columns, indexes, defaults and storage parameters) that the
#             relay does not read;
#   sql-delete: the same with DELETE instead of UPDATE (delete_on_sent).
#
# The machine limit of a relay that marks rows SENT is min(producer, sql).
# Run it in the same session as the relay's own figures (the machine is
# shared and noisy: compare only within one run).
#
# usage: machine_limit.sh BROKERS (e.g. 127.0.0.1:19092); PGHOST/PGPORT/PGUSER
# point at a cluster with cqrs_sync created in database postgres.  ROWS
# (default 200000).
set -euo pipefail

BROKERS="$1"
ROWS="${ROWS:-200000}"
PSQL=(env PGOPTIONS="-c client_min_messages=warning" psql -X -q -At -v ON_ERROR_STOP=1 -d postgres)
topic="bench.limit.$(date +%s)"

# ---- producer ----------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - "$ROWS" >"$tmp/msgs" <<'EOF'
import json, random, string, sys
rnd = random.Random(7)
bodies = ["".join(rnd.choice(string.ascii_letters) for _ in range(150)) for _ in range(997)]
for seq in range(int(sys.argv[1])):
    key = "k%04d" % (seq % 1000)
    print(key + "\t" + json.dumps({"seq": seq, "aggregate": key, "kind": "JobPostUpdated",
          "version": seq, "ts": "2026-11-24T09:00:00.000Z",
          "data": {"title": "Benchmark job post", "body": bodies[seq % 997]}}))
EOF
t0=$(date +%s.%N)
kcat -P -b "$BROKERS" -t "$topic" -K '\t' -X enable.idempotence=true -X acks=all \
    -X linger.ms=1 -X queue.buffering.max.messages=1000000 -l "$tmp/msgs" 2>"$tmp/kcat.err"
t1=$(date +%s.%N)
awk -v n="$ROWS" -v a="$t0" -v b="$t1" \
    'BEGIN { printf "machine limit, producer (kcat, idempotent, acks=all): %d msg in %.2f s: %.0f msg/s\n", n, b - a, n / (b - a) }'

# ---- SQL ---------------------------------------------------------------------
sql_limit() { # what: update|delete
    "${PSQL[@]}" -c "DROP TABLE IF EXISTS bench_limit" \
        -c "CREATE TABLE bench_limit (LIKE cqrs_outbox INCLUDING ALL)"
    # and its storage parameters (fillfactor: room for HOT updates)
    local opts
    opts="$("${PSQL[@]}" -c "SELECT array_to_string(reloptions, ', ') FROM pg_class
                              WHERE oid = 'cqrs_outbox'::regclass")"
    [ -z "$opts" ] || "${PSQL[@]}" -c "ALTER TABLE bench_limit SET ($opts)"
    "${PSQL[@]}" -c "INSERT INTO bench_limit (topic, key, payload)
        SELECT 'bench.sql', 'k' || lpad((g % 1000)::text, 4, '0'),
               jsonb_build_object('seq', g, 'aggregate', 'k' || (g % 1000), 'kind', 'JobPostUpdated',
                                  'version', g, 'ts', '2026-11-24T09:00:00.000Z',
                                  'data', jsonb_build_object('title', 'Benchmark job post', 'body', repeat('x', 150)))
          FROM generate_series(1, $ROWS) g"
    "${PSQL[@]}" -c "VACUUM ANALYZE bench_limit" -c "CHECKPOINT"
    local mark
    if [ "$1" = update ]; then
        mark="UPDATE bench_limit SET status = 'SENT', sent_at = now(), next_attempt_at = NULL, last_error = NULL
               WHERE id = ANY (:'ids'::bigint[]) AND status = 'PENDING'"
    else
        mark="DELETE FROM bench_limit WHERE id = ANY (:'ids'::bigint[]) AND status = 'PENDING'"
    fi
    local t0 t1
    t0=$(date +%s.%N)
    "${PSQL[@]}" >/dev/null <<EOF
\\set cursor 0
$(for _ in $(seq 1 $(((ROWS + 4999) / 5000))); do cat <<STEP
BEGIN;
SELECT coalesce(array_agg(id ORDER BY id), '{}') AS ids, coalesce(max(id), :cursor) AS cursor,
       sum(length(payload_text)) AS bytes
  FROM (SELECT id, event_id::text, topic, key, payload::text AS payload_text, headers
          FROM bench_limit WHERE status = 'PENDING' AND id > :cursor
         ORDER BY id LIMIT 5000) s \\gset
$mark;
COMMIT;
STEP
done)
EOF
    t1=$(date +%s.%N)
    awk -v n="$ROWS" -v a="$t0" -v b="$t1" -v w="$1" \
        'BEGIN { printf "machine limit, sql (scan + %s, 5,000 a transaction): %d rows in %.2f s: %.0f rows/s\n", w, n, b - a, n / (b - a) }'
}
sql_limit update
sql_limit delete
"${PSQL[@]}" -c "DROP TABLE bench_limit"
