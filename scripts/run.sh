#!/usr/bin/env bash
# Runs Kobe locally: the API on http://127.0.0.1:8000 and a worker, against real RabbitMQ, Redis
# and MongoDB on localhost (started, or installed, as scripts/services.sh does: a MONGODB_URI you
# set is used as it is). With a Docker engine, `docker compose up --build` runs the whole stack in
# containers instead.
#
# Usage: scripts/run.sh [worker flags, e.g. --concurrency 20]     Ctrl-C stops everything.
#        KOBE_EXAMPLE=custom_worker scripts/run.sh   runs examples/custom_worker.rs (your own tasks)
#        KOBE_TASKS_FILE=examples/tasks.toml scripts/run.sh   adds the tasks that file declares
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KOBE_ROOT"

ensure_services
command -v cargo >/dev/null || die "cargo is needed to build Kobe (https://rustup.rs)"
if [ -n "${KOBE_EXAMPLE:-}" ]; then
  log "building examples/$KOBE_EXAMPLE.rs (release)"
  cargo build --release --quiet --example "$KOBE_EXAMPLE"
  kobe=target/release/examples/$KOBE_EXAMPLE
else
  log "building kobe (release)"
  cargo build --release --quiet --bin kobe
  kobe=target/release/kobe
fi

"$kobe" init-db
"$kobe" serve &
serve=$!
"$kobe" worker "$@" &
worker=$!
trap 'kill -TERM $serve $worker 2>/dev/null || true; wait $serve $worker 2>/dev/null || true; stop_mongodb' INT TERM EXIT
addr=${KOBE_HTTP_ADDR:-127.0.0.1:8000}
wait_port "${addr%:*}" "${addr##*:}" 60 "kobe serve"
log "Kobe is up: try  curl -s -XPOST localhost:8000/task/start -H 'content-type: application/json' -d '{\"task_name\":\"demo_long_io\",\"kwargs\":{\"duration_ms\":200}}'"
log "Ctrl-C stops it."
wait -n $serve $worker
