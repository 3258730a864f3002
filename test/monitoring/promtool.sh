#!/usr/bin/env bash
# test/monitoring/promtool.sh -- static checks of the monitoring bundle in
# docs/monitoring/, as TAP (run by test/run.sh, suite "monitoring", through
# prove):
#   - promtool check rules alerts.yml, promtool test rules alerts_test.yml;
#   - amtool check-config on alertmanager.yml (and on the e2e test's
#     Alertmanager configuration: its routing and inhibition with local
#     receivers), that its routes send each severity where the file says
#     (every critical alert of alerts.yml pages), and that its inhibition
#     rules name alerts that exist;
#   - every cqrs_* metric that alerts.yml, alerts_test.yml and the Grafana
#     dashboard use is one that postgres_exporter.yml produces (the exporter
#     names a metric <query name>_<column>);
#   - every alert has severity, summary, description and a runbook_url ending
#     in docs/runbook.md#<alert name in lower case>;
#   - the dashboard is valid JSON.
# Needs promtool (Debian package prometheus) and amtool
# (prometheus-alertmanager): test/setup-deps.sh installs them.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
DIR="$HERE/../../docs/monitoring"
DIR="$(cd "$DIR" && pwd -P)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

n=0
fails=0
ok() { # description command...
    local desc="$1" out rc
    shift
    n=$((n + 1))
    out="$("$@" 2>&1)"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok $n - $desc"
    else
        fails=$((fails + 1))
        echo "not ok $n - $desc"
        printf '%s\n' "$out" | sed 's/^/# /'
    fi
}

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "1..0 # SKIP $1 not installed (run test/setup-deps.sh)"
    # a missing tool is a failure in CI, not a silent pass
    [ "${CI:-}" = true ] && { echo "Bail out! $1 missing"; exit 1; }
    exit 0
}
need promtool
need amtool

ok "promtool check rules alerts.yml" promtool check rules "$DIR/alerts.yml"
ok "promtool test rules alerts_test.yml" promtool test rules "$DIR/alerts_test.yml"
ok "amtool check-config alertmanager.yml" amtool check-config "$DIR/alertmanager.yml"

# The e2e test's Alertmanager configuration: the routing and inhibition of
# alertmanager.yml, its receivers replaced by alertmanager.yml.in's
sed '/^receivers:/,$d' "$DIR/alertmanager.yml" >"$TMP/am-test.yml"
sed 's|@WEBHOOK_URL@|http://127.0.0.1:9/hook|' "$HERE/alertmanager.yml.in" >>"$TMP/am-test.yml"
ok "amtool check-config alertmanager.yml with test/monitoring/alertmanager.yml.in's receivers" \
    amtool check-config "$TMP/am-test.yml"
sed -e "s|@RULES_FILE@|$DIR/alerts.yml|" -e 's|@ALERTMANAGER_ADDRESS@|127.0.0.1:9|' \
    -e 's|@EXPORTER_ADDRESS@|127.0.0.1:9|' "$HERE/prometheus.yml.in" >"$TMP/prom-test.yml"
ok "promtool check config test/monitoring/prometheus.yml.in" promtool check config "$TMP/prom-test.yml"

route() { # expected-receivers labels...
    local want="$1"
    shift
    local got
    got="$(amtool config routes test --config.file="$DIR/alertmanager.yml" "$@" 2>/dev/null)"
    [ "$got" = "$want" ] || { echo "labels $*: got '$got', want '$want'"; return 1; }
}
ok "critical alerts page (webhook), go to Slack and e-mail" \
    route oncall-webhook,slack-cqrs,team-email alertname=CqrsSyncDltFailed severity=critical service=cqrs_sync
ok "warnings go to Slack and e-mail" \
    route slack-cqrs,team-email alertname=CqrsSyncDltDepthStale severity=warning service=cqrs_sync
ok "anything else goes to e-mail" route team-email alertname=Other

# Every alert of alerts.yml, with the severity it carries, reaches the
# receivers of that severity: every critical one pages.
alert_severities() {
    perl -e '
        local $/; my $y = <STDIN>;
        my @blocks = split /\n(?=\s+- alert:)/, $y; shift @blocks;
        for my $b (@blocks) {
            my ($name) = $b =~ /- alert:\s*(\S+)/;
            my ($sev) = $b =~ /^\s+severity:\s*"?(\w+)"?/m;
            print "$name ", $sev // "none", "\n";
        }' <"$DIR/alerts.yml"
}
routes_by_severity() {
    local name sev want bad=0
    while read -r name sev; do
        case "$sev" in
            critical) want=oncall-webhook,slack-cqrs,team-email ;;
            warning) want=slack-cqrs,team-email ;;
            *) echo "$name: severity $sev"; bad=1; continue ;;
        esac
        route "$want" alertname="$name" severity="$sev" service=cqrs_sync || bad=1
    done < <(alert_severities)
    return $bad
}
ok "each alert of alerts.yml routes by its severity (critical pages)" routes_by_severity
ok "the DLT alerts page: CqrsSyncDltMessages and CqrsSyncDltFailed are critical" \
    bash -c '[ "$(printf "%s\n" "$1" | grep -cxE "CqrsSyncDlt(Messages|Failed) critical")" = 2 ]' _ "$(alert_severities)"

