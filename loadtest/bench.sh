#!/usr/bin/env bash
# loadtest/bench.sh [memory]
#
# What floodgate costs, next to nginx, in one run on one machine.
#
# Every scenario fronts the same small upstream (nginx, one worker, `return
# 200` with a ~100-byte body) and is driven by the same load generator (wrk,
# same threads, connections and duration). Both sides get one worker:
# nginx `worker_processes 1`, floodgate `workers = 1`.
#
#   upstream      the upstream directly (the floor)
#   proxy_pass    nginx proxy_pass with a keep-alive pool at least as large
#                 as the connection count: the reference for the ratios
#   limit_req     the same nginx plus limit_req (nginx's local limiter), set
#                 so high that it never refuses
#   peer          the classic OpenResty-style distributed limiter: nginx +
#                 Lua, one EVALSHA of a GCRA bucket in the same Redis per
#                 request, never refusing (../shared/bench/peer_openresty.sh,
#                 or $PEER_SCRIPT)
#   fg-norules    floodgate with no rules: forwarding only
#   fg-1rule      floodgate, one Redis-backed rule that never refuses
#   fg-3rules     floodgate, three never-refusing rules on one subject (ip)
#   fg-banned     floodgate answering a client banned beforehand through the
#                 admin API (no upstream, no Redis)
#
# Those are the hot-subject scenarios: every request comes from one client
# (wrk, 127.0.0.1), so floodgate's leased tokens (redis.lease) admit almost
# all of them from memory. The many-subjects scenarios send every request
# from one of MANY_CLIENTS X-Forwarded-For addresses in turn (wrk with a Lua
# script; 127.0.0.1 is a trusted proxy), so each subject comes rarely and
# almost every request is a Redis decision:
#   proxy_pass-many  nginx proxy_pass, the same wrk script (the reference)
#   peer-many        the peer keyed by X-Forwarded-For (PEER_KEY=xff)
#   fg-many          floodgate, one never-refusing rule keyed by client
#
# And HTTP/2 over TLS, driven by h2load (H2_STREAMS streams per
# connection) instead of wrk, against the same upstream over HTTP/1.1:
#   proxy_pass-h2    nginx `listen ... ssl http2` + proxy_pass (the reference)
#   fg-h2            floodgate with TLS, no rules (forwarding only)
# Their latency columns come from h2load's per-request log.
#
# Rounds are interleaved (A B C D E F, A B C D E F, ...) so that drift of
# the machine hits every scenario alike. For each number of connections it
# prints a markdown table: median (min–max) of requests/s, p50 and p99
# latency, each with its ratio to proxy_pass; Redis commands per request
# (INFO commandstats calls, delta over the scenario's rounds / requests
# completed); non-2xx answers (0 unless refusing is the point); and the
# floodgate process's peak resident memory (VmHWM) so far. A second table
# gives the CPU time per request of every process in the same rounds: the
# proxy under test, Redis, the upstream and the load generator (wrk), in
# microseconds (from /proc/PID/stat, 10 ms ticks, over whole rounds). Last
# come the verdicts of the performance targets (docs/performance.md).
#
# Environment:
#   ROUNDS    rounds per connection count (default 3)
#   DURATION  one wrk run (default 8s)
#   THREADS   wrk threads (default 2)
#   CONNS     connection counts, space-separated (default "64 256")
#   WARMUP    unmeasured wrk run per scenario before the rounds (default 1s;
#             0 skips it)
#   MANY_CLIENTS  distinct clients of the many-subjects scenarios (default
#             100000)
#   SCENARIOS only these scenarios (space-separated names), with
#             proxy_pass, proxy_pass-many and proxy_pass-h2; targets of
#             scenarios not run read as 0
#   H2_STREAMS  concurrent streams per HTTP/2 connection (default 10)
# With the defaults the whole run takes about 13 minutes.
#
# `bench.sh memory`: 100 000 distinct clients for 60 s against one floodgate
# (wrk with a Lua script setting X-Forwarded-For from a counter mod 100000)
# while floodgate's RSS is sampled every 5 s, to show memory stays flat.
#   MEM_DURATION  (default 60s)   MEM_CLIENTS (default 100000)
#   MEM_CONNS     (default 64)    MEM_SAMPLE  seconds between samples (default 5)
#   MEM_MAX_GROWTH  fail when RSS grows more than this many percent from the
#                 middle of the run to its end (default 25)
#
# Needs nginx, wrk, GNU time, openssl, h2load (nghttp2-client), and for the
# peer the nginx Lua module and its Redis client (all installed with apt-get
# when missing), redis-server.
# All traffic stays on 127.0.0.1; everything started is stopped on exit.

# Ports are assigned through lt_free_port's printf -v, which shellcheck cannot follow.
# shellcheck disable=SC2154
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

mode="${1:-compare}"
case "$mode" in
    compare | memory) ;;
    *)
        # The header comment is the usage text.
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
        exit 2
        ;;
