#!/usr/bin/env bash
# Runs every test (unit and integration) against real services on localhost:
#   RabbitMQ and Redis: the machine's own (started or installed if needed);
#   Celery 5 and Flower from PyPI, in a venv at $KOBE_CELERY_VENV (default ~/.cache/kobe/celery-venv);
#   MongoDB, first of: $KOBE_TEST_MONGODB_URI; a private `mongod` from PATH; Docker Compose's
#   `mongodb` service if a Docker engine answers; DocumentDB through $KOBE_DOCUMENTDB (default
#   ../shared/tools/documentdb/run.sh); the wire-protocol stand-in at $KOBE_MONGO_STANDIN (default
#   ../shared/tools/mongo-standin/run.sh). It prints which.
# Tests use their own database, AMQP prefix and Redis prefix each, and remove them when done.
#
# Then the API's contract test (scripts/contract.sh: schemathesis against the running API's own
# OpenAPI document). KOBE_CONTRACT=0 skips it.
#
# Usage: scripts/test.sh [extra arguments for cargo nextest run / cargo test]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KOBE_ROOT"

ensure_rabbitmq
ensure_redis
# Mixed fleets are tested against a real Celery and Flower.
ensure_celery_venv
# The operator page (/ui) is tested in a real browser, driven over WebDriver.
command -v chromium >/dev/null && command -v chromedriver >/dev/null || apt_install chromium chromium-driver

cleanup() {
  stop_mongodb
  # Topology a failed test could not remove (tests delete their own on success and on panic).
  if command -v rabbitmqctl >/dev/null; then
    for q in $(rabbitmqctl list_queues -q name 2>/dev/null | grep '^kobetest-' || true); do
      rabbitmqctl delete_queue -q "$q" >/dev/null 2>&1 || true
    done
  fi
}
trap cleanup EXIT

if [ -n "${KOBE_TEST_MONGODB_URI:-}" ]; then
  kind="KOBE_TEST_MONGODB_URI"
else
  find_mongodb "$(free_port)"
  kind=$KOBE_MONGO_KIND
  export KOBE_TEST_MONGODB_URI=$KOBE_MONGO_URI
fi
log "MongoDB for tests: $kind at $(redact "$KOBE_TEST_MONGODB_URI")"

status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@" || status=$?
else
  cargo test --no-fail-fast "$@" || status=$?
fi
if [ "${KOBE_CONTRACT:-1}" != 0 ]; then
  log "contract test (scripts/contract.sh)"
  bash scripts/contract.sh || status=1
fi
exit "$status"
