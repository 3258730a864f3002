#!/usr/bin/env bash
# test/release/check.sh -- the release files, as TAP (run by test/run.sh's
# "release" suite through prove --exec bash):
#  - META.json validates against the PGXN Meta Spec 1.0.0 with PGXN's own
#    validator (pgxn_meta, from crates.io; test/setup-deps.sh installs it),
#    which must also reject broken copies (so it really ran); without it, a
#    check of the spec's required fields and types (said in the output), and
#    a failure when CI=true;
#  - META.json's version, its provided extension's version and file, and
#    debian/changelog's upstream version equal the control file's;
#  - prereqs name PostgreSQL 15 and pgTAP; LICENSE is the PostgreSQL licence;
#    CHANGELOG.md has a section for the version;
#  - make dist builds cqrs_sync-<version>.zip with everything PGXN needs
#    under cqrs_sync-<version>/ and nothing from .git, tmp_check or a build.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

n=0
failed=0
ok() { # condition-result description
    n=$((n + 1))
    if [ "$1" = 0 ]; then
        echo "ok $n - $2"
    else
        echo "not ok $n - $2"
        failed=$((failed + 1))
    fi
}
json() { # file python-expression-on-m
    python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null
}

version="$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" cqrs_sync.control)"
[ -n "$version" ]
ok $? "the control file has a default_version ($version)"

# ---- META.json against the spec ---------------------------------------------
PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if command -v pgxn_meta >/dev/null 2>&1; then
    echo "# validator: $(pgxn_meta --version 2>&1 | head -n 1) (PGXN's, Meta Spec v1 JSON schemas)"
    out="$(pgxn_meta META.json 2>&1)"
    ok $? "META.json validates against the PGXN Meta Spec ($out)"
    # the validator must catch what the spec forbids
    python3 - "$tmp" <<'PY'
import json, sys
m = json.load(open('META.json'))
def bad(name, f):
    c = json.loads(json.dumps(m)); f(c)
    json.dump(c, open(f'{sys.argv[1]}/{name}.json', 'w'))
bad('no_license', lambda c: c.pop('license'))
bad('bad_version', lambda c: c.update(version='0.2'))
bad('bad_spec', lambda c: c['meta-spec'].update(version='9.9.9'))
bad('provides_no_file', lambda c: c['provides']['cqrs_sync'].update(file=5))
bad('unknown_key', lambda c: c.update(unknown_field=1))
PY
    for b in no_license bad_version bad_spec provides_no_file unknown_key; do
        pgxn_meta "$tmp/$b.json" >/dev/null 2>&1
        [ $? -ne 0 ]
        ok $? "the validator rejects a META.json with $b"
    done
else
    echo "# validator: pgxn_meta not installed (no cargo): checking the spec's required fields and types"
    python3 - <<'PY'
import json, re, sys
m = json.load(open('META.json'))
semver = re.compile(r'^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$')
errs = []
for k in ('name', 'version', 'abstract', 'maintainer', 'license', 'provides', 'meta-spec'):
    if k not in m: errs.append(f'missing {k}')
if not isinstance(m.get('name'), str) or not re.match(r'^[A-Za-z][A-Za-z0-9_-]+$', m.get('name', '')): errs.append('name')
if not semver.match(str(m.get('version'))): errs.append('version is not SemVer')
if m.get('meta-spec', {}).get('version') != '1.0.0': errs.append('meta-spec version')
if not isinstance(m.get('maintainer'), (str, list)): errs.append('maintainer')
for ext, p in m.get('provides', {}).items():
    if not isinstance(p, dict) or not isinstance(p.get('file'), str) or not semver.match(str(p.get('version'))): errs.append(f'provides {ext}')
