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
