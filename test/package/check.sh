#!/usr/bin/env bash
# test/package/check.sh -- the Debian package postgresql-15-cqrs-sync, as TAP
# (test/run.sh's "package" suite, through prove --exec bash):
#
#  1. builds it from a copy of the checkout with Debian's PostgreSQL
#     extension tooling (dpkg-buildpackage, debian/rules: dh --with
#     pgxs_loop, i.e. pg_buildext), after checking that debian/control is
#     what pg_buildext makes of debian/control.in;
#  2. looks at the .deb: name, version (the control file's), dependencies,
#     files;
#  3. installs it:
#       CQRS_PACKAGE_INSTALL=apt      apt-get install ./<deb> for real (into
#                                     /usr/lib/postgresql; default when CI=true:
#                                     a throwaway machine)
#       CQRS_PACKAGE_INSTALL=private  dpkg-deb -x, its files copied into the
#                                     PostgreSQL of $PG_CONFIG (default
#                                     elsewhere: a shared machine's system
#                                     PostgreSQL is left alone)
#     and checks the installed library is the package's;
#  4. starts a throwaway cluster (test/pg/cluster.sh, cqrs_sync preloaded) on
#     those files: CREATE EXTENSION from the package, its version, the relay
#     running, an event enqueued, an update from 0.1.0;
#  5. puts the development build back (apt: purges the package first), so
#     that the machine is left as test/run.sh's build left it.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
# shellcheck source=../lib.sh
. test/lib.sh

PG_CONFIG="${PG_CONFIG:-pg_config}"
mode="${CQRS_PACKAGE_INSTALL:-$([ "${CI:-}" = true ] && echo apt || echo private)}"
version="$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" cqrs_sync.control)"
pkg=postgresql-15-cqrs-sync
work="$CQRS_TEST_DIR/package"
port="$((${PGPORT:-55432} + 3))"

n=0
failed=0
ok() { # status description
    n=$((n + 1))
    if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=$((failed + 1)); fi
}
finish() {
    echo "1..$n"
    [ "$failed" -eq 0 ]
    exit $?
}
show() { sed 's/^/# /' "$@" | tail -n 40; }

echo "# install mode: $mode; PostgreSQL of $PG_CONFIG ($("$PG_CONFIG" --pkglibdir))"
case "$mode" in
    apt | private) ;;
    *) ok 1 "CQRS_PACKAGE_INSTALL is apt or private, not '$mode'"; finish ;;
esac

# ---- 1. build --------------------------------------------------------------------
rm -rf "$work"
src="$work/cqrs-sync-$version"
mkdir -p "$src"
# the checkout's files (committed, and new ones not ignored), not its build;
# in an unpacked release archive (no git), its files but those of a build or
# a test run
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard
else
    find . -mindepth 1 \( -name tmp_check -o -name results -o -name output_iso -o -name log \) -prune -o \
        -type f ! -name '*.o' ! -name '*.so' ! -name '*.bc' ! -name '*.d' ! -name '*.zip' \
        ! -name 'regression.*' -printf '%P\0'
