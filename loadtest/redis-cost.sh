#!/usr/bin/env bash
# loadtest/redis-cost.sh [redis_cost options]
#
# Redis CPU per decision in isolation, for sizing (docs/performance.md,
# "Sizing"): starts an empty redis-server of its own on a free port and runs
# examples/redis_cost.rs against it, which prints a markdown table: one
# `decide.lua` call per decision, batches of distinct subjects, and batches
# of one hot subject. Runs for about half a minute.
#
# Options go to the example: --seconds S (4), --conns N (8), --depth D (8
# calls in flight per connection), --batch B (16), --lua-dir DIR (measure
# the scripts in DIR instead of the built-in ones: a before-and-after of a
# script change).
set -euo pipefail
# shellcheck source=loadtest/lib.sh
source "$(dirname "$0")/lib.sh"
lt_init
lt_start_redis
(cd "$LT_ROOT" && cargo build --release --quiet --example redis_cost) >&2 ||
    lt_die "cargo build --example redis_cost failed"
lt_run "$LT_ROOT/target/release/examples/redis_cost" --port "$REDIS_PORT" --pid "$REDIS_PID" "$@"
