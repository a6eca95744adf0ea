"""The training benchmark runs tiny on CPU and writes a consistent JSON (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from reqdedup.bench.train import main, run_train_bench

TINY_MODEL = dict(items=64, d_model=16, n_layers=1, n_heads=2, ff_dim=32, emb_dim=8)
REQUIRED = ("device", "seq_len", "candidates_per_request", "dtype", "rows_per_s_naive", "rows_per_s_dedup",
            "speedup", "batch_requests_naive", "batch_requests_dedup", "rows_per_s_naive_equal",
            "rows_per_s_dedup_equal", "speedup_equal_rows", "repeats", "model_config", "torch_version", "command")


def _check_consistent(result: dict) -> None:
    for key in REQUIRED:
        assert key in result, key
    for key in ("rows_per_s_naive", "rows_per_s_dedup", "rows_per_s_naive_equal", "rows_per_s_dedup_equal"):
        assert result[key] > 0, key
    assert result["speedup"] == pytest.approx(result["rows_per_s_dedup"] / result["rows_per_s_naive"])
    assert result["speedup_equal_rows"] == pytest.approx(
        result["rows_per_s_dedup_equal"] / result["rows_per_s_naive_equal"])
    assert result["trials"]["dedup_equal_rows"]["rows_per_step"] == result["trials"]["naive"]["rows_per_step"]
    assert result["trials"]["naive"]["rows_per_step"] == result["batch_requests_naive"] * result["candidates_per_request"]


def test_fixed_batch_sizes_write_consistent_json(tmp_path):
    path = tmp_path / "out" / "train.json"
    result = run_train_bench(device="cpu", seq_len=16, candidates=4, dtype="bf16", batch_requests_naive=2,
                             batch_requests_dedup=4, steps=2, warmup=1, repeats=2, json_path=str(path),
                             **TINY_MODEL, log=lambda *_: None)
    assert json.loads(path.read_text()) == result
    _check_consistent(result)
    assert (result["seq_len"], result["candidates_per_request"], result["repeats"]) == (16, 4, 2)
    assert (result["batch_requests_naive"], result["batch_requests_dedup"]) == (2, 4)
    assert result["dtype"] == "fp32"  # bf16 autocast is CUDA-only; the JSON says what ran
    assert result["model_config"]["d_model"] == 16
    assert result["batch_size_search"]["trials"] == {}


def test_main_searches_batch_sizes_and_records_the_command(tmp_path):
    path = tmp_path / "train.json"
    argv = ["--device", "cpu", "--seq-len", "16", "--candidates", "4", "--items", "64", "--d-model", "16",
            "--n-layers", "1", "--n-heads", "2", "--ff-dim", "32", "--emb-dim", "8", "--steps", "1",
            "--warmup", "1", "--repeats", "1", "--search-start-naive", "1", "--search-start-dedup", "1",
            "--search-max-requests", "2", "--search-steps", "1", "--json", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    _check_consistent(result)
    assert result["command"].startswith("python -m reqdedup.bench.train --device cpu")
    for mode in ("per_row", "dedup"):
        trials = result["batch_size_search"]["trials"][mode]
        assert 1 <= len(trials) <= 2 and trials[0]["batch_requests"] == 1
        assert all(t["batch_requests"] <= 2 for t in trials)
    assert result["batch_requests_naive"] in (1, 2) and result["batch_requests_dedup"] in (1, 2)
