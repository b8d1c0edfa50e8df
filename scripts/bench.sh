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
#   http     POST /task/start under wrk (64 connections, 10 s): `kobe serve` against FastAPI +
#            Celery (from PyPI), each with its own worker consuming, same broker and Redis, same run;
#            req/s and p99 latency as ratios, and MongoDB commands per submission.
#   bulk     POST /task/start_many (batches of 500, no worker consuming): accepted tasks/s against
#            the broker's own confirmed-publish rate in the same run; then the drain of those tasks
#            by one `kobe worker`, against a Celery drain of as many.
#   canvas   workflows against Celery's canvas on the same broker and Redis, same run: a chord of
#            1,000 no-op members and a callback, and a chain of 100 no-op steps, from the call to
#            the callback's result (Kobe: `kobe worker --concurrency 10`; Celery: prefork x10);
#            and Kobe's chord join, from the last member's finish to the callback's start.
#   cluster  not a speed figure: three private RabbitMQ nodes clustered on this machine, quorum
#            queues, an API and two workers given every node; 1,200 submissions (some retrying,
#            some delayed) while a node is stopped, restarted, then another stopped. Checks every
#            accepted task ran exactly as planned and prints how long the API refused work.
#
# Usage: scripts/bench.sh [publish|worker|compare|http|bulk|canvas|cluster]   KOBE_BENCH_TASKS=3000 KOBE_BENCH_MESSAGES=50000
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

if [ "$which" = cluster ]; then
  if [ -z "${KOBE_TEST_MONGODB_URI:-}" ]; then
    find_mongodb "$(free_port)"
    export KOBE_TEST_MONGODB_URI=$KOBE_MONGO_URI
  fi
  if cargo nextest --version >/dev/null 2>&1; then
    run=(cargo nextest run --test integration --no-capture cluster::a_three_node_cluster)
  else
    run=(cargo test --test integration cluster::a_three_node_cluster -- --nocapture)
  fi
  KOBE_TEST_CLUSTER=1 "${run[@]}" 2>&1 | grep -E '^cluster:|PASS|FAIL|panicked|assert|test result'
  exit "${PIPESTATUS[0]}"
fi

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

# The Python baseline's venv: Celery 5, FastAPI and uvicorn from PyPI.
python_venv() {
  ensure_python_venv
  venv=${KOBE_BENCH_VENV:-$KOBE_ROOT/target/bench-venv}
  if [ ! -x "$venv/bin/uvicorn" ] || [ ! -x "$venv/bin/celery" ]; then
    log "installing Celery 5, FastAPI and uvicorn from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'celery[redis]>=5,<6' fastapi uvicorn pymongo
  fi
  "$venv/bin/python" -c 'import pymongo' 2>/dev/null || "$venv/bin/pip" install --quiet pymongo
}

if [ "$which" = compare ]; then
  python_venv
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
print(f"  store, a task's writes  {f('store_tasks_per_s'):8.0f} tasks/s (its claim and its outcome)")
print(f"  drain      Kobe / Celery          {f('kobe_drain_per_s')/f('celery_drain_per_s'):6.2f}x")
print(f"  drain      Kobe / broker          {f('kobe_drain_per_s')/f('broker_consume_ack_per_s'):6.2f}")
print(f"  drain      Kobe / store           {f('kobe_drain_per_s')/f('store_tasks_per_s'):6.2f}")
print(f"  memory     Kobe / Celery          {f('kobe_peak_rss_kib')/f('celery_peak_rss_kib')*100:6.1f} %")
print(f"  MongoDB commands per tracked task {f('kobe_mongo_commands_per_task'):6.3f}")
kobe_cpu = f('kobe_cpu_us_per_task') + f('kobe_broker_cpu_us_per_task') + f('kobe_store_cpu_us_per_task') + f('kobe_redis_cpu_us_per_task')
celery_cpu = f('celery_cpu_us_per_task') + f('celery_broker_cpu_us_per_task') + f('celery_redis_cpu_us_per_task')
print("  CPU per task (µs)        worker   broker    store    Redis    total")
print(f"    Kobe               {f('kobe_cpu_us_per_task'):8.0f} {f('kobe_broker_cpu_us_per_task'):8.0f} {f('kobe_store_cpu_us_per_task'):8.0f} {f('kobe_redis_cpu_us_per_task'):8.0f} {kobe_cpu:8.0f}")
print(f"    Celery             {f('celery_cpu_us_per_task'):8.0f} {f('celery_broker_cpu_us_per_task'):8.0f} {'-':>8} {f('celery_redis_cpu_us_per_task'):8.0f} {celery_cpu:8.0f}")
print(f"  CPU per task Kobe / Celery        {kobe_cpu/celery_cpu:6.2f}")
PY
  done
fi

