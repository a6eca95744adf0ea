"""Typed handoffs between the pipeline's tasks (issue 13 item 11).

Each CLI stage writes its result JSON to ``--result PATH`` (atomically); the DAG tasks run a
stage through ``reqdedup_dag_common.run_with_result`` / ``run_stage`` and return that file's
object as their XCom value, never a parse of stdout. ``register`` takes this run's summary
and evaluation id and refuses another evaluation's summary.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="reqdedup_airflow_"))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
sys.path.insert(0, str(REPO / "dags"))

import reqdedup_dag_common as common  # noqa: E402
from airflow.sdk.exceptions import AirflowFailException  # noqa: E402

from reqdedup.errors import InputError  # noqa: E402
from reqdedup.results import read_result, write_result  # noqa: E402


def fake_stage(tmp_path: Path, body: str) -> list[str]:
    """A stand-in for a `reqdedup` stage: a Python script; ``RESULT`` is its --result path."""
    script = tmp_path / "stage.py"
    script.write_text("import json, os, sys, time, subprocess\n"
                      "RESULT = sys.argv[sys.argv.index('--result') + 1]\n" + textwrap.dedent(body))
    return [sys.executable, str(script), "fake", "stage"]


# ---- write_result / read_result ----------------------------------------------------------
def test_write_result_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "deep" / "result.json"
    write_result(path, {"a": 1, "when": time})  # default=str: any value is written
    assert read_result(path)["a"] == 1
    with pytest.raises(TypeError):
        write_result(path, [1, 2])  # not an object: refused, the previous file stays whole
    assert read_result(path)["a"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


@pytest.mark.parametrize("content, check", [(None, "does not exist"), ("{not json", "not valid JSON"),
                                            ("[1, 2]", "not an object")])
def test_read_result_names_the_file_and_the_check(tmp_path, content, check):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=check) as e:
        read_result(path)
    assert str(path) in str(e.value)


# ---- the DAG's stage runner ------------------------------------------------------------
def test_run_with_result_returns_the_result_file_not_stdout(tmp_path):
    cmd = fake_stage(tmp_path, """
        print("{"); print('  "decoy": true'); print("}")
        json.dump({"real": 1, "nested": {"snapshot_id": 42}}, open(RESULT, "w"))
        print("{\\n  \\"last\\": \\"printed\\"\\n}")
    """)
    result = common.run_with_result(cmd, tmp_path / "out" / "try1.json")
    assert result == {"real": 1, "nested": {"snapshot_id": 42}}


def test_run_with_result_never_returns_a_stale_result(tmp_path):
    path = tmp_path / "try1.json"
    path.write_text(json.dumps({"stale": True}))
    cmd = fake_stage(tmp_path, "print('done, but no result written')\n")
    with pytest.raises(RuntimeError, match="wrote no result"):
        common.run_with_result(cmd, path)
    assert not path.exists()


def test_run_with_result_input_error_fails_without_retry_other_errors_retry(tmp_path):
    refused = fake_stage(tmp_path, "print('reqdedup ingest: error: landing/x.parquet: no rows', file=sys.stderr)\n"
                                   "sys.exit(2)\n")
    with pytest.raises(AirflowFailException, match="no rows"):
        common.run_with_result(refused, tmp_path / "a.json")
    crashed = fake_stage(tmp_path, "print('boom'); sys.exit(3)\n")
    with pytest.raises(RuntimeError, match="exited with 3"):
        common.run_with_result(crashed, tmp_path / "b.json")


def test_chaos_kill_sigkills_the_stage_and_its_children_mid_run(tmp_path):
    import psutil

    pids = tmp_path / "pids.json"
    cmd = fake_stage(tmp_path, f"""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        json.dump([os.getpid(), child.pid], open({str(pids)!r}, "w"))
        print("working", flush=True)
        time.sleep(90)
        json.dump({{"never": True}}, open(RESULT, "w"))
    """)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with -9"):
        # 6 s: the stage has started its child by then even on a busy 2-core machine.
        common.run_with_result(cmd, tmp_path / "r.json", kill_at=time.monotonic() + 6)
    assert time.monotonic() - t0 < 50
    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert not [pid for pid in json.loads(pids.read_text()) if alive(pid)]
    assert not (tmp_path / "r.json").exists()


def test_run_with_result_through_the_real_cli(tmp_path):
    """`reqdedup generate ... --result PATH`: the file holds the same object it prints."""
    result = common.run_with_result(
        [*common.reqdedup_cli(), "generate", "--date", "2026-05-01", "--users", "5", "--requests", "7",
         "--candidates", "3", "--history", "4", "--items", "100", "--out", str(tmp_path / "landing")],
        tmp_path / "r.json")
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(f).num_rows for f in Path(result["path"]).glob("*.parquet"))
    assert result["date"] == "2026-05-01" and result["rows"] == rows == 7 * 3


def _ti(**kw):
    base = dict(dag_id="request_dedup_pipeline", run_id="manual__2026-03-02T00:00:00+00:00",
                task_id="sorting_ingest", try_number=1, map_index=-1)
    return SimpleNamespace(**(base | kw))


def test_task_result_path_is_per_task_try(settings):
    first = common.task_result_path({"ti": _ti()})
    second = common.task_result_path({"ti": _ti(try_number=2)})
    named = common.task_result_path({"ti": _ti()}, name="publish")
    assert len({first, second, named}) == 3
    assert first.is_relative_to(settings.home) and ":" not in str(first.relative_to(settings.home))
    assert first.parent.name == "sorting_ingest" and first.name == "try1.json" and named.name == "try1.publish.json"


def test_chaos_deadline_only_for_the_listed_task_first_try_and_run_prefix(tmp_path, monkeypatch):
    monkeypatch.delenv(common.CHAOS_ENV, raising=False)
    assert common.chaos_deadline({"ti": _ti(run_id="chaos_1")}) is None
    spec = tmp_path / "chaos.json"
    monkeypatch.setenv(common.CHAOS_ENV, str(spec))
    assert common.chaos_deadline({"ti": _ti(run_id="chaos_1")}) is None  # no file: off
    spec.write_text(json.dumps({"run_id_prefix": "chaos", "kill_after_s": {"sorting_ingest": 5}}))
    now = time.monotonic()
    deadline = common.chaos_deadline({"ti": _ti(run_id="chaos_1")})
    assert deadline is not None and now + 4 < deadline < time.monotonic() + 6
    time.sleep(0.05)
    assert common.chaos_deadline({"ti": _ti(run_id="chaos_1")}) == deadline  # one deadline per try
    assert common.chaos_deadline({"ti": _ti(run_id="chaos_1", try_number=2)}) is None
    assert common.chaos_deadline({"ti": _ti(run_id="manual__x")}) is None
    assert common.chaos_deadline({"ti": _ti(run_id="chaos_1", task_id="register")}) is None


# ---- the CLI: --result on every stage, register's evaluation id --------------------------------
STAGES = [["generate", "--date", "2026-01-01"], ["import-interactions", "x.csv"], ["ingest", "--date", "2026-01-01"],
          ["publish", "--date", "2026-01-01"], ["validate", "--date", "2026-01-01"],
          ["features", "add", "item_ctr_7d", "--date", "2026-01-01"],
          ["features", "backfill", "item_ctr_7d", "--date", "2026-01-01", "--buckets", "1"],
          ["sample", "--date", "2026-01-01", "--rate", "0.5"], ["train", "--config", "c.yaml"],
          ["evaluate", "--config", "c.yaml"], ["register"], ["bench", "storage", "--json", "b.json"],
          ["maintain", "expire"]]


@pytest.mark.parametrize("argv", STAGES, ids=lambda a: " ".join(a[:2]))
def test_every_stage_takes_result(argv):
    from reqdedup.cli import build_parser

    assert build_parser().parse_args([*argv, "--result", "/tmp/r.json"]).result == "/tmp/r.json"


def _summary(tmp_path, evaluation_id: str) -> Path:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"evaluation_id": evaluation_id, "status": "failed", "error": "test"}))
    return path


def test_register_refuses_another_evaluations_summary(tmp_path, capsys):
    from reqdedup.cli import main

    path = _summary(tmp_path, "eval-of-another-run")
    assert main(["register", "--summary", str(path), "--evaluation-id", "eval-of-this-run",
                 "--result", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "eval-of-another-run" in err and "eval-of-this-run" in err and "--evaluation-id" in err
    assert not (tmp_path / "r.json").exists()
    # The matching id passes that check (and this failed evaluation is then refused for its status).
    assert main(["register", "--summary", str(path), "--evaluation-id", "eval-of-another-run"]) == 2
    err = capsys.readouterr().err
    assert "--evaluation-id" not in err and "status 'failed'" in err


# ---- the pipeline's tasks take what they need from their upstream return values -----------------
@pytest.fixture(scope="module")
def pipeline():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["request_dedup_pipeline"]


def call_task(pipeline, monkeypatch, task_id: str, results: list[dict], params: dict | None = None):
    """A task's function with run_stage recorded: each call returns the next of ``results``."""
    import types

    calls = []

    def fake_run_stage(*args, name=None):
        calls.append([str(a) for a in args])
        return results[len(calls) - 1]

    class Outlets(dict):
        def __missing__(self, key):
            self[key] = types.SimpleNamespace(extra=None)
            return self[key]

    context = {"params": params or {}, "outlet_events": Outlets()}
    fn = pipeline.get_task(task_id).python_callable
    monkeypatch.setitem(fn.__globals__, "run_stage", fake_run_stage)
    monkeypatch.setitem(fn.__globals__, "get_current_context", lambda: context)
    return fn, calls


