#!/usr/bin/env bash
# test/setup-deps.sh -- installs the Debian 12 packages the build and the tests
# need.  Idempotent: a fast no-op when everything is installed.  Runs as root,
# or through sudo otherwise.  Never prompts (CI has no stdin).
set -euo pipefail

packages=(
    build-essential
    postgresql-15
    postgresql-server-dev-15
    postgresql-15-pgtap
    postgresql-15-cron
    librdkafka-dev
    libipc-run-perl
    libtap-parser-sourcehandler-pgtap-perl
    kcat
    # make bench's latency floor (test/bench/kafka_latency.py): a producer on
    # the relay's own librdkafka, which this binding is built on
    python3-confluent-kafka
    # monitoring suite and test/t/100_alerting.pl: promtool, amtool and the
    # real daemons (the tests start them on free loopback ports; the packages'
    # own services are not used)
    prometheus
    prometheus-alertmanager
    prometheus-postgres-exporter
    # release and package suites: the Debian package (pg_buildext) and zip
    debhelper
    postgresql-server-dev-all
    unzip
)

# dpkg -s alone also succeeds for removed packages that left config files.
installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
# Java and Maven only for the test broker; any installed ones will do.
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)

# PGXN's META.json validator (release suite), from crates.io, when cargo is
# there (the release check falls back to the spec's required fields without).
install_pgxn_meta() {
    local cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
    if command -v pgxn_meta >/dev/null 2>&1 || [ -x "$cargo_bin/pgxn_meta" ]; then
        return 0
    fi
    if command -v cargo >/dev/null 2>&1 || [ -x "$cargo_bin/cargo" ]; then
        echo "setup-deps: cargo install pgxn_meta 0.7.0 (PGXN's META.json validator)"
        PATH="$PATH:$cargo_bin" cargo install --locked --quiet pgxn_meta --version 0.7.0 ||
            echo "setup-deps: pgxn_meta could not be installed; the release check falls back" >&2
    fi
}

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-deps: all packages present"
    install_pgxn_meta
    exit 0
fi

if [ "$(id -u)" = 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "setup-deps: missing packages (${missing[*]}), and neither root nor sudo" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup-deps: installing ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null

# Re-check: apt-get can "succeed" without installing what we asked for.
still=()
for p in "${packages[@]}"; do
    installed "$p" || still+=("$p")
done
command -v java >/dev/null 2>&1 || still+=(java)
command -v mvn >/dev/null 2>&1 || still+=(mvn)
if [ ${#still[@]} -ne 0 ]; then
    echo "setup-deps: still missing after apt-get: ${still[*]}" >&2
    exit 1
fi
install_pgxn_meta
echo "setup-deps: done"