esac

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-8s}"
THREADS="${THREADS:-2}"
CONNS="${CONNS:-64 256}"
WARMUP="${WARMUP:-1s}"
MANY_CLIENTS="${MANY_CLIENTS:-100000}"
H2_STREAMS="${H2_STREAMS:-10}"
((MANY_CLIENTS <= 131072)) || { echo "MANY_CLIENTS must be at most 131072 (198.18.0.0/15)" >&2; exit 2; }
ADMIN_TOKEN="${FLOODGATE_ADMIN_TOKEN:-bench-admin-token}"

lt_ensure_apt nginx:nginx-light wrk:wrk /usr/bin/time:time h2load:nghttp2-client openssl:openssl
lt_need nginx "apt-get install -y nginx-light"
lt_need wrk "apt-get install -y wrk"
PEER_SCRIPT="${PEER_SCRIPT:-$LT_ROOT/../shared/bench/peer_openresty.sh}"
lt_need redis-server "apt-get install -y redis-server"
lt_init
FLOODGATE="$(lt_floodgate_bin)"
lt_start_redis
lt_start_upstream

# Largest connection count: the nginx keep-alive pool is at least this big.
max_conns=64
for c in $CONNS "${MEM_CONNS:-64}"; do
    if ((c > max_conns)); then max_conns=$c; fi
done

# fg_config NAME PORT ADMIN PREFIX RULES -> config text for one floodgate.
fg_config() {
    cat <<EOF
# loadtest/bench.sh: $1
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
workers = 1
shutdown_timeout = "2s"
node_id = "bench-$1"

[redis]
url = "redis://127.0.0.1:$REDIS_PORT"
key_prefix = "$4"
timeout = "200ms"

[upstream]
urls = ["http://127.0.0.1:$UPSTREAM_PORT"]
max_connections = $((max_conns * 2))

$5

[ban]
enabled = true
EOF
}

# A rule that never refuses: a million tokens a second, a million in the
# bucket (far above what one machine can send).
never_refuses() {
    printf '[[rules]]\nname = "%s"\nkey = "ip"\nrate = 1000000\nper = "1s"\nburst = %s\n\n' "$1" "$2"
}

# wrk's numbers: "rps p50_us p99_us requests non2xx socket_errors".
wrk_parse() {
    awk '
        function us(v) {
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return v * 1000
            if (v ~ /s$/) return v * 1000000
            return v + 0
        }
        $1 == "50%" { p50 = us($2) }
        $1 == "99%" { p99 = us($2) }
        / requests in / { reqs = $1 }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
        END { printf "%s %s %s %s %d %d\n", rps, p50, p99, reqs, non2xx, errs }
    '
}

# Redis commands so far: "calls total usec". `calls` are the script calls
# the gateway sends (EVALSHA, and EVAL after a NOSCRIPT); `total` is every
# command INFO commandstats counts, which includes the commands a script
# runs inside Redis (TIME, HMGET, HSET, PEXPIRE, ...); `usec` is the time
# Redis spent running those script calls (the rest of its CPU is reading,
# parsing and answering them, and its event loop). Our own INFO and
# redis-cli's COMMAND are left out.
redis_calls() {
    lt_redis INFO commandstats | awk -F'calls=' '
        /^cmdstat_/ && !/^cmdstat_(info|command)/ {
            split($2, a, ","); total += a[1]
            if ($1 ~ /^cmdstat_eval(sha)?(_ro)?:$/) {
                calls += a[1]
                split($0, u, "usec="); split(u[2], b, ","); usec += b[1]
            }
        }
        END { print calls + 0, total + 0, usec + 0 }'
}

# run_wrk CONNS DURATION URL [many]: one wrk run; with "many", every
# request from the next of MANY_CLIENTS clients.
run_wrk() {
    local conns="$1" dur="$2" url="$3" script=()
    if [[ "${4:-}" == many ]]; then script=(-s "$LT_DIR/clients.lua" "$url" -- "$THREADS" "$MANY_CLIENTS"); else script=("$url"); fi
    lt_run timeout --kill-after=5 $(($(lt_seconds "$dur") + 30)) \
        wrk -t "$THREADS" -c "$conns" -d "$dur" --timeout 5s --latency "${script[@]}"
}

