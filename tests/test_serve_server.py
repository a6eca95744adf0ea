"""The registered champion served by MLflow's own scoring server (`mlflow models serve`).

A tiny RecModel is saved the way the training worker saves `model.pt`, logged with
`log_request_model(..., registered_model_name=...)` into the test home's MLflow store, given
the alias `champion`, and served from `models:/<name>@champion` with `--env-manager local`
on 127.0.0.1. Its scores must equal the in-process `RequestScorer`'s; malformed payloads get
a 4xx with a clear message and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from reqdedup.bench.serve_http import stop, wait_healthy
from reqdedup.serve.scorer import Request, RequestScorer
from reqdedup.train.model import ModelConfig, RecModel

pytestmark = pytest.mark.slow

MODEL_NAME = "reqdedup_serve_test"
CFG = ModelConfig(items=200, seq_len=32, d_model=16, n_layers=2, n_heads=2, ff_dim=32, emb_dim=8,
                  user_mlp=(16,), item_mlp=(16,), head_mlp=(16, 8))
START_TIMEOUT_S = 180
MAX_CANDIDATES = 16  # the server's serve_max_candidates_per_request (REQDEDUP_SERVE_MAX_CANDIDATES_PER_REQUEST)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(count: int = 3, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n, h = 2 + 3 * i, [0, 5, 50][i % 3]  # empty history, short, longer than seq_len
        out.append({
            "request_id": f"req-{i}",
            "user_history": torch.randint(0, CFG.items, (h,), generator=g).tolist(),
            "user_dense": torch.randn(8, generator=g).tolist(),
            "user_segment": i % 16,
            "user_country": (3 * i) % 64,
            "candidate_item_id": torch.randint(0, CFG.items, (n,), generator=g).tolist(),
            "candidate_item_category": torch.randint(0, 64, (n,), generator=g).tolist(),
            "candidate_item_dense": torch.randn(n, 4, generator=g).tolist(),
        })
    return out


def _post(port: int, payload, timeout: float = 60) -> tuple[int, dict | str]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


@pytest.fixture(scope="module")
def champion(settings, tmp_path_factory):
    """Checkpoint in the worker's format, logged + registered, alias champion."""
    import mlflow
    from mlflow import MlflowClient

    from reqdedup.registry.tracking import init_tracking
    from reqdedup.serve.pyfunc import log_request_model

    torch.manual_seed(0)
    model = RecModel(CFG)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path_factory.mktemp("serve_ckpt") / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": CFG.to_dict(), "config": {"name": "serve-test"}}, ckpt)
    init_tracking(settings)
    with mlflow.start_run(run_name="serve-test"):
        info = log_request_model(ckpt, registered_model_name=MODEL_NAME)
    assert info.registered_model_version is not None
    MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
    return {"checkpoint": ckpt, "info": info, "version": info.registered_model_version}


@pytest.fixture(scope="module")
def server(settings, champion, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    bin_dir = Path(sys.executable).parent  # the venv's: `mlflow models serve` execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "REQDEDUP_SERVE_DEVICE": "cpu",
           "PYTHONUNBUFFERED": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "REQDEDUP_SERVE_MAX_CANDIDATES_PER_REQUEST": str(MAX_CANDIDATES)}
    mlflow_bin = bin_dir / "mlflow"
    cmd = [str(mlflow_bin), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, START_TIMEOUT_S, log_path)
        yield {"port": port, "proc": proc, "log": log_path}
    finally:
        stop(proc)


def _in_process_scores(champion, records):
    scorer = RequestScorer.from_checkpoint(str(champion["checkpoint"]), "cpu")
    reqs = [Request(history=r["user_history"], user_dense=r["user_dense"], user_segment=r["user_segment"],
                    user_country=r["user_country"], item_id=r["candidate_item_id"],
                    item_category=r["candidate_item_category"], item_dense=r["candidate_item_dense"],
                    request_id=r["request_id"]) for r in records]
    return scorer.score(reqs)


def _check_scores(predictions, expected, records):
    assert [p["request_id"] for p in predictions] == [r["request_id"] for r in records]
    for p, e, r in zip(predictions, expected, records):
        assert len(p["scores"]) == len(r["candidate_item_id"]) == len(p["retrieval_scores"])
        torch.testing.assert_close(torch.tensor(p["scores"]), e.scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(p["retrieval_scores"]), e.retrieval_scores, atol=1e-5, rtol=1e-5)