# wrk_run NAME URL: 64 connections for KOBE_BENCH_SECONDS against URL; prints key=value lines.
wrk_run() {
  local out
  out=$(wrk -t2 -c64 -d"${KOBE_BENCH_SECONDS:-10}"s --latency -s scripts/bench/post.lua "$2/task/start")
  echo "$out" >&2
  printf '%s_rps=%s\n' "$1" "$(echo "$out" | awk '/^Requests\/sec/ {print $2}')"
  printf '%s_p99=%s\n' "$1" "$(echo "$out" | awk '$1 == "99%" {print $2}')"
  printf '%s_non2xx=%s\n' "$1" "$(echo "$out" | awk '/Non-2xx/ {print $NF}')"
}

# ms VALUE: wrk's latency (850.00us, 12.34ms, 1.20s) in milliseconds.
ms() { python3 -c "import sys,re; v=sys.argv[1]; n,u=re.match(r'([0-9.]+)(\w+)',v).groups(); print(float(n)*{'us':0.001,'ms':1,'s':1000,'m':60000}[u])" "$1"; }

# Starts `kobe serve` for benchmark NAME on its own database, queues and port (`$port`), with
# `$pids` stopped and the store's engine stopped on exit.
start_api() {
  pids=()
  trap '[ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true; stop_mongodb' EXIT
  prefix="kobebench-$1-$$"
  port=$(free_port)
  export MONGODB_URI=$KOBE_MONGO_URI MONGODB_DB=${prefix//-/_} KOBE_AMQP_PREFIX=$prefix \
    KOBE_REDIS_PREFIX=$prefix KOBE_HTTP_ADDR=127.0.0.1:$port KOBE_LOG_LEVEL=warn
  target/release/kobe --env-file /dev/null init-db >/dev/null
  target/release/kobe --env-file /dev/null serve & pids+=($!)
}

# Waits (60 s at most) until that API answers /ready.
wait_api() {
  wait_port 127.0.0.1 "$port" 60 "kobe serve"
  local deadline=$((SECONDS + 60))
  until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "kobe serve is not ready after 60 s" >&2; exit 1; }
    sleep 0.2
  done
}

if [ "$which" = http ]; then
  command -v wrk >/dev/null || apt_install wrk
  python_venv
  cargo build --release --quiet --bin kobe
  engine "${KOBE_BENCH_ENGINE:-documentdb}"
  log "MongoDB: $KOBE_MONGO_KIND"
  start_api http
  metrics_port=$(free_port)
  target/release/kobe --env-file /dev/null worker --metrics-addr "127.0.0.1:$metrics_port" & pids+=($!)
  wait_api
  before=$(curl -s "http://127.0.0.1:$port/metrics")
  kobe=$(KOBE_BENCH_BODY='{"task_name": "demo_long_io", "kwargs": {"duration_ms": 0}}' wrk_run kobe "http://127.0.0.1:$port")
  after=$(curl -s "http://127.0.0.1:$port/metrics")
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; pids=()

  queue="kobebench-celery-$$"
  fport=$(free_port)
  (cd scripts/bench && KOBE_BENCH_CELERY_QUEUE=$queue exec "$venv/bin/celery" -A celery_drain worker -Q "$queue" \
    -c 10 -P prefork --prefetch-multiplier 1 --without-heartbeat --without-mingle --without-gossip \
    --loglevel WARNING) & pids+=($!)
  (cd scripts/bench && KOBE_BENCH_CELERY_QUEUE=$queue exec "$venv/bin/uvicorn" fastapi_app:app \
    --host 127.0.0.1 --port "$fport" --log-level warning --no-access-log) & pids+=($!)
  wait_port 127.0.0.1 "$fport" 60 "FastAPI app"
  celery=$(wrk_run celery "http://127.0.0.1:$fport")
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; pids=()

  python3 - "$kobe" "$celery" "$before" "$after" "$(ms "$(echo "$kobe" | awk -F= '/_p99/ {print $2}')")" \
    "$(ms "$(echo "$celery" | awk -F= '/_p99/ {print $2}')")" <<'PY'
import sys
kobe, celery, before, after, kp99, cp99 = sys.argv[1:]
v = dict(l.split("=", 1) for l in (kobe + "\n" + celery).splitlines() if "=" in l)
def total(text, name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name) and not l.startswith("#"))
commands = total(after, "kobe_mongo_commands_total") - total(before, "kobe_mongo_commands_total")
accepted = total(after, "kobe_tasks_submitted_total") - total(before, "kobe_tasks_submitted_total")
print("== POST /task/start, 64 connections, a worker consuming in both cases, same run ==")
print(f"  FastAPI + Celery   {float(v['celery_rps']):8.0f} req/s   p99 {float(cp99):8.1f} ms   non-2xx {v['celery_non2xx'] or 0}")
print(f"  kobe serve         {float(v['kobe_rps']):8.0f} req/s   p99 {float(kp99):8.1f} ms   non-2xx {v['kobe_non2xx'] or 0}")
print(f"  req/s   Kobe / FastAPI+Celery   {float(v['kobe_rps'])/float(v['celery_rps']):6.2f}x")
print(f"  p99     Kobe / FastAPI+Celery   {float(kp99)/float(cp99):6.2f}")
print(f"  MongoDB commands per accepted submission {commands/max(accepted,1):6.3f} ({accepted:.0f} accepted)")
PY
fi

