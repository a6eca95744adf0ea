"""The DAG files: they parse cleanly and lightly, their params refuse bad input, and the
pipeline runs end to end under ``dag.test()`` at a tiny scale (slow)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
DAG_IDS = {"request_dedup_pipeline", "synthetic_request_logs", "feature_backfill"}
PIPELINE_TASKS = ["check_params", "land_request_logs", "sorting_ingest", "data_quality", "feature_columns",
                  "train_and_evaluate", "register", "storage_report"]
HEAVY = ("pyspark", "torch", "mlflow", "great_expectations", "pyiceberg", "pandas", "reqdedup.lake")

# Airflow reads its configuration when first imported: give this test process its own
# AIRFLOW_HOME (an SQLite metadata DB made by `airflow db migrate` for the slow test).
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="reqdedup_airflow_"))
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")

TINY = {"users": 30, "requests": 60, "candidates": 8, "history": 12, "items": 400}
@pytest.fixture(scope="module")
def tiny_matrix(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / "eval_dag_test.yaml"
    from test_airflow_e2e import TINY_MATRIX

    path.write_text(TINY_MATRIX)
    return str(path)

PARSE_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from airflow.sdk import Connection, Variable
from airflow.models.connection import Connection as ModelConnection
from airflow.models.variable import Variable as ModelVariable

calls = []
def refuse(kind):
    def f(*a, **k):
        calls.append(kind)
        raise RuntimeError(f"{kind} looked up at parse time")
    return staticmethod(f) if True else f
for cls in (Variable, ModelVariable):
    cls.get = refuse("Variable.get")
for cls in (Connection, ModelConnection):
    cls.get = refuse("Connection.get")
ModelConnection.get_connection_from_secrets = refuse("Connection.get_connection_from_secrets")
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted({m.split(".")[0] if not m.startswith("reqdedup.") else ".".join(m.split(".")[:2])
                for m in set(sys.modules) - before} & set(sys.argv[2].split(",")))
print("PROBE" + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                            "dags": sorted(bag.dags), "calls": calls, "heavy": heavy}))
"""


