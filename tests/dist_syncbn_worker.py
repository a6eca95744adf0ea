"""Worker for tests/test_syncbn.py: one rank of a 2-process gloo run of synchronized BN.

Launched as `python -m torch.distributed.run --standalone --nproc-per-node 2 <this> OUT_DIR [cuda]`:
gloo on CPU (our CPUSyncBatchNorm), or NCCL on two GPUs with `cuda` (torch's nn.SyncBatchNorm).
Every rank builds the same models and the same fixed global batches, takes its own slice
(ranks get different sizes: 5 and 7 rows), runs two training steps and an eval forward, and
saves what it saw to OUT_DIR/rank{R}.pt. Param grads are all_reduced with SUM first: each
rank's grads are local, and with a loss that is a sum over the global batch, their sum is
the single-process gradient.

The test also imports `build_models`, `global_inputs` and `run_steps` to compute the
single-process reference with plain BatchNorm over the concatenated global batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

SLICE_SIZES = (5, 7)
STEPS = 2


def build_models() -> dict[str, nn.Module]:
    """The modules under test, float64, same init on every rank."""
    torch.manual_seed(1234)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.ReLU(), nn.Linear(4, 2))
    conv = nn.Sequential(nn.Conv2d(2, 3, kernel_size=1), nn.BatchNorm2d(3, momentum=None))
    return {"bn1d": mlp.double(), "bn2d": conv.double()}


def global_inputs(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, loss weights) of the whole global batch for a model and step."""
    g = torch.Generator().manual_seed(100 * step + (1 if name == "bn1d" else 2))
    n = sum(SLICE_SIZES)
    shape = (n, 3) if name == "bn1d" else (n, 2, 3, 3)
    out_shape = (n, 2) if name == "bn1d" else (n, 3, 3, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(out_shape, generator=g, dtype=torch.float64)
    return x, w


def run_steps(name: str, model: nn.Module, rows: slice, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Two training steps on `rows` of the global batches, then an eval forward."""
    record: dict[str, torch.Tensor] = {}
    model.train()
    for step in range(STEPS):
        x, w = global_inputs(name, step)
        x = x[rows].clone().to(device).requires_grad_()
        y = model(x)
        (y * w[rows].to(device)).sum().backward()  # a sum over rows: the global loss is the sum of the local ones
        record[f"out{step}"] = y.detach()
        record[f"input_grad{step}"] = x.grad.detach()
    model.eval()
    with torch.no_grad():
        x, _ = global_inputs(name, 99)
        record["eval_out"] = model(x[rows].to(device))
    for pname, p in model.named_parameters():
        record[f"grad.{pname}"] = p.grad.detach().clone()
    for bname, buf in model.named_buffers():
        record[f"buffer.{bname}"] = buf.detach().clone()
    return record


def main(out_dir: str, device: str = "cpu") -> None:
    from reqdedup.train.syncbn import CPUSyncBatchNorm, convert_sync_batchnorm

    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{torch.cuda.current_device()}"
    expected_type = nn.SyncBatchNorm if device.startswith("cuda") else CPUSyncBatchNorm
    assert dist.get_world_size() == len(SLICE_SIZES)
    start = sum(SLICE_SIZES[:rank])
    rows = slice(start, start + SLICE_SIZES[rank])
    result: dict[str, torch.Tensor] = {}
    for name, model in build_models().items():
        model = convert_sync_batchnorm(model.to(device))
        n_sync = sum(isinstance(m, expected_type) for m in model.modules())
        assert n_sync == 1, f"{name}: expected one {expected_type.__name__}, found {n_sync}"
        record = run_steps(name, model, rows, device)
        for key, value in record.items():
            if key.startswith("grad."):
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
            result[f"{name}.{key}"] = value.cpu()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
