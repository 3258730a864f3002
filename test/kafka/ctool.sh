#!/usr/bin/env bash
# test/kafka/ctool.sh NAME [OUTDIR]
#
# Builds the test tool test/kafka/NAME.c (mock_cluster, probe_producer) against
# librdkafka into OUTDIR (default $CQRS_TEST_DIR/bin), unless an up-to-date
# binary is already there (newer than NAME.c and test/kafka/*.h), and prints
# the binary's path.  These tools are test infrastructure: never part of the
# extension's build, never committed.
#
#   "$(bash test/kafka/ctool.sh mock_cluster)" -b 3     # then type commands
#
# Environment: CC (default cc), CQRS_TEST_DIR (see test/lib.sh).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"

[ $# -ge 1 ] && [ $# -le 2 ] || cqrs_die "usage: $0 NAME [OUTDIR]"
name="$1"
src="$HERE/$name.c"
[ -f "$src" ] || cqrs_die "no test tool $src"
outdir="${2:-$CQRS_TEST_DIR/bin}"
out="$outdir/$name"

[ -f /usr/include/librdkafka/rdkafka_mock.h ] ||
    cqrs_die "librdkafka headers missing (install librdkafka-dev: test/setup-deps.sh)"
stale=
if [ ! -x "$out" ]; then
    stale=1
else
    for f in "$src" "$HERE"/*.h; do
        [ "$f" -nt "$out" ] && stale=1
    done
fi
if [ -n "$stale" ]; then
    mkdir -p "$outdir"
    # built under a temporary name: a concurrent user never runs half a file
    "${CC:-cc}" -std=gnu11 -O1 -g -Wall -Wextra -Werror -Wno-unused-parameter \
        -o "$out.tmp.$$" "$src" -lrdkafka ||
        { rm -f "$out.tmp.$$"; cqrs_die "could not build $src"; }
    mv -f "$out.tmp.$$" "$out"
fi
echo "$out"
