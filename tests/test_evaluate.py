"""`reqdedup evaluate` and `reqdedup register` end to end on a tiny lake: a 2-config x 2-seed
matrix in one torchrun launch (2 gloo processes), MLflow parent run with nested runs, the
report, a rerun that reuses the checkpoints, registration through the gate (promote and
refuse paths), idempotent re-registration, an unreachable store, and a failed evaluation
that never registers. The config checks at the top need no lake."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from reqdedup.errors import InputError, ServiceUnavailableError
from reqdedup.evaluate.matrix import load_matrix, parse_matrix

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "eval_tiny.yaml"
DATES = ("2026-05-01", "2026-05-02")
DATA = dict(users=40, requests=80, candidates=10, history=24, items=500, seed=11)


def _raw():
    import yaml

    return yaml.safe_load(TINY.read_text())


# ---- config checks (fast) ----------------------------------------------------------------
def test_shipped_configs_parse():
    for name in ("eval_tiny.yaml", "eval_demo.yaml", "eval_matrix.yaml", "eval_gpu.yaml"):
        cfg = load_matrix(REPO / "configs" / name)
        assert cfg.configs[0] == "iid" and cfg.seeds
    full = load_matrix(REPO / "configs" / "eval_matrix.yaml")
    assert full.configs == ["iid", "sorted_naive", "sorted_syncbn", "sorted_masked", "sorted_fixed"]
    assert len(full.seeds) >= 3
    assert load_matrix(TINY, ["data.batch_rows=64", "data.sorted_order=block_shuffled"]).data.batch_rows == 64


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(configs=["iid", "sorted_magic"]), "unknown config 'sorted_magic'"),
    (lambda r: r.update(configs=["sorted_fixed"]), "baseline 'iid'"),
    (lambda r: r["data"].update(eval_start="2026-05-01"), "LATER"),
    (lambda r: r["data"].update(batch_size=3), "data.batch_size"),
    (lambda r: r["model"].update(d_modle=3), "model.d_modle"),
    (lambda r: r.update(seeds=[]), "seeds"),
    (lambda r: r.update(colour="red"), "colour"),
    (lambda r: r["train"].update(sync_bn=True), "train.sync_bn"),
    (lambda r: r["gate"].update(tolerance=2), "tolerance"),
    (lambda r: r["model"].update(n_heads=3), "model.n_heads"),
])
def test_bad_config_names_the_problem(change, message):
    raw = _raw()
    change(raw)
    with pytest.raises(InputError, match=message):
        parse_matrix(raw, "t.yaml")


# ---- end to end (slow) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake(settings, spark):
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.lake.ingest import ingest_date

    for day in DATES:
        write_landing(GeneratorConfig(date=day, **DATA), out_dir=settings.landing_dir)
        ingest_date(day, settings, publish=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_empty_eval_split_and_unreachable_store(settings, lake, tmp_path, monkeypatch):
    from reqdedup.evaluate.matrix import run_evaluation

    with pytest.raises(InputError, match="evaluation split 2026-05-09..2026-05-09 is empty"):
        run_evaluation(TINY, settings, overrides=["data.eval_start=2026-05-09", "data.eval_end=2026-05-09"],
                       report_dir=tmp_path / "r")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    bad = dataclasses.replace(settings, mlflow_tracking_uri=f"http://127.0.0.1:{_closed_port()}")
    # an unreachable store is transient (Airflow retries the task: exit 75), not bad input
    with pytest.raises(ServiceUnavailableError, match="is unavailable while opening experiment"):
        run_evaluation(TINY, bad, report_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_matrix_evaluate_register_gate(settings, lake, tmp_path, capsys, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from reqdedup.cli import main as cli_main
    from reqdedup.evaluate.matrix import report_dir_default, run_evaluation
    from reqdedup.evaluate.matrix_worker import FAIL_CONFIG_ENV
    from reqdedup.evaluate.report import PLOT_FNR, PLOT_METRICS, SUMMARY, TABLE

    summary = run_evaluation(TINY, settings)
    assert summary["status"] == "succeeded" and len(summary["runs"]) == 4
    out = report_dir_default(settings)
    for name in (TABLE, SUMMARY, f"plots/{PLOT_METRICS}", f"plots/{PLOT_FNR}"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    agg = summary["aggregate"]["configs"]
    for config in ("iid", "sorted_fixed"):
        for metric in ("auc", "log_loss", "recall@10", "ndcg@10", "false_negative_rate", "unique_users_per_batch",
                       "train_rows_per_s"):
            assert agg[config][metric]["n"] == 2, (config, metric)
    # intervals of the change vs iid, the gate's input, over both seeds
    iv = summary["aggregate"]["intervals"]["sorted_fixed"]["auc"]
    assert iv["n_seeds"] == 2 and iv["low"] <= iv["point"] <= iv["high"] and iv["se_requests"] > 0
    # request-level batches hold far fewer users than IID ones
    assert agg["sorted_fixed"]["unique_users_per_batch"]["mean"] < agg["iid"]["unique_users_per_batch"]["mean"]

    # MLflow: one parent run, a nested run per (config, seed) with the eval metrics
    client = MlflowClient(settings.mlflow_tracking_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["reqdedup.status"] == "succeeded"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in artifacts and "report/summary.json" in artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`reqdedup.stage` = 'evaluation_run'")
    assert sorted((c.data.tags["reqdedup.config"], c.data.tags["reqdedup.seed"]) for c in children) == \
        [("iid", "0"), ("iid", "1"), ("sorted_fixed", "0"), ("sorted_fixed", "1")]
    for c in children:
        assert {"eval.auc", "eval.recall_at_10", "eval.false_negative_rate", "loss"} <= set(c.data.metrics)

    assert cli_main(["report"]) == 0
    assert "| sorted_fixed |" in capsys.readouterr().out

    # rerun: same evaluation, same parent run, checkpoints reused, report replaced
    before = (out / SUMMARY).stat().st_mtime_ns
    again = run_evaluation(TINY, settings)
    assert again["evaluation_id"] == summary["evaluation_id"] and again["parent_run_id"] == summary["parent_run_id"]
    assert [r["metrics"]["auc"] for r in again["runs"]] == [r["metrics"]["auc"] for r in summary["runs"]]
    assert (out / SUMMARY).stat().st_mtime_ns != before
    assert len(client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4

    from reqdedup.registry.register import register

    # A model name of its own: other tests of the session (the Airflow ones) register too.
    name = "reqdedup_gate_test"
    monkeypatch.setenv("REQDEDUP_REGISTERED_MODEL", name)
    settings = dataclasses.replace(settings, registered_model=name)
    # promote path: no champion yet, and an interval that supports non-inferiority (2 tiny
    # seeds give an interval far too wide for any tolerance, so the test narrows it: the
    # gate's own tests cover the decision rule; this one covers the registry path)
    good = json.loads((out / SUMMARY).read_text())
    for m in ("auc", "recall@10"):
        good["aggregate"]["intervals"]["sorted_fixed"][m].update(point=0.0, low=-0.001, high=0.001)
    good_path = tmp_path / "good.json"
    good_path.write_text(json.dumps(good))
    first = register(settings, summary_path=good_path, tolerance=0.005)
    assert first["status"] == "registered" and first["promoted"], first
    assert set(first["aliases"]) == {"challenger", "champion"}
    v1 = first["version"]
    mv = client.get_model_version(name, v1)
    assert mv.tags["reqdedup.evaluation_id"] == summary["evaluation_id"]
    assert mv.tags["reqdedup.eval_set_id"] == summary["eval_set_id"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    # the registered model serves request-level input
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.metadata.signature is not None

    # the same evaluation again: no second version
    capsys.readouterr()
    assert cli_main(["register"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "already_registered"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # refuse path: another evaluation of the same eval set whose sorted_fixed is 10% under iid
    worse = json.loads((out / SUMMARY).read_text())
    worse["evaluation_id"] = "ev-worse-copy"
    for m in ("auc", "recall@10"):
        worse["aggregate"]["configs"]["sorted_fixed"][m]["mean"] = worse["aggregate"]["configs"]["iid"][m]["mean"] * 0.9
        worse["aggregate"]["intervals"]["sorted_fixed"][m].update(point=-0.1, low=-0.12, high=-0.08)
    worse_path = tmp_path / "worse.json"
    worse_path.write_text(json.dumps(worse))
    second = register(settings, summary_path=worse_path, tolerance=0.005)
    assert second["status"] == "registered" and not second["promoted"]
    assert second["aliases"] == ["challenger"] and second["champion_version"] == v1
    reg_run = client.get_run(second["register_run_id"])
    assert reg_run.data.tags["reqdedup.gate"] == "refused" and "not shown non-inferior" in reg_run.data.tags["reqdedup.gate.reason"]
    gate_txt = Path(client.download_artifacts(reg_run.info.run_id, "gate.txt", str(tmp_path)))
    assert "NOT promoted" in gate_txt.read_text()
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1

    # a failed evaluation never registers: its summary says failed and register refuses
    versions = len(client.search_model_versions(f"name = '{name}'"))
    with pytest.raises(RuntimeError, match="failed"):
        run_evaluation(TINY, settings, overrides=["seeds=[0, 1, 2]"], extra_env={FAIL_CONFIG_ENV: "sorted_fixed"})
    assert json.loads((out / SUMMARY).read_text())["status"] == "failed"
    with pytest.raises(InputError, match="never registers"):
        register(settings, tolerance=0.99)
    assert len(client.search_model_versions(f"name = '{name}'")) == versions
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


@pytest.mark.slow
def test_matrix_without_mlflow_on_landing_data(tmp_path):
    """What the GPU host runs: torch, numpy and pyarrow, no mlflow package, no catalog.

    `reqdedup evaluate --set mlflow.enabled=false` with REQDEDUP_READ_SOURCE=landing, in a
    process where importing mlflow fails, still trains and evaluates the matrix and writes
    the report; `register` refuses such an evaluation."""
    import os
    import subprocess
    import sys

    from reqdedup.config import get_settings
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.evaluate.report import SUMMARY, TABLE
    from reqdedup.registry.register import register

    home = tmp_path / "home"
    blocker = tmp_path / "block" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mlflow is blocked in this test')\n")
    env = {**os.environ, "REQDEDUP_HOME": str(home), "REQDEDUP_READ_SOURCE": "landing",
           "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO / "src")]), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("REQDEDUP_") and k.endswith(("_DIR", "_DB", "_URI"))]:
        env.pop(key)  # everything under the fresh home
    for day in DATES:
        write_landing(GeneratorConfig(date=day, **DATA), out_dir=home / "landing")
    proc = subprocess.run([sys.executable, "-m", "reqdedup.cli", "evaluate", "--config", str(TINY),
                           "--set", "mlflow.enabled=false"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow off" in proc.stdout
    report = home / "reports" / "evaluation"
    summary = json.loads((report / SUMMARY).read_text())
    assert summary["status"] == "succeeded" and summary["parent_run_id"] is None and len(summary["runs"]) == 4
    assert all(r["mlflow_run_id"] is None for r in summary["runs"])
    assert "| sorted_fixed |" in (report / TABLE).read_text()
    assert not (home / "mlflow.db").exists()
    with pytest.raises(InputError, match="mlflow.enabled false"):
        register(get_settings(), summary_path=report / SUMMARY, tolerance=0.99)