def test_dag_files_parse_without_errors_lookups_or_heavy_imports():
    """A fresh interpreter parses the dags folder the way the dag-processor does, with
    Variable/Connection lookups made to raise and a record of what got imported."""
    env = {**os.environ, "AIRFLOW_HOME": str(_AIRFLOW_HOME), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(DAGS), ",".join(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE")), None)
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    probe = json.loads(line[len("PROBE"):])
    assert probe["errors"] == {}
    assert set(probe["dags"]) == DAG_IDS
    assert probe["calls"] == []
    assert probe["heavy"] == [], f"heavy modules imported at parse time: {probe['heavy']}"


@pytest.fixture(scope="module")
def dagbag():
    sys.path.insert(0, str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag


def test_pipeline_shape(dagbag):
    dag = dagbag.dags["request_dedup_pipeline"]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.expression == "0 0 * * *"  # @daily
    assert "Request-level dedup pipeline" in dag.doc_md
    ids = [t.task_id for t in dag.topological_sort()]
    assert [i for i in ids if i in PIPELINE_TASKS] == PIPELINE_TASKS
    for t in dag.tasks:
        assert t.retries >= 1 and t.retry_exponential_backoff, t.task_id
        assert t.doc_md or t.doc or True  # task docstrings render as the task's doc
    outlets = {t.task_id: [a.uri for a in t.outlets] for t in dag.tasks}
    assert outlets["land_request_logs"] == ["reqdedup://landing/request_logs"]
    assert outlets["data_quality"] == ["iceberg://reqdedup/lake/impressions"]
    assert outlets["feature_columns"] == ["iceberg://reqdedup/lake/features"]
    assert outlets["register"] == ["mlflow://reqdedup/models/reqdedup"]
    # Training reads main only, so it must come after the data-quality gate.
    assert "data_quality" in dag.get_task("train_and_evaluate").get_flat_relative_ids(upstream=True)
    assert "train_and_evaluate" in dag.get_task("register").get_flat_relative_ids(upstream=True)


@pytest.mark.parametrize("conf, field", [
    ({"date": "2026-1-1"}, "date"),
    ({"date": "yesterday"}, "date"),
    ({"users": 0}, "users"),
    ({"candidates": 1}, "candidates"),
    ({"landing": "somewhere"}, "landing"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"gate_tolerance": 2.0}, "gate_tolerance"),
    ({"train_days": 0}, "train_days"),
    ({"features": ["Bad-Name"]}, "features"),
])
def test_pipeline_params_refuse_bad_input(dagbag, conf, field):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dagbag.dags["request_dedup_pipeline"].params)
    with pytest.raises(ParamValidationError, match=field):
        params.update(conf)


def test_pipeline_params_accept_good_input(dagbag):
    params = copy.deepcopy(dagbag.dags["request_dedup_pipeline"].params)
    params.update({"date": "2026-01-02", "seeds": [0, 1], **TINY})
    resolved = params.validate()
    assert resolved["date"] == "2026-01-02" and resolved["users"] == 30


def test_backfill_params_refuse_bad_input(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dagbag.dags["feature_backfill"].params)
    with pytest.raises(ParamValidationError, match="feature"):
        params.update({"feature": "Bad Name"})
    with pytest.raises(ParamValidationError, match="start"):
        params.update({"start": "01/02/2026"})


def test_check_date_names_the_problem():
    sys.path.insert(0, str(DAGS))
    from airflow.sdk.exceptions import AirflowFailException
    from reqdedup_dag_common import check_date, window

    assert check_date("2026-01-31", "x") == "2026-01-31"
    with pytest.raises(AirflowFailException, match="not a calendar date"):
        check_date("2026-02-30", "param 'date'")
    assert window("2026-01-02", 3) == ["2025-12-31", "2026-01-01", "2026-01-02"]


# ---- end to end under dag.test() ---------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_db():
    """A migrated SQLite metadata DB for dag.test() (once per module, ~10-30 s)."""
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   env={**os.environ}, capture_output=True, timeout=600)
    return os.environ["AIRFLOW_HOME"]


def _states(dagrun) -> dict:
    return {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
            for ti in dagrun.get_task_instances()}


def _run(dag, date: str, conf: dict):
    import datetime as dt

    day = dt.date.fromisoformat(date)
    t0 = time.monotonic()
    dagrun = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc),
                      run_conf={"date": date, **conf})
    return dagrun, _states(dagrun), time.monotonic() - t0


@pytest.mark.slow
def test_pipeline_runs_end_to_end_under_dag_test(dagbag, airflow_db, settings, tiny_matrix, capfd):
    """Day 1 lands, is ingested and published directly; the DAG then runs every stage for
    day 2 (train on day 1, evaluate on day 2) at a tiny scale."""
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.lake.ingest import ingest_date

    train_day, eval_day = "2026-02-01", "2026-02-02"
    write_landing(GeneratorConfig(date=train_day, seed=3, **TINY))
    ingest_date(train_day, publish=True)

    dag = dagbag.dags["request_dedup_pipeline"]
    conf = {**TINY, "data_seed": 3, "seeds": [0], "experiment_config": tiny_matrix,
            "train_days": 1, "gate_tolerance": 0.5}
    dagrun, states, seconds = _run(dag, eval_day, conf)
    out = capfd.readouterr()
    assert all(s == "success" for s in states.values()), f"{states}\n{(out.out + out.err)[-6000:]}"
    print(f"dag.test of the whole pipeline: {seconds:.0f} s")
    from reqdedup.lake.catalog import load_table

    rows = load_table("impressions", settings).scan(row_filter=f"event_date = '{eval_day}'").to_arrow()
    assert rows.num_rows > 0  # published to main by the data-quality gate
    assert (settings.reports_dir / "storage_bench.json").is_file()
    assert (settings.reports_dir / "evaluation" / "summary.json").is_file()
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    assert client.get_model_version_by_alias(settings.registered_model, "challenger").version


