#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the distributed-search tests and benchmarks.
#
#   eval "$(scripts/start_postgres.sh)"        # exports AUTOQUANT_TEST_POSTGRES_URL, AUTOQUANT_PG_DIR
#   ...
#   scripts/start_postgres.sh --stop "$AUTOQUANT_PG_DIR"
#
# Faults, for the outage tests (the data is kept):
#   scripts/start_postgres.sh --down "$AUTOQUANT_PG_DIR"     # stop the server (a restart's first half)
#   scripts/start_postgres.sh --up "$AUTOQUANT_PG_DIR"       # start it again, same port and data
#   scripts/start_postgres.sh --freeze "$AUTOQUANT_PG_DIR"   # SIGSTOP the server and its backends
#   scripts/start_postgres.sh --thaw "$AUTOQUANT_PG_DIR"     # SIGCONT them
#
# Installs Debian's `postgresql` package when no server binaries are found (needs root and
# apt-get), initialises a cluster in a new temporary folder (as the `postgres` user when run
# as root: initdb refuses root), listens on 127.0.0.1 only, on a free port, and creates a
# database and a user with a random password. Only the `export` lines go to stdout; progress
# goes to stderr.
set -euo pipefail

log() { echo "start_postgres: $*" >&2; }

as_owner() {  # run a server command as the cluster's owner
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then
    echo "$d"
  elif command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}

server_pids() {  # the postmaster of this cluster and its children (not other clusters)
  local pm
  pm="$(head -n 1 "$1/data/postmaster.pid")"
  echo "$pm" $(pgrep -P "$pm" || true)
}

case "${1:-}" in
  --stop | --down | --up | --freeze | --thaw)
    dir="${2:?usage: start_postgres.sh $1 DIR}"
    bindir="$(pg_bindir)"
    case "$1" in
      --stop)
        if [ -f "$dir/data/postmaster.pid" ]; then
          kill -CONT $(server_pids "$dir") 2>/dev/null || true  # a frozen server cannot stop
          as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
        fi
        rm -rf "$dir"
        ;;
      --down) as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 ;;
      --up)
        as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
          -o "$(cat "$dir/server.opts")" start >&2
        ;;
      --freeze) kill -STOP $(server_pids "$dir") ;;
      --thaw) kill -CONT $(server_pids "$dir") ;;
    esac
    exit 0
    ;;
esac

bindir="$(pg_bindir)"
if [ -z "$bindir" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "no PostgreSQL server found; install it (Debian: apt-get install postgresql) or run as root"
    exit 1
  fi
  log "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  bindir="$(pg_bindir)"
fi

dir="$(mktemp -d "${TMPDIR:-/tmp}/autoquant-pg.XXXXXX")"
chmod 755 "$dir"
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$dir"
fi

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
password="$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
db=autoquant
user=autoquant

# Local (unix-socket) connections trust the owner, for the set-up below; TCP needs the password.
as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth-local=trust \
  --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
# A test server: no fsync (a crash loses nothing that matters), sockets only in $dir. The
# options are kept for --up.
echo "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  >"$dir/server.opts"
as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "$(cat "$dir/server.opts")" start >&2 || { cat "$dir/server.log" >&2; exit 1; }

as_owner "$bindir/psql" -h "$dir" -p "$port" -U postgres -q -v ON_ERROR_STOP=1 -d postgres >&2 <<SQL
CREATE ROLE $user LOGIN PASSWORD '$password';
CREATE DATABASE $db OWNER $user;
SQL

log "PostgreSQL on 127.0.0.1:$port, data in $dir (stop: scripts/start_postgres.sh --stop $dir)"
echo "export AUTOQUANT_TEST_POSTGRES_URL='postgresql://$user:$password@127.0.0.1:$port/$db'"
echo "export AUTOQUANT_PG_DIR='$dir'"
