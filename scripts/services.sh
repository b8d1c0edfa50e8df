#!/usr/bin/env bash
# Makes sure RabbitMQ (5672), Redis (6379) and a MongoDB answer on localhost, starting them if
# installed and installing Debian's packages if missing, and prints the MongoDB URI to use.
# MongoDB comes from, in order: $MONGODB_URI if set, something already listening on 27017, `mongod`
# on PATH, Docker Compose's `mongodb` service, DocumentDB ($KOBE_DOCUMENTDB, a real engine kept
# running), or the wire-protocol stand-in on 27017 (in memory; for trying Kobe out).
#
# Usage: scripts/services.sh        (leaves the services running; a stand-in runs until killed)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_services
# Keep a MongoDB this started running after this script exits.
[ -z "$KOBE_MONGO_PID" ] || disown "$KOBE_MONGO_PID" 2>/dev/null || true
KOBE_MONGO_DIR=""
echo "MONGODB_URI=$MONGODB_URI"
