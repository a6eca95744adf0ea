"""scripts/stack.sh (reqdedup.stack): the compose topology as local processes. Checked here
without starting anything: it names the compose file's services and gives each the same
environment variables, its secrets are generated into a private file, its settings are
checked, and `down` stops exactly the processes `up` recorded."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reqdedup.config import get_settings
from reqdedup.errors import InputError
from reqdedup import stack

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def st(tmp_path, monkeypatch):
    monkeypatch.setenv("REQDEDUP_STACK_DIR", str(tmp_path / "stack"))
    for k in list(os.environ):
        if k.startswith("AIRFLOW__"):
            monkeypatch.delenv(k)
    return stack.stack_settings(get_settings())


def _compose():
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def _compose_env_names(service: dict) -> set[str]:
    names = set(service.get("environment") or {})
    if service.get("env_file") == ".env":
        names |= set(re.findall(r"^(\w+)=", (REPO / ".env.example").read_text(), re.M))
    return names


def test_the_stack_starts_the_compose_services():
    assert set(stack.SERVICES) == set(_compose()["services"])
    names = stack.process_names(stack.StackSettings(dir=Path("/x")))
    # every long-running compose service is a process (spark-worker: one per worker)
    kinds = {re.sub(r"-\d+$", "", n) for n in names}
    assert kinds == set(stack.SERVICES) - {"airflow-init"}
    assert len([n for n in names if n.startswith("spark-worker-")]) == 2


def test_each_service_gets_the_variables_of_its_compose_service(st):
    settings = get_settings()
    secret = stack.ensure_secrets(st)
    for name, service in _compose()["services"].items():
        ours = set(stack.service_env(name, st, settings, secret)) - stack.LAUNCHER_ONLY
        assert ours == _compose_env_names(service), (name, sorted(ours ^ _compose_env_names(service)))
    # and the same values where they are not addresses or folders
    compose_env = _compose()["x-reqdedup-env"]
    ours = stack.reqdedup_env(st, settings)
    for key in ("REQDEDUP_CATALOG_NAME", "REQDEDUP_NAMESPACE", "REQDEDUP_BUCKETS", "REQDEDUP_READ_SOURCE",
                "REQDEDUP_MLFLOW_EXPERIMENT", "REQDEDUP_REGISTERED_MODEL"):
        assert ours[key] == str(compose_env[key]), key
    assert ours["REQDEDUP_SPARK_MASTER"] == f"spark://127.0.0.1:{st.spark_master_port}"
    assert ours["REQDEDUP_MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{st.mlflow_port}"
    airflow = stack.service_env("airflow-scheduler", st, settings, secret)
    compose_af = _compose()["services"]["airflow-scheduler"]["environment"]
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__LOAD_EXAMPLES", "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"):
        assert airflow[key] == compose_af[key], key
    assert airflow["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    # the master's UI is not Airflow's port
    assert st.spark_master_ui_port != st.airflow_port


def test_secrets_are_generated_once_into_a_private_file(st, monkeypatch):
    first = stack.ensure_secrets(st)
    example = set(re.findall(r"^(\w+)=", (REPO / ".env.example").read_text(), re.M))
    assert set(first) == example == set(stack.SECRET_NAMES)
    assert stat.S_IMODE(st.secrets_file.stat().st_mode) == 0o600
    assert len(first["POSTGRES_PASSWORD"]) >= 24 and first["POSTGRES_PASSWORD"] in first["MLFLOW_BACKEND_STORE_URI"]
    assert first["POSTGRES_PASSWORD"] not in (REPO / "src/reqdedup/stack.py").read_text()
    # a second `up` keeps them; a new port moves the URIs, not the password
    monkeypatch.setenv("REQDEDUP_STACK_POSTGRES_PORT", "25432")
    again = stack.ensure_secrets(stack.stack_settings(get_settings()))
    assert again["POSTGRES_PASSWORD"] == first["POSTGRES_PASSWORD"]
    assert ":25432/iceberg" in again["REQDEDUP_CATALOG_SERVER_URI"]
    assert "127.0.0.1:25432/iceberg?" in again["REQDEDUP_CATALOG_SERVER_JDBC_URI"]
    env = stack.client_env(get_settings())
    assert env["REQDEDUP_CATALOG_SERVER_URI"] == again["REQDEDUP_CATALOG_SERVER_URI"]
    assert get_settings().home / "stack" != st.dir  # the dir setting is honoured


@pytest.mark.parametrize("var,value,message", [
    ("REQDEDUP_STACK_AIRFLOW_PORT", "8090", "collide"),
    ("REQDEDUP_STACK_MLFLOW_PORT", "five", "REQDEDUP_STACK_MLFLOW_PORT must be an integer"),
    ("REQDEDUP_STACK_POSTGRES_PORT", "70000", "postgres"),
    ("REQDEDUP_STACK_SPARK_WORKERS", "0", "SPARK_WORKERS"),
])
def test_bad_stack_settings_are_refused(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(InputError, match=message):
        stack.stack_settings(get_settings())


def test_client_env_needs_a_stack(st):
    with pytest.raises(InputError, match="stack.sh up"):
        stack.client_env(get_settings())


def test_status_of_a_stack_never_started(st):
    out = stack.status(get_settings())
    assert out["state"] == "down"
    assert all(s["state"] == "stopped" and s["pid"] is None for s in out["services"].values())


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)


def test_down_stops_exactly_the_recorded_processes(st):
    st.dir.mkdir(parents=True)
    recorded, other, recycled = _sleeper(), _sleeper(), _sleeper()
    try:
        pids = {
            "spark-master": {"pid": recorded.pid, "start": stack._proc_start_time(recorded.pid), "group": True},
            # a PID that was recorded once but now belongs to another process (start time differs)
            "mlflow": {"pid": recycled.pid, "start": stack._proc_start_time(recycled.pid) - 1, "group": True},
        }
        st.pids_file.write_text(json.dumps(pids))
        out = stack.down(get_settings())
        assert out["stopped"]["spark-master"]["stopped"] is True
        assert out["stopped"]["mlflow"]["stopped"] is False
        assert recorded.wait(timeout=30) is not None
        time.sleep(0.5)
        assert other.poll() is None and recycled.poll() is None, "down stopped a process it did not start"
        assert json.loads(st.pids_file.read_text()) == {}
    finally:
        for p in (recorded, other, recycled):
            p.kill()
            p.wait()


def test_stack_script_usage():
    r = subprocess.run(["bash", str(REPO / "scripts/stack.sh"), "sideways"], capture_output=True, text=True)
    assert r.returncode == 2 and "up|status|down|env" in r.stderr
    assert "stack:" in (REPO / "Makefile").read_text()


def test_supervisor_restarts_an_exited_process_until_stopped(tmp_path):
    """compose's `restart: unless-stopped`: Airflow's scheduler exits when Postgres goes away."""
    runs = tmp_path / "runs"
    child = f"import pathlib; p = pathlib.Path({str(runs)!r}); p.open('a').write('x'); raise SystemExit(3)"
    sup = subprocess.Popen([sys.executable, "-m", "reqdedup.stack", "supervise", "--", sys.executable, "-c", child],
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not runs.exists() or len(runs.read_text()) < 2):
            time.sleep(0.2)
        assert runs.exists() and len(runs.read_text()) >= 2, "the exited process was not started again"
        os.killpg(sup.pid, 15)
        assert sup.wait(timeout=30) is not None
        count = len(runs.read_text())
        time.sleep(2.5)
        assert len(runs.read_text()) == count, "started again after TERM"
        assert "exited with 3" in sup.stdout.read()
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, 9)
