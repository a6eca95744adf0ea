# Source me: Airflow's environment for this project, derived from reqdedup's settings.
#   source scripts/airflow_env.sh && airflow standalone     # the UI on http://127.0.0.1:8080
# AIRFLOW_HOME is settings.airflow_home ($REQDEDUP_HOME/airflow by default); everything is
# bound to 127.0.0.1. The UI login is `admin` with the password in $AIRFLOW_HOME/passwords.json
# (generated once, or set REQDEDUP_AIRFLOW_PASSWORD before the first run).
_reqdedup_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_reqdedup_root/.venv/bin:$PATH"
export REQDEDUP_HOME="${REQDEDUP_HOME:-$_reqdedup_root/.reqdedup}"
eval "$("$_reqdedup_root/.venv/bin/python" - <<'EOF'
import shlex
from reqdedup.config import get_settings
s = get_settings()
s.ensure_dirs()
for k, v in s.as_env().items():
    print(f"export {k}={shlex.quote(v)}")
EOF
)"
export AIRFLOW_HOME="$REQDEDUP_AIRFLOW_HOME"
export AIRFLOW__CORE__DAGS_FOLDER="$_reqdedup_root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$_reqdedup_root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-2}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-True}"
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:${AIRFLOW__API__PORT}/execution/"
# Task processes call the execution API; its default 5 s timeout is short on a busy small machine.
export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$AIRFLOW_HOME/passwords.json"
if [ ! -s "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" ]; then
  (umask 077; "$_reqdedup_root/.venv/bin/python" -c '
import json, os, secrets, sys
pw = os.environ.get("REQDEDUP_AIRFLOW_PASSWORD") or secrets.token_urlsafe(12)
json.dump({"admin": pw}, open(sys.argv[1], "w"))' "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
fi
unset _reqdedup_root
