"""The quality study harness (reqdedup.evaluate.study): config checks, cells, one run in
process on a toy world, and (slow) the whole command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reqdedup.errors import InputError
from reqdedup.evaluate import study as S

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "study_tiny.yaml"


def test_shipped_study_configs_parse():
    for name in ("study_tiny", "study_cpu", "study_cpu_256", "study_gpu", "study_gpu_256", "study_ml100k",
                 "study_crossing_cpu"):
        cfg = S.load_study(ROOT / "configs" / f"{name}.yaml")
        assert cfg["sweeps"] and len(cfg["seeds"]) >= 2
    gpu = S.load_study(ROOT / "configs" / "study_gpu.yaml")
    assert len(gpu["seeds"]) >= 5 and {256, 1024, 64, 16} <= {r for sw in gpu["sweeps"] for r in sw["requests_per_step"]}


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key bogus"),
    ({"train": {"lrr": 1}}, "unknown key train.lrr"),
    ({"model": {"widht": 3}}, "unknown model key"),
    ({"sweeps": [{"variants": ["nope"]}]}, "unknown variant 'nope'"),
    ({"sweeps": [{"variants": ["fixed"], "orders": ["shuffle"]}]}, "order 'shuffle'"),
    ({"data": {"validation": ["2026-03-01", "2026-03-01"]}}, "train < validation < eval"),
    ({"sweeps": [{"variants": ["fixed"], "requests_per_step": [1]}]}, "requests_per_step 1"),
])
def test_bad_study_config_names_the_problem(change, message):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    for k, v in change.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    with pytest.raises(InputError, match=message):
        S.parse_study(raw, "t.yaml")


def test_cells_add_the_iid_baseline_per_requests_per_step_once():
    cfg = S.load_study(TINY)
    keys = [c["key"] for c in S.cells_of(cfg)]
    assert keys == ["iid|8|iid", "fixed|8|request_shuffle:all", "fixed_logq_mixed|8|request_shuffle:all",
                    "naive|8|table", "naive|8|request_shuffle:4"]
    assert S.parse_order("request_shuffle:all", "x") == ("request_shuffle", None)
    assert S.parse_order("request_shuffle:32", "x") == ("request_shuffle", 32)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = S.load_study(TINY)
    files = S.prepare_data(cfg, tmp_path_factory.mktemp("study"), lambda m: None)
    return cfg, S.Data(cfg, files, torch.device("cpu"))


def _task(variant, order, rows=600, points=2, **kw):
    return {"cell": S.cell_key(variant, 8, order), "variant": variant, "requests_per_step": 8, "order": order,
            "seed": 0, "phase": "sweep", "rows": rows, "curve_points": points, "curve_on": "eval", **kw}


def test_one_run_trains_its_row_budget_and_scores_every_eval_request(tiny_data):
    cfg, data = tiny_data
    r = S.run_one(cfg, data, _task("fixed_logq_mixed", "request_shuffle:all"), torch.device("cpu"))
    assert r["rows_seen"] >= 600 and r["rows_seen"] - 600 < r["batch_rows"]
    assert [p["rows"] for p in r["curve"]] == sorted(p["rows"] for p in r["curve"]) and len(r["curve"]) == 2
    arr = r["arrays"]
    assert arr.n_requests == data.eval.n_requests and set(arr.row_request.tolist()) == set(range(arr.n_requests))
    assert 0 < r["metrics"]["auc"] < 1 and r["users_per_device_batch"] <= 8 / cfg["train"]["devices"] + 1e-9
    # a seconds budget (compute-matched) stops on the training clock
    t = S.run_one(cfg, data, {**_task("iid", "iid", rows=None), "seconds": 0.3, "curve_points": 1}, torch.device("cpu"))
    assert t["train_seconds"] >= 0.3 and t["rows_seen"] > 0


def test_table_order_packs_fewer_users_than_a_shuffle(tiny_data):
    cfg, data = tiny_data
    table = S.run_one(cfg, data, _task("naive", "table", points=0), torch.device("cpu"))
    shuffled = S.run_one(cfg, data, _task("naive", "request_shuffle:all", points=0), torch.device("cpu"))
    iid = S.run_one(cfg, data, _task("iid", "iid", points=0), torch.device("cpu"))
    assert table["users_per_device_batch"] < shuffled["users_per_device_batch"] < iid["users_per_device_batch"]
    assert table["false_negative_rate"] > shuffled["false_negative_rate"] > iid["false_negative_rate"]


@pytest.mark.slow
def test_study_command_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "reqdedup.evaluate.study", "--config", str(TINY), "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--set", "train.threads=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "study.json").read_text())
    assert s["calibration"]["rows"] > 0 and len(s["calibration"]["curve"]) == 3
    sweep = [r for r in s["runs"] if r["phase"] == "sweep"]
    assert len(sweep) == 5 * 2 and len([r for r in s["runs"] if r["phase"] == "compute"]) == 2
    for cell in ("fixed|8|request_shuffle:all", "naive|8|table"):
        iv = s["intervals"][cell]["auc"]
        assert iv["n_seeds"] == 2 and iv["low"] <= iv["point"] <= iv["high"]
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| fixed / 8 / request_shuffle:all | 2 |" in md and "Compute-matched" in md


def _fake_study(folder: Path, name: str, model: dict, aucs: dict[int, float], rng) -> None:
    """A finished study's study.json and eval arrays for one cell: per seed, eval rows whose
    logits separate the labels so that the AUC is about ``aucs[seed]``."""
    import numpy as np

    from reqdedup.evaluate.metrics import EvalArrays

    cfg = S.load_study(TINY)
    cfg["model"] = {**cfg["model"], **model}
    cell = "fixed|8|request_shuffle:all"
    arrays_dir = folder / "arrays"
    n_req, per = 40, 5
    for seed, auc in aucs.items():
        labels = np.tile([1.0, 0, 0, 0, 0], n_req)
        noise = np.random.default_rng(seed).normal(size=labels.size)
        logits = labels * (2.0 * auc - 1.0) * 4 + noise
        S.save_arrays(arrays_dir, cell, seed, EvalArrays(
            labels=labels, logits=logits, row_request=np.repeat(np.arange(n_req), per),
            ranks=rng.integers(1, 100, n_req).astype(float), rank_request=np.arange(n_req), n_requests=n_req))
    runs = [{"phase": "sweep", "cell": cell, "seed": s} for s in aucs]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(json.dumps({"name": name, "config": {k: v for k, v in cfg.items() if k != "source"},
                                                   "runs": runs, "arrays_dir": str(arrays_dir)}))


def test_compare_two_studies_cell_by_cell(tmp_path):
    """`--compare`: the candidate study's cell against the same cell of the baseline study,
    paired by seed over the same eval requests; refused when more than the model differs."""
    import numpy as np

    from reqdedup.evaluate import metrics as M

    rng = np.random.default_rng(0)
    _fake_study(tmp_path / "two", "two_tower", {}, {0: 0.6, 1: 0.62, 2: 0.61}, rng)
    _fake_study(tmp_path / "cross", "crossing", {"ranking": "crossing"}, {0: 0.7, 1: 0.71, 2: 0.69}, rng)
    out = S.compare_studies(tmp_path / "two", tmp_path / "cross", tmp_path / "cmp")
    assert out["model_difference"] == {"ranking": [None, "crossing"]}
    [row] = out["cells"]
    assert row["cell"] == "fixed|8|request_shuffle:all" and row["seeds"] == [0, 1, 2]
    cell = row["cell"]
    base = [S.load_arrays(tmp_path / "two" / "arrays", cell, s) for s in (0, 1, 2)]
    cand = [S.load_arrays(tmp_path / "cross" / "arrays", cell, s) for s in (0, 1, 2)]
    auc = row["intervals"]["auc"]
    expect = np.mean([M.metric_value(a, "auc") for a in cand]) / np.mean([M.metric_value(a, "auc") for a in base]) - 1
    assert auc["point"] == pytest.approx(expect) and auc["low"] < auc["point"] < auc["high"]
    assert auc["low"] > 0  # the separable candidate is clearly ahead
    assert "crossing" in (tmp_path / "cmp" / "compare.md").read_text()
    # a study written before budget.select existed ran with its default, "last": comparable
    study = json.loads((tmp_path / "two" / "study.json").read_text())
    del study["config"]["budget"]["select"]
    (tmp_path / "two" / "study.json").write_text(json.dumps(study))
    assert S.compare_studies(tmp_path / "two", tmp_path / "cross", tmp_path / "cmp")["cells"]
    # ... but not against a study that selected by another rule
    study = json.loads((tmp_path / "cross" / "study.json").read_text())
    study["config"]["budget"]["select"] = "best_validation"
    (tmp_path / "cross" / "study.json").write_text(json.dumps(study))
    with pytest.raises(InputError, match="config.budget differs"):
        S.compare_studies(tmp_path / "two", tmp_path / "cross", tmp_path / "cmp")
    study["config"]["budget"]["select"] = "last"
    (tmp_path / "cross" / "study.json").write_text(json.dumps(study))
    # more than the model differs -> refused, naming the section
    study = json.loads((tmp_path / "cross" / "study.json").read_text())
    study["config"]["seeds"] = [0, 1, 2]
    (tmp_path / "cross" / "study.json").write_text(json.dumps(study))
    with pytest.raises(InputError, match="config.seeds differs"):
        S.compare_studies(tmp_path / "two", tmp_path / "cross", tmp_path / "cmp")


def test_early_stopping_scores_the_model_at_its_best_validation_point(tiny_data):
    """budget.select best_validation: the reported eval metrics are the model's at the curve
    point of its best validation AUC, not the model after the last step."""
    cfg, data = tiny_data
    r = S.run_one(cfg, data, _task("naive", "request_shuffle:all", rows=2400, points=6, select="best_validation"),
                  torch.device("cpu"))
    best = max(r["curve"], key=lambda p: p["validation_auc"])
    assert r["selected_rows"] == best["rows"]
    assert r["selected_rows"] < r["curve"][-1]["rows"]  # this seed's best is not the last point, so the check bites
    assert r["metrics"]["auc"] == pytest.approx(best["auc"], abs=1e-6)
    assert r["metrics"]["auc"] != pytest.approx(r["curve"][-1]["auc"], abs=1e-6)


def test_early_stopping_config_skips_the_calibration_run(tmp_path):
    cfg = S.load_study(TINY)
    cfg["budget"].update(select="best_validation", max_epochs=3)
    st = S.Study(cfg, tmp_path / "out", tmp_path / "work")
    st.data_info = {"train_rows": 1000, "train_requests": 50}
    assert st.calibrate() == 3000 and st.calibration["select"] == "best_validation"
    import yaml

    with pytest.raises(InputError, match="budget.select"):
        S.parse_study({**yaml.safe_load(TINY.read_text()), "budget": {"select": "best"}}, "t.yaml")


def test_across_studies_that_differ_in_one_setting(tmp_path):
    """`--across`: each variant's change against its own study's iid, per study, with the
    setting that differs named; refused across different data."""
    def study(folder: Path, devices: int, users: float, point: float) -> Path:
        cfg = S.load_study(TINY)
        cfg["train"]["devices"] = devices
        iv = {"point": point, "low": point - 0.01, "high": point + 0.01}
        runs = [{"phase": "sweep", "cell": c, "seed": s, "rows_seen": 1000, "selected_rows": 1000,
                 "users_per_device_batch": users, "false_negative_rate": 0.1}
                for c in ("naive|8|request_shuffle:all", "iid|8|iid") for s in (0, 1)]
        folder.mkdir(parents=True)
        (folder / "study.json").write_text(json.dumps({
            "name": folder.name, "config": {k: v for k, v in cfg.items() if k != "source"}, "runs": runs,
            "intervals": {"naive|8|request_shuffle:all": {"auc": iv, "recall@50": iv}}}))
        return folder

    dirs = [study(tmp_path / "dev2", 2, 20.0, -0.01), study(tmp_path / "dev8", 8, 5.0, -0.04)]
    result = S.across_studies(dirs)
    assert result["varied"] == ["train.devices"]
    assert [(r["setting"]["train.devices"], r["users_per_device_batch"], r["intervals"]["auc"]["point"])
            for r in result["rows"]] == [(2, 20.0, -0.01), (8, 5.0, -0.04)]
    paths = S.write_across(result, tmp_path / "out")
    md = (tmp_path / "out" / "across.md").read_text()
    assert "| dev8 | 8 | naive / 8 / request_shuffle:all | 1,000 | 5.0 | 0.100 | -4.00% [-5.00, -3.00] |" in md
    assert all(p.exists() for p in paths)
    with pytest.raises(InputError, match="at least two"):
        S.across_studies(dirs[:1])
    other = json.loads((dirs[1] / "study.json").read_text())
    other["config"]["seeds"] = [0]
    (dirs[1] / "study.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="config.seeds differs"):
        S.across_studies(dirs)
