#!/usr/bin/env bash
# loadtest/cpu-per-request.sh URL PID...
#
# CPU time per request, per process: runs wrk (2 threads, 64 connections,
# 5 s) against URL and divides the user+system CPU each PID used by the
# requests completed. Also reports wrk's own CPU per request. Timings on a
# shared 2-core machine are noisy; CPU per request is much less so, and is
# what says which process bounds throughput.
#
#   loadtest/cpu-per-request.sh http://127.0.0.1:8080/ "$(pgrep -f 'floodgate --config')" "$(pgrep redis-server)"
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
url=$1
shift
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for p in "$@"; do before[$p]=$(cpu "$p"); done
out=$(mktemp)
tm=$(mktemp)
trap 'rm -f "$out" "$tm"' EXIT
/usr/bin/time -f "%U %S" -o "$tm" wrk -t2 -c64 -d5s --latency "$url" >"$out"
req=$(awk '/requests in/ {print $1}' "$out")
line="req/s=$(awk '/Requests\/sec/ {print $2}' "$out")"
for p in "$@"; do
    after=$(cpu "$p")
    line="$line $(cat "/proc/$p/comm")=$(( (after - before[$p]) * 1000000 / ticks / req ))us"
done
wrk_us=$(awk -v r="$req" '{printf "%d", ($1 + $2) * 1000000 / r}' "$tm")
echo "$line wrk=${wrk_us}us"
