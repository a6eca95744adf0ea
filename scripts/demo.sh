#!/usr/bin/env bash
# `make demo` (after scripts/setup.sh): the whole request-level dedup pipeline through
# Airflow itself, on the embedded defaults (everything under $REQDEDUP_HOME, default .reqdedup/):
#   1. airflow db migrate (SQLite metadata DB under settings.airflow_home);
#   2. a few days of synthetic request logs at demo scale (the same generator the
#      synthetic_request_logs DAG runs);
#   3. `airflow dags test request_dedup_pipeline` for each training day (ingest, data
#      quality, features; `train` off), then for the evaluation day with every stage:
#      ingest -> data quality -> features -> train + evaluate (torchrun) -> register -> storage report;
#   4. a summary: compression, the evaluation table, the registered version and its aliases,
#      and where to look next.
# Idempotent: a rerun replaces the same dates, reuses finished training runs, and finds
# the evaluation already registered. Knobs (environment): DEMO_DATES (space-separated,
# the last one is evaluated), DEMO_USERS, DEMO_REQUESTS, DEMO_CANDIDATES, DEMO_HISTORY,
# DEMO_ITEMS, DEMO_CONFIG (experiment config), DEMO_SEEDS (JSON list).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
started=$(date +%s)
# shellcheck source=scripts/airflow_env.sh
source scripts/airflow_env.sh

