#!/usr/bin/env bash
# The API's contract test: schemathesis (from PyPI, in a venv of its own) fuzzes a running
# `kobe serve` from the server's own /openapi.json and fails on any 5xx, and on any response
# whose status, content type, headers or body the document does not describe. Schema-violating
# requests must be refused with a 4xx, and schema-valid ones accepted: every constraint the server
# enforces is in the document. It runs with KOBE_API_TOKENS set (schemathesis sends the token)
# and a worker consuming.
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
  # Pinned: a newer release may generate differently, and CI should fail on Kobe, not on a tool.
  "$venv/bin/pip" install --quiet 'schemathesis==4.32.5' 'hypothesis==6.170.17'
fi

cargo build --quiet --bin kobe
port=$(free_port)
prefix=kobetest-contract
export MONGODB_URI=$KOBE_TEST_MONGODB_URI MONGODB_DB=kobetest_contract KOBE_AMQP_PREFIX=$prefix \
  KOBE_REDIS_PREFIX=$prefix KOBE_HTTP_ADDR=127.0.0.1:$port KOBE_LOG_LEVEL=warn
# With authentication on, as a deployment runs it, and a worker consuming beside the API.
token="contract-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
export KOBE_API_TOKENS=$token
target/debug/kobe --env-file /dev/null init-db >/dev/null
target/debug/kobe --env-file /dev/null serve &
serve=$!
target/debug/kobe --env-file /dev/null worker --concurrency 2 &
worker=$!
trap 'stop_mongodb; kill ${serve:-} ${worker:-} 2>/dev/null || true' EXIT
wait_port 127.0.0.1 "$port" 60 "kobe serve"
log "schemathesis $("$venv/bin/schemathesis" --version | awk '{print $NF}') against http://127.0.0.1:$port/openapi.json"
# One worker: with two threads, hypothesis's lambda-source cache once raised inside the generator
# (a FlakyFailure in schemathesis' coverage phase, no request sent).
# Every check runs (schemathesis enables all by default); scripts/schemathesis.toml says where one
# does not apply.
(cd "${TMPDIR:-/tmp}" && "$venv/bin/schemathesis" --config-file "$KOBE_ROOT/scripts/schemathesis.toml" run "http://127.0.0.1:$port/openapi.json" \
  -H "Authorization: Bearer $token" \
  --max-examples "${KOBE_CONTRACT_EXAMPLES:-100}" --workers 1 --no-color "$@")