if [ "$which" = bulk ]; then
  python_venv
  cargo build --release --quiet --bin kobe
  cargo bench --no-run --quiet --bench publish 2>/dev/null
  engine "${KOBE_BENCH_ENGINE:-documentdb}"
  log "MongoDB: $KOBE_MONGO_KIND"
  n=${KOBE_BENCH_BULK_TASKS:-20000}
  broker=$(cargo bench --quiet --bench publish 2>/dev/null | awk '/raw amiquip/ {print $(NF-3)}')
  start_api bulk
  wait_api
  kobe=$("$venv/bin/python" scripts/bench/bulk.py "http://127.0.0.1:$port" "$KOBE_MONGO_URI" "$MONGODB_DB" \
    "$n" 500 -- target/release/kobe --env-file /dev/null worker)
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; pids=()
  "$venv/bin/python" -c "import pymongo; pymongo.MongoClient('$KOBE_MONGO_URI').drop_database('$MONGODB_DB')"
  rabbitmqctl list_queues -q name 2>/dev/null | grep "^$prefix" | while read -r q; do
    rabbitmqctl delete_queue -q "$q" >/dev/null 2>&1 || true
  done
  celery=$(cd scripts/bench && "$venv/bin/python" celery_drain.py --tasks "$n" --concurrency 10)
  python3 - "$kobe" "$celery" "$broker" <<'PY'
import sys
kobe, celery, broker = sys.argv[1], sys.argv[2], float(sys.argv[3])
v = dict(l.split("=", 1) for l in (kobe + "\n" + celery).splitlines() if "=" in l)
f = lambda k: float(v[k])
print(f"== POST /task/start_many, batches of 500, two clients, no worker; then one worker drains them; same run ==")
print(f"  broker, confirmed publishes   {broker:8.0f} msg/s (raw amiquip, one batch)")
print(f"  start_many accepted           {f('bulk_accepted_per_s'):8.0f} tasks/s (refused {v['bulk_refused']})")
print(f"  Kobe drain of those           {f('bulk_drain_per_s'):8.0f} tasks/s")
print(f"  Celery drain of as many       {f('celery_drain_per_s'):8.0f} tasks/s")
print(f"  accepted   start_many / broker    {f('bulk_accepted_per_s')/broker:6.2f}")
print(f"  drain      Kobe / Celery          {f('bulk_drain_per_s')/f('celery_drain_per_s'):6.2f}x")
PY
fi

if [ "$which" = canvas ]; then
  python_venv
  cargo build --release --quiet --bin kobe
  engine "${KOBE_BENCH_ENGINE:-documentdb}"
  log "MongoDB: $KOBE_MONGO_KIND"
  members=${KOBE_BENCH_CHORD_MEMBERS:-1000}
  steps=${KOBE_BENCH_CHAIN_STEPS:-100}
  start_api canvas
  target/release/kobe --env-file /dev/null worker --concurrency 10 & pids+=($!)
  wait_api
  kobe=$("$venv/bin/python" scripts/bench/canvas.py "http://127.0.0.1:$port" "$KOBE_MONGO_URI" \
    "$MONGODB_DB" --members "$members" --steps "$steps")
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; pids=()
  "$venv/bin/python" -c "import pymongo; pymongo.MongoClient('$KOBE_MONGO_URI').drop_database('$MONGODB_DB')"
  celery=$(cd scripts/bench && "$venv/bin/python" celery_canvas.py --members "$members" --steps "$steps" --concurrency 10)
  python3 - "$kobe" "$celery" "$members" "$steps" <<'PY'
import sys
kobe, celery, members, steps = sys.argv[1:]
v = dict(l.split("=", 1) for l in (kobe + "\n" + celery).splitlines() if "=" in l)
f = lambda k: float(v[k])
print(f"== workflows, time to the callback's result, same broker and Redis, same run ==")
print(f"  chord of {members} + callback   Kobe {f('kobe_chord_s'):7.2f} s   Celery {f('celery_chord_s'):7.2f} s   Kobe join {f('kobe_chord_join_ms'):.0f} ms")
print(f"  chain of {steps}              Kobe {f('kobe_chain_s'):7.2f} s   Celery {f('celery_chain_s'):7.2f} s")
print(f"  chord      Kobe / Celery (speed)  {f('celery_chord_s')/f('kobe_chord_s'):6.2f}x")
print(f"  chain      Kobe / Celery (speed)  {f('celery_chain_s')/f('kobe_chain_s'):6.2f}x")
PY
fi
