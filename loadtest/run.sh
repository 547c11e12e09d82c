#!/usr/bin/env bash
# loadtest/run.sh <script> [nodes]
#
# Runs one k6 script of loadtest/ against a throw-away local setup:
# redis-server (own free port, no persistence), a small upstream (nginx
# answering 200 with a ~100-byte body, or a python server when nginx is
# missing), and `nodes` floodgate gateways on loopback sharing that Redis,
# each with a config written to a temp dir. The limits in that config are
# handed to k6 as environment variables, so the script checks the bounds the
# gateways really enforce. Everything started here is stopped on exit.
#
#   script  smoke | steady | limits | bans | multi-node | llm-tokens | login
#           (".js" optional)
#   nodes   gateways to start (default 1; multi-node: 3)
#
# PLANS=1 with `limits` adds [consumers] and two plans (free, pro) to the
# gateways' config: `PLANS=1 loadtest/run.sh limits 2` checks both plans'
# bounds over two nodes.
#
# Environment (all optional): DURATION (default 20s) and every knob the
# script lists in its header (RATE, CLIENTS, RULE_RATE, RULE_BURST, ...):
# what is set here is used both in the gateway config and by k6.
# FLOODGATE_BIN picks the binary (default target/release/floodgate, built
# when missing); KEEP_TMP=1 keeps configs and logs; RUST_LOG sets the
# gateways' log level (default warn). TLS=1 serves HTTPS (HTTP/2) with a
# self-signed certificate made here (openssl), and runs k6 against https://
# URLs with INSECURE_TLS=1 and EXPECT_PROTO=HTTP/2.0.
#
# The exit code is k6's: 0 when every threshold held, 99 when one failed.

# Ports are assigned through lt_free_port's printf -v, which shellcheck cannot follow.
# shellcheck disable=SC2154
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

usage() {
    # The header comment is the usage text.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
script="${1%.js}"
script="${script##*/}"
[[ -f "$here/$script.js" ]] || { echo "no such script: $here/$script.js" >&2; usage; }
case "$script" in
    multi-node) nodes="${2:-3}" ;;
    *) nodes="${2:-1}" ;;
esac
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || usage
if [[ "$script" == multi-node && "$nodes" -lt 2 ]]; then
    echo "multi-node needs at least 2 nodes" >&2
    exit 2
fi

# ------------------------------------------------------------- settings

export DURATION="${DURATION:-20s}"
ADMIN_TOKEN="${FLOODGATE_ADMIN_TOKEN:-loadtest-admin-token}"

