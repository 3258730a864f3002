#!/usr/bin/env bash
# test/e2e.sh [test/t/NNN_name.pl ...]
#
# End-to-end TAP tests (test/t/*.pl): real PostgreSQL clusters made by
# PostgreSQL::Test::Cluster (shipped in postgresql-server-dev-15) and a real
# Kafka broker.  cqrs_sync must be installed (make install) first.
#
# The broker is $KAFKA_BROKERS; when unset, this script starts its own with
# test/kafka/broker.sh and stops it afterwards.
#
# As root, the tests run as the postgres OS user (initdb and postgres refuse
# root) with a clean environment; if that user cannot read the checkout, a copy
# of it is staged in $CQRS_TEST_DIR/tap/src.  Output and server logs go to
# $CQRS_TEST_DIR/tap/tmp_check/log.
#
# Environment: PROVE_FLAGS (e.g. -v or -j2), PG_TEST_* (passed through),
# CQRS_E2E_TIMEOUT (whole run, seconds, default 2400), PG_CONFIG.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PG_CONFIG="${PG_CONFIG:-pg_config}"
pgxs="$("$PG_CONFIG" --pgxs)"
pgxs_root="${pgxs%/src/makefiles/pgxs.mk}"
PG_PERL_LIB="$pgxs_root/src/test/perl"
PG_REGRESS="$pgxs_root/src/test/regress/pg_regress"
[ -f "$PG_PERL_LIB/PostgreSQL/Test/Cluster.pm" ] ||
    cqrs_die "PostgreSQL::Test::Cluster not found in $PG_PERL_LIB (install postgresql-server-dev-15)"
[ -x "$PG_REGRESS" ] || cqrs_die "pg_regress not found at $PG_REGRESS"
perl -MIPC::Run -e1 2>/dev/null || cqrs_die "perl IPC::Run missing (install libipc-run-perl)"
command -v kcat >/dev/null || cqrs_die "kcat missing (run test/setup-deps.sh)"

own_broker=
cleanup() {
    if [ -n "$own_broker" ]; then
        bash "$HERE/kafka/broker.sh" stop || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ -z "${KAFKA_BROKERS:-}" ]; then
    own_broker=1
    KAFKA_BROKERS="$(bash "$HERE/kafka/broker.sh" start)"
fi
export KAFKA_BROKERS

TAPDIR="$CQRS_TEST_DIR/tap"
rm -rf "$TAPDIR"
mkdir -p "$TAPDIR/tmp_check"

SRC="$CQRS_REPO"
run_as=()
if cqrs_is_root; then
    cqrs_ensure_pg_osuser
    if ! runuser -u "$CQRS_PG_OSUSER" -- test -r "$CQRS_REPO/test/t/CqrsTest.pm"; then
        SRC="$TAPDIR/src"
        cqrs_log "e2e: $CQRS_PG_OSUSER cannot read $CQRS_REPO; staging a copy in $SRC"
        mkdir -p "$SRC"
        tar -C "$CQRS_REPO" --exclude=./.git --exclude=./tmp_check --exclude=./results \
            --exclude=./output_iso -cf - . | tar -C "$SRC" -xf -
    fi
    chown -R "$CQRS_PG_OSUSER:" "$TAPDIR"
    runuser -u "$CQRS_PG_OSUSER" -- test -w "$TAPDIR" ||
        cqrs_die "$CQRS_PG_OSUSER cannot write $TAPDIR; set CQRS_TEST_DIR to a directory it can reach"
    run_as=(runuser -u "$CQRS_PG_OSUSER" --)
fi

if [ $# -gt 0 ]; then
    tests=("$@")
else
    tests=()
    for t in "$SRC"/test/t/*.pl; do
        [ -e "$t" ] && tests+=("test/t/$(basename "$t")")
    done
fi
if [ ${#tests[@]} -eq 0 ]; then
    echo "e2e: no TAP tests in test/t"
    exit 0
fi

# A clean, explicit environment: what Cluster.pm/Utils.pm need (PATH with
# the PG15 binaries first, PERL5LIB, PG_REGRESS, TESTDIR), the broker, and
# pass-through knobs.  Utils.pm itself drops any PG* connection variables.
envv=(
    "PATH=$PG_BINDIR:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    "PERL5LIB=$PG_PERL_LIB:$SRC/test/t"
    "PG_REGRESS=$PG_REGRESS"
    "TESTDIR=$TAPDIR"
    "KAFKA_BROKERS=$KAFKA_BROKERS"
    "KAFKA_PORT=$KAFKA_PORT"
    "CQRS_REPO=$SRC"
    "CQRS_TEST_DIR=$CQRS_TEST_DIR"
    "CQRS_KAFKA_CACHE=$CQRS_KAFKA_CACHE"
    "PG_BINDIR=$PG_BINDIR"
    "HOME=$(if cqrs_is_root; then echo "$TAPDIR"; else echo "${HOME:-$TAPDIR}"; fi)"
)
while IFS='=' read -r name _; do
    case "$name" in
        PG_TEST_* | PROVE_* | CI | TERM | LANG | CQRS_PG_OSUSER) envv+=("$name=${!name}") ;;
    esac
done < <(env)

cqrs_log "e2e: prove ${tests[*]} (broker $KAFKA_BROKERS, logs in $TAPDIR/tmp_check/log)"
cd "$SRC"
rc=0
# shellcheck disable=SC2086
"${run_as[@]}" env -i "${envv[@]}" \
    timeout --kill-after=30 "${CQRS_E2E_TIMEOUT:-2400}" \
    prove --timer ${PROVE_FLAGS:-} "${tests[@]}" 2>&1 | tee "$TAPDIR/prove.out" || rc=$?

if [ "$rc" -ne 0 ]; then
    echo
    echo "e2e: FAILED (prove exit $rc); logs in $TAPDIR/tmp_check/log"
    # For each failed test file, the tail of its TAP log and its server logs.
    failed="$(sed -n 's/^\(test\/t\/[^ ]*\.pl\) *(Wstat.*/\1/p' "$TAPDIR/prove.out" | sort -u)"
    [ -n "$failed" ] || failed="${tests[*]}"
    for t in $failed; do
        name="$(basename "$t" .pl)"
        for f in "$TAPDIR/tmp_check/log/regress_log_$name" "$TAPDIR"/tmp_check/log/"${name}"_*.log; do
            [ -f "$f" ] || continue
            echo "----- tail of $f -----"
            tail -n 80 "$f"
        done
    done
fi
exit "$rc"
