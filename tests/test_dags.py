"""The DAG files: they parse cleanly and lightly, and their params refuse bad input. (The
pipeline's end-to-end runs are in test_airflow_e2e.py and test_chaos.py, on one server.)"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
DAG_IDS = {"request_dedup_pipeline", "synthetic_request_logs", "feature_backfill", "lake_maintenance"}
PIPELINE_TASKS = ["check_params", "land_request_logs", "sorting_ingest", "data_quality", "publish", "feature_columns",
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
    assert outlets["publish"] == ["iceberg://reqdedup/lake/impressions"] and outlets["data_quality"] == []
    assert outlets["feature_columns"] == ["iceberg://reqdedup/lake/features"]
    assert outlets["register"] == ["mlflow://reqdedup/models/reqdedup"]
    # Training reads main only, so it must come after the data-quality gate.
    assert "data_quality" in dag.get_task("train_and_evaluate").get_flat_relative_ids(upstream=True)
    assert "train_and_evaluate" in dag.get_task("register").get_flat_relative_ids(upstream=True)


def _call_task(task, monkeypatch, *args):
    """Run a @task's function with run_stage recorded (it returns the given result)."""
    import types

    calls = []
    printed = {}

    def fake_run_stage(*cmd, name=None):
        calls.append([str(c) for c in cmd])
        return json.loads(json.dumps(printed))

    class Outlets(dict):
        def __missing__(self, key):
            self[key] = types.SimpleNamespace(extra=None)
            return self[key]

    context = {"params": {}, "outlet_events": Outlets()}
    fn = task.python_callable
    monkeypatch.setitem(fn.__globals__, "run_stage", fake_run_stage)
    monkeypatch.setitem(fn.__globals__, "get_current_context", lambda: context)
    return fn, calls, printed, context


def test_publish_task_publishes_the_snapshot_data_quality_audited(dagbag, monkeypatch):
    """publish gets the audited snapshot id from data_quality's return value (XCom) and passes
    it to `reqdedup publish --snapshot-id`; without one it fails, never publishes the branch head."""
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["request_dedup_pipeline"]
    task = dag.get_task("publish")
    assert [a.operator.task_id for a in task.op_args] == ["check_params", "data_quality"]
    fn, calls, printed, context = _call_task(task, monkeypatch)
    printed.update({"date": "2026-01-02", "published": True, "status": "published", "snapshot_id": 42})
    result = fn({"date": "2026-01-02"}, {"date": "2026-01-02", "snapshot_id": 42, "success": True})
    assert calls == [["publish", "--date", "2026-01-02", "--snapshot-id", "42"]]
    assert result["snapshot_id"] == 42
    assert [e.extra for e in context["outlet_events"].values()] == [{"date": "2026-01-02", "snapshot_id": 42}]
    with pytest.raises(AirflowFailException, match="no passed audit with a snapshot id"):
        fn({"date": "2026-01-02"}, {"date": "2026-01-02", "success": True})
    assert len(calls) == 1

    audit = dag.get_task("data_quality")
    fn, calls, printed, _ = _call_task(audit, monkeypatch)
    printed.update({"date": "2026-01-02", "snapshot_id": 42, "success": True, "expectations": [{"check": "x"}]})
    assert fn({"date": "2026-01-02"}, {"date": "2026-01-02", "snapshot_id": 42}) == \
        {"date": "2026-01-02", "snapshot_id": 42, "success": True}
    assert calls == [["validate", "--date", "2026-01-02", "--no-publish"]]


def test_lake_maintenance_shape_and_params(dagbag, monkeypatch):
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["lake_maintenance"]
    assert dag.timetable.expression == "0 12 * * 0"  # weekly, Sundays at noon (away from the daily runs)
    assert dag.catchup is False and dag.max_active_runs == 1 and "Lake maintenance" in dag.doc_md
    ids = [t.task_id for t in dag.topological_sort()]
    assert ids == ["drop_stale_branches", "rewrite_data_files", "expire_snapshots", "remove_orphan_files"]
    for t in dag.tasks:
        assert t.retries >= 1, t.task_id
    for conf, field in [({"orphan_older_than_days": 0.5}, "orphan_older_than_days"), ({"retain_last": 0}, "retain_last"),
                        ({"tables": ["Bad Name"]}, "tables"), ({"branch_max_age_days": -1}, "branch_max_age_days")]:
        params = copy.deepcopy(dag.params)
        with pytest.raises(ParamValidationError, match=field):
            params.update(conf)
    fn, calls, printed, context = _call_task(dag.get_task("expire_snapshots"), monkeypatch)
    context["params"] = {"tables": ["impressions"], "expire_older_than_days": 7, "retain_last": 5}
    printed.update({"expire": []})
    assert fn() == {"expire": []}
    assert calls == [["maintain", "expire", "--table", "impressions", "--older-than-days", "7", "--retain-last", "5"]]


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


# ---- end to end: through the session's one `airflow standalone` server --------------------------
# The pipeline's end-to-end runs (success, a failed data-quality gate, chaos) run on the
# shared server and prepared lake of tests/conftest.py: tests/test_airflow_e2e.py and
# tests/test_chaos.py. (They ran here under dag.test() with their own metadata DB and lake.)


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
