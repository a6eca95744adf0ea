"""`reqdedup register` refusals and idempotence without training (fast): a missing or failed
evaluation never registers, an unreachable MLflow store is a clear error, and an evaluation
that already has a registered version is a no-op. The full path (train, log the pyfunc,
aliases) is in tests/test_evaluate.py."""

from __future__ import annotations

import json
import socket

import pytest

from reqdedup.cli import main as cli_main
from reqdedup.errors import InputError
from reqdedup.registry.register import TAG_EVALUATION, register


def _summary(tmp_path, status="succeeded", **extra):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not used")
    runs = [{"config": c, "seed": s, "model_path": str(ckpt), "mlflow_run_id": None,
             "metrics": {"auc": 0.7, "recall@10": 0.3}} for c in ("iid", "sorted_fixed") for s in (0, 1)]
    summary = {"status": status, "evaluation_id": "ev-test123", "eval_set_id": "es-x", "parent_run_id": None,
               "config": {"configs": ["iid", "sorted_fixed"], "seeds": [0, 1], "eval": {"k": 10}, "mlflow": {}},
               "gate": {"tolerance": 0.005, "metrics": ["auc", "recall@10"]},
               "aggregate": {"configs": {c: {"auc": {"mean": 0.7}, "recall@10": {"mean": 0.3}}
                                         for c in ("iid", "sorted_fixed")}},
               "runs": runs, **extra}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def test_missing_summary_is_a_clear_error(settings, tmp_path):
    with pytest.raises(InputError, match="no evaluation summary"):
        register(settings, summary_path=tmp_path / "nope.json")


def test_failed_evaluation_never_registers(settings, tmp_path, capsys):
    path = _summary(tmp_path, status="failed", error="torchrun exited with 1")
    with pytest.raises(InputError, match="never registers"):
        register(settings, summary_path=path)
    assert cli_main(["register", "--summary", str(path)]) == 2
    assert "status 'failed'" in capsys.readouterr().err


def test_incomplete_evaluation_never_registers(settings, tmp_path):
    path = _summary(tmp_path)
    data = json.loads(path.read_text())
    data["runs"] = [r for r in data["runs"] if r["config"] != "sorted_fixed"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="no 'sorted_fixed' runs"):
        register(settings, summary_path=path)


def test_bad_tolerance(settings, tmp_path):
    with pytest.raises(InputError, match="tolerance"):
        register(settings, summary_path=_summary(tmp_path), tolerance=-0.1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_is_a_clear_error(settings, tmp_path, monkeypatch):
    import dataclasses

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    bad = dataclasses.replace(settings, mlflow_tracking_uri=uri)
    with pytest.raises(InputError, match="cannot be reached"):
        register(bad, summary_path=_summary(tmp_path))


def test_same_evaluation_twice_is_a_noop(settings, tmp_path):
    """A version tagged with the evaluation id exists: register creates nothing."""
    import dataclasses

    from mlflow import MlflowClient

    from reqdedup.registry.tracking import init_tracking

    s = dataclasses.replace(settings, registered_model="reqdedup_noop_test")
    init_tracking(s)
    client = MlflowClient(s.mlflow_tracking_uri)
    client.create_registered_model(s.registered_model)
    mv = client.create_model_version(s.registered_model, source=str(tmp_path), tags={TAG_EVALUATION: "ev-test123"})
    out = register(s, summary_path=_summary(tmp_path))
    assert out["status"] == "already_registered" and out["version"] == str(mv.version)
    assert len(client.search_model_versions(f"name = '{s.registered_model}'")) == 1
