# Shared helpers for Kobe's scripts: source it, do not run it.
# Each ensure_* function makes a service reachable on localhost, starting it if it is installed but
# down, and installing Debian's package first if it is missing.

KOBE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[kobe] %s\n' "$*" >&2; }
die() { printf '[kobe] error: %s\n' "$*" >&2; exit 1; }

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

docker_engine() { command -v docker >/dev/null && timeout 5 docker info >/dev/null 2>&1; }

standin_script() {
  echo "${KOBE_MONGO_STANDIN:-$KOBE_ROOT/../shared/tools/mongo-standin/run.sh}"
}

# start_mongodb PORT: starts a MongoDB (or, failing that, the wire-protocol stand-in) on PORT and
# prints its kind. The process is recorded in $KOBE_MONGO_PID for stop_mongodb.
KOBE_MONGO_PID=""
KOBE_MONGO_DIR=""
start_mongodb() {
  local port=$1
  if command -v mongod >/dev/null; then
    KOBE_MONGO_DIR=$(mktemp -d)
    mongod --bind_ip 127.0.0.1 --port "$port" --dbpath "$KOBE_MONGO_DIR" --quiet \
      >"$KOBE_MONGO_DIR/mongod.log" 2>&1 &
    KOBE_MONGO_PID=$!
    wait_port 127.0.0.1 "$port" 60 mongod
    echo "mongod ($(command -v mongod))"
    return 0
  fi
  local standin
  standin=$(standin_script)
  [ -x "$standin" ] || [ -f "$standin" ] || die "no MongoDB: no mongod on PATH, no Docker engine, and no stand-in at $standin (set KOBE_MONGO_STANDIN or KOBE_TEST_MONGODB_URI)"
  ensure_python_venv
  KOBE_MONGO_DIR=$(mktemp -d)
  bash "$standin" --host 127.0.0.1 --port "$port" >"$KOBE_MONGO_DIR/standin.log" 2>&1 &
  KOBE_MONGO_PID=$!
  # The first run installs the stand-in's venv, which takes a while.
  wait_port 127.0.0.1 "$port" 300 "MongoDB stand-in (log: $KOBE_MONGO_DIR/standin.log)"
  echo "wire-protocol stand-in ($standin) — not a real MongoDB"
}

stop_mongodb() {
  if [ -n "$KOBE_MONGO_PID" ]; then
    kill "$KOBE_MONGO_PID" 2>/dev/null || true
    wait "$KOBE_MONGO_PID" 2>/dev/null || true
  fi
  [ -z "$KOBE_MONGO_DIR" ] || rm -rf "$KOBE_MONGO_DIR"
}
