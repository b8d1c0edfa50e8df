#!/usr/bin/env bash
# Benchmarks, reported as ratios against baselines measured in the same run (machines are shared
# and noisy: absolute numbers mean little).
#
#   publish  Kobe's publisher (64 callers, and one at a time) against raw amiquip.
#   worker   a `kobe worker --concurrency 10` draining pre-loaded no-op tasks, against the broker
#            alone and the store alone, with its peak memory and MongoDB commands per task.
#   compare  the same drain beside the stack Kobe replaces: Celery 5 (prefork x10, acks_late,
#            prefetch 1, publisher confirms, Redis results) from PyPI in a venv of its own, on the
#            same RabbitMQ and Redis, on each MongoDB engine in $KOBE_BENCH_ENGINES
#            (default: "documentdb standin").
#
# Usage: scripts/bench.sh [publish|worker|compare]   KOBE_BENCH_TASKS=3000 KOBE_BENCH_MESSAGES=50000
#        KOBE_BENCH_WORKER_ARGS="--prefetch-multiplier 10" passes flags to the Kobe worker.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KOBE_ROOT"
ensure_rabbitmq
ensure_redis
which=${1:-all}
export KOBE_BENCH_TASKS=${KOBE_BENCH_TASKS:-3000}
trap stop_mongodb EXIT

kobe_worker_bench() {
  KOBE_BENCH_BINARY="$KOBE_ROOT/target/release/kobe" cargo bench --quiet --bench worker 2>/dev/null \
    | grep '='
}

# engine NAME: starts that MongoDB engine and sets KOBE_MONGO_URI and KOBE_MONGO_KIND.
engine() {
  stop_mongodb
  case $1 in
    documentdb)
      KOBE_DOCUMENTDB=${KOBE_DOCUMENTDB:-$(documentdb_script)}
      KOBE_MONGO_URI=$(bash "$KOBE_DOCUMENTDB" --port "${KOBE_DOCUMENTDB_PORT:-10260}" \
        --pg-port "${KOBE_DOCUMENTDB_PG_PORT:-9712}" --dir "${KOBE_DOCUMENTDB_DIR:-/var/tmp/kobe-documentdb}" 2>/dev/null)
      KOBE_MONGO_KIND="DocumentDB (a real engine on PostgreSQL)" ;;
    standin) start_standin "$(free_port)" ;;
    found) find_mongodb "$(free_port)" ;;
    *) die "unknown engine $1 (documentdb, standin, found)" ;;
  esac
}

if [ "$which" = all ] || [ "$which" = publish ]; then
  cargo bench --bench publish
fi

if [ "$which" = all ] || [ "$which" = worker ]; then
  cargo build --release --quiet --bin kobe
  if [ -z "${KOBE_BENCH_MONGODB_URI:-}" ]; then
    engine found
    export KOBE_BENCH_MONGODB_URI=$KOBE_MONGO_URI
  fi
  log "MongoDB for the benchmark: ${KOBE_MONGO_KIND:-KOBE_BENCH_MONGODB_URI}"
  kobe_worker_bench
fi

if [ "$which" = compare ]; then
  ensure_python_venv
  venv=${KOBE_BENCH_VENV:-$KOBE_ROOT/target/bench-venv}
  if [ ! -x "$venv/bin/celery" ]; then
    log "installing Celery 5 from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'celery[redis]>=5,<6'
  fi
  cargo build --release --quiet --bin kobe
  cargo bench --no-run --quiet --bench worker 2>/dev/null
  log "Celery $("$venv/bin/python" -c 'import celery; print(celery.__version__)'), $KOBE_BENCH_TASKS no-op tasks each"
  for name in ${KOBE_BENCH_ENGINES:-documentdb standin}; do
    engine "$name"
    log "MongoDB: $KOBE_MONGO_KIND"
    celery=$(cd scripts/bench && "$venv/bin/python" celery_drain.py --tasks "$KOBE_BENCH_TASKS" --concurrency 10)
    kobe=$(KOBE_BENCH_MONGODB_URI=$KOBE_MONGO_URI kobe_worker_bench)
    python3 - "$name" "$celery" "$kobe" <<'PY'
import sys
name, celery, kobe = sys.argv[1], sys.argv[2], sys.argv[3]
v = dict(l.split("=", 1) for l in (celery + "\n" + kobe).splitlines() if "=" in l)
f = lambda k: float(v[k])
print(f"== {name}: {v['tasks']} pre-loaded no-op tasks, one worker at concurrency 10, same broker, same run ==")
print(f"  Celery drain            {f('celery_drain_per_s'):8.0f} tasks/s   peak memory {f('celery_peak_rss_kib')/1024:7.1f} MiB (all processes)")
print(f"  Kobe drain              {f('kobe_drain_per_s'):8.0f} tasks/s   peak memory {f('kobe_peak_rss_kib')/1024:7.1f} MiB")
print(f"  broker consume+ack      {f('broker_consume_ack_per_s'):8.0f} msg/s")
print(f"  store, claims alone     {f('store_claims_per_s'):8.0f} statements/s (a task needs 2)")
print(f"  drain      Kobe / Celery          {f('kobe_drain_per_s')/f('celery_drain_per_s'):6.2f}x")
print(f"  drain      Kobe / broker          {f('kobe_drain_per_s')/f('broker_consume_ack_per_s'):6.2f}")
print(f"  drain      Kobe / (store / 2)     {f('kobe_drain_per_s')/(f('store_claims_per_s')/2):6.2f}")
print(f"  memory     Kobe / Celery          {f('kobe_peak_rss_kib')/f('celery_peak_rss_kib')*100:6.1f} %")
print(f"  MongoDB commands per tracked task {f('kobe_mongo_commands_per_task'):6.3f}")
PY
  done
fi
