"""Shared pieces of the reqdedup DAGs: Assets, default args, and small task helpers.

Not a DAG file (listed in ``.airflowignore``); the DAG files import it. It stays light at
parse time: only ``airflow.sdk`` and the standard library are imported at module level,
and nothing here reads a Variable, a Connection or the metadata database. The project's
modules (Spark, pyiceberg, torch, MLflow) are imported inside task bodies only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset

log = logging.getLogger("airflow.task")

# ---- Assets: one per table the pipeline writes, the landing folder, the model ------------
LANDING = Asset(uri="reqdedup://landing/request_logs", name="reqdedup_landing_request_logs")
IMPRESSIONS = Asset(uri="iceberg://reqdedup/lake/impressions", name="reqdedup_impressions")
FEATURES = Asset(uri="iceberg://reqdedup/lake/features", name="reqdedup_feature_tables")
STORAGE_REPORT = Asset(uri="reqdedup://reports/storage_bench", name="reqdedup_storage_report")
MODEL = Asset(uri="mlflow://reqdedup/models/reqdedup", name="reqdedup_registered_model")

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"

DEFAULT_ARGS = {
    "owner": "reqdedup",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}

START_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def run_date(context) -> str:
    """The date a run works on: the ``date`` param if given, else the run's logical date (ds).

    Manually triggered Airflow 3 runs may have no logical date; then the day the run was
    triggered for (``run_after``) is used.
    """
    given = (context["params"] or {}).get("date")
    if given:
        return check_date(given, "param 'date'")
    if context.get("ds"):
        return context["ds"]
    run_after = context["dag_run"].run_after
    return run_after.date().isoformat()


def check_date(value: str, what: str) -> str:
    from airflow.sdk.exceptions import AirflowFailException

    if not isinstance(value, str) or not re.match(DATE_PATTERN, value):
        raise AirflowFailException(f"{what} = {value!r} is not a date of the form YYYY-MM-DD")
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise AirflowFailException(f"{what} = {value!r} is not a calendar date") from None
    return value


def window(date: str, days: int) -> list[str]:
    """The ``days`` dates ending at ``date`` (inclusive), oldest first."""
    end = dt.date.fromisoformat(date)
    return [(end - dt.timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]


@contextlib.contextmanager
def fail_fast_on_input_error():
    """Bad input (reqdedup's InputError: bad params, bad data, failed expectations) fails the
    task at once, without retries, with the error's own message; other errors are retried."""
    from airflow.sdk.exceptions import AirflowFailException

    from reqdedup.errors import InputError

    try:
        yield
    except InputError as e:
        message = str(e)
        for line in message.splitlines():
            log.error("%s", line)
        raise AirflowFailException(f"{type(e).__name__}: {message}") from e


def repo_path(path: str) -> Path:
    """A path from a param: absolute, or relative to the repository root."""
    from reqdedup.config import REPO_ROOT

    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)


def run_streaming(cmd: list[str], env: dict | None = None, cwd: str | Path | None = None) -> list[str]:
    """Run a command as a subprocess (not multiprocessing: spawn fails inside a task),
    streaming its output line by line into the task log. Returns the output lines."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    log.info("running: %s", " ".join(map(str, cmd)))
    lines: list[str] = []
    with subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, env=full_env, cwd=cwd) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            log.info("%s", line)
    if proc.returncode != 0:
        what = " ".join(map(str, cmd[2:4]))
        if proc.returncode == 2:  # the CLI's exit status for InputError: do not retry
            from airflow.sdk.exceptions import AirflowFailException

            # The CLI prints "reqdedup <command>: error: <message>" (possibly many lines).
            start = next((i for i in range(len(lines) - 1, -1, -1) if ": error: " in lines[i]), max(0, len(lines) - 20))
            raise AirflowFailException(f"{what} refused its input:\n" + "\n".join(lines[start:start + 60]))
        tail = "\n".join(lines[-20:])
        raise RuntimeError(f"`{what}` exited with {proc.returncode}:\n{tail}")
    return lines


def last_json(lines: list[str]) -> dict:
    """The last JSON object a `reqdedup` command printed (it prints one, indented)."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "{":
            with contextlib.suppress(json.JSONDecodeError):
                return json.JSONDecoder().raw_decode("\n".join(lines[i:]))[0]
    return {}


def reqdedup_cli() -> list[str]:
    return [sys.executable, "-m", "reqdedup.cli"]


def run_reqdedup(*args) -> list[str]:
    """`reqdedup ARGS...` as a subprocess with the settings' environment (run_streaming).

    A subprocess, not a call: no Spark JVM or torchrun outlives the command inside a task."""
    from reqdedup.config import get_settings

    return run_streaming([*reqdedup_cli(), *args], env=get_settings().as_env())