# run_h2load_timed CONNS DURATION URL: h2load over HTTP/2 for DURATION,
# its output rewritten as the wrk lines wrk_parse reads (req/s, p50 and p99
# from h2load's per-request log, non-2xx, errors), then its CPU seconds.
run_h2load_timed() {
    local conns="$1" dur="$2" url="$3" log="$LT_DIR/h2load-requests.log"
    local secs
    secs=$(lt_seconds "$dur")
    local out
    out=$(timeout --kill-after=5 $((secs + 30)) /usr/bin/time -f "wrk-cpu %U %S" \
        h2load -t "$THREADS" -c "$conns" -m "$H2_STREAMS" -D "$secs" --warm-up-time=1 \
        --log-file="$log" "$url" 2>&1) || true
    awk -v secs="$secs" '
        /^finished in/ { for (i = 1; i <= NF; i++) if ($i ~ /req\/s,?$/) { gsub(/,/, "", $(i-1)); rps = $(i-1) } }
        /^requests:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^succeeded/) ok = $i; if ($(i+1) ~ /^errored/) err = $i } }
        /^status codes:/ { gsub(/,/, ""); s2 = $3; s3 = $5; s4 = $7; s5 = $9 }
        /^wrk-cpu/ { print }
        END {
            printf "Requests/sec: %s\n", rps
            printf "%d requests in %ss\n", ok, secs
            printf "Non-2xx or 3xx responses: %d\n", s4 + s5
            printf "Socket errors: connect 0, read 0, write 0, timeout %d\n", err
        }' <<<"$out"
    if [[ -s "$log" ]]; then
        cut -f3 "$log" | sort -n | awk '{ v[NR] = $1 } END {
            if (NR > 0) { printf "50%% %dus\n", v[int(NR * 0.5) + 1]; printf "99%% %dus\n", v[int(NR * 0.99) + 1] } }'
    fi
    rm -f "$log"
}

# run_wrk_timed CONNS DURATION URL [many]: run_wrk, then wrk's own CPU
# seconds (user + system, from GNU time) on the last line of the output.
run_wrk_timed() {
    local conns="$1" dur="$2" url="$3" script=()
    if [[ "${4:-}" == many ]]; then script=(-s "$LT_DIR/clients.lua" "$url" -- "$THREADS" "$MANY_CLIENTS"); else script=("$url"); fi
    lt_run timeout --kill-after=5 $(($(lt_seconds "$dur") + 30)) \
        /usr/bin/time -f "wrk-cpu %U %S" \
        wrk -t "$THREADS" -c "$conns" -d "$dur" --timeout 5s --latency "${script[@]}" 2>&1
}

# A wrk script sending each request from the next of N clients (its
# arguments: wrk's thread count and N). Client n is 198.18.0.0 + n (RFC 2544
# benchmark range); thread t of T sends clients t, t+T, t+2T, ... so
# together the threads cycle through all of them.
cat >"$LT_DIR/clients.lua" <<'LUA'
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  step = tonumber(args[1])
  clients = tonumber(args[2])
  n = id
end
function request()
  n = (n + step) % clients
  local ip = string.format("198.%d.%d.%d", 18 + math.floor(n / 65536), math.floor(n / 256) % 256, n % 256)
  return wrk.format(nil, nil, { ["X-Forwarded-For"] = ip })
end
LUA

# ============================================================== memory

