"""`reqdedup bench loader` at a tiny size: it runs end to end and writes the fields the
data-path issue asks for (figures themselves come from the GPU host and bench/results/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FIELDS = ("device", "candidates_per_request", "seq_len", "requests_per_s_old", "requests_per_s_new",
          "peak_rss_gb_old", "peak_rss_gb_new", "train_rows_per_s_request_level", "train_rows_per_s_per_row",
          "model_only_rows_per_s_request_level", "data_wait_share")


def test_bench_loader_writes_its_json(tmp_path):
    out = tmp_path / "loader.json"
    cmd = [sys.executable, "-m", "reqdedup.bench.loader", "--source", "landing", "--home", str(tmp_path / "home"),
           "--requests", "300", "--candidates", "10", "--history", "24", "--items", "500", "--dates", "2",
           "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--ff-dim", "32", "--emb-dim", "8",
           "--batch-rows-per-row", "100", "--batch-rows-request-level", "200", "--per-row-buckets", "all",
           "--epochs", "2", "--workers", "1", "--model-only-steps", "4", "--device", "cpu", "--loader-repeats", "2",
           "--json", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    result = json.loads(out.read_text())
    for key in FIELDS:
        assert key in result, key
    assert result["loaders"]["old"]["requests"] == result["loaders"]["new"]["requests"] == 300
    assert result["loaders"]["new_all_dates"]["requests"] == 600
    assert result["loaders"]["new_wide"]["requests"] == 300  # the reader without the projection
    # every loader variant ran twice; its figures are the medians
    for v in result["loaders"].values():
        assert len(v["repeats"]) == 2
        assert v["peak_rss_gb"] == pytest.approx(sum(r["peak_rss_gb"] for r in v["repeats"]) / 2)
    assert result["data_files_with_projection"] == result["data_files"] > 0
    # the reader as training reads it: every epoch the steps of both dates
    epochs = result["loaders"]["new_epochs"]["epochs"]
    assert len(epochs) == 4 and len({e["rows"] for e in epochs}) == 1 and epochs[0]["rows"] > 0
    assert result["reader_epoch_rows_per_s_over_training"] > 0
    for key in FIELDS[3:]:
        assert result[key] > 0 if key != "data_wait_share" else 0 <= result[key] <= 1, key
