#!/usr/bin/env bash
# Makes sure RabbitMQ (5672), Redis (6379) and a MongoDB (27017) answer on localhost, starting
# them if installed and installing Debian's packages if missing. MongoDB comes from, in order:
# something already listening on 27017, `mongod` on PATH, Docker Compose's `mongodb` service, or
# the wire-protocol stand-in (in memory; for trying Kobe out, not for data you want to keep).
#
# Usage: scripts/services.sh        (leaves the services running; a stand-in runs until killed)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_rabbitmq
log "RabbitMQ answers on 127.0.0.1:5672"
ensure_redis
log "Redis answers on 127.0.0.1:6379"

if port_open 127.0.0.1 27017; then
  log "MongoDB answers on 127.0.0.1:27017"
elif docker_engine && ! command -v mongod >/dev/null; then
  log "starting MongoDB with Docker Compose"
  (cd "$KOBE_ROOT" && docker compose up -d mongodb >&2)
  wait_port 127.0.0.1 27017 60 MongoDB
else
  kind=$(start_mongodb 27017)
  log "MongoDB on 127.0.0.1:27017: $kind (pid $KOBE_MONGO_PID)"
  # Keep it running after this script exits.
  disown "$KOBE_MONGO_PID" 2>/dev/null || true
  KOBE_MONGO_DIR=""
fi