# Per-script limits: small enough that k6 on one machine goes over them
# (or stays under them) by a wide margin. Each can be overridden from the
# environment; the same value then goes into the config and to k6.
ban_enabled=true
case "$script" in
    smoke)
        : "${RULE_RATE:=5}" "${RULE_BURST:=10}"
        ;;
    steady)
        # 100 requests/s over 20 clients = 5/s each, a tenth of their rate.
        : "${RULE_RATE:=50}" "${RULE_BURST:=100}" "${RATE:=100}" "${CLIENTS:=20}"
        export RATE CLIENTS
        ;;
    limits)
        # Each client asks 3x its rate; bans off so the bucket alone decides.
        if [[ "${PLANS:-0}" == 1 ]]; then
            # Two plans: the per-ip rule stays out of the way of both.
            : "${RULE_RATE:=50}" "${RULE_BURST:=100}" "${CLIENTS:=20}" "${CLIENT_RATE:=15}"
            : "${FREE_RATE:=2}" "${FREE_PER:=1s}" "${FREE_BURST:=4}" "${FREE_QUOTA:=30}" "${FREE_PERIOD:=hour}"
            : "${PRO_RATE:=10}" "${PRO_PER:=1s}" "${PRO_BURST:=20}" "${PRO_QUOTA:=150}" "${PRO_PERIOD:=hour}"
            : "${PRO_CONCURRENCY:=5}" "${KEY_HEADER:=X-Api-Key}"
            export PLANS FREE_RATE FREE_PER FREE_BURST FREE_QUOTA FREE_PERIOD
            export PRO_RATE PRO_PER PRO_BURST PRO_QUOTA PRO_PERIOD PRO_CONCURRENCY KEY_HEADER
        else
            : "${RULE_RATE:=5}" "${RULE_BURST:=10}" "${CLIENTS:=20}" "${CLIENT_RATE:=15}"
        fi
        export CLIENTS CLIENT_RATE
        ban_enabled=false
        ;;
    bans)
        : "${RULE_RATE:=5}" "${RULE_BURST:=10}"
        : "${BAN_AFTER:=10}" "${BAN_WITHIN:=10s}" "${BAN_DURATION:=5m}" "${BAN_STATUS:=429}"
        export BAN_AFTER BAN_WITHIN BAN_DURATION BAN_STATUS
        ;;
    multi-node)
        # 20 clients x 10/s = 200/s offered; the shared global rule (50/s)
        # binds before the per-ip one (5/s each = 100/s in all).
        : "${RULE_RATE:=5}" "${RULE_BURST:=10}" "${CLIENTS:=20}" "${CLIENT_RATE:=10}"
        : "${GLOBAL_NAME:=global}" "${GLOBAL_RATE:=50}" "${GLOBAL_BURST:=100}" "${GLOBAL_PER:=1s}"
        export CLIENTS CLIENT_RATE GLOBAL_NAME GLOBAL_RATE GLOBAL_BURST GLOBAL_PER
        ban_enabled=false
        ;;
    llm-tokens)
        # The per-ip rule out of the way: the token budget decides.
        : "${RULE_RATE:=100000}" "${RULE_BURST:=100000}"
        : "${TOKEN_QUOTA:=20000}" "${MAX_COST:=2000}" "${CLIENTS:=10}" "${CLIENT_RATE:=20}"
        export TOKEN_QUOTA MAX_COST CLIENTS CLIENT_RATE
        ban_enabled=false
        ;;
    login)
        : "${RULE_RATE:=100000}" "${RULE_BURST:=100000}"
        : "${FAIL_RATE:=5}" "${FAIL_PER:=10m}" "${FAIL_BURST:=5}"
        : "${BAN_AFTER:=5}" "${BAN_WITHIN:=1m}" "${BAN_DURATION:=5m}" "${BAN_STATUS:=403}"
        export FAIL_RATE FAIL_PER FAIL_BURST BAN_AFTER BAN_WITHIN BAN_DURATION BAN_STATUS
        ;;
esac
: "${RULE_NAME:=per-ip}" "${RULE_PER:=1s}"
export RULE_NAME RULE_RATE RULE_PER RULE_BURST

rules="[[rules]]
name = \"$RULE_NAME\"
key = \"ip\"
rate = $RULE_RATE
per = \"$RULE_PER\"
burst = $RULE_BURST"
if [[ "$script" == multi-node ]]; then
    rules+="

[[rules]]
name = \"$GLOBAL_NAME\"
key = \"global\"
rate = $GLOBAL_RATE
per = \"$GLOBAL_PER\"
burst = $GLOBAL_BURST"
fi
if [[ "$script" == limits && "${PLANS:-0}" == 1 ]]; then
    rules+="

[consumers]
key = \"header:$KEY_HEADER\"
default_plan = \"free\"

