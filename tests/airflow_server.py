"""The slow Airflow tests' shared pieces: ONE `airflow standalone` server and ONE prepared
lake per test session (the session fixtures in tests/conftest.py use them), and the
pipeline's one unbroken run that the REST, browser, data-quality and chaos tests share.

Not a test module. The server runs in its own process group, AIRFLOW_HOME and port on
127.0.0.1, with the session's REQDEDUP_* settings; it is stopped at the end of the session
by TERM to its process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "request_dedup_pipeline"
USER, PASSWORD = "admin", "reqdedup-test"
TINY = {"users": 30, "requests": 60, "candidates": 8, "history": 12, "items": 400}
E2E_TRAIN_DAY, E2E_DATE = "2026-03-01", "2026-03-02"
# A tiny experiment matrix (2 configs x 1 seed, tiny model) for the pipeline's
# `experiment_config` param; the run sets its dates, seeds and tolerance.
TINY_MATRIX = """
name: tiny_pipeline
data: {train_start: "2026-01-01", train_end: "2026-01-01", eval_start: "2026-01-02", eval_end: "2026-01-02", batch_rows: 100}
model: {items: 400, seq_len: 12, d_model: 16, n_layers: 1, n_heads: 2, ff_dim: 32, emb_dim: 8,
        user_mlp: [16], item_mlp: [16], head_mlp: [16, 8]}
train: {epochs: 2, lr: 0.003}
dist: {nproc_per_node: 2, device: cpu}
seeds: [0]
configs: [iid, sorted_fixed]
eval: {k: 10, batch_requests: 64}
gate: {tolerance: 0.005, metrics: [auc, recall]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Standalone:
    """`airflow standalone` in its own process group, AIRFLOW_HOME and port."""

    def __init__(self, reqdedup_env: dict[str, str]):
        self.home = Path(tempfile.mkdtemp(prefix="reqdedup_standalone_"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.home / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ, **reqdedup_env,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # Only the runs the tests trigger: no scheduled runs of the daily DAGs.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__WORKERS": "1",
            # Task processes call the execution API; on a busy 2-core machine its default
            # 5 s timeout fails tasks before they start.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The chaos test's fault injection (dags/reqdedup_dag_common.py): off until the
            # test writes this file, and then only for runs whose id has its prefix.
            "REQDEDUP_CHAOS_KILL": str(self.home / "chaos.json"),
            "REQDEDUP_TASK_RETRY_DELAY_S": "2",
        }
        self.env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
        self.log_path = self.home / "standalone.log"
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None

    def start(self, timeout: float = 600) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"],
                                     env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
                if health.get("scheduler", {}).get("status") == "healthy":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        raise TimeoutError(f"airflow standalone not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)  # TERM to the parent alone would leave orphans
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # Children that outlive the parent by a moment: make sure the group is gone.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        os.killpg(pgid, signal.SIGKILL)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- REST API v2 ---------------------------------------------------------------------
    def login(self) -> str:
        import httpx

        r = httpx.post(f"{self.url}/auth/token", json={"username": USER, "password": PASSWORD}, timeout=30)
        r.raise_for_status()
        self.token = r.json()["access_token"]
        return self.token

    def api(self, method: str, path: str, attempts: int = 5, **kw):
        """One REST call; a busy api-server (2 cores shared with the tasks) may stall, so
        timeouts and 5xx answers are retried."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token or self.login()}", **kw.pop("headers", {})}
        for attempt in range(attempts):
            try:
                r = httpx.request(method, f"{self.url}/api/v2{path}", headers=headers, timeout=120, **kw)
                if r.status_code < 500 or attempt == attempts - 1:
                    return r
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
            time.sleep(5)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api("GET", f"/dags/{dag_id}").status_code == 200:
                return
            time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f} s:\n{self.log_tail()}")

    def trigger(self, dag_id: str, conf: dict):
        return self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json()
            if run.get("state") in ("success", "failed"):
                return run
            time.sleep(5)
        raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s")

    def task_states(self, dag_id: str, run_id: str) -> dict:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                     params={"full_content": "true"})
        return r.text


def start_server(reqdedup_env: dict[str, str]) -> Standalone:
    """The session's one server (conftest's ``standalone`` fixture); the caller stops it."""
    server = Standalone(reqdedup_env)
    t0 = time.monotonic()
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    server.started_in = time.monotonic() - t0
    return server


def cli_stage(env: dict, *args) -> dict:
    """`reqdedup ARGS... --result PATH` in a subprocess (no Spark JVM stays in the test
    process); returns its result."""
    from reqdedup.results import read_result

    path = Path(tempfile.mkdtemp(prefix="reqdedup_stage_")) / "result.json"
    out = subprocess.run([sys.executable, "-m", "reqdedup.cli", *map(str, args), "--result", str(path)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return read_result(path)


def prepare_lake(env: dict) -> dict:
    """The ONE prepared lake: the day before the unbroken run's date, landed and published to
    main (the pipeline trains on it)."""
    landed = cli_stage(env, "generate", "--date", E2E_TRAIN_DAY, *[f"--{k}={v}" for k, v in TINY.items()],
                       "--seed", "5")
    ingested = cli_stage(env, "ingest", "--date", E2E_TRAIN_DAY, "--publish")
    assert ingested["published"] and ingested["rows"] == landed["rows"], (landed, ingested)
    return {"date": E2E_TRAIN_DAY, "rows": landed["rows"], "snapshot_id": ingested["snapshot_id"]}


def pipeline_conf(server: Standalone, date: str, **extra) -> dict:
    matrix = server.home / "eval_tiny_pipeline.yaml"
    matrix.write_text(TINY_MATRIX)
    return {"date": date, **TINY, "data_seed": 5, "train_days": 1, "seeds": [0],
            "experiment_config": str(matrix), "gate_tolerance": 0.5, **extra}


def run_to_end(server: Standalone, conf: dict, run_id: str | None = None, timeout: float = 2400) -> tuple[str, dict, dict]:
    """Trigger the pipeline and wait for the run to end: (run_id, run, task states)."""
    server.wait_for_dag(DAG_ID)
    body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
    r = server.api("POST", f"/dags/{DAG_ID}/dagRuns", json=body)
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    run = server.wait_for_run(DAG_ID, run_id, timeout=timeout)
    return run_id, run, server.task_states(DAG_ID, run_id)


def require_success(server: Standalone, run_id: str, run: dict, states: dict) -> None:
    if run["state"] != "success":
        failed = [t for t, s in states.items() if s == "failed"]
        logs = "\n".join(server.task_log(DAG_ID, run_id, t)[-3000:] for t in failed)
        pytest.fail(f"run {run_id} {run['state']}: {states}\n{logs}")
