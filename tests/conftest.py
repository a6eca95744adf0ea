"""Test-wide settings: every test session works under its own temporary REQDEDUP_HOME.

The Spark jars come from the set-up's cache (REQDEDUP_JARS_DIR, default the repo's
.reqdedup/jars), so no test downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def test_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("reqdedup_home")
    old = {k: os.environ.get(k) for k in ("REQDEDUP_HOME", "REQDEDUP_JARS_DIR", "REQDEDUP_SPARK_SHUFFLE_PARTITIONS")}
    default_jars = Path(os.environ.get("REQDEDUP_HOME", REPO / ".reqdedup")) / "jars"
    os.environ["REQDEDUP_JARS_DIR"] = os.environ.get("REQDEDUP_JARS_DIR", str(default_jars))
    os.environ["REQDEDUP_HOME"] = str(home)
    os.environ["REQDEDUP_SPARK_SHUFFLE_PARTITIONS"] = "4"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def settings(test_home):
    from reqdedup.config import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def spark(settings):
    from reqdedup.lake.spark import get_spark

    session = get_spark(settings, app_name="reqdedup-tests")
    yield session
    session.stop()


# ---- the slow Airflow tests: ONE standalone server, ONE prepared lake, ONE unbroken run ------
@pytest.fixture(scope="session")
def standalone(request, test_home):
    """`airflow standalone` on 127.0.0.1 with this session's REQDEDUP_* settings, started once
    for every slow Airflow test (REST, browser, data quality, chaos); stopped at session end."""
    from airflow_server import start_server

    server = start_server({k: v for k, v in os.environ.items() if k.startswith("REQDEDUP_")})
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def prepared_lake(standalone) -> dict:
    """The training day, landed and published to main once (airflow_server.prepare_lake)."""
    from airflow_server import prepare_lake

    return prepare_lake(standalone.env)


@pytest.fixture(scope="session")
def pipeline_run(standalone, prepared_lake) -> dict:
    """The pipeline's one unbroken run on the day after the prepared lake (tiny params)."""
    import time

    from airflow_server import E2E_DATE, pipeline_conf, require_success, run_to_end

    t0 = time.monotonic()
    run_id, run, states = run_to_end(standalone, pipeline_conf(standalone, E2E_DATE))
    require_success(standalone, run_id, run, states)
    return {"run_id": run_id, "date": E2E_DATE, "states": states, "seconds": time.monotonic() - t0}