def test_served_champion_scores_equal_in_process_scorer(server, champion):
    records = _records()
    expected = _in_process_scores(champion, records)
    status, body = _post(server["port"], {"dataframe_records": records})
    assert status == 200, body
    _check_scores(body["predictions"], expected, records)
    # the same requests in split orientation, and one request alone, give the same scores
    columns = list(records[0])
    split = {"columns": columns, "data": [[r[c] for c in columns] for r in records]}
    status, body = _post(server["port"], {"dataframe_split": split})
    assert status == 200, body
    _check_scores(body["predictions"], expected, records)
    status, body = _post(server["port"], {"dataframe_records": records[2:]})
    assert status == 200, body
    _check_scores(body["predictions"], expected[2:], records[2:])


def _malformed() -> dict[str, tuple[dict | bytes, str]]:
    def change(i, **kw):
        recs = _records()
        recs[i].update(kw)
        return {"dataframe_records": recs}

    no_history = _records()
    for r in no_history:
        del r["user_history"]
    return {
        "missing history": ({"dataframe_records": no_history}, "missing inputs ['user_history']"),
        "no candidates": (change(1, candidate_item_id=[], candidate_item_category=[], candidate_item_dense=[]),
                          "request 1 (request_id 'req-1'): no candidates"),
        "lengths disagree": (change(2, candidate_item_category=[1, 2]),
                             "2 candidate_item_category values for 8 candidates"),
        "dense rows disagree": (change(0, candidate_item_dense=[[0.0, 0.0, 0.0, 0.0]]),
                                "candidate_item_dense must be 2 candidates x 4 floats"),
        "history is a string": (change(0, user_history="1 2 3"), "user_history"),
        "string in history": (change(0, user_history=[1, "x"]), "user_history"),
        "float item ids": (change(1, candidate_item_id=[1.5] * 5), "candidate_item_id"),
        "segment is a float": (change(0, user_segment=1.5), "user_segment must be an integer, got float 1.5"),
        "segment is a string": (change(0, user_segment="a"), "user_segment must be an integer"),
        "item id out of range": (change(1, candidate_item_id=[0, 1, 2, 3, CFG.items]),
                                 f"candidate_item_id holds {CFG.items}, outside 0..{CFG.items - 1}"),
        "NaN feature": (change(0, user_dense=[None] * 8), "user_dense"),
        "not JSON": (b"{not json", "valid JSON"),
        "past the candidates limit": (change(1, candidate_item_id=[1] * (MAX_CANDIDATES + 1),
                                             candidate_item_category=[1] * (MAX_CANDIDATES + 1),
                                             candidate_item_dense=[[0.0] * 4] * (MAX_CANDIDATES + 1)),
                                      f"serve_max_candidates_per_request = {MAX_CANDIDATES}"),
    }


def test_malformed_payloads_get_4xx_and_the_server_keeps_serving(server, champion):
    records = _records()
    expected = _in_process_scores(champion, records)
    for case, (payload, message) in _malformed().items():
        status, body = _post(server["port"], payload)
        assert 400 <= status < 500, (case, status, body)
        text = body.get("message", "") if isinstance(body, dict) else body
        assert message in text, (case, text[-600:])
        if isinstance(body, dict):
            assert body.get("error_code") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"), (case, body)
        # still serving good requests, with the same scores
        status, good = _post(server["port"], {"dataframe_records": records})
        assert status == 200, (case, good)
        _check_scores(good["predictions"], expected, records)
    assert server["proc"].poll() is None


def test_bench_serve_http_bounded_load_against_mlflow_models_serve(settings, champion, tmp_path, monkeypatch):
    """`reqdedup bench serve-http` starts `mlflow models serve` of the registered champion on
    loopback, runs a few seconds at a fixed rate (every 4th call past the candidates limit)
    and writes p50/p99, calls by status and the server's RSS at start and end."""
    from reqdedup.bench.serve_http import main as bench_main

    monkeypatch.setenv("REQDEDUP_SERVE_MAX_CANDIDATES_PER_REQUEST", str(MAX_CANDIDATES))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
    path = tmp_path / "serve_http.json"
    assert bench_main(["--model-uri", f"models:/{MODEL_NAME}@champion", "--seconds", "4", "--rate", "5",
                       "--candidates", "8", "--history", "20", "--items", str(CFG.items), "--oversize-every", "4",
                       "--warmup", "2", "--startup-timeout", str(START_TIMEOUT_S), "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["calls"] == 20 and out["by_status"] == {"200": 15, "400": 5}, out
    assert out["errors_by_status"] == {"400": 5} and out["connection_errors"] == {}
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["p99"]
    assert out["rss_bytes"]["start"] > 50 << 20 and out["rss_bytes"]["end"] > 50 << 20
    assert out["server_command"][1:3] == ["models", "serve"] and "127.0.0.1" in out["server_command"]
