#!/usr/bin/env bash
# test/kafka/topic.sh -- topics on the test broker, with Kafka's own TopicCommand
# (kafka-tools, from the jars test/kafka/broker.sh fetched).
#
#   topic.sh create NAME PARTITIONS [config=value ...]
#   topic.sh create-assigned NAME ASSIGNMENT [config=value ...]
#   topic.sh alter-config NAME config=value [config=value ...]
#   topic.sh describe NAME
#   topic.sh delete NAME
#   topic.sh delete-records NAME PARTITION OFFSET   (the log then starts at OFFSET)
#   topic.sh list
#   topic.sh acl add|remove PRINCIPAL OPERATION[,OPERATION...] NAME
#                 (an ACL allowing PRINCIPAL, e.g. User:relay, the operations
#                 on topic NAME, or on the cluster when NAME is "cluster";
#                 for a broker started with KAFKA_SASL_PORT)
#
# The broker is KAFKA_BROKERS if set, else 127.0.0.1:$KAFKA_PORT (default 19092).
# Example: topic.sh create orders 4 max.message.bytes=200000
#
# create-assigned places every replica explicitly (TopicCommand's
# --replica-assignment): partitions separated by commas, the replicas of a
# partition (broker ids, the preferred leader first) by colons; every
# partition must have the same number of replicas.  E.g. with a second broker
# (broker.sh with KAFKA_JOIN): "1,2" puts partition 0 on broker 1 and
# partition 1 on broker 2 only; "1:2,1:2" with min.insync.replicas=2 needs
# both brokers for every acks=all write.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"

KAFKA_VERSION=$CQRS_KAFKA_VERSION
LIB="$CQRS_KAFKA_CACHE/lib"
[ -f "$CQRS_KAFKA_CACHE/.complete" ] ||
    cqrs_die "no Kafka jars in $CQRS_KAFKA_CACHE (run test/kafka/broker.sh start first)"
BOOTSTRAP="${KAFKA_BROKERS:-127.0.0.1:$KAFKA_PORT}"

tool() {
    # Tools log4j output (WARN and up) goes to stderr.
    java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j.configuration="file:$HERE/tools-log4j.properties" \
        -cp "$LIB/*" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "$BOOTSTRAP" "$@"
}

configs() {
    local c
    for c in "$@"; do
        case "$c" in
            *=*) printf -- '--config\0%s\0' "$c" ;;
            *) cqrs_die "not a config=value pair: $c" ;;
        esac
    done
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    create)
        [ $# -ge 2 ] || cqrs_die "usage: $0 create NAME PARTITIONS [config=value ...]"
        name="$1" parts="$2"
        shift 2
        mapfile -d '' cfg < <(configs "$@")
        tool --create --topic "$name" --partitions "$parts" --replication-factor 1 "${cfg[@]}"
        ;;
    create-assigned)
        [ $# -ge 2 ] || cqrs_die "usage: $0 create-assigned NAME ASSIGNMENT [config=value ...]"
        name="$1" assignment="$2"
        shift 2
        [[ $assignment =~ ^[0-9]+(:[0-9]+)*(,[0-9]+(:[0-9]+)*)*$ ]] ||
            cqrs_die "not a replica assignment (e.g. 1,2 or 1:2,2:1): $assignment"
        mapfile -d '' cfg < <(configs "$@")
        tool --create --topic "$name" --replica-assignment "$assignment" "${cfg[@]}"
        ;;
    alter-config)
        [ $# -ge 2 ] || cqrs_die "usage: $0 alter-config NAME config=value [...]"
        name="$1"
        shift
        # TopicCommand cannot alter configs any more; ConfigCommand can.
        java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
            -Dlog4j.configuration="file:$HERE/tools-log4j.properties" \
            -cp "$LIB/*" kafka.admin.ConfigCommand --bootstrap-server "$BOOTSTRAP" \
            --alter --entity-type topics --entity-name "$name" \
            --add-config "$(IFS=,; echo "$*")"
        ;;
    describe)
        [ $# -eq 1 ] || cqrs_die "usage: $0 describe NAME"
        tool --describe --topic "$1"
        ;;
    delete)
        [ $# -eq 1 ] || cqrs_die "usage: $0 delete NAME"
        tool --delete --topic "$1"
        ;;
    delete-records)
        [ $# -eq 3 ] || cqrs_die "usage: $0 delete-records NAME PARTITION OFFSET"
        json="$(mktemp)"
        trap 'rm -f "$json"' EXIT
        printf '{"version":1,"partitions":[{"topic":"%s","partition":%d,"offset":%d}]}\n' \
            "$1" "$2" "$3" > "$json"
        java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
            -Dlog4j.configuration="file:$HERE/tools-log4j.properties" \
            -cp "$LIB/*" org.apache.kafka.tools.DeleteRecordsCommand \
            --bootstrap-server "$BOOTSTRAP" --offset-json-file "$json"
        ;;
    list)
        tool --list
        ;;
    acl)
        [ $# -eq 4 ] && [[ $1 =~ ^(add|remove)$ ]] ||
            cqrs_die "usage: $0 acl add|remove PRINCIPAL OPERATION[,OPERATION...] NAME"
        action="$1" principal="$2" name="$4"
        ops=()
        IFS=, read -ra opnames <<<"$3"
        for o in "${opnames[@]}"; do ops+=(--operation "$o"); done
        if [ "$name" = cluster ]; then what=(--cluster); else what=(--topic "$name"); fi
        extra=()
        [ "$action" = remove ] && extra=(--force)
        java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
            -Dlog4j.configuration="file:$HERE/tools-log4j.properties" \
            -cp "$LIB/*" kafka.admin.AclCommand --bootstrap-server "$BOOTSTRAP" \
            "--$action" --allow-principal "$principal" "${ops[@]}" "${what[@]}" "${extra[@]}"
        ;;
    *)
        echo "usage: $0 create NAME PARTITIONS [config=value ...] | create-assigned NAME ASSIGNMENT [config=value ...] | alter-config NAME config=value ... | describe NAME | delete NAME | delete-records NAME PARTITION OFFSET | list | acl add|remove PRINCIPAL OPERATIONS NAME" >&2
        exit 2
        ;;
esac
