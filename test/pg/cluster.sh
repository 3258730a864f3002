#!/usr/bin/env bash
# test/pg/cluster.sh start|stop|status|env|psql [psql args...]
#
# A throwaway PostgreSQL 15 cluster for pg_regress, isolation and pgTAP tests,
# with cqrs_sync and pg_cron preloaded.  The cqrs_sync extension must be
# installed (make install) before start.
#
#   eval "$(test/pg/cluster.sh start)"   # starts it, prints PGHOST/PGPORT/PGUSER
#   test/pg/cluster.sh psql -c 'select 1'
#   test/pg/cluster.sh stop              # fast shutdown, removes everything
#
# Environment:
#   PGPORT              port (default 55432); listens on 127.0.0.1 and a socket
#   KAFKA_PORT          broker for cqrs_sync.brokers (default 19092)
#   CQRS_TEST_DIR       the cluster lives in $CQRS_TEST_DIR/pg-$PGPORT
#   CQRS_PG_EXTRA_CONF  extra postgresql.conf lines, appended last
#   PG_BINDIR           PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
# As root, the cluster belongs to the OS user postgres (initdb refuses root).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"

PGPORT="${PGPORT:-55432}"
BASE="$CQRS_TEST_DIR/pg-$PGPORT"
DATA="$BASE/data"
LOGFILE="$BASE/postgresql.log"
SUPERUSER=postgres
# Socket paths are limited to 107 bytes; fall back to a short directory.
SOCKDIR="$BASE"
if [ $((${#SOCKDIR} + ${#PGPORT} + 10)) -gt 100 ]; then
    SOCKDIR="/tmp/cqrs_sync_pg.$PGPORT"
fi

log() { printf 'cluster: %s\n' "$*" >&2; }

print_env() {
    printf 'export PGHOST=%q PGPORT=%q PGUSER=%q\n' "$SOCKDIR" "$PGPORT" "$SUPERUSER"
}

pg_ctl_() { cqrs_as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" "$@"; }

running() {
    [ -f "$DATA/postmaster.pid" ] && pg_ctl_ status >/dev/null 2>&1
}

start() {
    if running; then
        log "already running on port $PGPORT ($DATA)"
        print_env
        return 0
    fi
    [ -x "$PG_BINDIR/initdb" ] || cqrs_die "no initdb in $PG_BINDIR (run test/setup-deps.sh)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$PGPORT") 2>/dev/null; then
        cqrs_die "port $PGPORT on 127.0.0.1 is in use by another process; set PGPORT"
    fi
    cqrs_ensure_pg_osuser
    rm -rf "$BASE"
    mkdir -p "$BASE" "$SOCKDIR"
    if cqrs_is_root; then
        chown "$CQRS_PG_OSUSER:" "$BASE" "$SOCKDIR"
        runuser -u "$CQRS_PG_OSUSER" -- test -w "$BASE" ||
            cqrs_die "$CQRS_PG_OSUSER cannot write $BASE; set CQRS_TEST_DIR to a directory it can reach"
    fi

    log "initdb $DATA"
    cqrs_as_pg "$PG_BINDIR/initdb" -D "$DATA" -U "$SUPERUSER" -A trust \
        -E UTF8 --no-locale --no-sync >"$BASE/initdb.log" 2>&1 ||
        { cat "$BASE/initdb.log" >&2; cqrs_die "initdb failed"; }

    cqrs_as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<EOF

# ---- test/pg/cluster.sh ----
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCKDIR'
shared_preload_libraries = 'cqrs_sync,pg_cron'
cron.database_name = 'postgres'
cqrs_sync.database = 'postgres'
cqrs_sync.brokers = '127.0.0.1:$KAFKA_PORT'
cqrs_sync.poll_interval = 200ms
fsync = on
logging_collector = off
log_min_messages = info
log_line_prefix = '%m [%p] %q%a '
max_connections = 50
max_prepared_transactions = 10
${CQRS_PG_EXTRA_CONF:-}
EOF

    log "starting PostgreSQL on port $PGPORT, socket $SOCKDIR, log $LOGFILE"
    if ! pg_ctl_ start -w -t 60 -l "$LOGFILE" >/dev/null; then
        tail -n 40 "$LOGFILE" >&2 || true
        cqrs_die "PostgreSQL did not start (log: $LOGFILE)"
    fi
    print_env
}

stop() {
    if running; then
        log "stopping PostgreSQL on port $PGPORT"
        pg_ctl_ stop -m fast -w -t 60 >/dev/null ||
            pg_ctl_ stop -m immediate -w -t 30 >/dev/null || true
    fi
    # Keep the server log for post-mortems, then remove the cluster.
    if [ -f "$LOGFILE" ]; then
        mkdir -p "$CQRS_TEST_DIR/log"
        cp "$LOGFILE" "$CQRS_TEST_DIR/log/postgresql-$PGPORT.log" || true
    fi
    rm -rf "$BASE"
    [ "$SOCKDIR" = "$BASE" ] || rm -rf "$SOCKDIR"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        if running; then
            echo "running on port $PGPORT ($DATA)"
        else
            echo "not running"
            exit 3
        fi
        ;;
    env) print_env ;;
    psql)
        shift
        exec "$PG_BINDIR/psql" -X -h "$SOCKDIR" -p "$PGPORT" -U "$SUPERUSER" -d postgres "$@"
        ;;
    *)
        echo "usage: $0 start|stop|status|env|psql [args...]" >&2
        exit 2
        ;;
esac
