#!/usr/bin/env bash
# test/run.sh -- THE test command: installs what is missing, builds (warnings
# are errors), installs, starts a throwaway Kafka broker and PostgreSQL
# cluster, runs every suite, stops everything, and ends with one line
#
#   N passed, N failed
#
# counting test files (pg_regress tests, isolation specs, pgTAP files, TAP
# files, the monitoring bundle's check script; a build or start-up failure
# counts as one failed).  Exit status is non-zero if anything failed.  Works
# as root on a fresh Debian 12 machine.
#
# Environment:
#   CQRS_SUITES   suites to run (default "regress isolation pgtap monitoring
#                 release e2e package"; monitoring = test/monitoring/promtool.sh:
#                 promtool/amtool checks and unit tests of docs/monitoring/;
#                 release = test/release/check.sh: META.json against the PGXN
#                 spec, versions, make dist; package = test/package/check.sh:
#                 the Debian package built with pg_buildext, installed
#                 (CQRS_PACKAGE_INSTALL, apt when CI=true) and used; it runs
#                 last and puts the development build back)
#   CQRS_CLEAN=1  make clean before building (default on when CI=true)
#   CQRS_COPT     extra compiler flags (COPT; default -DUSE_ASSERT_CHECKING,
#                 CQRS_COPT= turns assertions off)
#   CQRS_SKIP_BUILD=1  test the already installed cqrs_sync (no make)
#   KAFKA_PORT (19092), PGPORT (55432), CQRS_TEST_DIR, PROVE_FLAGS: see
#   test/lib.sh, test/kafka/broker.sh, test/pg/cluster.sh, test/e2e.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

SUITES="${CQRS_SUITES:-regress isolation pgtap monitoring release e2e package}"
START=$SECONDS

PASSED=0
FAILED=0
SUMMARY=()

section() { printf '\n===== %s =====\n' "$*"; }
record() { # suite passed failed [note]
    local p="${2:-}" f="${3:-}"
    # never let a parsing problem turn into a pass
    [[ $p =~ ^[0-9]+$ ]] || p=0
    [[ $f =~ ^[0-9]+$ ]] || f=1
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    SUMMARY+=("$(printf '%-12s %3d passed, %3d failed %s' "$1" "$p" "$f" "${4:-}")")
}

