#!/usr/bin/env bash
# Whole set-up from a fresh clone, idempotent: a second run is a no-op that takes seconds.
#  1. .venv with the pinned packages from requirements.lock (uv, cached under ~/.cache/uv,
#     so the multi-GB CUDA torch wheel that PyPI serves on Linux is downloaded once);
#  2. the project itself, editable;
#  3. the JVM jars Spark needs (Iceberg runtime, SQLite and Postgres JDBC drivers) from Maven Central at pinned
#     versions, fetched once into $REQDEDUP_JARS_DIR (default $REQDEDUP_HOME/jars);
#  4. headless Chromium (Debian's package) for tests/test_browser.py, where it is missing and
#     apt-get can install it (root, or password-less sudo); otherwise one line says why, and
#     the browser test skips with that reason (written to .venv/.reqdedup-chromium-missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version.split()[0]}"'

UV_VERSION=0.13.8
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.reqdedup-installed
# Bytecode compiled at install (uv does not by default): every `reqdedup` subprocess that the
# DAG, the tests and torchrun start would otherwise compile torch, pandas, mlflow or airflow
# from source where __pycache__ is not written (PYTHONDONTWRITEBYTECODE, read-only venvs):
# idle 2-core box, import torch 5.5 -> 3.4 s, mlflow 6.8 -> 2.6 s, airflow 5.8 -> 2.7 s.
# "bytecode" in the stamp makes an older venv go through this once.
want=$( (cat requirements.lock requirements-data.txt pyproject.toml; echo bytecode) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages into .venv (first run downloads ~4 GB, then cached)"
  .venv/bin/python -m pip install -q "uv==$UV_VERSION"
  .venv/bin/uv pip install --python .venv/bin/python -r requirements.lock
  .venv/bin/uv pip install --python .venv/bin/python --no-deps -r requirements-data.txt
  .venv/bin/uv pip install --python .venv/bin/python --no-deps -e .
  echo "[setup] compiling the packages' bytecode"
  # (a few packages ship files that are not Python 3, e.g. templates: their errors are not ours)
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages >/dev/null || true
  echo "$want" > "$stamp"
else
  echo "[setup] .venv up to date"
fi

# Jars: versions pinned here; Spark reads them from the same folder (reqdedup.config).
HOME_DIR=${REQDEDUP_HOME:-$ROOT/.reqdedup}
JARS_DIR=${REQDEDUP_JARS_DIR:-$HOME_DIR/jars}
mkdir -p "$JARS_DIR"
for coord in $(.venv/bin/python -c 'from reqdedup.config import SPARK_JARS; print(" ".join(SPARK_JARS))'); do
  IFS=: read -r group artifact version <<<"$coord"
  jar="$JARS_DIR/$artifact-$version.jar"
  if [ ! -s "$jar" ]; then
    echo "[setup] fetching $coord from Maven Central"
    command -v mvn >/dev/null || { echo "[setup] mvn not found: install Maven (apt-get install maven)" >&2; exit 1; }
    mvn -q -B dependency:copy -Dartifact="$coord" -DoutputDirectory="$JARS_DIR"
  fi
done
# Chromium for the browser test (Debian's package: a real browser, no driver download).
bash scripts/setup_chromium.sh .venv/.reqdedup-chromium-missing
echo "[setup] ready: .venv, jars in $JARS_DIR"