DATES=(${DEMO_DATES:-2026-01-03 2026-01-04})
USERS=${DEMO_USERS:-500}
REQUESTS=${DEMO_REQUESTS:-2000}
CANDIDATES=${DEMO_CANDIDATES:-50}
HISTORY=${DEMO_HISTORY:-128}
ITEMS=${DEMO_ITEMS:-20000}
SEED=${DEMO_SEED:-0}
CONFIG=${DEMO_CONFIG:-configs/eval_demo.yaml}
SEEDS=${DEMO_SEEDS:-null}  # null: the experiment config's seeds
LOGS=$REQDEDUP_HOME/demo-logs
mkdir -p "$LOGS"
N=${#DATES[@]}
EVAL_DAY=${DATES[$((N - 1))]}
[ -f "$CONFIG" ] || { echo "[demo] experiment config $CONFIG not found (set DEMO_CONFIG)" >&2; exit 2; }

say() { printf '[demo %4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

say "REQDEDUP_HOME=$REQDEDUP_HOME  AIRFLOW_HOME=$AIRFLOW_HOME  logs: $LOGS"
say "airflow db migrate"
airflow db migrate >"$LOGS/db-migrate.log" 2>&1 || { tail -30 "$LOGS/db-migrate.log"; exit 1; }

for d in "${DATES[@]}"; do
  say "synthetic request logs for $d ($USERS users, $REQUESTS requests x $CANDIDATES candidates, history ~$HISTORY)"
  reqdedup generate --date "$d" --users "$USERS" --requests "$REQUESTS" --candidates "$CANDIDATES" \
    --history "$HISTORY" --items "$ITEMS" --seed "$SEED" >"$LOGS/generate-$d.json"
done

# One DAG run through Airflow (`airflow dags test`: scheduler-free, in one process),
# printing each task as it ends; fails the demo with the failed task's log lines.
dag_test() {
  local date=$1 conf=$2 log="$LOGS/pipeline-$1.log"
  say "airflow dags test request_dedup_pipeline $date  conf=$conf"
  set +e
  airflow dags test request_dedup_pipeline "$date" -c "$conf" >"$log" 2>&1 &
  local pid=$!
  local shown=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 3
    # Task ends so far (the log is structured: "[DAG TEST] end task task_id=...").
    local ends
    ends=$(grep -o 'end task task_id=[a-z_]*' "$log" | sed 's/end task task_id=//')
    local count
    count=$(printf '%s\n' "$ends" | grep -c . || true)
    if [ "$count" -gt "$shown" ]; then
      printf '%s\n' "$ends" | tail -n +$((shown + 1)) | while read -r t; do say "  task $t finished"; done
      shown=$count
    fi
  done
  wait "$pid"
  local rc=$?
  set -e
  if ! grep -q 'DagRun Finished:.*state=success' "$log"; then
    say "request_dedup_pipeline $date FAILED (exit $rc); the errors from $log:"
    grep -E '\[error|Traceback|Error:|failed' "$log" | grep -v '^\s*at ' | cut -c1-400 | tail -40
    exit 1
  fi
  grep -oE "Task instance in (failed|skipped|up_for_retry) state|Marking task as (SUCCESS|FAILED|SKIPPED)[^ ]*" "$log" \
    | sort | uniq -c | sed 's/^/           /' || true
  say "request_dedup_pipeline $date: success"
}

scale="\"users\": $USERS, \"requests\": $REQUESTS, \"candidates\": $CANDIDATES, \"history\": $HISTORY, \"items\": $ITEMS, \"data_seed\": $SEED"
for ((i = 0; i < N - 1; i++)); do
  d=${DATES[$i]}
  dag_test "$d" "{\"date\": \"$d\", \"landing\": \"existing\", \"train\": false, \"storage_report\": false, $scale}"
done
dag_test "$EVAL_DAY" "{\"date\": \"$EVAL_DAY\", \"landing\": \"existing\", \"train\": true, \"train_days\": $((N - 1)), \"experiment_config\": \"$CONFIG\", \"seeds\": $SEEDS, $scale}"

say "done in $(( $(date +%s) - started )) s"
python - <<'EOF'
import json
from pathlib import Path

from reqdedup.config import get_settings

s = get_settings()
print("\n================ reqdedup demo: summary ================")
bench = s.reports_dir / "storage_bench.json"
if bench.is_file():
    b = json.loads(bench.read_text())
    print(f"Storage ({b['rows']:,} rows, {b['candidates_per_request']} candidates/request), IID-shuffled -> request-sorted:")
    print(f"  whole table {b['bytes_iid']:,} -> {b['bytes_sorted']:,} bytes: {b['table_ratio']}x smaller")
    print(f"  user columns {b['user_columns_ratio']}x, item columns {b['item_columns_ratio']}x")
    print(f"  plot: {b.get('plot') or s.reports_dir / 'storage_bench.png'}")
else:
    print("Storage report: not written (storage_report task skipped?)")
ev = s.reports_dir / "evaluation"
table = None
try:
    from reqdedup.evaluate.report import show
    table = show(ev)
except Exception as e:  # the report module names what is missing
    table = f"(no evaluation table: {e})"
print("\nEvaluation (held-out day):")
print(table)
try:
    from mlflow import MlflowClient

    c = MlflowClient(s.mlflow_tracking_uri)
    versions = sorted(c.search_model_versions(f"name = '{s.registered_model}'"), key=lambda v: int(v.version))
    if versions:
        latest = versions[-1]
        aliases = {}
        for a in ("challenger", "champion"):  # search results carry no aliases: ask for each
            try:
                aliases[a] = c.get_model_version_by_alias(s.registered_model, a).version
            except Exception:  # no such alias yet
                pass
        print(f"\nRegistered model {s.registered_model!r}: latest version {latest.version}; "
              + ", ".join(f"@{a} -> v{v}" for a, v in aliases.items()))
        reason = latest.tags.get("reqdedup.gate.reason")
        if "champion" not in aliases and reason:
            print(f"  no champion: the gate refused v{latest.version}: {reason}")
        print(f"  load it: mlflow.pyfunc.load_model('models:/{s.registered_model}@challenger')")
    else:
        print(f"\nRegistered model {s.registered_model!r}: no version yet")
except Exception as e:
    print(f"\nRegistry: {e}")
pw = json.loads((s.airflow_home / "passwords.json").read_text()).get("admin")
print(f"""
Where to look next
  Airflow UI:  source scripts/airflow_env.sh && airflow standalone
               -> http://127.0.0.1:8080  login admin / {pw}
               (DAG request_dedup_pipeline: its runs; Browse -> Dedup report: this report)
  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {s.mlflow_tracking_uri} --host 127.0.0.1 --port 5000
               -> http://127.0.0.1:5000  (experiment {s.mlflow_experiment!r}, model {s.registered_model!r})
  Reports:     {s.reports_dir}
""")
EOF
