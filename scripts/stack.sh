#!/usr/bin/env bash
# The docker-compose.yaml topology started for real, without Docker, on 127.0.0.1:
#   scripts/stack.sh up       # PostgreSQL 15, Spark master + 2 workers, MLflow server, Airflow 3 services
#   scripts/stack.sh status   # JSON: state, PID, URL, health per service (exit 0 only when all are healthy)
#   scripts/stack.sh down     # stops exactly the processes `up` started
#   eval "$(scripts/stack.sh env)"   # this shell's reqdedup commands then use the stack
# Everything lives under $REQDEDUP_STACK_DIR (default $REQDEDUP_HOME/stack): the Postgres
# cluster, the data (compose's `warehouse` volume), secrets.env (generated, mode 600), pids.json
# and logs/. Ports and sizes: REQDEDUP_STACK_* (see src/reqdedup/stack.py, docs/scale-out.md).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export REQDEDUP_HOME="${REQDEDUP_HOME:-$ROOT/.reqdedup}"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "[stack] no .venv: run scripts/setup.sh (make setup) first" >&2; exit 1; }
if [ "${1:-}" = up ] && [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
  # PostgreSQL 15 from Debian's packages (the server binaries only; no cluster of its own is used)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[stack] installing postgresql-15 (Debian)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >&2
  else
    echo "[stack] PostgreSQL 15 server not found: apt-get install -y postgresql-15" >&2; exit 1
  fi
fi
exec "$PY" -m reqdedup.stack "$@"
