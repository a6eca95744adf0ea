"""Synchronized BatchNorm: 2 real gloo processes vs one BatchNorm over the global batch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reqdedup.train.syncbn import CPUSyncBatchNorm, convert_sync_batchnorm

WORKER = Path(__file__).with_name("dist_syncbn_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_syncbn_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_process_group_module_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert not torch.distributed.is_initialized()
    converted = convert_sync_batchnorm(model)
    assert converted is model
    assert type(converted[1]) is nn.BatchNorm1d


def test_cpu_sync_bn_without_group_behaves_like_batchnorm():
    """Same math, buffers and state_dict keys as BatchNorm1d when there is nothing to sync."""
    torch.manual_seed(0)
    plain = nn.BatchNorm1d(3, momentum=0.2)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    mine = CPUSyncBatchNorm(3, momentum=0.2)
    mine.load_state_dict(plain.state_dict())
    assert mine.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3) * 3 + 1
    torch.testing.assert_close(mine(x), plain(x))
    torch.testing.assert_close(mine.running_var, plain.running_var)
    mine.eval(), plain.eval()
    torch.testing.assert_close(mine(x), plain(x))


def _two_ranks_match_single_process_batchnorm(tmp_path, device: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(tmp_path), device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    worker = _load_worker()
    n = sum(worker.SLICE_SIZES)
    for name, model in worker.build_models().items():
        reference = worker.run_steps(name, model, slice(0, n))  # plain BN, global batch
        assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        for key, expected in reference.items():
            if key.startswith(("grad.", "buffer.")):
                # summed grads and synchronized buffers: identical on both ranks
                for r in range(2):
                    torch.testing.assert_close(ranks[r][f"{name}.{key}"], expected, msg=f"{name}.{key} rank {r}")
            else:
                got = torch.cat([ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"]])
                torch.testing.assert_close(got, expected, msg=f"{name}.{key}")
    # sanity: the comparison is not vacuous, per-rank BN statistics would differ
    assert ranks[0]["bn1d.buffer.1.running_mean"].abs().sum() > 0


@pytest.mark.slow
def test_two_gloo_ranks_with_uneven_slices_match_single_process_batchnorm(tmp_path):
    _two_ranks_match_single_process_batchnorm(tmp_path, "cpu")


# Runs on the lent multi-GPU machine (bench/results/multigpu_h200.md); CI has no GPU.
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_two_nccl_gpus_with_uneven_slices_match_single_process_batchnorm(tmp_path):
    _two_ranks_match_single_process_batchnorm(tmp_path, "cuda")
