# Shared helpers for Kobe's scripts: source it, do not run it.
# Each ensure_* function makes a service reachable on localhost, starting it if it is installed but
# down, and installing Debian's package first if it is missing.

KOBE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[kobe] %s\n' "$*" >&2; }
die() { printf '[kobe] error: %s\n' "$*" >&2; exit 1; }
# redact URL: the URL with its password shown as ***.
redact() { printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }

# port_open HOST PORT: true when something accepts connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_port HOST PORT SECONDS NAME
wait_port() {
  local deadline=$((SECONDS + $3))
  until port_open "$1" "$2"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$4 did not open $1:$2 within $3 s"
    sleep 0.2
  done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get on this machine; install it by hand"
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq >&2
    apt_updated=1
  fi
  log "installing $* (apt-get)"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >&2
}

ensure_rabbitmq() {
  if port_open 127.0.0.1 5672; then return 0; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached >&2 || true
  wait_port 127.0.0.1 5672 90 RabbitMQ
}

ensure_redis() {
  if port_open 127.0.0.1 6379; then return 0; fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >&2
  wait_port 127.0.0.1 6379 30 Redis
}

# The stand-in needs python3 with venv (Debian splits venv into its own package).
ensure_python_venv() {
  command -v python3 >/dev/null || apt_install python3 python3-venv
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
}

# ensure_celery_venv: Celery 5 and Flower from PyPI, for the mixed-fleet tests, in a venv outside
# the clone (KOBE_CELERY_VENV, default ~/.cache/kobe/celery-venv) so clean clones share it.
ensure_celery_venv() {
  ensure_python_venv
  export KOBE_CELERY_VENV=${KOBE_CELERY_VENV:-$HOME/.cache/kobe/celery-venv}
  if ! "$KOBE_CELERY_VENV/bin/python" -c 'import celery, redis, flower' 2>/dev/null; then
    log "installing Celery 5 and Flower from PyPI into $KOBE_CELERY_VENV"
    python3 -m venv "$KOBE_CELERY_VENV"
    "$KOBE_CELERY_VENV/bin/pip" install --quiet 'celery[redis]>=5,<6' 'flower>=2,<3'
  fi
}

docker_engine() { command -v docker >/dev/null && timeout 5 docker info >/dev/null 2>&1; }

standin_script() {
  echo "${KOBE_MONGO_STANDIN:-$KOBE_ROOT/../shared/tools/mongo-standin/run.sh}"
}

documentdb_script() {
  echo "${KOBE_DOCUMENTDB:-$KOBE_ROOT/../shared/tools/documentdb/run.sh}"
}

# find_mongodb PORT: makes a MongoDB answer and sets KOBE_MONGO_URI and KOBE_MONGO_KIND. The first
# that is available wins: a private `mongod` from PATH (on PORT), Docker Compose's `mongodb`
# service, DocumentDB through $KOBE_DOCUMENTDB (a real MongoDB-compatible engine on PostgreSQL; it
# keeps running for the next run), the wire-protocol stand-in (on PORT; in memory, serialized).
# A process this starts is recorded for stop_mongodb.
KOBE_MONGO_PID=""
KOBE_MONGO_DIR=""
KOBE_MONGO_URI=""
KOBE_MONGO_KIND=""
find_mongodb() {
  local port=$1 documentdb
  if command -v mongod >/dev/null; then
    KOBE_MONGO_DIR=$(mktemp -d)
    mongod --bind_ip 127.0.0.1 --port "$port" --dbpath "$KOBE_MONGO_DIR" --quiet \
      >"$KOBE_MONGO_DIR/mongod.log" 2>&1 &
    KOBE_MONGO_PID=$!
    wait_port 127.0.0.1 "$port" 60 mongod
    KOBE_MONGO_URI="mongodb://127.0.0.1:$port"
    KOBE_MONGO_KIND="mongod ($(command -v mongod))"
    return 0
  fi
  if docker_engine; then
    (cd "$KOBE_ROOT" && docker compose up -d mongodb >&2)
    wait_port 127.0.0.1 27017 60 "MongoDB (Docker Compose)"
    KOBE_MONGO_URI="mongodb://127.0.0.1:27017"
    KOBE_MONGO_KIND="Docker Compose service mongodb"
    return 0
  fi
  documentdb=$(documentdb_script)
  if [ -f "$documentdb" ]; then
    # Its own ports and data directory: never the machine's PostgreSQL.
    if KOBE_MONGO_URI=$(bash "$documentdb" --port "${KOBE_DOCUMENTDB_PORT:-10260}" \
        --pg-port "${KOBE_DOCUMENTDB_PG_PORT:-9712}" --dir "${KOBE_DOCUMENTDB_DIR:-/var/tmp/kobe-documentdb}" \
        2>"${TMPDIR:-/tmp}/kobe-documentdb.log"); then
      KOBE_MONGO_KIND="DocumentDB ($documentdb; PostgreSQL + documentdb, a real engine)"
      return 0
    fi
    log "DocumentDB did not start (see ${TMPDIR:-/tmp}/kobe-documentdb.log); falling back to the stand-in"
  fi
  start_standin "$port"
}

# start_standin PORT: the wire-protocol stand-in alone (benchmarks compare it with DocumentDB).
start_standin() {
  local port=$1 standin
  standin=$(standin_script)
  [ -f "$standin" ] || die "no MongoDB: no mongod on PATH, no Docker engine, no DocumentDB, and no stand-in at $standin (set KOBE_TEST_MONGODB_URI, KOBE_DOCUMENTDB or KOBE_MONGO_STANDIN)"
  ensure_python_venv
  KOBE_MONGO_DIR=$(mktemp -d)
  bash "$standin" --host 127.0.0.1 --port "$port" >"$KOBE_MONGO_DIR/standin.log" 2>&1 &
  KOBE_MONGO_PID=$!
  wait_port 127.0.0.1 "$port" 300 "MongoDB stand-in (log: $KOBE_MONGO_DIR/standin.log)"
  KOBE_MONGO_URI="mongodb://127.0.0.1:$port"
  KOBE_MONGO_KIND="wire-protocol stand-in ($standin) - not a real MongoDB"
}

stop_mongodb() {
  if [ -n "$KOBE_MONGO_PID" ]; then
    kill "$KOBE_MONGO_PID" 2>/dev/null || true
    wait "$KOBE_MONGO_PID" 2>/dev/null || true
  fi
  [ -z "$KOBE_MONGO_DIR" ] || rm -rf "$KOBE_MONGO_DIR"
  KOBE_MONGO_PID=""
  KOBE_MONGO_DIR=""
}

# ensure_services: RabbitMQ and Redis on their usual ports, and a MongoDB whose URI it exports as
# MONGODB_URI (kept when already set).
ensure_services() {
  ensure_rabbitmq
  log "RabbitMQ answers on 127.0.0.1:5672"
  ensure_redis
  log "Redis answers on 127.0.0.1:6379"
  if [ -n "${MONGODB_URI:-}" ]; then
    log "MongoDB: MONGODB_URI ($(redact "$MONGODB_URI"))"
  elif port_open 127.0.0.1 27017; then
    export MONGODB_URI="mongodb://127.0.0.1:27017"
    log "MongoDB answers on 127.0.0.1:27017"
  else
    find_mongodb 27017
    export MONGODB_URI=$KOBE_MONGO_URI
    log "MongoDB: $KOBE_MONGO_KIND at $(redact "$MONGODB_URI")"
  fi
}
