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
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset

from reqdedup.contract import DATE_PATTERN, parse_date  # noqa: F401 (DATE_PATTERN: the DAG files' Params)

log = logging.getLogger("airflow.task")

# ---- Assets: one per table the pipeline writes, the landing folder, the model ------------
LANDING = Asset(uri="reqdedup://landing/request_logs", name="reqdedup_landing_request_logs")
IMPRESSIONS = Asset(uri="iceberg://reqdedup/lake/impressions", name="reqdedup_impressions")
FEATURES = Asset(uri="iceberg://reqdedup/lake/features", name="reqdedup_feature_tables")
STORAGE_REPORT = Asset(uri="reqdedup://reports/storage_bench", name="reqdedup_storage_report")
MODEL = Asset(uri="mlflow://reqdedup/models/reqdedup", name="reqdedup_registered_model")



# REQDEDUP_TASK_RETRY_DELAY_S: the first retry's delay (default 30 s; the chaos test shortens it).
DEFAULT_ARGS = {
    "owner": "reqdedup",
    "retries": 2,
    "retry_delay": timedelta(seconds=float(os.environ.get("REQDEDUP_TASK_RETRY_DELAY_S", "30"))),
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

    from reqdedup.errors import InputError

    if not isinstance(value, str):
        raise AirflowFailException(f"{what} = {value!r} is not a date of the form YYYY-MM-DD")
    try:
        parse_date(value, what)
    except InputError as e:
        raise AirflowFailException(str(e)) from None
    return value


def window(date: str, days: int) -> list[str]:
    """The ``days`` dates ending at ``date`` (inclusive), oldest first."""
    end = parse_date(date, "date")
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


def run_streaming(cmd: list[str], env: dict | None = None, cwd: str | Path | None = None,
                  kill_at: float | None = None) -> list[str]:
    """Run a command as a subprocess (not multiprocessing: spawn fails inside a task),
    streaming its output line by line into the task log. Returns the output lines.

    Exit status 2 (the CLI's InputError) fails the task without retries; any other failure
    raises RuntimeError, which Airflow retries. ``kill_at`` (a ``time.monotonic()`` deadline,
    the chaos hook: see :func:`chaos_deadline`) SIGKILLs the subprocess and its descendants
    if it is still running then."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    log.info("running: %s", " ".join(map(str, cmd)))
    lines: list[str] = []
    with subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, env=full_env, cwd=cwd) as proc:
        assert proc.stdout is not None
        killer = None
        if kill_at is not None:
            killer = threading.Thread(target=_chaos_kill, args=(proc, kill_at), daemon=True)
            killer.start()
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
        from reqdedup.errors import EX_TEMPFAIL, ServiceUnavailableError

        if proc.returncode == EX_TEMPFAIL:  # a service (MLflow) is down: an ordinary error, so Airflow retries
            raise ServiceUnavailableError(f"`{what}` could not reach a service (exit {EX_TEMPFAIL}); "
                                          f"the task is retried:\n{tail}")
        raise RuntimeError(f"`{what}` exited with {proc.returncode}:\n{tail}")
    return lines


def reqdedup_cli() -> list[str]:
    return [sys.executable, "-m", "reqdedup.cli"]


def run_with_result(cmd: list, result_path: str | Path, env: dict | None = None,
                    kill_at: float | None = None) -> dict:
    """Run a stage command with ``--result result_path`` appended; return the JSON object it
    wrote there (the typed handoff: nothing is parsed from stdout).

    A result file left by an earlier attempt is removed first, so a command that exits 0
    without writing one fails the task (RuntimeError, retried) instead of returning stale data."""
    from reqdedup.results import read_result

    path = Path(result_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    t0 = time.monotonic()
    run_streaming([*cmd, "--result", str(path)], env=env, kill_at=kill_at)
    log.info("stage `%s` finished in %.1f s", " ".join(map(str, cmd[2:4])), time.monotonic() - t0)
    if not path.is_file():
        raise RuntimeError(f"`{' '.join(map(str, cmd[2:4]))}` exited with 0 but wrote no result to {path}")
    return read_result(path)


def task_result_path(context, name: str | None = None) -> Path:
    """Per task try: ``<home>/task_results/<dag>/<run>/<task>[.<map>]/try<N>[.<name>].json``."""
    from reqdedup.config import get_settings

    ti = context["ti"]
    run_id = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(ti.run_id))
    task = ti.task_id + (f".{ti.map_index}" if getattr(ti, "map_index", -1) not in (-1, None) else "")
    return get_settings().home / "task_results" / ti.dag_id / run_id / task / \
        f"try{ti.try_number}{'.' + name if name else ''}.json"


def run_stage(*args, name: str | None = None) -> dict:
    """`reqdedup ARGS... --result <per-try path>` as a subprocess with the settings'
    environment; returns the stage's result dict (the task's XCom value).

    A subprocess, not a call: no Spark JVM or torchrun outlives the command inside a task.
    ``name`` tells apart several stages of one task (e.g. one per feature)."""
    from airflow.sdk import get_current_context

    from reqdedup.config import get_settings

    context = get_current_context()
    return run_with_result([*reqdedup_cli(), *args], task_result_path(context, name),
                           env=get_settings().as_env(), kill_at=chaos_deadline(context))


# ---- chaos hook (tests only) --------------------------------------------------------------
CHAOS_ENV = "REQDEDUP_CHAOS_KILL"
_CHAOS_DEADLINES: dict[tuple, float] = {}


def chaos_deadline(context) -> float | None:
    """Test-only fault injection. ``REQDEDUP_CHAOS_KILL`` names a JSON file
    ``{"run_id_prefix": "chaos", "kill_after_s": {"<task_id>": seconds, ...}}``; when it
    exists, the first try of each listed task of a run whose id starts with the prefix gets
    a deadline ``seconds`` after the task's first stage started, at which run_streaming
    SIGKILLs the stage's subprocess tree. Unset or missing file: no deadline (production)."""
    spec_path = os.environ.get(CHAOS_ENV)
    if not spec_path or not os.path.isfile(spec_path):
        return None
    ti = context["ti"]
    spec = json.loads(Path(spec_path).read_text())
    after = (spec.get("kill_after_s") or {}).get(ti.task_id)
    if after is None or ti.try_number != 1 or not str(ti.run_id).startswith(spec.get("run_id_prefix", "")):
        return None
    key = (ti.dag_id, ti.run_id, ti.task_id, ti.try_number)
    return _CHAOS_DEADLINES.setdefault(key, time.monotonic() + float(after))


def _chaos_kill(proc: subprocess.Popen, deadline: float) -> None:
    import psutil

    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        log.warning("chaos: this stage ended before the kill deadline (it carries over to the task's next stage)")
        return
    try:
        parent = psutil.Process(proc.pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    log.warning("chaos: SIGKILL to pid %s and %d descendants (%s)", proc.pid, len(victims) - 1, CHAOS_ENV)
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    # Descendants gone (or zombies awaiting their parent) before a retry. Not the stage itself:
    # psutil would reap our own child, and Popen's wait would then read exit status 0.
    psutil.wait_procs(victims[:-1], timeout=10)
