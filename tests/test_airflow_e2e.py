"""`airflow standalone` on 127.0.0.1: trigger the pipeline through REST API v2 with params,
wait for success; a trigger with invalid params is refused by the params schema.

The server is shared with tests/test_browser.py (one start per test session, stopped at the
end of the session by TERM to its process group).
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


_SERVER: dict[str, Standalone] = {}
_RUNS: dict[str, str] = {}


def shared_standalone(request) -> Standalone:
    """One server per test session, whichever module asks first; stopped at session end."""
    if "server" not in _SERVER:
        if "failed" in _SERVER:
            pytest.fail(f"airflow standalone did not start (see the first error): {_SERVER['failed']}")
        reqdedup_env = {k: v for k, v in os.environ.items() if k.startswith("REQDEDUP_")}
        server = Standalone(reqdedup_env)
        request.session.config.add_cleanup(server.stop)
        t0 = time.monotonic()
        try:
            server.start()
        except Exception as e:
            server.stop()
            _SERVER["failed"] = str(e)[:200]
            raise
        server.started_in = time.monotonic() - t0
        _SERVER["server"] = server
    return _SERVER["server"]


def prepare_training_day(server: Standalone) -> None:
    """The day before the run's date, landed and published to main (the pipeline trains on
    it). Through the CLI in subprocesses: no Spark JVM stays in the test process."""
    cli = [sys.executable, "-m", "reqdedup.cli"]
    scale = [f"--{k}={v}" for k, v in TINY.items()]
    for cmd in ([*cli, "generate", "--date", E2E_TRAIN_DAY, *scale, "--seed", "5"],
                [*cli, "ingest", "--date", E2E_TRAIN_DAY, "--publish"]):
        out = subprocess.run(cmd, env=server.env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def successful_run(server: Standalone) -> str:
    """Trigger the pipeline once per session with tiny params and wait for its success."""
    if "run_id" in _RUNS:
        return _RUNS["run_id"]
    if "triggered" not in _RUNS:
        prepare_training_day(server)
    matrix = server.home / "eval_tiny_pipeline.yaml"
    matrix.write_text(TINY_MATRIX)
    server.wait_for_dag(DAG_ID)
    conf = {"date": E2E_DATE, **TINY, "data_seed": 5, "train_days": 1, "seeds": [0],
            "experiment_config": str(matrix), "gate_tolerance": 0.5}
    if "triggered" not in _RUNS:  # once per session, even if a first wait failed
        r = server.trigger(DAG_ID, conf)
        assert r.status_code == 200, r.text
        _RUNS["triggered"] = r.json()["dag_run_id"]
    run_id = _RUNS["triggered"]
    run = server.wait_for_run(DAG_ID, run_id, timeout=2400)
    states = server.task_states(DAG_ID, run_id)
    if run["state"] != "success":
        failed = [t for t, s in states.items() if s == "failed"]
        logs = "\n".join(server.task_log(DAG_ID, run_id, t)[-3000:] for t in failed)
        pytest.fail(f"run {run_id} {run['state']}: {states}\n{logs}")
    _RUNS["run_id"] = run_id
    return run_id


@pytest.fixture(scope="session")
def standalone(request, test_home):
    return shared_standalone(request)


@pytest.mark.slow
def test_trigger_with_params_through_rest_api_v2(standalone):
    t0 = time.monotonic()
    run_id = successful_run(standalone)
    seconds = time.monotonic() - t0
    states = standalone.task_states(DAG_ID, run_id)
    assert all(s in ("success", "skipped") for s in states.values()), states
    run = standalone.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
    assert run["conf"]["date"] == E2E_DATE and run["conf"]["users"] == 30
    # The run worked on the date from its params, and the check task says so in its log.
    assert E2E_DATE in standalone.task_log(DAG_ID, run_id, "check_params")
    assert states["register"] == "success" and states["train_and_evaluate"] == "success", states
    print(f"standalone healthy in {standalone.started_in:.0f} s; prepare + run {run_id}: {seconds:.0f} s")


@pytest.mark.slow
def test_trigger_with_invalid_params_is_refused(standalone):
    standalone.wait_for_dag(DAG_ID)
    r = standalone.trigger(DAG_ID, {"date": "01/03/2026"})
    assert r.status_code == 400, r.text
    assert "date" in r.text and "does not match" in r.text
    r = standalone.trigger(DAG_ID, {"users": -5})
    assert r.status_code == 400 and "users" in r.text, r.text


@pytest.mark.slow
def test_report_page_is_served_to_logged_in_users_only(standalone):
    import httpx

    assert httpx.get(f"{standalone.url}/reqdedup-reports/", timeout=30).status_code == 401
    r = httpx.get(f"{standalone.url}/reqdedup-reports/", timeout=30,
                  headers={"Authorization": f"Bearer {standalone.login()}"})
    assert r.status_code == 200 and "reqdedup: latest reports" in r.text
    r = httpx.get(f"{standalone.url}/reqdedup-reports/files/%2e%2e/%2e%2e/etc/passwd", timeout=30,
                  headers={"Authorization": f"Bearer {standalone.token}"})
    assert r.status_code == 404
    plugins = standalone.api("GET", "/plugins").json()["plugins"]
    views = [v for p in plugins for v in p["external_views"]]
    assert any(v.get("url_route") == "reqdedup-report" for v in views), plugins
