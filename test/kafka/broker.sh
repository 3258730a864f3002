#!/usr/bin/env bash
# test/kafka/broker.sh start|stop|halt|resume|freeze|thaw|status|address
#
# A throwaway Apache Kafka 3.9.1 broker in KRaft mode (one combined
# broker+controller, node.id=1) on 127.0.0.1, for tests.  The jars come from
# Maven Central (test/kafka/pom.xml) into a cache that survives between runs.
#
# With KAFKA_JOIN set, a second (third, ...) broker instead: a broker-only
# KRaft node (process.roles=broker, node.id=KAFKA_NODE_ID, default 2) that
# joins the controller quorum of the broker at KAFKA_JOIN (a combined node
# started by this script: its controller listens on its port+1) and takes
# that cluster's id.  Topics then reach it through a replica assignment
# (topic.sh create-assigned).  Used to make some partitions sick (freeze).
#
# Environment:
#   KAFKA_PORT               broker port (default 19092); controller = port+1
#                            (a joining broker has no controller port)
#   KAFKA_JOIN               bootstrap address (127.0.0.1:PORT) of the broker
#                            whose quorum to join; unset: a combined node 1
#   KAFKA_NODE_ID            node.id of a joining broker (default 2)
#   KAFKA_CONTROLLER         its controller.quorum.voters (default
#                            1@<KAFKA_JOIN's host>:<KAFKA_JOIN's port + 1>)
#   KAFKA_CLUSTER_ID         the cluster id to format the storage with
#                            (default: a new one; when joining, the joined
#                            broker's, asked with ClusterTool).  Given to both
#                            nodes, it lets them start at the same time.
#   KAFKA_MESSAGE_MAX_BYTES  broker message.max.bytes (default: Kafka's own)
#   KAFKA_AUTO_CREATE        auto.create.topics.enable (default true)
#   KAFKA_HEAP               JVM heap (default 512m)
#   KAFKA_SASL_PORT          a combined node only: also a SASL_PLAINTEXT
#                            listener on this port, mechanism PLAIN, one user
#                            "relay" with password KAFKA_SASL_PASSWORD, and
#                            Kafka's StandardAuthorizer: "relay" may do only
#                            what ACLs allow (topic.sh acl), while the
#                            PLAINTEXT listener (User:ANONYMOUS, a super
#                            user) stays open to the test tools
#   CQRS_KAFKA_CACHE         jar cache (default ${XDG_CACHE_HOME:-~/.cache}
#                            /cqrs_sync/kafka-3.9.1; as root
#                            /var/cache/cqrs_sync/kafka-3.9.1 so that tests
#                            running as the postgres user can use the tools)
#   CQRS_TEST_DIR            state: $CQRS_TEST_DIR/kafka-$KAFKA_PORT holds the
#                            data, pid file, server.properties and logs
#
# halt stops the broker keeping its data; resume starts it again on that
# data (a broker outage for failure tests).  freeze stops the process with
# SIGSTOP, thaw continues it (SIGCONT): unlike halt, a frozen broker keeps its
# sockets, so clients' connections hang instead of failing, and the port is
# never lost to lingering connections.
# start prints the bootstrap address (127.0.0.1:PORT) on stdout; everything
# else goes to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"

KAFKA_VERSION=$CQRS_KAFKA_VERSION
CONTROLLER_PORT=$((KAFKA_PORT + 1))
ADDR="127.0.0.1:$KAFKA_PORT"
JOIN="${KAFKA_JOIN:-}"
if [ -n "$JOIN" ]; then
    NODE_ID="${KAFKA_NODE_ID:-2}"
    [[ $JOIN =~ ^([^:,]+):([0-9]+)$ ]] || cqrs_die "KAFKA_JOIN must be one HOST:PORT, not '$JOIN'"
    VOTERS="${KAFKA_CONTROLLER:-1@${BASH_REMATCH[1]}:$((BASH_REMATCH[2] + 1))}"
else
    NODE_ID=1
fi
LIB="$CQRS_KAFKA_CACHE/lib"
STATE="$CQRS_TEST_DIR/kafka-$KAFKA_PORT"
PIDFILE="$STATE/broker.pid"

log() { printf 'broker: %s\n' "$*" >&2; }