[plans.free]
rules = [
  { name = \"free-rate\", rate = $FREE_RATE, per = \"$FREE_PER\", burst = $FREE_BURST },
  { name = \"free-quota\", quota = $FREE_QUOTA, period = \"$FREE_PERIOD\" },
]

[plans.pro]
rules = [
  { name = \"pro-rate\", rate = $PRO_RATE, per = \"$PRO_PER\", burst = $PRO_BURST },
  { name = \"pro-quota\", quota = $PRO_QUOTA, period = \"$PRO_PERIOD\" },
  { name = \"pro-inflight\", concurrency = $PRO_CONCURRENCY },
]"
fi
if [[ "$script" == llm-tokens ]]; then
    rules+="

[[rules]]
name = \"llm-tokens\"
key = \"header:X-Api-Key\"
quota = $TOKEN_QUOTA
period = \"day\"
cost = \"header:X-Max-Tokens\"
max_cost = $MAX_COST
default_cost = $MAX_COST
settle = \"header:X-Usage\""
fi
if [[ "$script" == login ]]; then
    rules+="

[[rules]]
name = \"login-failures\"
key = \"ip\"
rate = $FAIL_RATE
per = \"$FAIL_PER\"
burst = $FAIL_BURST
match = { path_prefix = \"/login\", methods = [\"POST\"] }
count = { status = [401, 403] }"
fi
if [[ "$script" == bans || "$script" == login ]]; then
    ban="[ban]
enabled = true
after = $BAN_AFTER
within = \"$BAN_WITHIN\"
duration = \"$BAN_DURATION\"
status = $BAN_STATUS"
elif [[ "$ban_enabled" == true ]]; then
    ban="[ban]
enabled = true"
else
    ban="[ban]
enabled = false"
fi

# ------------------------------------------------------------- start

lt_init
lt_ensure_k6
FLOODGATE="$(lt_floodgate_bin)"
lt_start_redis
lt_start_upstream
lt_log "redis :$REDIS_PORT, upstream :$UPSTREAM_PORT"

scheme=http
tls_section=""
if [[ "${TLS:-0}" == 1 ]]; then
    lt_need openssl "apt-get install -y openssl"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$LT_DIR/key.pem" -out "$LT_DIR/cert.pem" -days 1 \
        -subj "/CN=floodgate loadtest" \
        -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" 2>/dev/null ||
        lt_die "openssl could not make a test certificate"
    scheme=https
    tls_section="[server.tls]
cert = \"$LT_DIR/cert.pem\"
key = \"$LT_DIR/key.pem\""
    export INSECURE_TLS=1 EXPECT_PROTO="${EXPECT_PROTO:-HTTP/2.0}"
fi

base_urls=()
for ((n = 1; n <= nodes; n++)); do
    lt_free_port port
    lt_free_port admin
    config="# loadtest/run.sh $script: node $n of $nodes
[server]
listen = \"127.0.0.1:$port\"
admin_listen = \"127.0.0.1:$admin\"
shutdown_timeout = \"2s\"
workers = 1
node_id = \"loadtest-$n\"

$tls_section

[redis]
url = \"redis://127.0.0.1:$REDIS_PORT\"
key_prefix = \"lt:\"
timeout = \"200ms\"

[upstream]
urls = [\"http://127.0.0.1:$UPSTREAM_PORT\"]
timeout = \"5s\"

$rules

$ban"
    lt_start_gateway "gateway-$n" "$config" "$admin"
    base_urls+=("$scheme://127.0.0.1:$port")
    # The first node's admin API, for scripts that look at it (bans.js).
    if ((n == 1)); then
        export ADMIN_URL="http://127.0.0.1:$admin"
    fi
    lt_log "gateway $n: $scheme://127.0.0.1:$port (admin :$admin, pid $LT_LAST_PID)"
done
BASE_URL="$(IFS=,; echo "${base_urls[*]}")"
export BASE_URL ADMIN_TOKEN

# ------------------------------------------------------------- run k6

# Bounded: the scenario's own duration plus a margin for setup, graceful
# stop and teardown.
limit=$(($(lt_seconds "$DURATION") + 90))
lt_log "k6 run $script.js (DURATION=$DURATION, nodes=$nodes, at most ${limit}s)"
set +e
export K6_NO_USAGE_REPORT=true
lt_run timeout --kill-after=10 "$limit" \
    k6 run --no-usage-report --quiet "$here/$script.js"
rc=$?
set -e
if ((rc != 0)); then
    lt_log "k6 exited $rc; last gateway log lines:"
    for ((n = 1; n <= nodes; n++)); do
        tail -n 5 "$LT_DIR/gateway-$n/stderr.log" >&2 || true
    done
fi
exit "$rc"
