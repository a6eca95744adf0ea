"""`reqdedup train` end to end: two real gloo processes through torchrun on the lake's data,
MLflow logging, checkpoints, and resume after a real SIGKILL."""

from __future__ import annotations

import pytest
import torch

from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.lake.ingest import ingest_date
from reqdedup.train.config import config_from_dict
from reqdedup.train.launch import run_training
from reqdedup.train.worker import CHECKPOINT, FINAL_MODEL, KILL_AT_STEP_ENV

pytestmark = pytest.mark.slow

DATES = ("2026-05-01", "2026-05-02")
DATA = dict(users=40, requests=80, candidates=10, history=24, items=500, seed=11)


@pytest.fixture(scope="module")
def lake(settings, spark):
    for day in DATES:
        write_landing(GeneratorConfig(date=day, **DATA), out_dir=settings.landing_dir)
        ingest_date(day, settings, publish=True)


def _config(tmp_path, name, mlflow=False, **train):
    return config_from_dict({
        "name": name,
        "data": {"train_start": DATES[0], "train_end": DATES[1], "order": "sorted", "batch_rows": 100},
        "model": {"items": 500, "seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "ff_dim": 32,
                  "emb_dim": 8, "user_mlp": [16], "item_mlp": [16], "head_mlp": [16, 8]},
        "train": {"epochs": 3, "seed": 5, **train},
        "dist": {"nproc_per_node": 2},
        "output": {"run_dir": str(tmp_path / name)},
        "mlflow": {"enabled": mlflow},
    })


def _weights(path):
    from reqdedup.train.model import load_checkpoint

    return load_checkpoint(path)["model"]


def test_two_process_training_logs_to_mlflow(settings, lake, tmp_path):
    metrics = run_training(_config(tmp_path, "e2e_mlflow", mlflow=True), settings)
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 3
    assert metrics["final"]["rows"] > 0 and metrics["rows_per_s"] > 0
    assert 0.0 <= metrics["final"]["false_negative_rate"] <= 1.0
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert run.data.params["data.order"] == "table" and run.data.params["dist.nproc_per_node"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    # SyncBN was in the model: its state loads into a plain single-process model.
    from reqdedup.train.model import load_model

    load_model(tmp_path / "e2e_mlflow" / FINAL_MODEL)


def test_killed_run_resumes_to_where_an_unbroken_run_ends(settings, lake, tmp_path):
    unbroken = _config(tmp_path, "unbroken")
    run_training(unbroken, settings)

    broken = _config(tmp_path, "broken")
    steps = run_steps = None
    from reqdedup.train.reader import RequestReader
    from reqdedup.train.worker import reader_spec

    steps = RequestReader.from_settings(DATES[0], DATES[1], reader_spec(unbroken), settings=settings,
                                        rank=0, world_size=2).steps_per_epoch()
    kill_at = steps + steps // 2  # mid-way through the second epoch
    with pytest.raises(RuntimeError, match="torchrun exited"):
        run_training(broken, settings, extra_env={KILL_AT_STEP_ENV: str(kill_at)})
    from reqdedup.train.model import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "broken" / CHECKPOINT)
    assert ckpt["epoch"] == 0, "the kill came after the first epoch's checkpoint"
    assert not (tmp_path / "broken" / FINAL_MODEL).exists()

    resumed = run_training(broken, settings)
    assert len(resumed["history"]) == 3
    a, b = _weights(tmp_path / "unbroken" / FINAL_MODEL), _weights(tmp_path / "broken" / FINAL_MODEL)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