if m.get('release_status') not in (None, 'stable', 'testing', 'unstable'): errs.append('release_status')
print('; '.join(errs)); sys.exit(1 if errs else 0)
PY
    ok $? "META.json has the spec's required fields and types"
    # CI must have validated with PGXN's validator, not only with this, where
    # it can: test/setup-deps.sh installs it with cargo when cargo is there.
    # (Debian 12's own cargo is too old to build it, and rustup's site is not
    # a package registry; a machine without Rust says so instead.)
    if [ "${CI:-}" = true ]; then
        if command -v cargo >/dev/null 2>&1 || [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
            ok 1 "PGXN's validator pgxn_meta is installed in CI (cargo is here: test/setup-deps.sh installs it)"
        else
            echo "# CI without cargo: META.json was checked against the spec's required fields only, not with pgxn_meta"
        fi
    fi
fi

# ---- versions and contents ----------------------------------------------------
[ "$(json META.json "m['version']")" = "$version" ]
ok $? "META.json's version equals the control file's ($version)"
[ "$(json META.json "m['provides']['cqrs_sync']['version']")" = "$version" ]
ok $? "META.json provides cqrs_sync $version"
file="$(json META.json "m['provides']['cqrs_sync']['file']")"
[ "$file" = "sql/cqrs_sync--$version.sql" ] && [ -f "$file" ]
ok $? "the provided file is the install script of $version ($file)"
[ "$(json META.json "m['meta-spec']['version']")" = "1.0.0" ]
ok $? "meta-spec 1.0.0"
json META.json "m['prereqs']['runtime']['requires']['PostgreSQL']" | grep -q '15\.0\.0'
ok $? "prereqs: PostgreSQL 15"
[ -n "$(json META.json "m['prereqs']['test']['requires']['pgTAP']")" ]
ok $? "prereqs: pgTAP for the tests"
json META.json "m['description']" | grep -q librdkafka
ok $? "the description names the librdkafka dependency"
[ "$(json META.json "m['license']")" = "postgresql" ] &&
    grep -q "Permission to use, copy, modify, and distribute this software and its" LICENSE &&
    grep -q "PostgreSQL License" LICENSE
ok $? "LICENSE is the PostgreSQL licence, as META.json says"
grep -qE "^## $(printf '%s' "$version" | sed 's/\./\\./g')\$" CHANGELOG.md
ok $? "CHANGELOG.md has a section for $version"
deb_version="$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' debian/changelog)"
[ "${deb_version%-*}" = "$version" ]
ok $? "debian/changelog's upstream version ($deb_version) equals the control file's"

# ---- make dist ------------------------------------------------------------------
dist="cqrs_sync-$version"
rm -f "$dist.zip"
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # an unpacked release archive: it is what make dist made
    echo "# not a git checkout: make dist (git archive) is checked in the repository"
    make -s dist >/dev/null 2>"$tmp/dist.err"
    [ $? -ne 0 ] && grep -q "not a git checkout" "$tmp/dist.err"
    ok $? "make dist says that it needs a git checkout"
elif make -s dist >/dev/null 2>"$tmp/dist.err"; ok $? "make dist succeeds"; [ -f "$dist.zip" ]; then
    unzip -Z1 "$dist.zip" >"$tmp/list"
    outside="$(grep -v "^$dist/" "$tmp/list" | head -n 3)"
    [ -z "$outside" ]
    ok $? "every file is under $dist/ ${outside:+($outside)}"
    missing=""
    for f in META.json LICENSE CHANGELOG.md README.md Makefile cqrs_sync.control \
        "sql/cqrs_sync--$version.sql" "sql/cqrs_sync--0.1.0.sql" "sql/cqrs_sync--0.1.0--$version.sql" \
        src/cqrs_sync.c src/enqueue.c src/attach.c debian/control debian/rules; do
        grep -qx "$dist/$f" "$tmp/list" || missing="$missing $f"
    done
    [ -z "$missing" ]
    ok $? "the archive holds what PGXN and a build need${missing:+ (missing:$missing)}"
    junk="$(grep -E "^$dist/(\.git/|tmp_check/|results/|output_iso/|\.ci/)|\.(o|so|bc|d|zip)\$|regression\.(diffs|out)\$" "$tmp/list" | head -n 3)"
    [ -z "$junk" ]
    ok $? "nothing from .git, tmp_check, CI or a build ${junk:+($junk)}"
    unzip -p "$dist.zip" "$dist/META.json" >"$tmp/META.json"
    [ "$(json "$tmp/META.json" "m['version']")" = "$version" ]
    ok $? "the archive's META.json says $version"
    rm -f "$dist.zip"
else
    ok 1 "make dist made $dist.zip ($(cat "$tmp/dist.err"))"
fi

echo "1..$n"
[ "$failed" -eq 0 ]
