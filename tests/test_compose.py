"""docker-compose.yaml, checked structurally (no Docker engine runs on these machines):
services, healthchecks, the shared warehouse volume, the image built from the project's
requirements, secrets only from .env, and the same REQDEDUP_* names the code reads."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yaml"
SERVICES = {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "mlflow", "spark-master", "spark-worker"}
LONG_RUNNING = SERVICES - {"airflow-init"}
SECRET_WORDS = re.compile(r"(PASSWORD|SECRET|FERNET_KEY|SQL_ALCHEMY_CONN|BACKEND_STORE_URI|TOKEN)", re.I)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def settings_fields() -> set[str]:
    """Field names of reqdedup.config.Settings, read from the source (not imported)."""
    tree = ast.parse((REPO / "src/reqdedup/config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and n.target.id != "extra"}


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def test_services_present(compose):
    assert set(compose["services"]) == SERVICES


def test_every_long_running_service_has_a_healthcheck(compose):
    for name in LONG_RUNNING:
        hc = compose["services"][name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        assert {"interval", "timeout", "retries"} <= set(hc), name


def test_airflow_services_wait_for_init_and_postgres(compose):
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        deps = compose["services"][name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    init_cmd = " ".join(compose["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in init_cmd


def test_airflow_3_commands(compose):
    cmd = {n: " ".join(compose["services"][n]["command"]) for n in SERVICES - {"postgres", "mlflow", "airflow-init"}}
    assert cmd["airflow-apiserver"].startswith("airflow api-server")
    assert cmd["airflow-scheduler"] == "airflow scheduler"
    assert cmd["airflow-dag-processor"] == "airflow dag-processor"
    assert cmd["airflow-triggerer"] == "airflow triggerer"
    assert "deploy.master.Master" in cmd["spark-master"] and "deploy.worker.Worker" in cmd["spark-worker"]


def test_image_built_from_the_projects_requirements(compose):
    dockerfile = (REPO / "docker/Dockerfile").read_text()
    assert "requirements.lock" in dockerfile and "uv pip install --system -r requirements.lock" in dockerfile
    for name in SERVICES - {"postgres"}:
        build = compose["services"][name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile" and build["context"] == ".", name
        assert compose["services"][name]["image"] == "reqdedup:latest"
    # The COPY sources exist in the repository.
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is missing"


def test_shared_warehouse_volume(compose):
    assert "warehouse" in compose["volumes"]
    for name in SERVICES - {"postgres"}:
        volumes = compose["services"][name]["volumes"]
        assert "warehouse:/warehouse" in volumes, name


def test_secrets_only_from_env_file(compose):
    text = COMPOSE.read_text()
    # No literal secret values: any secret-looking key is only referenced, never assigned.
    for service_name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if key.endswith("_FILE"):  # a path to a file holding secrets, not a secret
                continue
            assert not SECRET_WORDS.search(key), f"{service_name}: secret {key} set in the compose file"
    assert "CHANGE_ME" not in text
    for name in ("postgres", "mlflow", *[s for s in SERVICES if s.startswith("airflow")]):
        assert compose["services"][name]["env_file"] == ".env", name
    example = (REPO / ".env.example").read_text()
    for needed in ("POSTGRES_PASSWORD", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__FERNET_KEY",
                   "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD", "MLFLOW_BACKEND_STORE_URI"):
        assert re.search(rf"^{needed}=", example, re.M), needed
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO).returncode == 0
    assert ignored, ".env must be git-ignored"


def test_ports_bound_to_localhost(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_reqdedup_settings_names_match_the_code(compose):
    fields = settings_fields()
    seen = set()
    for name, service in compose["services"].items():
        for key in env_of(service):
            if key.startswith("REQDEDUP_"):
                field = key.removeprefix("REQDEDUP_").lower()
                assert field in fields, f"{name}: {key} is not a setting of reqdedup.config.Settings"
                seen.add(field)
    # The deployment sets every location and service address explicitly: in the compose
    # file, or (the catalog's URIs, which hold a password) in the env file.
    example = (REPO / ".env.example").read_text()
    from_env_file = {m.lower() for m in re.findall(r"^REQDEDUP_(\w+)=", example, re.M)}
    unused = {"catalog_db"}  # the SQLite catalog file: the catalog is in Postgres here
    assert fields <= seen | from_env_file | unused, f"settings not set: {sorted(fields - seen - from_env_file - unused)}"
    assert not seen & from_env_file, "a setting in both the compose file and .env"
    uri = re.search(r"^REQDEDUP_CATALOG_SERVER_URI=(.*)$", example, re.M).group(1)
    jdbc = re.search(r"^REQDEDUP_CATALOG_SERVER_JDBC_URI=(.*)$", example, re.M).group(1)
    assert uri.startswith("postgresql+psycopg2://") and uri.endswith("@postgres:5432/iceberg"), uri
    assert jdbc.startswith("jdbc:postgresql://postgres:5432/iceberg?"), jdbc
    assert "CREATE DATABASE iceberg;" in compose["configs"]["postgres-init"]["content"]
    env = env_of(compose["services"]["airflow-scheduler"])
    assert env["REQDEDUP_SPARK_MASTER"] == "spark://spark-master:7077"
    assert env["REQDEDUP_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["REQDEDUP_WAREHOUSE_DIR"].startswith("/warehouse/")
    # Tasks (and so Spark drivers) run in the scheduler container: executors connect back to it.
    assert env["REQDEDUP_SPARK_DRIVER_HOST"] == "airflow-scheduler"
    assert env["REQDEDUP_SPARK_DRIVER_BIND_ADDRESS"] == "0.0.0.0"
    assert env_of(compose["services"]["airflow-apiserver"])["REQDEDUP_SPARK_DRIVER_HOST"] == "127.0.0.1"


def test_execution_api_points_at_the_api_server(compose):
    env = env_of(compose["services"]["airflow-scheduler"])
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
