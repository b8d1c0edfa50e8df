#!/usr/bin/env bash
# Benchmarks, reported as ratios against baselines measured in the same run (machines are shared
# and noisy: absolute numbers mean little). Needs RabbitMQ on localhost (started if installed).
#
# Usage: scripts/bench.sh            KOBE_BENCH_MESSAGES=50000 scripts/bench.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KOBE_ROOT"
ensure_rabbitmq
cargo bench --bench publish
