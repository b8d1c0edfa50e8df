#!/usr/bin/env bash
# Benchmarks, reported as ratios against baselines measured in the same run (machines are shared
# and noisy: absolute numbers mean little):
#   publish: Kobe's publisher (64 callers, and one at a time) against raw amiquip;
#   worker:  a `kobe worker --concurrency 10` process against the broker alone, and its peak memory.
# Needs RabbitMQ on localhost (started if installed); the worker benchmark needs a MongoDB, found as
# scripts/test.sh finds one ($KOBE_BENCH_MONGODB_URI, mongod, or the wire-protocol stand-in).
#
# Usage: scripts/bench.sh [publish|worker]     KOBE_BENCH_MESSAGES=50000 KOBE_BENCH_TASKS=5000
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KOBE_ROOT"
ensure_rabbitmq
ensure_redis
which=${1:-all}

if [ "$which" = all ] || [ "$which" = publish ]; then
  cargo bench --bench publish
fi
if [ "$which" = all ] || [ "$which" = worker ]; then
  trap stop_mongodb EXIT
  if [ -z "${KOBE_BENCH_MONGODB_URI:-}" ]; then
    port=$(free_port)
    kind=$(start_mongodb "$port")
    export KOBE_BENCH_MONGODB_URI="mongodb://127.0.0.1:$port"
    log "MongoDB for the benchmark: $kind"
  fi
  cargo build --release --quiet --bin kobe
  KOBE_BENCH_BINARY="$KOBE_ROOT/target/release/kobe" cargo bench --bench worker
fi
