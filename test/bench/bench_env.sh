# test/bench/bench_env.sh -- what the benchmarks share; source it after
# setting PGPORT and KAFKA_PORT (each benchmark has its own ports):
#   . "$HERE/bench_env.sh"   # test/lib.sh, the dependencies, the build and
#                            # its installation (into $PG_CONFIG's if set),
#                            # the Python venv ($VENV)
#   bench_start              # a broker and a cluster, stopped at exit;
#                            # sets BROKER and the libpq variables
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
. "$HERE/../lib.sh"

bash "$HERE/../setup-deps.sh"
# PG_CONFIG, when set, picks the PostgreSQL installation built against and
# installed into (a private copy, for instance); set PG_BINDIR to match.
make_pg=(make -C "$CQRS_REPO" -s ${PG_CONFIG:+PG_CONFIG="$PG_CONFIG"})
"${make_pg[@]}"
if cqrs_is_root; then "${make_pg[@]}" install; else sudo "${make_pg[@]}" install; fi

# Python client libraries for the latency probes, in a cached venv (PyPI).
VENV="${CQRS_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs_sync/bench-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import psycopg, confluent_kafka' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "psycopg[binary]==3.3.9" "confluent-kafka==2.16.1"
fi

bench_cleanup() {
    bash "$HERE/../pg/cluster.sh" stop || true
    bash "$HERE/../kafka/broker.sh" stop || true
}

bench_start() {
    trap bench_cleanup EXIT
    BROKER="$(bash "$HERE/../kafka/broker.sh" start)"
    eval "$(bash "$HERE/../pg/cluster.sh" start)"
}
