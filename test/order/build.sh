#!/usr/bin/env bash
# test/order/build.sh [OUTDIR]
#
# Builds the test module test/order/order_schedule.c (see its header) into
# OUTDIR/order_schedule.so (default $CQRS_TEST_DIR/bin), unless an
# up-to-date one is there, and prints its path.  It is compiled against the
# server's headers and cqrs_sync's own (src/relay.h), and resolves the
# relay's functions in cqrs_sync.so when a server that preloads cqrs_sync
# loads it.  Test infrastructure: never installed, never committed.
#
# Environment: CC (default cc), PG_CONFIG (default pg_config), CQRS_TEST_DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"

[ $# -le 1 ] || cqrs_die "usage: $0 [OUTDIR]"
src="$HERE/order_schedule.c"
outdir="${1:-$CQRS_TEST_DIR/bin}"
out="$outdir/order_schedule.so"
PG_CONFIG="${PG_CONFIG:-pg_config}"

stale=
if [ ! -f "$out" ]; then
    stale=1
else
    for f in "$src" "$HERE"/../../src/relay.h "$HERE"/../../src/shmem.h "$HERE"/../../src/kafka.h; do
        [ "$f" -nt "$out" ] && stale=1
    done
fi
if [ -n "$stale" ]; then
    mkdir -p "$outdir"
    # shellcheck disable=SC2046
    "${CC:-cc}" -shared -fPIC $("$PG_CONFIG" --cflags) -Werror \
        -I"$HERE/../../src" -I"$("$PG_CONFIG" --includedir-server)" \
        -o "$out.tmp.$$" "$src" ||
        { rm -f "$out.tmp.$$"; cqrs_die "could not build $src"; }
    mv -f "$out.tmp.$$" "$out"
fi
echo "$out"
