"""The sizing model (reqdedup bench sizing): hand-checkable numbers on made-up measurements,
the plan follows the measurement files, the shipped config runs, bad input names the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reqdedup.bench.sizing import load_inputs, size
from reqdedup.errors import InputError

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = {"candidate_rows_per_day": 1_000_000, "candidates_per_request": 100, "history_items": 200, "seq_len": 200,
            "epochs": 2, "ingest_window_hours": 1, "training_window_hours": 1, "target_file_mb": 1,
            "max_buckets": 64, "history_cost_exponent": 1.0, "cpu_cores_per_host": 2, "gpus_per_host": 8}


def _write(tmp_path, ingest_rate=1000.0, train_rate=50_000.0, workload=None, drop=None):
    (tmp_path / "ingest.json").write_text(json.dumps({
        "rows": 1000, "bytes_landed_parquet": 1_000_000, "history_mean": 100, "spark_master": "local[2]",
        "ingest_sorted": {"rows_per_s": ingest_rate}, "bytes_sorted": 30_000, "user_columns_bytes_sorted": 20_000,
        "requests": 10, "candidates_per_request": 100}))
    (tmp_path / "reader.json").write_text(json.dumps({"loaders": {"all": {"requests_per_s": 100.0}},
                                                      "history_mean": 100, "candidates_per_request": 50}))
    (tmp_path / "train.json").write_text(json.dumps({"rows_per_s_dedup": train_rate, "seq_len": 100,
                                                     "candidates_per_request": 100, "device": "GPU-X"}))
    measured = {
        "ingest": {"file": str(tmp_path / "ingest.json"), "rows_per_s": "ingest_sorted.rows_per_s", "rows": "rows",
                   "landed_bytes": "bytes_landed_parquet", "history": "history_mean", "cores": "spark_master"},
        "table": {"file": str(tmp_path / "ingest.json"), "table_bytes": "bytes_sorted",
                  "user_bytes": "user_columns_bytes_sorted", "rows": "rows", "requests": "requests",
                  "history": "history_mean", "candidates": "candidates_per_request"},
        "reader": {"file": str(tmp_path / "reader.json"), "requests_per_s": "loaders.all.requests_per_s",
                   "history": "history_mean", "candidates": "candidates_per_request"},
        "training": {"file": str(tmp_path / "train.json"), "rows_per_s": "rows_per_s_dedup", "seq_len": "seq_len",
                     "candidates": "candidates_per_request"},
    }
    if drop:
        section, key = drop
        del measured[section][key]
    cfg = tmp_path / "sizing.yaml"
    cfg.write_text(yaml.safe_dump({"workload": workload or WORKLOAD, "measured": measured}))
    return cfg


def test_numbers_by_hand(tmp_path):
    plan = size(*load_inputs(_write(tmp_path)))
    # landed: 1000 B/row at history 100 -> 2000 B/row at 200; 1e6 rows -> 2e9 B a day.
    # ingest: 1000 rows/s on local[2] = 500 rows/s x 1000 B = 5e5 B/s per core; 1 h -> 2e9 / 1.8e9 -> 2 cores.
    assert plan["spark"]["landed_bytes_per_row"] == 2000
    assert plan["spark"]["executor_cores"] == 2
    # table: user block 2000 B/request at history 100 -> 4000 at 200, x 1e4 requests = 4e7;
    # items (30000 - 20000) / 1000 = 10 B/row x 1e6 = 1e7; 5e7 B a day.
    assert plan["table"]["user_block_bytes_per_request"] == 4000 and plan["table"]["item_bytes_per_row"] == 10
    day = 5e7
    assert plan["table"]["gib_per_day"] == round(day / 2**30, 1)
    # buckets: largest power of two <= 64 with >= 1 MiB a bucket: 5e7 / 2**20 = 47.7 -> 32; files: ceil(1.49) = 2
    assert plan["table"]["buckets"] == 32 and plan["table"]["files_per_bucket_per_day"] == 2
    # reader: 100 req/s x 50 rows = 5000 rows/s at (h 100, k 50) -> x (100/50) x (100/200) = 5000 rows/s
    # training: 50000 rows/s at (seq 100, k 100) -> x 1 x 0.5 = 25000 rows/s; the reader limits
    assert plan["gpus"]["reader_rows_per_s_per_gpu"] == 5000 and plan["gpus"]["train_rows_per_s_per_gpu"] == 25000
    # 2e6 rows (2 epochs) / 5000 rows/s = 400 s = 0.111 GPU-hours -> 1 GPU in a 1 h window
    assert plan["gpus"]["gpu_hours_per_day"] == round(2e6 / 5000 / 3600, 1) and plan["gpus"]["gpus_for_window"] == 1
    assert plan["stages"]["training"]["limited_by"].startswith("the request-level reader")
    # ingest: 2 cores = 1 host of 2 cores; training: 1 host -> a tie goes to ingest
    assert plan["first_bottleneck"].startswith("ingest")


def test_plan_follows_the_measurements(tmp_path):
    slow = size(*load_inputs(_write(tmp_path, ingest_rate=100.0)))
    fast = size(*load_inputs(_write(tmp_path, ingest_rate=10_000.0)))
    assert slow["spark"]["executor_cores"] == 12 and fast["spark"]["executor_cores"] == 1  # ceil(11.1), ceil(0.11)
    step_bound = size(*load_inputs(_write(tmp_path, train_rate=2_000.0)))
    assert step_bound["gpus"]["rows_per_s_per_gpu"] == 1000 and step_bound["stages"]["training"]["limited_by"] == "the GPU training step"


@pytest.mark.parametrize("change,message", [
    ({"drop": ("training", "seq_len")}, "measured.training needs the keys"),
    ({"workload": {**WORKLOAD, "epochs": 0}}, "workload.epochs"),
    ({"workload": {**WORKLOAD, "gpu_per_host": 8}}, "unknown"),
])
def test_bad_config_names_the_key(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        load_inputs(_write(tmp_path, **change))


def test_a_missing_key_in_a_measurement_names_the_file(tmp_path):
    cfg = _write(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"seq_len": 100, "candidates_per_request": 100}))
    with pytest.raises(InputError, match=r"train.json \(measured.training\): no key 'rows_per_s_dedup'"):
        load_inputs(cfg)


def test_shipped_config_through_the_cli(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "reqdedup.cli", "bench", "sizing", str(REPO / "configs/sizing.yaml"),
                        "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["workload"]["candidate_rows_per_day"] == 1e9 and plan["workload"]["candidates_per_request"] == 500
    train = json.loads((REPO / "bench/results/train_h200.json").read_text())
    assert plan["measured"]["training"]["rows_per_s"] == train["rows_per_s_dedup"]
    assert plan["spark"]["executor_cores"] >= 1 and plan["gpus"]["gpu_hours_per_day"] > 0
    assert "Spark executor-cores" in r.stdout and "First bottleneck" in r.stdout