started=
cleanup() {
    [ -n "$started" ] || return 0
    started=
    section "stopping the cluster and the broker"
    bash test/pg/cluster.sh stop || true
    bash test/kafka/broker.sh stop || true
}
finish() {
    cleanup
    section "summary ($((SECONDS - START)) s)"
    printf '%s\n' "${SUMMARY[@]}"
    [ -n "${CQRS_TEST_DIR:-}" ] && echo "logs: $CQRS_TEST_DIR/log, $CQRS_TEST_DIR/tap/tmp_check/log"
    echo "$PASSED passed, $FAILED failed"
    # success means something ran and nothing failed
    [ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
    exit $?
}
fatal() { # suite message
    echo "run.sh: $2" >&2
    record "$1" 0 1 "($2)"
    finish
}
trap cleanup EXIT
on_signal() {
    trap '' INT TERM
    fatal interrupted "interrupted by a signal"
}
trap on_signal INT TERM

# ---- dependencies ------------------------------------------------------------
section "dependencies"
bash test/setup-deps.sh || fatal setup "test/setup-deps.sh failed"
# shellcheck source=lib.sh
. test/lib.sh

# ---- build -------------------------------------------------------------------
section "build"
if [ "${CQRS_SKIP_BUILD:-}" = 1 ]; then
    echo "CQRS_SKIP_BUILD=1: using the installed cqrs_sync"
    record build 0 0 "(skipped)"
else
    # Assertions on by default (links against Debian's non-assert server:
    # only the extension's own Assert()s are checked).  make does not track
    # flags, so a change of flags since the last run forces a clean build.
    # (The stamp is in the repo, not in CQRS_TEST_DIR: PGXS's make clean
    # removes ./tmp_check.)
    copt="-Werror ${CQRS_COPT--DUSE_ASSERT_CHECKING}"
    stamp=".build-flags"
    if [ "${CQRS_CLEAN:-$([ "${CI:-}" = true ] && echo 1)}" = 1 ] ||
        [ "$(cat "$stamp" 2>/dev/null)" != "$copt" ]; then
        make -s clean
    fi
    echo "make COPT='$copt'"
    make -j"$(nproc)" COPT="$copt" || fatal build "make failed"
    echo "$copt" >"$stamp"
    if cqrs_is_root; then
        make -s install >/dev/null || fatal build "make install failed"
    else
        sudo -n make -s install >/dev/null || fatal build "make install failed (needs sudo)"
    fi
    record build 0 0 "(ok; not counted)"
fi

# ---- services ----------------------------------------------------------------
# (after the build: make clean removes ./tmp_check, the default CQRS_TEST_DIR)
mkdir -p "$CQRS_TEST_DIR/log"
section "starting Kafka and PostgreSQL"
# Stop leftovers of an earlier, interrupted run of this checkout (ours only:
# the scripts check their pid files), so nothing depends on a stale server.
bash test/pg/cluster.sh stop 2>/dev/null
bash test/kafka/broker.sh stop 2>/dev/null
started=1
KAFKA_BROKERS="$(bash test/kafka/broker.sh start)" || fatal services "the Kafka broker did not start"
export KAFKA_BROKERS
pgenv="$(bash test/pg/cluster.sh start)" || fatal services "the PostgreSQL cluster did not start"
eval "$pgenv"
export PGHOST PGPORT PGUSER
echo "KAFKA_BROKERS=$KAFKA_BROKERS $pgenv"

# ---- result parsers ------------------------------------------------------------
# pg_regress / pg_isolation_regress (PG15): " All 2 tests passed." or
# " 1 of 2 tests failed." (also "..., 1 of these failures ignored.")
count_regress() { # logfile rc -> "passed failed"
    local line n m
    line="$(grep -E '^ *(All [0-9]+ tests passed|[0-9]+ of [0-9]+ tests failed)' "$1" | tail -n 1)"
    if [[ $line =~ All\ ([0-9]+)\ tests\ passed ]]; then
        echo "${BASH_REMATCH[1]} 0"
    elif [[ $line =~ ([0-9]+)\ of\ ([0-9]+)\ tests\ failed ]]; then
        n="${BASH_REMATCH[1]}" m="${BASH_REMATCH[2]}"
        echo "$((m - n)) $n"
    else
        # No summary (pg_regress stopped early): count the per-test lines.
        n="$(grep -cE '^ *(test +)?[^ ]+ +\.\.\. ok' "$1")"
        m="$(grep -cE '^ *(test +)?[^ ]+ +\.\.\. FAILED' "$1")"
        [ "$2" -ne 0 ] && [ "$m" -eq 0 ] && m=1
        [ "$2" -eq 0 ] && [ "$n" -eq 0 ] && n=1
        echo "$n $m"
    fi
}
# prove / pg_prove: "Files=3, Tests=..." and, on failure, a Test Summary
# Report with one "test/t/x.pl (Wstat: 256 ...)" line per failed file.
count_prove() { # logfile rc -> "passed failed"
    local files failed
    files="$(sed -n 's/^Files=\([0-9]*\),.*/\1/p' "$1" | tail -n 1)"
    # one "name (Wstat: ...)" line per failed file in the Test Summary Report
    failed="$(grep -cE '^[^ ].* \(Wstat: ' "$1")"
    if [ -z "$files" ]; then
        if [ "$2" -eq 0 ]; then echo "1 0"; else echo "0 1"; fi
        return
    fi
    failed="${failed:-0}"
    # e.g. prove timed out, or make failed after the summary
    [ "$2" -ne 0 ] && [ "$failed" -eq 0 ] && failed=1
    local passed=$((files - failed))
    [ "$passed" -ge 0 ] || passed=0
    echo "$passed $failed"
}

run_suite() { # name parser command...
    local name="$1" parser="$2"
    shift 2
    local out="$CQRS_TEST_DIR/log/$name.out" rc
    section "$name: $*"
    mkdir -p "$CQRS_TEST_DIR/log"
    "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    local counts
    counts="$($parser "$out" "$rc")"
    # shellcheck disable=SC2086
    record "$name" $counts "$([ "$rc" -eq 0 ] || echo "(exit $rc)")"
    return "$rc"
}

print_diffs() { # file
    if [ -s "$1" ]; then
        section "$1 (first 2000 lines)"
        head -n 2000 "$1"
    fi
}

mkvar() { # print a Makefile variable
    make -s --no-print-directory -f Makefile -f - "print-$1" <<<'print-%: ; @echo $($*)' 2>/dev/null
}

# ---- suites ----------------------------------------------------------------------
for suite in $SUITES; do
    case "$suite" in
        regress)
            if [ -z "$(mkvar REGRESS)" ]; then
                record regress 0 0 "(none)"
                continue
            fi
            rm -f regression.diffs
            run_suite regress count_regress \
                make installcheck ISOLATION= CONTRIB_TESTDB=cqrs_regress ||
                print_diffs regression.diffs
            ;;
        isolation)
            if [ -z "$(mkvar ISOLATION)" ]; then
                record isolation 0 0 "(none)"
                continue
            fi
            rm -f output_iso/regression.diffs
            run_suite isolation count_regress \
                make installcheck REGRESS= ISOLATION_TESTDB=cqrs_isolation ||
                print_diffs output_iso/regression.diffs
            ;;
        pgtap)
            if ! compgen -G "test/pgtap/*.sql" >/dev/null; then
                record pgtap 0 0 "(no test/pgtap/*.sql)"
                continue
            fi
            # A fresh database with pgTAP installed; test files create
            # cqrs_sync themselves (BEGIN; CREATE EXTENSION ...; ROLLBACK).
            PGOPTIONS="-c client_min_messages=warning" "$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d postgres \
                -c 'DROP DATABASE IF EXISTS cqrs_pgtap' -c 'CREATE DATABASE cqrs_pgtap' &&
                "$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d cqrs_pgtap -c 'CREATE EXTENSION pgtap' ||
                { record pgtap 0 1 "(could not create database cqrs_pgtap)"; continue; }
            run_suite pgtap count_prove make pgtap
            ;;
        monitoring)
            # promtool check/test rules, amtool check-config, metric names
            # (TAP, one file); the alerting e2e test is test/t/100_alerting.pl
            run_suite monitoring count_prove prove --exec bash test/monitoring/promtool.sh
            ;;
        release)
            run_suite release count_prove prove --exec bash test/release/check.sh
            ;;
        e2e)
            run_suite e2e count_prove bash test/e2e.sh
            ;;
        package)
            run_suite package count_prove prove --exec bash test/package/check.sh
            ;;
        *)
            record "$suite" 0 1 "(unknown suite)"
            ;;
    esac
done

finish
