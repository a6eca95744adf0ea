"""The serving benchmark runs tiny on CPU and writes a consistent JSON (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from reqdedup.bench.serve import main, percentile, run_serve_bench

TINY_MODEL = dict(items=64, d_model=16, n_layers=1, n_heads=2, ff_dim=32, emb_dim=8)
PER_COUNT = ("rps_request_level", "rps_per_candidate", "speedup", "batch_requests_request_level",
             "batch_requests_per_candidate", "p50_ms_request_level", "p99_ms_request_level",
             "p50_ms_per_candidate", "p99_ms_per_candidate", "single_rps_request_level", "single_rps_per_candidate",
             "single_speedup", "agreement", "trials", "host_prep_ms_request_level")
TOP = ("device", "device_type", "dtype", "seq_len", "history_len", "candidates", "results", "repeats",
       "model_config", "torch_version", "command", "statistic")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_consistent(result: dict, candidates: tuple[int, ...], batches: tuple[int, ...]) -> None:
    for key in TOP:
        assert key in result, key
    assert result["candidates"] == list(candidates)
    assert sorted(result["results"], key=int) == [str(c) for c in candidates]
    for c in candidates:
        r = result["results"][str(c)]
        for key in PER_COUNT:
            assert key in r, (c, key)
        assert r["candidates"] == c
        assert r["rps_request_level"] > 0 and r["rps_per_candidate"] > 0
        assert r["speedup"] == pytest.approx(r["rps_request_level"] / r["rps_per_candidate"])
        assert r["single_speedup"] == pytest.approx(r["single_rps_request_level"] / r["single_rps_per_candidate"])
        for mode in ("request_level", "per_candidate"):
            assert 0 < r[f"p50_ms_{mode}"] <= r[f"p99_ms_{mode}"]
        sweep = r["trials"]["request_level_batches"]
        assert [t["batch_requests"] for t in sweep] == list(batches)
        assert r["batch_requests_request_level"] in batches
        assert r["rps_request_level"] == max(t["rps"] for t in sweep)
        single = r["trials"]["request_level_single"]
        assert single["batch_requests"] == 1 and single["p50_ms"] == r["p50_ms_request_level"]
        assert len(single["rps_per_repeat"]) == result["repeats"]
        assert r["trials"]["per_candidate_single"]["calls_per_repeat"] >= result["pc_min_calls"]
        # both modes compute the same function (fp32 on CPU)
        assert r["agreement"]["max_abs_diff_probability"] < 1e-4
        assert r["agreement"]["max_abs_diff_retrieval"] < 1e-4


def test_tiny_run_writes_consistent_json(tmp_path):
    path = tmp_path / "out" / "serve.json"
    result = run_serve_bench(device="cpu", dtype="bf16", seq_len=8, candidates=(3, 10), batch_requests=(1, 8),
                             pc_batch_sequences=20, single_calls=3, batch_calls=2, repeats=2, warmup=1,
                             pc_repeats=1, pc_budget_s=0.05, pc_min_calls=2, json_path=str(path),
                             **TINY_MODEL, log=lambda *_: None)
    assert json.loads(path.read_text()) == result
    _check_consistent(result, (3, 10), (1, 8))
    assert result["dtype"] == "fp32"  # bf16 autocast is CUDA-only; the JSON says what ran
    assert result["seq_len"] == 8 and result["history_len"] == {"min": 8, "max": 8}
    assert result["model_config"]["d_model"] == 16
    # per candidate: about 20 user-tower sequences per call -> 7 requests of 3, 2 of 10
    assert result["results"]["3"]["trials"]["per_candidate_batch"]["batch_requests"] == 7
    assert result["results"]["10"]["trials"]["per_candidate_batch"]["batch_requests"] == 2
    assert result["torch_threads"] == 1


def test_main_records_the_command_and_cpu_defaults(tmp_path, capsys):
    path = tmp_path / "serve.json"
    argv = ["--device", "cpu", "--candidates", "2,5", "--batch-requests", "2", "--history-min", "3",
            "--items", "64", "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--ff-dim", "32",
            "--emb-dim", "8", "--single-calls", "2", "--batch-calls", "1", "--repeats", "1", "--warmup", "1",
            "--pc-repeats", "1", "--pc-budget-s", "0.01", "--threads", "1", "--json", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    _check_consistent(result, (2, 5), (2,))
    for c in ("2", "5"):  # per candidate never batches more requests than request level does
        assert result["results"][c]["trials"]["per_candidate_batch"]["batch_requests"] == 2
    assert result["command"].startswith("python -m reqdedup.bench.serve --device cpu")
    assert result["seq_len"] == 32  # small default history on CPU
    assert result["history_len"] == {"min": 3, "max": 32}
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{"):])  # the summary printed last
    assert summary["results"]["5"]["speedup"] == pytest.approx(result["results"]["5"]["speedup"])


def test_cli_bench_serve_passes_through(tmp_path):
    from reqdedup.cli import main as cli_main

    path = tmp_path / "cli.json"
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "serve", "--device", "cpu", "--seq-len", "4", "--candidates", "2", "--batch-requests", "2",
                  "--items", "32", "--d-model", "8", "--n-layers", "1", "--n-heads", "2", "--ff-dim", "16",
                  "--emb-dim", "4", "--single-calls", "1", "--batch-calls", "1", "--repeats", "1", "--warmup", "1",
                  "--pc-repeats", "1", "--pc-budget-s", "0.01", "--threads", "1", "--json", str(path)])
    assert info.value.code == 0
    assert json.loads(path.read_text())["results"]["2"]["candidates"] == 2


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([7.0], 99) == 7.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        run_serve_bench(device="cpu", dtype="fp8", json_path=None, log=lambda *_: None)
    with pytest.raises(SystemExit):
        main(["--candidates", "0,5", "--json", "x.json"])
