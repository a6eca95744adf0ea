"""The Iceberg catalog in Postgres (what docker-compose.yaml deploys), against a real server.

A throwaway PostgreSQL cluster (initdb + pg_ctl, 127.0.0.1 only, password auth) holds the
catalog; Spark's JDBC catalog and pyiceberg's SqlCatalog both use it through
REQDEDUP_CATALOG_SERVER_URI / REQDEDUP_CATALOG_SERVER_JDBC_URI, and no SQLite file appears.
Skipped where no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from reqdedup.errors import InputError


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    # Not under pytest's tmp folder: its parent is private to root, the server user could not enter it.
    root = Path(tempfile.mkdtemp(prefix="reqdedup-pg-"))
    # initdb refuses root; run the server as the 'postgres' system user where we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    password = secrets.token_urlsafe(16)
    (root / "pw").write_text(password + "\n")
    if as_user:
        shutil.chown(root, user="postgres")
        shutil.chown(root / "pw", user="postgres")
    port = _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(root / "data"), "-U", "reqdedup", "--auth=scram-sha-256",
                        f"--pwfile={root / 'pw'}"], check=True, capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
                        "-o", f"-h 127.0.0.1 -p {port} -k {root}"], check=True, capture_output=True)
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="reqdedup", password=password, dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE iceberg")
        con.close()
        yield {"port": port, "password": password}
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_half_a_server_catalog_is_refused(monkeypatch):
    from reqdedup.config import get_settings

    monkeypatch.setenv("REQDEDUP_CATALOG_SERVER_URI", "postgresql+psycopg2://u:p@127.0.0.1:1/iceberg")
    monkeypatch.delenv("REQDEDUP_CATALOG_SERVER_JDBC_URI", raising=False)
    with pytest.raises(InputError, match="both"):
        get_settings().catalog_uri
    assert "p@" not in repr(get_settings())  # credentials stay out of reprs and logs


_SCRIPT = r"""
import pyarrow as pa
from reqdedup.config import get_settings
from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.lake.catalog import get_catalog, load_table
from reqdedup.lake.ingest import ingest_date
from reqdedup.lake.spark import get_spark

settings = get_settings()
assert settings.catalog_on_server
day = "2026-03-01"
write_landing(GeneratorConfig(date=day, users=30, requests=60, candidates=8, history=12, items=300, seed=4),
              out_dir=settings.landing_dir)
staged = ingest_date(day, settings, publish=True)   # Spark writes, WAP branch, publish
rows = load_table("impressions", settings).scan(row_filter=f"event_date = '{day}'").to_arrow()
assert rows.num_rows == staged["rows"] == 480, (rows.num_rows, staged)
# Spark and pyiceberg commit in turn to one table of the Postgres catalog
spark = get_spark(settings)
name = settings.spark_table("shared_t")
spark.sql(f"CREATE TABLE {name} (a int) USING iceberg")
spark.sql(f"INSERT INTO {name} VALUES (1)")
get_catalog(settings).load_table(settings.table("shared_t")).append(pa.table({"a": pa.array([2], pa.int32())}))
spark.sql(f"INSERT INTO {name} VALUES (3)")
assert sorted(r.a for r in spark.sql(f"SELECT a FROM {name}").collect()) == [1, 2, 3]
assert not settings.catalog_db.exists(), "a SQLite catalog file was created"
print("POSTGRES-CATALOG-OK")
"""


@pytest.mark.slow
def test_ingest_publish_and_read_through_a_postgres_catalog(postgres, tmp_path):
    port, password = postgres["port"], postgres["password"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REQDEDUP_") or k == "REQDEDUP_JARS_DIR"}
    env.update({
        "REQDEDUP_HOME": str(tmp_path / "home"),
        "REQDEDUP_CATALOG_SERVER_URI": f"postgresql+psycopg2://reqdedup:{password}@127.0.0.1:{port}/iceberg",
        "REQDEDUP_CATALOG_SERVER_JDBC_URI": f"jdbc:postgresql://127.0.0.1:{port}/iceberg?user=reqdedup&password={password}",
    })
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "POSTGRES-CATALOG-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not Path(tmp_path / "home" / "catalog.db").exists()
