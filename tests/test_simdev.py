"""N devices simulated on one (reqdedup.train.simdev) against real ranks, and the BatchNorm
placement options of the model."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reqdedup.train import simdev
from reqdedup.train.batch import synthetic_batch
from reqdedup.train.losses import recommendation_losses
from reqdedup.train.model import ModelConfig, RecModel

WORKER = Path(__file__).with_name("dist_simdev_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _worker():
    spec = importlib.util.spec_from_file_location("dist_simdev_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _simulate(worker, sync: bool) -> dict:
    model = worker.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for step in range(worker.STEPS):
        loss, _ = simdev.device_losses(model, worker.global_batch(step), 2, sync_bn=sync, **worker.LOSS)
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
    return worker.record(model, first)


def test_bn_placement_options():
    base = dict(items=50, seq_len=6, d_model=8, n_layers=1, n_heads=2, ff_dim=16, emb_dim=4, user_mlp=(8,),
                item_mlp=(8,), head_mlp=(8,))
    kinds = lambda m: sorted(n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm1d))  # noqa: E731
    assert kinds(RecModel(ModelConfig(**base))) == ["ranking_head.mlp.1"]
    user = RecModel(ModelConfig(**base, user_batch_norm=True, head_batch_norm=False))
    assert kinds(user) == ["user_tower.dense_bn", "user_tower.output_bn"]
    # the user-side BN normalizes over the batch's requests: the user embedding of a request
    # depends on the other requests of the batch in training mode, not in eval mode
    b = synthetic_batch(6, 3, 6, 50, generator=1)
    user.train()
    full = user.encode_users(b)
    sub = user.encode_users(simdev.split_requests(b, 2)[0])
    assert not torch.allclose(full[:3], sub, atol=1e-5)
    user.eval()
    torch.testing.assert_close(user.encode_users(b)[:3], user.encode_users(simdev.split_requests(b, 2)[0]))


def test_split_and_concat_requests():
    b = synthetic_batch(7, 3, 6, 50, generator=2)
    parts = simdev.split_requests(b, 3)
    assert [p.num_requests for p in parts] == [2, 2, 3] and sum(p.num_rows for p in parts) == b.num_rows
    back = simdev.concat_batches(parts)
    for f in ("user_ids", "history", "row_request", "item_id", "label"):
        torch.testing.assert_close(getattr(back, f), getattr(b, f))
    if "dense_features" in {f.name for f in dataclasses.fields(b)}:  # per-row side-table features travel too
        b.dense_features = torch.arange(b.num_rows, dtype=torch.float32)[:, None]
        parts = simdev.split_requests(b, 3)
        torch.testing.assert_close(simdev.concat_batches(parts).dense_features, b.dense_features)
    with pytest.raises(ValueError, match="cannot split"):
        simdev.split_requests(b, 8)


def test_one_device_is_the_plain_loss_and_per_device_bn_differs_from_sync():
    torch.manual_seed(0)
    model = RecModel(ModelConfig(items=50, seq_len=6, d_model=8, n_layers=1, n_heads=2, ff_dim=16, emb_dim=4,
                                 user_mlp=(8,), item_mlp=(8,), head_mlp=(8,), user_batch_norm=True))
    b = synthetic_batch(8, 4, 6, 50, generator=3, users=4, positive_rate=0.5)
    one, _ = simdev.device_losses(model, b, 1, sync_bn=False)
    ref, _ = recommendation_losses(model(b), b)
    torch.testing.assert_close(one, ref)
    sync, _ = simdev.device_losses(model, b, 4, sync_bn=True)
    local, _ = simdev.device_losses(model, b, 4, sync_bn=False)
    assert abs(sync.item() - local.item()) > 1e-4  # the statistics differ, so does the loss


@pytest.mark.slow
def test_simulated_devices_match_two_gloo_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    worker = _worker()
    for sync in (False, True):
        sim = _simulate(worker, sync)
        for key, expected in sim.items():
            torch.testing.assert_close(rank0[f"sync{int(sync)}.{key}"], expected, msg=f"sync={sync} {key}")
    # not vacuous: per-device and synchronized statistics give different models
    a, b = rank0["sync0.param.user_tower.mlp.0.weight"], rank0["sync1.param.user_tower.mlp.0.weight"]
    assert not torch.allclose(a, b)
    assert not torch.allclose(rank0["sync0.buffer.user_tower.output_bn.running_var"],
                              rank0["sync1.buffer.user_tower.output_bn.running_var"])
