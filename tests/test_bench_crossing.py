"""The crossing benchmark runs tiny on CPU and writes a consistent JSON + md (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from reqdedup.bench.crossing import main

PER_SHAPE = ("candidates_per_request", "seq_len", "train_speedup", "serve_speedup", "p50_ms_request_level",
             "p99_ms_request_level", "train_rows_per_s_dedup", "train_rows_per_s_naive", "serve_rps_dedup",
             "serve_rps_naive", "train_naive_subset", "serve_naive_subset", "trials")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_cpu_run_writes_json_and_md(tmp_path, capsys):
    out = tmp_path / "crossing.json"
    argv = ["--device", "cpu", "--seq-len", "8", "--candidates", "3,6", "--train-rows", "12",
            "--naive-train-rows", "4", "--steps", "1", "--warmup", "1", "--repeats", "2", "--naive-repeats", "1",
            "--serve-batch-requests", "1,2", "--single-calls", "2", "--serve-calls", "1", "--naive-budget-s", "0.01",
            "--naive-serve-max-candidates", "4", "--items", "50", "--d-model", "8", "--n-layers", "1",
            "--n-heads", "2", "--ff-dim", "16", "--emb-dim", "4", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "fp32" and result["model_config"]["ranking"] == "crossing"
    assert [r["candidates_per_request"] for r in result["results"]] == [3, 6]
    small, big = result["results"]
    for r in result["results"]:
        for key in PER_SHAPE:
            assert key in r, key
        assert r["seq_len"] == 8
        assert r["train_speedup"] == pytest.approx(r["train_rows_per_s_dedup"] / r["train_rows_per_s_naive"])
        assert r["serve_speedup"] == pytest.approx(r["serve_rps_dedup"] / r["serve_rps_naive"])
        assert r["p50_ms_request_level"] > 0 and r["p99_ms_request_level"] >= r["p50_ms_request_level"] * 0.999
        assert r["max_abs_diff_probability_dedup_vs_naive"] < 1e-4  # the two paths compute the same function
        assert len(r["trials"]["train_dedup"]["rows_per_s"]) == 2
    # the naive subsets are stated, and the naive serving rate is scaled per candidate
    assert not small["train_naive_subset"] and small["train_naive_candidates_per_step"] == 3
    assert big["train_naive_subset"] and big["train_naive_candidates_per_step"] == 4
    assert big["serve_naive_subset"] and big["serve_rps_naive"] == pytest.approx(big["serve_rps_naive_measured"] * 4 / 6)
    md = out.with_suffix(".md").read_text()
    assert "| 6 |" in md and "subset" in md
    assert '"train_speedup"' in capsys.readouterr().out
