#!/usr/bin/env bash
# The API's contract test: schemathesis (from PyPI, in a venv of its own) fuzzes a running
# `kobe serve` from the server's own /openapi.json and fails on any 5xx, and on any response
# whose status, content type, headers or body the document does not describe. Schema-violating
# requests must be refused with a 4xx. (Schema-valid requests may still be refused: a task name
# or argument the schema cannot know is a documented 422.)
#
# Needs RabbitMQ, Redis and a MongoDB: scripts/test.sh runs it with what it found; alone it finds
# them the same way. Usage: scripts/contract.sh [extra schemathesis arguments]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KOBE_ROOT"
ensure_rabbitmq
ensure_redis
trap 'stop_mongodb; [ -z "${serve:-}" ] || kill "$serve" 2>/dev/null || true' EXIT
if [ -z "${KOBE_TEST_MONGODB_URI:-}" ]; then
  find_mongodb "$(free_port)"
  KOBE_TEST_MONGODB_URI=$KOBE_MONGO_URI
fi

ensure_python_venv
venv=${KOBE_CONTRACT_VENV:-$KOBE_ROOT/target/contract-venv}
if [ ! -x "$venv/bin/schemathesis" ]; then
  log "installing schemathesis from PyPI into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'schemathesis>=4,<5'
fi

cargo build --quiet --bin kobe
port=$(free_port)
prefix=kobetest-contract
export MONGODB_URI=$KOBE_TEST_MONGODB_URI MONGODB_DB=kobetest_contract KOBE_AMQP_PREFIX=$prefix \
  KOBE_REDIS_PREFIX=$prefix KOBE_HTTP_ADDR=127.0.0.1:$port KOBE_LOG_LEVEL=warn
target/debug/kobe --env-file /dev/null init-db >/dev/null
target/debug/kobe --env-file /dev/null serve &
serve=$!
wait_port 127.0.0.1 "$port" 60 "kobe serve"
log "schemathesis $("$venv/bin/schemathesis" --version | awk '{print $NF}') against http://127.0.0.1:$port/openapi.json"
(cd "${TMPDIR:-/tmp}" && "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "${KOBE_CONTRACT_EXAMPLES:-100}" --workers 2 --no-color "$@")