# Downloads the broker's jars once.  Atomic: a half-done download is never
# mistaken for a complete one.
fetch_jars() {
    if [ -f "$CQRS_KAFKA_CACHE/.complete" ]; then
        return 0
    fi
    command -v mvn >/dev/null || cqrs_die "mvn not found (run test/setup-deps.sh)"
    mkdir -p "$CQRS_KAFKA_CACHE"
    local tmp="$CQRS_KAFKA_CACHE/lib.tmp.$$"
    rm -rf "$tmp"
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $CQRS_KAFKA_CACHE"
    # -U: retry downloads even if an earlier failure was cached in ~/.m2
    local try
    for try in 1 2 3; do
        if mvn -q -B -U -Dstyle.color=never -f "$HERE/pom.xml" dependency:copy-dependencies \
            -DoutputDirectory="$tmp" -DincludeScope=runtime </dev/null >&2; then
            break
        fi
        rm -rf "$tmp"
        [ "$try" -lt 3 ] || cqrs_die "maven could not fetch the Kafka jars from Maven Central"
        log "maven failed (attempt $try of 3), retrying in 5 s"
        sleep 5
    done
    ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar "$tmp"/kafka-tools-"$KAFKA_VERSION".jar >/dev/null ||
        { rm -rf "$tmp"; cqrs_die "maven did not deliver the Kafka jars"; }
    rm -rf "$LIB"
    mv "$tmp" "$LIB"
    chmod -R a+rX "$CQRS_KAFKA_CACHE"
    touch "$CQRS_KAFKA_CACHE/.complete"
}