if [[ "$mode" == memory ]]; then
    MEM_DURATION="${MEM_DURATION:-60s}"
    MEM_CLIENTS="${MEM_CLIENTS:-100000}"
    MEM_CONNS="${MEM_CONNS:-64}"
    MEM_SAMPLE="${MEM_SAMPLE:-5}"
    MEM_MAX_GROWTH="${MEM_MAX_GROWTH:-25}"
    ((MEM_CLIENTS <= 131072)) || lt_die "MEM_CLIENTS must be at most 131072 (198.18.0.0/15)"

    lt_free_port port
    lt_free_port admin
    # A realistic per-client rule: 100 requests/s, burst 200. Spread over
    # 100 000 clients, nobody comes near it, so every request is a full
    # Redis decision that creates or refreshes a bucket.
    lt_start_gateway fg-memory "$(fg_config memory "$port" "$admin" "mem:" \
        "$(printf '[[rules]]\nname = "per-ip"\nkey = "ip"\nrate = 100\nper = "1s"\nburst = 200\n')")" "$admin"
    fg_pid="$LT_LAST_PID"


    requests_so_far() {
        curl -fsS "http://127.0.0.1:$admin/metrics" 2>/dev/null |
            awk '/^floodgate_requests_total/ { n += $NF } END { printf "%d\n", n }'
    }

    total=$(lt_seconds "$MEM_DURATION")
    lt_log "memory: $MEM_CLIENTS clients, $MEM_CONNS connections, ${total}s, floodgate pid $fg_pid"
    # Started directly (not through run_wrk) so that $! is timeout's pid,
    # which passes a TERM from the cleanup on to wrk.
    timeout --kill-after=5 $((total + 30)) \
        wrk -t "$THREADS" -c "$MEM_CONNS" -d "$MEM_DURATION" --timeout 5s --latency \
        -s "$LT_DIR/clients.lua" "http://127.0.0.1:$port/" -- "$THREADS" "$MEM_CLIENTS" \
        >"$LT_DIR/wrk-memory.txt" &
    wrk_pid=$!
    LT_PIDS+=("$wrk_pid")

    echo
    echo "## floodgate memory, $MEM_CLIENTS distinct clients, $MEM_CONNS connections"
    echo
    echo "| t (s) | RSS (MiB) | requests counted (/metrics) | Redis keys |"
    echo "|---:|---:|---:|---:|"
    samples=()
    row() { awk -v t="$1" -v kib="$2" -v n="$3" -v k="$4" 'BEGIN { printf "| %d | %.1f | %d | %d |\n", t, kib / 1024, n, k }'; }
    row 0 "$(lt_mem "$fg_pid" VmRSS)" "$(requests_so_far)" "$(lt_redis DBSIZE)"
    for ((t = MEM_SAMPLE; t <= total; t += MEM_SAMPLE)); do
        sleep "$MEM_SAMPLE"
        rss=$(lt_mem "$fg_pid" VmRSS)
        samples+=("$rss")
        row "$t" "$rss" "$(requests_so_far)" "$(lt_redis DBSIZE)"
    done
    wait "$wrk_pid" || lt_die "wrk failed: $(cat "$LT_DIR/wrk-memory.txt")"
    lt_forget "$wrk_pid"
    read -r rps p50 p99 reqs non2xx errs < <(wrk_parse <"$LT_DIR/wrk-memory.txt")
    hwm=$(lt_mem "$fg_pid" VmHWM)
    echo
    awk -v r="$reqs" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v x="$non2xx" -v e="$errs" -v hwm="$hwm" 'BEGIN {
        printf "wrk: %d requests, %.0f req/s, p50 %.2f ms, p99 %.2f ms, non-2xx %d, socket errors %d\n", r, rps, p50 / 1000, p99 / 1000, x, e
        printf "floodgate peak RSS (VmHWM): %.1f MiB\n", hwm / 1024 }'
    n=${#samples[@]}
    if ((n >= 2)); then
        mid=${samples[$((n / 2))]}
        last=${samples[$((n - 1))]}
        growth=$(awk -v a="$mid" -v b="$last" 'BEGIN { printf "%.1f", (b - a) * 100 / a }')
        printf 'RSS from the middle of the run (%d s) to its end: %+.1f%% (limit %s%%)\n' \
            "$(((n / 2 + 1) * MEM_SAMPLE))" "$growth" "$MEM_MAX_GROWTH"
        if awk -v g="$growth" -v m="$MEM_MAX_GROWTH" 'BEGIN { exit !(g > m) }'; then
            echo "FAIL: memory keeps growing with the number of clients seen"
            exit 1
        fi
        echo "OK: memory stays flat"
    fi
    exit 0
fi

# ============================================================== compare

# A certificate for the HTTP/2 scenarios (both sides serve the same one).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$LT_DIR/bench-key.pem" -out "$LT_DIR/bench-cert.pem" >/dev/null 2>&1 ||
    lt_die "openssl could not make the benchmark's certificate"

# The reference nginx: one worker, three servers on the same upstream pool.
lt_free_port proxy_port
lt_free_port limit_port
lt_free_port h2_port
proxy_conf="$(lt_nginx_conf proxy "
    upstream backend {
        server 127.0.0.1:$UPSTREAM_PORT;
        # At least one idle upstream connection per client connection.
        keepalive $((max_conns * 2));
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    # nginx's own limiter, so high that it never refuses.
    limit_req_zone \$binary_remote_addr zone=bench:1m rate=10000000r/s;
    server {
        listen 127.0.0.1:$proxy_port;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
    # HTTP/2 over TLS in front of the same HTTP/1.1 upstream.
    server {
        listen 127.0.0.1:$h2_port ssl http2;
        ssl_certificate $LT_DIR/bench-cert.pem;
        ssl_certificate_key $LT_DIR/bench-key.pem;
        http2_max_concurrent_streams 1024;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
    server {
        listen 127.0.0.1:$limit_port;
        location / {
            limit_req zone=bench burst=1000000 nodelay;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }")"
lt_start_nginx proxy "$proxy_conf"
proxy_nginx_pid="$LT_LAST_PID"
lt_wait_for 10 "nginx proxy_pass" curl -fsS -o /dev/null "http://127.0.0.1:$proxy_port/"
lt_wait_for 10 "nginx limit_req" curl -fsS -o /dev/null "http://127.0.0.1:$limit_port/"
lt_wait_for 10 "nginx HTTP/2" curl -fsSk --http2 -o /dev/null "https://127.0.0.1:$h2_port/"

# The OpenResty-style peer, on the same Redis and upstream.
[[ -x "$PEER_SCRIPT" || -r "$PEER_SCRIPT" ]] || lt_die "the peer script is missing: $PEER_SCRIPT (set PEER_SCRIPT)"
if [[ ! -e /usr/lib/nginx/modules/ngx_http_lua_module.so || ! -e /usr/share/lua/5.1/nginx/redis.lua ]]; then
    lt_log "installing libnginx-mod-http-lua lua-nginx-redis (the peer)"
    apt-get install -y libnginx-mod-http-lua lua-nginx-redis >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 || true; apt-get install -y libnginx-mod-http-lua lua-nginx-redis >/dev/null; } ||
        lt_die "apt-get install libnginx-mod-http-lua lua-nginx-redis failed"
fi
lt_free_port peer_port
mkdir -p "$LT_DIR/peer"
UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT" REDIS_PORT="$REDIS_PORT" GATEWAY_PORT="$peer_port" \
    GATEWAY_WORKDIR="$LT_DIR/peer" bash "$PEER_SCRIPT" >"$LT_DIR/peer/stdout.log" 2>&1 &
peer_pid=$!
LT_PIDS+=("$peer_pid")
lt_wait_for 10 "the OpenResty peer" curl -fsS -o /dev/null "http://127.0.0.1:$peer_port/"
# The same peer keyed by X-Forwarded-For, for the many-subjects scenarios.
lt_free_port peerx_port
mkdir -p "$LT_DIR/peer-xff"
PEER_KEY=xff UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT" REDIS_PORT="$REDIS_PORT" GATEWAY_PORT="$peerx_port" \
    GATEWAY_WORKDIR="$LT_DIR/peer-xff" bash "$PEER_SCRIPT" >"$LT_DIR/peer-xff/stdout.log" 2>&1 &
peerx_pid=$!
LT_PIDS+=("$peerx_pid")
lt_wait_for 10 "the OpenResty peer keyed by X-Forwarded-For" curl -fsS -o /dev/null "http://127.0.0.1:$peerx_port/"

# Four floodgates, each with its own key prefix so that the ban of the
# fourth touches none of the others.
lt_free_port fg0_port
lt_free_port fg0_admin
lt_start_gateway fg-norules "$(fg_config norules "$fg0_port" "$fg0_admin" "b0:" "")" "$fg0_admin"
fg0_pid="$LT_LAST_PID"

lt_free_port fg1_port
lt_free_port fg1_admin
lt_start_gateway fg-1rule "$(fg_config 1rule "$fg1_port" "$fg1_admin" "b1:" \
    "$(never_refuses only 1000000)")" "$fg1_admin"
fg1_pid="$LT_LAST_PID"

lt_free_port fg3_port
lt_free_port fg3_admin
lt_start_gateway fg-3rules "$(fg_config 3rules "$fg3_port" "$fg3_admin" "b3:" \
    "$(never_refuses first 1000000; never_refuses second 2000000; never_refuses third 3000000)")" "$fg3_admin"
fg3_pid="$LT_LAST_PID"

lt_free_port fgm_port
lt_free_port fgm_admin
lt_start_gateway fg-many "$(fg_config many "$fgm_port" "$fgm_admin" "bm:" \
    "$(never_refuses only 1000000)")" "$fgm_admin"
fgm_pid="$LT_LAST_PID"

lt_free_port fgh_port
lt_free_port fgh_admin
lt_start_gateway fg-h2 "$(fg_config h2 "$fgh_port" "$fgh_admin" "bh:" "" |
    sed "s|^\[redis\]|[server.tls]\ncert = \"$LT_DIR/bench-cert.pem\"\nkey = \"$LT_DIR/bench-key.pem\"\n\n[redis]|")" "$fgh_admin"
fgh_pid="$LT_LAST_PID"

lt_free_port fgb_port
lt_free_port fgb_admin
lt_start_gateway fg-banned "$(fg_config banned "$fgb_port" "$fgb_admin" "bb:" \
    "$(never_refuses only 1000000)")" "$fgb_admin"
fgb_pid="$LT_LAST_PID"
# wrk connects from 127.0.0.1 without X-Forwarded-For: that is the client.
status=$(curl -sS -o "$LT_DIR/ban.json" -w '%{http_code}' -X POST \
    -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d '{"subject":"127.0.0.1","duration":"1h","reason":"bench"}' \
    "http://127.0.0.1:$fgb_admin/admin/bans")
[[ "$status" == 201 ]] || lt_die "POST /admin/bans answered $status: $(cat "$LT_DIR/ban.json")"
lt_wait_for 5 "the ban to apply" bash -c \
    "[[ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$fgb_port/) == 429 ]]"
for p in "$fg0_port" "$fg1_port" "$fg3_port" "$fgm_port" "$peer_port" "$peerx_port"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/")
    [[ "$code" == 200 ]] || lt_die "floodgate on :$p answers $code, expected 200"
done
code=$(curl -sk --http2 -o /dev/null -w '%{http_version} %{http_code}' "https://127.0.0.1:$fgh_port/")
[[ "$code" == "2 200" ]] || lt_die "floodgate over HTTP/2 answers $code, expected 2 200"

scenarios=(upstream proxy_pass limit_req peer fg-norules fg-1rule fg-3rules fg-banned proxy_pass-many peer-many fg-many proxy_pass-h2 fg-h2)
# The scenarios whose clients are many (see run_wrk).
declare -A many=([proxy_pass-many]=many [peer-many]=many [fg-many]=many)
# SCENARIOS: a subset to run (space-separated names); proxy_pass and
# proxy_pass-many are always run, the references of the ratios.
if [[ -n "${SCENARIOS:-}" ]]; then
    chosen=()
    for s in "${scenarios[@]}"; do
        case " $SCENARIOS proxy_pass proxy_pass-many proxy_pass-h2 " in *" $s "*) chosen+=("$s") ;; esac
    done
    scenarios=("${chosen[@]}")
fi
declare -A url=(
    [upstream]="http://127.0.0.1:$UPSTREAM_PORT/"
    [proxy_pass]="http://127.0.0.1:$proxy_port/"
    [limit_req]="http://127.0.0.1:$limit_port/"
    [peer]="http://127.0.0.1:$peer_port/"
    [fg-norules]="http://127.0.0.1:$fg0_port/"
    [fg-1rule]="http://127.0.0.1:$fg1_port/"
    [fg-3rules]="http://127.0.0.1:$fg3_port/"
    [fg-banned]="http://127.0.0.1:$fgb_port/"
    [proxy_pass-many]="http://127.0.0.1:$proxy_port/"
    [peer-many]="http://127.0.0.1:$peerx_port/"
    [fg-many]="http://127.0.0.1:$fgm_port/"
    [proxy_pass-h2]="https://127.0.0.1:$h2_port/"
    [fg-h2]="https://127.0.0.1:$fgh_port/"
)
declare -A pid_of=([fg-norules]="$fg0_pid" [fg-1rule]="$fg1_pid" [fg-3rules]="$fg3_pid" [fg-banned]="$fgb_pid" [fg-many]="$fgm_pid" [fg-h2]="$fgh_pid")
# The process that answers each scenario (nginx masters count their workers).
declare -A proxy_pid=(
    [upstream]="" [proxy_pass]="$proxy_nginx_pid" [limit_req]="$proxy_nginx_pid" [peer]="$peer_pid"
    [fg-norules]="$fg0_pid" [fg-1rule]="$fg1_pid" [fg-3rules]="$fg3_pid" [fg-banned]="$fgb_pid"
    [proxy_pass-many]="$proxy_nginx_pid" [peer-many]="$peerx_pid" [fg-many]="$fgm_pid"
    [proxy_pass-h2]="$proxy_nginx_pid" [fg-h2]="$fgh_pid"
)

rounds_n=$(echo "$CONNS" | wc -w)
estimate=$(( rounds_n * ${#scenarios[@]} * (ROUNDS * ($(lt_seconds "$DURATION") + 1) + $(lt_seconds "$WARMUP")) ))
lt_log "bench: ROUNDS=$ROUNDS DURATION=$DURATION THREADS=$THREADS CONNS=\"$CONNS\" (about ${estimate}s)"

results="$LT_DIR/results.tsv"
: >"$results"

for conns in $CONNS; do
    if [[ "$WARMUP" != 0 && "$WARMUP" != 0s ]]; then
        for s in "${scenarios[@]}"; do
            if [[ "$s" == *-h2 ]]; then
                run_h2load_timed "$conns" "$WARMUP" "${url[$s]}" >/dev/null
            else
                run_wrk "$conns" "$WARMUP" "${url[$s]}" "${many[$s]:-}" >/dev/null
            fi
        done
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        for s in "${scenarios[@]}"; do
            read -r calls0 total0 usec0 < <(redis_calls)
            pcpu0=$(lt_cpu_ticks ${proxy_pid[$s]})
            rcpu0=$(lt_cpu_ticks "$REDIS_PID")
            ucpu0=$(lt_cpu_ticks "$UPSTREAM_PID")
            out="$LT_DIR/wrk-$conns-$round-$s.txt"
            if [[ "$s" == *-h2 ]]; then
                run_h2load_timed "$conns" "$DURATION" "${url[$s]}" >"$out"
            else
                run_wrk_timed "$conns" "$DURATION" "${url[$s]}" "${many[$s]:-}" >"$out"
            fi
            pcpu1=$(lt_cpu_ticks ${proxy_pid[$s]})
            rcpu1=$(lt_cpu_ticks "$REDIS_PID")
            ucpu1=$(lt_cpu_ticks "$UPSTREAM_PID")
            read -r calls1 total1 usec1 < <(redis_calls)
            read -r rps p50 p99 reqs non2xx errs < <(wrk_parse <"$out")
            wcpu=$(awk '$1 == "wrk-cpu" { printf "%d", ($2 + $3) * 100 + 0.5 }' "$out")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                "$conns" "$s" "$round" "$rps" "$p50" "$p99" "$reqs" \
                "$((calls1 - calls0))" "$non2xx" "$errs" "$((total1 - total0))" \
                "$((pcpu1 - pcpu0))" "$((rcpu1 - rcpu0))" "$((ucpu1 - ucpu0))" "${wcpu:-0}" "$((usec1 - usec0))" >>"$results"
            lt_log "c=$conns round $round $s: $rps req/s, p50 ${p50}us, p99 ${p99}us, non-2xx $non2xx"
        done
    done
    # Peak memory of each floodgate once this connection count is done.
    for s in fg-norules fg-1rule fg-3rules fg-banned fg-many fg-h2; do
        printf '%s\t%s\n' "$conns" "$s $(lt_mem "${pid_of[$s]}" VmHWM)" >>"$LT_DIR/hwm.tsv"
    done
done

# ------------------------------------------------------------------ report

# stats COL CONNS SCENARIO -> "median min max" of that column.
stats() {
    awk -F'\t' -v c="$2" -v s="$3" -v col="$1" '$1 == c && $2 == s { print $col }' "$results" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "0 0 0"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            print m, v[1], v[NR] }'
}
sum_col() {
    awk -F'\t' -v c="$2" -v s="$3" -v col="$1" '$1 == c && $2 == s { n += $col } END { print n + 0 }' "$results"
}

echo
echo "# floodgate vs nginx: ROUNDS=$ROUNDS DURATION=$DURATION THREADS=$THREADS, one worker each side"
echo
echo "$(nproc) CPUs; $(nginx -v 2>&1); $(redis-server --version | awk '{print $1, $2, $3}'); floodgate $("$FLOODGATE" --version 2>/dev/null | awk '{print $NF}')."
echo "Ratios are to nginx proxy_pass under the same load (req/s: higher is better; latency: lower is better):"
echo "the *-many scenarios to proxy_pass-many, the *-h2 ones (h2load, HTTP/2 over TLS) to proxy_pass-h2, the others to proxy_pass."
for conns in $CONNS; do
    echo
    echo "## $conns connections"
    echo
    echo "| scenario | req/s median (min–max) | × proxy_pass | p50 ms median (min–max) | × proxy_pass | p99 ms median (min–max) | × proxy_pass | Redis calls/req | Redis cmds/req | non-2xx | peak RSS MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for s in "${scenarios[@]}"; do
        ref=proxy_pass
        [[ -n "${many[$s]:-}" ]] && ref=proxy_pass-many
        [[ "$s" == *-h2 ]] && ref=proxy_pass-h2
        read -r ref_rps _ _ < <(stats 4 "$conns" "$ref")
        read -r ref_p50 _ _ < <(stats 5 "$conns" "$ref")
        read -r ref_p99 _ _ < <(stats 6 "$conns" "$ref")
        read -r rps rps_lo rps_hi < <(stats 4 "$conns" "$s")
        read -r p50 p50_lo p50_hi < <(stats 5 "$conns" "$s")
        read -r p99 p99_lo p99_hi < <(stats 6 "$conns" "$s")
        reqs=$(sum_col 7 "$conns" "$s")
        calls=$(sum_col 8 "$conns" "$s")
        cmds=$(sum_col 11 "$conns" "$s")
        non2xx=$(sum_col 9 "$conns" "$s")
        errs=$(sum_col 10 "$conns" "$s")
        hwm="–"
        if [[ -n "${pid_of[$s]:-}" ]]; then
            hwm=$(awk -F'\t' -v c="$conns" -v s="$s" '$1 == c { split($2, a, " "); if (a[1] == s) printf "%.1f", a[2] / 1024 }' "$LT_DIR/hwm.tsv")
        fi
        awk -v s="$s" -v rps="$rps" -v rlo="$rps_lo" -v rhi="$rps_hi" -v rref="$ref_rps" \
            -v p50="$p50" -v p50lo="$p50_lo" -v p50hi="$p50_hi" -v p50ref="$ref_p50" \
            -v p99="$p99" -v p99lo="$p99_lo" -v p99hi="$p99_hi" -v p99ref="$ref_p99" \
            -v reqs="$reqs" -v calls="$calls" -v cmds="$cmds" -v non2xx="$non2xx" -v errs="$errs" -v hwm="$hwm" 'BEGIN {
            printf "| %s | %.0f (%.0f–%.0f) | %.2f | %.3f (%.3f–%.3f) | %.2f | %.3f (%.3f–%.3f) | %.2f | %.3f | %.3f | %d%s | %s |\n",
                s, rps, rlo, rhi, (rref > 0 ? rps / rref : 0),
                p50 / 1000, p50lo / 1000, p50hi / 1000, (p50ref > 0 ? p50 / p50ref : 0),
                p99 / 1000, p99lo / 1000, p99hi / 1000, (p99ref > 0 ? p99 / p99ref : 0),
                (reqs > 0 ? calls / reqs : 0), (reqs > 0 ? cmds / reqs : 0), non2xx, (errs > 0 ? " (+" errs " socket errors)" : ""), hwm
        }'
    done
done
echo
echo "fg-banned answers every request with the ban (429), by design: its non-2xx count is its request count."
echo "Redis calls/req: script calls the gateway sent (EVALSHA/EVAL) per completed request; Redis cmds/req: every"
echo "command INFO commandstats counted, including those the script runs inside Redis. Both are deltas over the"
echo "scenario's own rounds divided by the requests wrk completed (requests still in flight when wrk stops add a little)."
echo "Peak RSS is VmHWM since the process started, read after each connection count."

# CPU per request, per process, over the same rounds.
echo
echo "## CPU time per request (µs), each process, same rounds"
echo
echo "CPU seconds each process used during the scenario's rounds, divided by the requests completed."
echo "The proxy column is the process under test (nginx counts its worker); 2 CPUs are shared by all four."
echo "\"In scripts\" is the time Redis spent running the script calls (INFO commandstats usec, wall time: a script preempted"
echo "on a busy machine counts its wait too); the rest of Redis' CPU is reading, parsing and answering them, and waking up."
for conns in $CONNS; do
    echo
    echo "### $conns connections"
    echo
    echo "| scenario | proxy | Redis | (of which in scripts) | upstream | wrk | total | Redis µs per Redis call |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for s in "${scenarios[@]}"; do
        reqs=$(sum_col 7 "$conns" "$s")
        calls=$(sum_col 8 "$conns" "$s")
        awk -v s="$s" -v reqs="$reqs" -v calls="$calls" \
            -v p="$(sum_col 12 "$conns" "$s")" -v r="$(sum_col 13 "$conns" "$s")" \
            -v u="$(sum_col 14 "$conns" "$s")" -v w="$(sum_col 15 "$conns" "$s")" \
            -v us="$(sum_col 16 "$conns" "$s")" -v tck="$(getconf CLK_TCK)" 'BEGIN {
            f = (reqs > 0) ? 1000000 / tck / reqs : 0
            printf "| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %s |\n", s, p * f, r * f, (reqs > 0 ? us / reqs : 0), u * f, w * f, (p + r + u + w) * f,
                (calls > reqs / 100 ? sprintf("%.1f", r * 1000000 / tck / calls) : "–")
        }'
    done
done

# ------------------------------------------------------------------ verdicts

# ratio A B COL CONNS -> median(A) / median(B) of that column.
ratio() {
    local a b
    read -r a _ _ < <(stats "$3" "$4" "$1")
    read -r b _ _ < <(stats "$3" "$4" "$2")
    awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'
}
verdict() { # verdict TEXT VALUE OP LIMIT
    if awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN { exit !((op == ">=") ? v >= l : v <= l) }'; then
        echo "| $1 | $2 | $3 $4 | met |"
    else
        echo "| $1 | $2 | $3 $4 | NOT met |"
    fi
}
echo
echo "## Targets"
echo
echo "| target | measured | wanted | verdict |"
echo "|---|---:|---:|---|"
# per_request COL CONNS SCENARIO: CPU µs (a ticks column) per request.
per_request() {
    awk -v r="$(sum_col "$1" "$2" "$3")" -v n="$(sum_col 7 "$2" "$3")" -v t="$(getconf CLK_TCK)" \
        'BEGIN { printf "%.1f", (n > 0 ? r * 1000000 / t / n : 0) }'
}
calls_per_request() {
    awk -v c="$(sum_col 8 "$1" "$2")" -v n="$(sum_col 7 "$1" "$2")" 'BEGIN { printf "%.4f", (n > 0 ? c / n : 0) }'
}
for conns in $CONNS; do
    # One hot subject: leased tokens.
    verdict "c=$conns fg-1rule req/s × proxy_pass" "$(ratio fg-1rule proxy_pass 4 "$conns")" ">=" 0.85
    verdict "c=$conns fg-1rule req/s × peer" "$(ratio fg-1rule peer 4 "$conns")" ">=" 1.6
    verdict "c=$conns fg-1rule p99 × peer p99" "$(ratio fg-1rule peer 6 "$conns")" "<=" 1.0
    verdict "c=$conns fg-1rule Redis calls per request" "$(calls_per_request "$conns" fg-1rule)" "<=" 0.01
    # Forwarding.
    verdict "c=$conns fg-norules req/s × proxy_pass" "$(ratio fg-norules proxy_pass 4 "$conns")" ">=" 1.0
    verdict "c=$conns fg-norules proxy CPU µs/req × proxy_pass's" \
        "$(awk -v a="$(per_request 12 "$conns" fg-norules)" -v b="$(per_request 12 "$conns" proxy_pass)" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')" "<=" 1.0
    verdict "c=$conns fg-h2 req/s × proxy_pass-h2" "$(ratio fg-h2 proxy_pass-h2 4 "$conns")" ">=" 1.0
    verdict "c=$conns fg-banned Redis calls per request" "$(calls_per_request "$conns" fg-banned)" "<=" 0
    # Many subjects: a Redis decision per request.
    verdict "c=$conns fg-many req/s × peer-many" "$(ratio fg-many peer-many 4 "$conns")" ">=" 1.3
    verdict "c=$conns fg-many req/s × proxy_pass-many" "$(ratio fg-many proxy_pass-many 4 "$conns")" ">=" 0.6
    verdict "c=$conns fg-many Redis CPU µs per decision" "$(per_request 13 "$conns" fg-many)" "<=" 6
done
