#!/usr/bin/env bash
# loadtest/reload-under-load.sh
#
# Reloads a gateway under load: wrk sends requests for DURATION while the
# gateway's config file is rewritten and SIGHUP sent RELOADS times, evenly
# spread. Everything runs on 127.0.0.1: redis-server, an nginx upstream
# (python when nginx is missing) and one floodgate, in a temp dir.
#
# Prints wrk's summary and the gateway's reload counters. Exits 1 if any
# request failed (a socket error, or an answer other than 2xx/3xx) or a
# reload was not applied, 0 otherwise.
#
# Environment (all optional): DURATION (default 10s), RELOADS (10),
# CONNECTIONS (32), THREADS (2), FLOODGATE_BIN (default
# target/release/floodgate, built when missing), KEEP_TMP=1 keeps the temp
# dir. Needs wrk (apt-get install -y wrk).

# Ports are assigned through lt_free_port's printf -v, which shellcheck cannot follow.
# shellcheck disable=SC2154
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

DURATION="${DURATION:-10s}"
RELOADS="${RELOADS:-10}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"
ADMIN_TOKEN="${FLOODGATE_ADMIN_TOKEN:-loadtest-admin-token}"

lt_init
lt_need wrk "apt-get install -y wrk"
FLOODGATE="$(lt_floodgate_bin)"
lt_start_redis
lt_start_upstream
lt_free_port port
lt_free_port admin

# The rule allows everything wrk sends; each reload changes its burst and
# adds a rule, so every reload compiles a new rule set.
config() {
    cat <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
shutdown_timeout = "2s"
workers = 1

[redis]
url = "redis://127.0.0.1:$REDIS_PORT"
key_prefix = "lt:"
timeout = "200ms"

[upstream]
urls = ["http://127.0.0.1:$UPSTREAM_PORT"]
timeout = "5s"

[[rules]]
name = "per-ip"
key = "ip"
rate = 1000000
per = "1s"
burst = $((1000000 - $1))

[[rules]]
name = "reload-$1"
match = { path_prefix = "/never" }
key = "ip"
rate = 1
per = "1s"
burst = 1

[ban]
enabled = false
EOF
}

lt_start_gateway gateway "$(config 0)" "$admin"
gateway_pid="$LT_LAST_PID"
file="$LT_DIR/gateway/floodgate.toml"
auth="Authorization: Bearer $ADMIN_TOKEN"

seconds="$(lt_seconds "$DURATION")"
pause="$(awk -v s="$seconds" -v n="$RELOADS" 'BEGIN { printf "%.3f", s / (n + 1) }')"
lt_log "wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $RELOADS reloads, one every ${pause}s"
timeout --kill-after=5 $((seconds + 30)) \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/" >"$LT_DIR/wrk.out" &
wrk_pid=$!
LT_PIDS+=("$wrk_pid")

for ((i = 1; i <= RELOADS; i++)); do
    sleep "$pause"
    config "$i" >"$file.new"
    mv "$file.new" "$file"
    kill -HUP "$gateway_pid"
done
wait "$wrk_pid" || lt_die "wrk failed: $(cat "$LT_DIR/wrk.out")"
cat "$LT_DIR/wrk.out"

status="$(curl -fsS -H "$auth" "http://127.0.0.1:$admin/admin/config")"
metrics="$(curl -fsS "http://127.0.0.1:$admin/metrics")"
ok="$(awk '/^floodgate_config_reloads_total\{result="ok"\}/ { print $2 }' <<<"$metrics")"
failed_reloads="$(awk '/^floodgate_config_reloads_total\{result="error"\}/ { print $2 }' <<<"$metrics")"
echo "gateway: $status; reloads ok ${ok:-0}, refused ${failed_reloads:-0}"

requests="$(awk '/requests in/ { print $1 }' "$LT_DIR/wrk.out")"
non2xx="$(awk -F': ' '/Non-2xx or 3xx responses/ { print $2 }' "$LT_DIR/wrk.out")"
socket="$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$LT_DIR/wrk.out")"
echo "requests ${requests:-0}, non-2xx/3xx ${non2xx:-0}, socket errors ${socket:-0}"
if [[ "${non2xx:-0}" != 0 || "${socket:-0}" != 0 || "${ok:-0}" != "$RELOADS" ]]; then
    exit 1
fi