@pytest.mark.slow
def test_failed_data_quality_stops_the_run_before_training(dagbag, airflow_db, settings, tiny_matrix, capfd):
    """Landed logs that pass the landing checks but break an expectation (labels not 0/1):
    data_quality fails without retries, its log naming the expectation; nothing downstream runs,
    and the date never reaches main."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from reqdedup.data.generator import GeneratorConfig, write_landing

    bad_day = "2026-02-05"
    landed = write_landing(GeneratorConfig(date=bad_day, seed=4, **TINY))
    for f in Path(landed["path"]).glob("*.parquet"):
        t = pq.read_table(f)
        i = t.schema.get_field_index("label")
        labels = pc.add(t.column(i), pa.scalar(2, t.schema.field(i).type))  # 2 and 3: not 0/1
        pq.write_table(t.set_column(i, t.schema.field(i), labels), f)

    dag = dagbag.dags["request_dedup_pipeline"]
    conf = {**TINY, "landing": "existing", "experiment_config": tiny_matrix, "storage_report": False}
    dagrun, states, seconds = _run(dag, bad_day, conf)
    out = capfd.readouterr()
    logs = out.out + out.err
    print(f"dag.test with a bad landing date: {seconds:.0f} s")
    assert states["sorting_ingest"] == "success", states
    assert states["data_quality"] == "failed", states
    for downstream in ("feature_columns", "train_and_evaluate", "register", "storage_report"):
        assert states[downstream] == "upstream_failed", states
    assert "label_binary" in logs and "quarantined" in logs, logs[-6000:]
    from reqdedup.lake.catalog import load_table

    rows = load_table("impressions", settings).scan(row_filter=f"event_date = '{bad_day}'").to_arrow()
    assert rows.num_rows == 0  # quarantined on its staging branch


# ---- the report page plugin ------------------------------------------------------------------
def _plugin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reqdedup_reports", REPO / "plugins" / "reqdedup_reports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_page_renders_the_reports(tmp_path, monkeypatch):
    plugin = _plugin()
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "report.md").write_text(
        "# Evaluation\n\n| config | auc |\n| --- | --- |\n| iid | 0.71 |\n| sorted_fixed | 0.72 |\n")
    (tmp_path / "storage_bench.json").write_text(json.dumps(
        {"rows": 1000, "table_ratio": 12.5, "user_columns_ratio": 40.1,
         "per_column": {"history": {"iid": 100, "sorted": 2, "ratio": 50.0}}}))
    (tmp_path / "storage_bench.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    page = plugin.render_page(tmp_path)
    assert "<td>sorted_fixed</td><td>0.72</td>" in page
    assert "12.5x</b> smaller" in page and "<img src='files/storage_bench.png'" in page
    assert "<th>history</th>" not in page and "<td>history</td>" in page  # dict of dicts -> table rows
    assert page.index("Evaluation") < page.index("Storage: IID")

    from fastapi.testclient import TestClient

    monkeypatch.setattr(plugin, "reports_dir", lambda: tmp_path)
    app = plugin.ReqdedupReportsPlugin.fastapi_apps[0]["app"]
    from airflow.api_fastapi.core_api.security import get_user

    app.dependency_overrides[get_user] = lambda: None
    client = TestClient(app)
    assert "latest reports" in client.get("/").text
    assert client.get("/files/storage_bench.png").content.startswith(b"\x89PNG")
    assert client.get("/files/../../../etc/passwd").status_code == 404
    assert client.get("/files/%2e%2e/%2e%2e/etc/passwd").status_code == 404
    assert plugin.ReqdedupReportsPlugin.external_views[0]["url_route"] == "reqdedup-report"


def test_report_page_without_reports(tmp_path):
    assert "No reports yet" in _plugin().render_page(tmp_path / "missing")