# Pid of our running broker, or nothing.  Checks that the pid really is this
# broker (pids get reused).
broker_pid() {
    [ -f "$PIDFILE" ] || return 0
    local pid
    pid="$(cat "$PIDFILE")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
    if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "kafka.Kafka $STATE/server.properties"; then
        echo "$pid"
    fi
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A joining broker answers once it is registered and unfenced (only then
# does Metadata list it).
answers() {
    kcat -L -b "$ADDR" -m 3 2>/dev/null | grep -q "broker $NODE_ID at"
}

start() {
    local pid
    pid="$(broker_pid)"
    if [ -n "$pid" ]; then
        log "already running (pid $pid) at $ADDR"
        echo "$ADDR"
        return 0
    fi
    local ports=("$KAFKA_PORT")
    [ -n "$JOIN" ] || ports+=("$CONTROLLER_PORT")
    for p in "${ports[@]}"; do
        if port_in_use "$p"; then
            cqrs_die "port $p on 127.0.0.1 is in use by another process; set KAFKA_PORT"
        fi
    done
    command -v java >/dev/null || cqrs_die "java not found (run test/setup-deps.sh)"
    command -v kcat >/dev/null || cqrs_die "kcat not found (run test/setup-deps.sh)"
    fetch_jars

    rm -rf "$STATE"
    mkdir -p "$STATE/data"
    if [ -n "$JOIN" ]; then
        [ -z "${KAFKA_SASL_PORT:-}" ] || cqrs_die "KAFKA_SASL_PORT is for a combined node only, not with KAFKA_JOIN"
        cat >"$STATE/server.properties" <<EOF
process.roles=broker
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
EOF
    elif [ -n "${KAFKA_SASL_PORT:-}" ]; then
        # (it goes into a JAAS line as it is)
        [[ ${KAFKA_SASL_PASSWORD:-} =~ ^[A-Za-z0-9._-]+$ ]] ||
            cqrs_die "KAFKA_SASL_PORT needs KAFKA_SASL_PASSWORD, of letters, digits, '.', '_' and '-'"
        [[ $KAFKA_SASL_PORT != "$KAFKA_PORT" && $KAFKA_SASL_PORT != "$CONTROLLER_PORT" ]] ||
            cqrs_die "KAFKA_SASL_PORT must differ from the broker's and the controller's port"
        if port_in_use "$KAFKA_SASL_PORT"; then
            cqrs_die "port $KAFKA_SASL_PORT on 127.0.0.1 is in use by another process"
        fi
        cat >"$STATE/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_relay="$KAFKA_SASL_PASSWORD";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
EOF
    else
        cat >"$STATE/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
EOF
    fi
    cat >>"$STATE/server.properties" <<EOF
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$STATE/data
auto.create.topics.enable=${KAFKA_AUTO_CREATE:-true}
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
EOF
    if [ -n "${KAFKA_MESSAGE_MAX_BYTES:-}" ]; then
        echo "message.max.bytes=$KAFKA_MESSAGE_MAX_BYTES" >>"$STATE/server.properties"
    fi
    cat >"$STATE/log4j.properties" <<EOF
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$STATE/kafka.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
    local jopts=(-Xmx"${KAFKA_HEAP:-512m}" -XX:+UseG1GC
        -Djava.awt.headless=true -Dlog4j.configuration="file:$STATE/log4j.properties")

    local cluster_id="${KAFKA_CLUSTER_ID:-}"
    if [ -n "$cluster_id" ]; then
        :
    elif [ -n "$JOIN" ]; then
        # the quorum's own id: a broker formatted with another one is refused
        cluster_id="$(java "${jopts[@]}" -cp "$LIB/*" org.apache.kafka.tools.ClusterTool \
            cluster-id --bootstrap-server "$JOIN" 2>>"$STATE/kafka.out" |
            sed -n 's/^Cluster ID: *//p')" || true
        [ -n "$cluster_id" ] || cqrs_die "could not read the cluster id of the broker at $JOIN"
    else
        cluster_id="$(java "${jopts[@]}" -cp "$LIB/*" kafka.tools.StorageTool random-uuid 2>>"$STATE/kafka.out")"
    fi
    java "${jopts[@]}" -cp "$LIB/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$STATE/server.properties" >>"$STATE/kafka.out" 2>&1 ||
        { tail -n 30 "$STATE/kafka.out" >&2; cqrs_die "kafka storage format failed"; }

    launch
}

# Starts the broker on the state in $STATE (formatted by start) and waits
# until it answers.
launch() {
    local pid
    local jopts=(-Xmx"${KAFKA_HEAP:-512m}" -XX:+UseG1GC
        -Djava.awt.headless=true -Dlog4j.configuration="file:$STATE/log4j.properties")
    log "starting Kafka $KAFKA_VERSION (KRaft) at $ADDR, state in $STATE"
    nohup java "${jopts[@]}" -cp "$LIB/*" kafka.Kafka "$STATE/server.properties" \
        >>"$STATE/kafka.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"

    local deadline=$((SECONDS + 60))
    until answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$STATE/kafka.out" "$STATE/kafka.log" >&2 || true
            rm -f "$PIDFILE"
            cqrs_die "the broker exited during startup"
        fi
        if [ $SECONDS -ge $deadline ]; then
            tail -n 40 "$STATE/kafka.out" "$STATE/kafka.log" >&2 || true
            stop
            cqrs_die "the broker did not answer at $ADDR within 60 s"
        fi
        sleep 0.3
    done
    log "ready (pid $pid)"
    echo "$ADDR"
}

# Stops the broker but keeps its data: "resume" starts it again with the
# same topics and messages (an outage, for failure tests).
halt() {
    local pid
    pid="$(broker_pid)"
    if [ -n "$pid" ]; then
        log "stopping pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
        # a frozen broker acts on the TERM only once continued
        kill -CONT "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "still running after 20 s, killing"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$PIDFILE"
}

resume() {
    [ -z "$(broker_pid)" ] || { log "already running"; echo "$ADDR"; return 0; }
    [ -f "$STATE/server.properties" ] && [ -d "$STATE/data" ] ||
        cqrs_die "no halted broker state in $STATE (use start)"
    launch
}

stop() {
    halt
    # Keep the logs for post-mortems; the next start overwrites them.
    rm -rf "$STATE/data"
}

# freeze/thaw: SIGSTOP / SIGCONT, a sick broker that keeps its sockets and
# its port.
signal_broker() { # signal what-it-is-now
    local pid
    pid="$(broker_pid)"
    [ -n "$pid" ] || cqrs_die "no broker at $ADDR"
    kill "-$1" "$pid"
    log "$2 (pid $pid)"
}

is_frozen() {
    # the field after the parenthesised command name in /proc/PID/stat: T = stopped
    [ "$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" = T ]
}

status() {
    local pid
    pid="$(broker_pid)"
    if [ -z "$pid" ]; then
        echo "not running"
        return 3
    fi
    if is_frozen "$pid"; then
        echo "frozen (pid $pid) at $ADDR"
    elif answers; then
        echo "running (pid $pid) at $ADDR"
    else
        echo "process $pid alive but not answering at $ADDR"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    halt) halt ;;
    resume) resume ;;
    freeze) signal_broker STOP frozen ;;
    thaw) signal_broker CONT thawed ;;
    status) status ;;
    address) echo "$ADDR" ;;
    *)
        echo "usage: $0 start|stop|halt|resume|freeze|thaw|status|address" >&2
        exit 2
        ;;
esac