# Inhibition rules name alerts that exist (a renamed alert would silently
# stop inhibiting, and one incident would page several times).
inhibit_names_known() {
    alert_severities | cut -d' ' -f1 >"$TMP/alert_names"
    perl -e '
        my %known = map { chomp; $_ => 1 } do { open my $f, "<", shift or die; <$f> };
        local $/; my $y = <STDIN>;
        my ($inh) = $y =~ /^inhibit_rules:\n(.*?)(?=^\S|\z)/ms or do { print "no inhibit_rules\n"; exit 1 };
        my @names = map { split /\|/ } $inh =~ /alertname=~?"([^"]*)"/g;
        @names or do { print "inhibit_rules name no alert\n"; exit 1 };
        my @missing = grep { !$known{$_} } @names;
        print "inhibit_rules name alerts that do not exist: @missing\n" if @missing;
        exit(@missing ? 1 : 0);
    ' "$TMP/alert_names" <"$DIR/alertmanager.yml"
}
ok "every alert named in alertmanager.yml's inhibit_rules exists" inhibit_names_known

# Metric names: what postgres_exporter.yml produces ...
perl -ne '
    if (/^([a-z_][a-z0-9_]*):\s*$/) { $q = $1; next }
    if (/^\s+usage:\s*"?(GAUGE|COUNTER|LABEL|DISCARD|MAPPEDMETRIC|DURATION|HISTOGRAM)"?/) {
        print "$q\_$col\n" if defined $col && $1 ne "LABEL" && $1 ne "DISCARD"; next }
    if (/^\s+-\s+([a-z_][a-z0-9_]*):\s*$/) { $col = $1 }
' "$DIR/postgres_exporter.yml" | sort -u >"$TMP/produced"
# ... and what the rules, their tests and the dashboard use.
grep -ohE '\bcqrs_(outbox|relay|dlt|cleanup|sink)_[a-z0-9_]+' "$DIR/alerts.yml" "$DIR/alerts_test.yml" \
    "$DIR/grafana-dashboard.json" |
    # SQL objects named in annotation texts, not metrics
    grep -vxE 'cqrs_dlt_depth|cqrs_outbox_stats|cqrs_outbox_audit|cqrs_relay_state|cqrs_cleanup_counters|cqrs_cleanup_stats|cqrs_sink_stats|cqrs_sink_held|cqrs_sink_replay|cqrs_sink_discard' |
    sort -u >"$TMP/used"
metrics_known() {
    local missing
    missing="$(comm -13 "$TMP/produced" "$TMP/used")"
    [ -s "$TMP/produced" ] || { echo "no metric found in postgres_exporter.yml"; return 1; }
    [ -z "$missing" ] || { echo "used but not produced by postgres_exporter.yml: $missing"; return 1; }
}
ok "every cqrs_* metric used is produced by postgres_exporter.yml ($(wc -l <"$TMP/produced") metrics)" metrics_known

alerts_complete() {
    local want="CqrsSyncDltFailed CqrsSyncDltMessages CqrsSyncOutboxStuck CqrsSyncRelayDown CqrsSyncRelayPaused CqrsSyncDltPublishFailing CqrsSyncPartitionStalled CqrsSyncRelayRecordingFailed CqrsSyncDltDepthStale CqrsSyncRelayNotInDatabase CqrsSyncCleanupFailing CqrsSyncSentRowsPilingUp CqrsSyncOutboxTooLarge CqrsSyncPurgeApprovalOverdue"
    # the sink's (issue 14)
    want="$want CqrsSyncSinkLagging CqrsSyncSinkDeadLetters CqrsSyncSinkFailed CqrsSyncSinkWaiting CqrsSyncSinkDown CqrsSyncSinkBrokerDown"
    perl -e '
        local $/; my $y = <STDIN>; my @want = split / /, shift; my $bad = 0;
        my @blocks = split /\n(?=\s+- alert:)/, $y; shift @blocks;
        my %seen;
        for my $b (@blocks) {
            my ($name) = $b =~ /- alert:\s*(\S+)/;
            $seen{$name}++;
            my $lc = lc $name;
            for my $k (qw(severity summary description)) {
                $b =~ /^\s+$k:/m or do { print "$name: no $k\n"; $bad++ } }
            $b =~ m{^\s+runbook_url:\s*"?\S*docs/runbook\.md#\Q$lc\E"?\s*$}m
              or do { print "$name: runbook_url must end in docs/runbook.md#$lc\n"; $bad++ };
        }
        for (@want) { $seen{$_} or do { print "alert $_ missing\n"; $bad++ } }
        exit($bad ? 1 : 0);
    ' "$want" <"$DIR/alerts.yml"
}
ok "every alert has severity, summary, description and its runbook anchor" alerts_complete

ok "grafana-dashboard.json is valid JSON" \
    perl -MJSON::PP -e 'local $/; JSON::PP->new->decode(<STDIN>)' <"$DIR/grafana-dashboard.json"

# The dashboard's queries parse as PromQL: each becomes a recording rule
# ($__rate_interval -> 1m, $instance -> .*) for promtool check rules.
dashboard_promql() {
    perl -MJSON::PP -e '
        local $/; my $d = JSON::PP->new->decode(<STDIN>); my @e;
        my $walk; $walk = sub {
            my ($x) = @_;
            if (ref $x eq "HASH") { push @e, $x->{expr} if defined $x->{expr} && !ref $x->{expr};
                                    $walk->($_) for values %$x }
            elsif (ref $x eq "ARRAY") { $walk->($_) for @$x } };
        $walk->($d);
        die "no queries in the dashboard
" unless @e;
        print "groups:
  - name: dashboard
    rules:
";
        my $i = 0;
        for (@e) { s/\$__rate_interval/1m/g; s/\$instance/.*/g;
                   print "      - record: dashboard_expr_", $i++, "
        expr: ", JSON::PP->new->allow_nonref->encode($_), "
" }
    ' <"$DIR/grafana-dashboard.json" >"$TMP/dashboard-rules.yml" || return 1
    promtool check rules "$TMP/dashboard-rules.yml"
}
ok "every query of grafana-dashboard.json is valid PromQL" dashboard_promql

echo "1..$n"
[ "$fails" -eq 0 ]