RUN = {"date": "2026-01-02", "train_start": "2026-01-01", "train_end": "2026-01-01", "experiment_config": "c.yaml"}


def test_ingest_and_data_quality_use_the_staged_values(pipeline, monkeypatch):
    fn, calls = call_task(pipeline, monkeypatch, "sorting_ingest", [{"date": "2026-01-02", "snapshot_id": 7}])
    assert fn(RUN, {"date": "2026-01-02", "path": "/l"}) == {"date": "2026-01-02", "snapshot_id": 7}
    assert calls == [["ingest", "--date", "2026-01-02"]]
    with pytest.raises(AirflowFailException, match="land_request_logs returned date"):
        fn(RUN, {"date": "2026-01-03"})

    audit = {"date": "2026-01-02", "snapshot_id": 7, "success": True, "expectations": [{"check": "x"}]}
    fn, calls = call_task(pipeline, monkeypatch, "data_quality", [audit, audit])
    assert fn(RUN, {"date": "2026-01-02", "snapshot_id": 7}) == {"date": "2026-01-02", "snapshot_id": 7, "success": True}
    assert calls == [["validate", "--date", "2026-01-02", "--no-publish"]]
    with pytest.raises(AirflowFailException, match="staging branch moved"):
        fn(RUN, {"date": "2026-01-02", "snapshot_id": 8})


