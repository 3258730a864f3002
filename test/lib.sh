# test/lib.sh -- shared defaults for the test scripts; source it, don't run it.
#
# Environment (all optional):
#   CQRS_TEST_DIR   throwaway state (Kafka data, PostgreSQL cluster, TAP output).
#                   Default: <repo>/tmp_check, or, when running as root and the
#                   postgres OS user cannot reach the checkout (e.g. under /root),
#                   /tmp/cqrs_sync-test.<hash of the checkout path>.
#   KAFKA_PORT      broker port (default 19092); the KRaft controller uses +1.
#   PGPORT          throwaway cluster port (default 55432).
#   PG_BINDIR       PostgreSQL 15 binaries (default /usr/lib/postgresql/15/bin).
#   CQRS_PG_OSUSER  OS user that owns the clusters when running as root
#                   (default postgres).

CQRS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export CQRS_REPO

if [ -z "${PG_BINDIR:-}" ]; then
    if [ -x /usr/lib/postgresql/15/bin/initdb ]; then
        PG_BINDIR=/usr/lib/postgresql/15/bin
    elif command -v pg_config >/dev/null 2>&1; then
        PG_BINDIR="$(pg_config --bindir)"
    else
        PG_BINDIR=/usr/lib/postgresql/15/bin
    fi
fi
export PG_BINDIR

export KAFKA_PORT="${KAFKA_PORT:-19092}"
export CQRS_PG_OSUSER="${CQRS_PG_OSUSER:-postgres}"

cqrs_is_root() { [ "$(id -u)" = 0 ]; }

cqrs_log() { printf '%s\n' "[$(date +%H:%M:%S)] $*" >&2; }
cqrs_die() { printf '%s\n' "error: $*" >&2; exit 1; }

# Runs a command as the OS user that owns PostgreSQL clusters (root only;
# otherwise as the calling user).  The environment is kept.
cqrs_as_pg() {
    if cqrs_is_root; then
        # from / so that it never starts in a directory it may not enter
        (cd / && runuser -u "$CQRS_PG_OSUSER" -- "$@")
    else
        "$@"
    fi
}

# Makes sure the cluster-owning OS user exists (root only).
cqrs_ensure_pg_osuser() {
    cqrs_is_root || return 0
    if ! id -u "$CQRS_PG_OSUSER" >/dev/null 2>&1; then
        cqrs_log "creating OS user $CQRS_PG_OSUSER"
        useradd --system --user-group --home-dir /var/lib/postgresql \
            --create-home --shell /bin/bash "$CQRS_PG_OSUSER"
    fi
}

if [ -z "${CQRS_TEST_DIR:-}" ]; then
    CQRS_TEST_DIR="$CQRS_REPO/tmp_check"
    # Probe as the cluster owner (or as nobody before it exists: same
    # "other" permissions) whether it can reach the checkout.
    _cqrs_probe_user="$CQRS_PG_OSUSER"
    id -u "$_cqrs_probe_user" >/dev/null 2>&1 || _cqrs_probe_user=nobody
    if cqrs_is_root && ! runuser -u "$_cqrs_probe_user" -- test -x "$CQRS_REPO"; then
        CQRS_TEST_DIR="/tmp/cqrs_sync-test.$(printf '%s' "$CQRS_REPO" | md5sum | cut -c1-8)"
    fi
fi
case "$CQRS_TEST_DIR" in
    /*) ;;
    *) CQRS_TEST_DIR="$PWD/$CQRS_TEST_DIR" ;;
esac
export CQRS_TEST_DIR

# Kafka jar cache (test/kafka/broker.sh fills it, topic.sh uses it).  Root's
# lives in /var/cache so that tests running as the postgres user can read it.
CQRS_KAFKA_VERSION=3.9.1
if [ -z "${CQRS_KAFKA_CACHE:-}" ]; then
    _cqrs_user_cache="${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/cqrs_sync/kafka-$CQRS_KAFKA_VERSION"
    _cqrs_sys_cache="/var/cache/cqrs_sync/kafka-$CQRS_KAFKA_VERSION"
    if cqrs_is_root; then
        CQRS_KAFKA_CACHE="$_cqrs_sys_cache"
    elif [ -f "$_cqrs_user_cache/.complete" ] || [ ! -f "$_cqrs_sys_cache/.complete" ]; then
        CQRS_KAFKA_CACHE="$_cqrs_user_cache"
    else
        CQRS_KAFKA_CACHE="$_cqrs_sys_cache"
    fi
fi
export CQRS_KAFKA_CACHE

# The relay's count of events recorded as sent (or deleted), from shared
# memory: waiting for a drain reads it instead of counting PENDING rows (a
# count that walks the outbox and would compete with the relay for the CPU).
cqrs_relay_sent() {
    "$PG_BINDIR/psql" -X -At -d postgres -c "SELECT events_sent FROM cqrs_relay_state()"
}

# Wait until the relay recorded n more events than $before (a cqrs_relay_sent()
# reading), polling every $poll seconds (default 0.05).
cqrs_wait_sent() { # before n [poll]
    local target=$(($1 + $2))
    while [ "$(cqrs_relay_sent)" -lt "$target" ]; do sleep "${3:-0.05}"; done
}