fi | tar --null -T - -cf - | tar -C "$src" -xf -
(cd "$src" && cp debian/control "$work/control.committed" && pg_buildext updatecontrol >/dev/null 2>&1)
cmp -s "$work/control.committed" "$src/debian/control"
ok $? "debian/control is what pg_buildext updatecontrol makes of debian/control.in"
(cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1
rc=$?
deb="$(ls "$work"/${pkg}_"$version"-*_*.deb 2>/dev/null | head -n 1)"
[ $rc -eq 0 ] && [ -n "$deb" ]
ok $? "dpkg-buildpackage built ${deb##*/}" || { show "$work/build.log"; finish; }
grep -q "pg_buildext" "$work/build.log"
ok $? "the build ran pg_buildext"

# ---- 2. the .deb -------------------------------------------------------------------
[ "$(dpkg-deb -f "$deb" Package)" = "$pkg" ]
ok $? "package name $pkg"
debver="$(dpkg-deb -f "$deb" Version)"
[ "${debver%-*}" = "$version" ]
ok $? "package version $debver is the control file's $version"
depends="$(dpkg-deb -f "$deb" Depends)"
echo "# Depends: $depends"
[[ $depends == *postgresql-15* ]] && [[ $depends == *librdkafka1* ]]
ok $? "depends on postgresql-15 and librdkafka1"
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|' >"$work/files"
missing=""
for f in /usr/lib/postgresql/15/lib/cqrs_sync.so \
    /usr/share/postgresql/15/extension/cqrs_sync.control \
    "/usr/share/postgresql/15/extension/cqrs_sync--$version.sql" \
    /usr/share/postgresql/15/extension/cqrs_sync--0.1.0.sql \
    "/usr/share/postgresql/15/extension/cqrs_sync--0.1.0--$version.sql" \
    "/usr/share/doc/$pkg/copyright"; do
    grep -qx "$f" "$work/files" || missing="$missing $f"
done
[ -z "$missing" ]
ok $? "holds the library, the control file, the install and upgrade scripts and the copyright${missing:+ (missing:$missing)}"

# ---- 3. install --------------------------------------------------------------------
mkdir -p "$work/deb"
dpkg-deb -x "$deb" "$work/deb"
pkglibdir="$("$PG_CONFIG" --pkglibdir)"
extdir="$("$PG_CONFIG" --sharedir)/extension"
if [ "$mode" = apt ]; then
    if [ "$pkglibdir" != /usr/lib/postgresql/15/lib ]; then
        ok 1 "apt installs into /usr/lib/postgresql/15, but PG_CONFIG's library directory is $pkglibdir"
        finish
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        --allow-downgrades --reinstall "$deb" >"$work/install.log" 2>&1
    ok $? "apt-get install ./${deb##*/}" || show "$work/install.log"
    [ "$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null)" = "install ok installed $debver" ]
    ok $? "dpkg knows $pkg $debver as installed"
    dpkg -S "$pkglibdir/cqrs_sync.so" 2>/dev/null | grep -q "^$pkg:"
    ok $? "$pkglibdir/cqrs_sync.so belongs to $pkg"
else
    cp "$work/deb/usr/lib/postgresql/15/lib/cqrs_sync.so" "$pkglibdir/" &&
        cp "$work"/deb/usr/share/postgresql/15/extension/cqrs_sync* "$extdir/"
    ok $? "the package's files copied into $pkglibdir and $extdir"
fi
cmp -s "$work/deb/usr/lib/postgresql/15/lib/cqrs_sync.so" "$pkglibdir/cqrs_sync.so"
ok $? "the installed library is the package's"
cmp -s "$work/deb/usr/share/postgresql/15/extension/cqrs_sync--$version.sql" "$extdir/cqrs_sync--$version.sql"
ok $? "the installed install script is the package's"

# ---- 4. a cluster on the installed files ------------------------------------------------
export PGPORT="$port" CQRS_TEST_DIR="$work/pg"
mkdir -p "$CQRS_TEST_DIR"
[ "$(id -u)" = 0 ] && chown -R "$CQRS_PG_OSUSER:" "$work" 2>/dev/null
if pgenv="$(bash test/pg/cluster.sh start 2>"$work/cluster.log")"; then
    ok 0 "a cluster with cqrs_sync preloaded starts"
    eval "$pgenv"
    export PGHOST PGPORT PGUSER
    q() { "$PG_BINDIR/psql" -X -q -A -t -v ON_ERROR_STOP=1 -d postgres "$@" 2>&1; }
    out="$(q -c 'CREATE EXTENSION cqrs_sync' -c "SELECT extversion FROM pg_extension WHERE extname = 'cqrs_sync'")"
    [ "$out" = "$version" ]
    ok $? "CREATE EXTENSION cqrs_sync from the package: version $out"
    relay=""
    for _ in $(seq 1 50); do
        relay="$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs_sync relay'")"
        [ "$relay" = 1 ] && break
        sleep 0.2
    done
    [ "$relay" = 1 ]
    ok $? "the relay of the package's library runs"
    out="$(q -c "SELECT cqrs_enqueue('package.test', 'k', '{\"n\": 1}') > 0")"
    [ "$out" = t ]
    ok $? "cqrs_enqueue() works"
    out="$(q -c 'CREATE DATABASE old' && "$PG_BINDIR/psql" -X -q -A -t -v ON_ERROR_STOP=1 -d old \
        -c "CREATE EXTENSION cqrs_sync VERSION '0.1.0'" -c 'ALTER EXTENSION cqrs_sync UPDATE' \
        -c "SELECT extversion FROM pg_extension WHERE extname = 'cqrs_sync'" 2>&1)"
    [ "$out" = "$version" ]
    ok $? "the package updates 0.1.0 to $version ($out)"
    bash test/pg/cluster.sh stop >/dev/null 2>&1
else
    ok 1 "a cluster with cqrs_sync preloaded starts"
    show "$work/cluster.log"
fi

# ---- 5. the development build back ------------------------------------------------------
if [ "$mode" = apt ]; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "$pkg" >"$work/purge.log" 2>&1
    ok $? "apt-get purge $pkg" || show "$work/purge.log"
fi
make -s install >/dev/null 2>"$work/reinstall.log"
ok $? "make install puts the development build back" || show "$work/reinstall.log"
finish