def test_publish_and_features_use_the_audited_and_published_values(pipeline, monkeypatch):
    fn, calls = call_task(pipeline, monkeypatch, "publish", [{"date": "2026-01-02", "published": True, "snapshot_id": 7}])
    assert fn(RUN, {"date": "2026-01-02", "snapshot_id": 7, "success": True})["snapshot_id"] == 7
    assert calls == [["publish", "--date", "2026-01-02", "--snapshot-id", "7"]]
    with pytest.raises(AirflowFailException, match="no passed audit"):
        fn(RUN, {"date": "2026-01-02", "success": True})
    assert len(calls) == 1

    added = [{"feature": "item_ctr_7d", "start": "2026-01-02", "end": "2026-01-02", "snapshot_id": 3}]
    fn, calls = call_task(pipeline, monkeypatch, "feature_columns", added, params={"features": ["item_ctr_7d"]})
    assert fn(RUN, {"date": "2026-01-02", "published": True}) == added
    assert calls == [["features", "add", "item_ctr_7d", "--date", "2026-01-02"]]
    with pytest.raises(AirflowFailException, match="did not publish"):
        fn(RUN, {"date": "2026-01-02", "published": False})


def test_evaluate_and_register_use_this_runs_evaluation(pipeline, monkeypatch):
    params = {"train": True, "seeds": None, "gate_tolerance": 0.5}
    evaluation = {"evaluation_id": "e1", "summary_path": "/r/evaluation/summary.json", "status": "succeeded"}
    fn, calls = call_task(pipeline, monkeypatch, "train_and_evaluate", [dict(evaluation)], params=params)
    features = [{"feature": "item_ctr_7d", "start": "2026-01-02", "end": "2026-01-02", "snapshot_id": 3}]
    assert fn(RUN, features) == evaluation | {"features": {"item_ctr_7d": 3}}
    assert calls[0][:3] == ["evaluate", "--config", "c.yaml"] and 'data.eval_start="2026-01-02"' in calls[0]
    with pytest.raises(AirflowFailException, match="did not add 2026-01-02"):
        fn(RUN, [{**features[0], "end": "2026-01-01"}])

    fn, calls = call_task(pipeline, monkeypatch, "register", [{"version": "1", "evaluation_id": "e1"}], params=params)
    assert fn(RUN, evaluation)["version"] == "1"
    assert calls == [["register", "--summary", "/r/evaluation/summary.json", "--evaluation-id", "e1",
                      "--tolerance", "0.5"]]
