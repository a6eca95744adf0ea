"""Worker for tests/test_simdev.py: one of 2 real gloo ranks training RecModel with DDP.

Launched as `python -m torch.distributed.run --standalone --nproc-per-node 2 <this> OUT_DIR`.
Every rank builds the same model (user-side and head BatchNorm) and the same global batches,
takes its device batch (`simdev.split_requests(global, 2)[rank]`, what the simulation hands
device `rank`), and takes STEPS SGD steps under DDP, plain BatchNorm and then
`convert_sync_batchnorm`. It saves the first step's (DDP-averaged) gradients, the final
parameters and BatchNorm buffers to OUT_DIR/rank{R}.pt; the test compares them with
`simdev.device_losses` in one process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

STEPS = 2
LOSS = {"temperature": 0.2, "mask_same_user": True, "mask_same_item": True}


def build_model():
    from reqdedup.train.model import ModelConfig, RecModel

    torch.manual_seed(7)
    cfg = ModelConfig(items=60, seq_len=8, d_model=8, n_layers=1, n_heads=2, ff_dim=16, emb_dim=4,
                      user_mlp=(8,), item_mlp=(8,), head_mlp=(8,), small_emb_dim=2, user_batch_norm=True)
    return RecModel(cfg).double()


def global_batch(step: int):
    from reqdedup.train.batch import synthetic_batch

    b = synthetic_batch(requests=6, candidates=5, seq_len=8, items=60, generator=100 + step, users=3,
                        positive_rate=0.4)
    return b.to("cpu", dtype=torch.float64)


def record(model, first_grads) -> dict:
    out = {f"grad.{k}": v for k, v in first_grads.items()}
    out.update({f"param.{k}": p.detach().clone() for k, p in model.named_parameters()})
    out.update({f"buffer.{k}": b.detach().clone() for k, b in model.named_buffers()})
    return out


def main(out_dir: str) -> None:
    from reqdedup.train import simdev
    from reqdedup.train.losses import recommendation_losses
    from reqdedup.train.syncbn import convert_sync_batchnorm

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for sync in (False, True):
        model = build_model()
        if sync:
            model = convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        first = None
        for step in range(STEPS):
            mine = simdev.split_requests(global_batch(step), 2)[rank]
            loss, _ = recommendation_losses(ddp(mine), mine, **LOSS)
            opt.zero_grad()
            loss.backward()
            if first is None:
                first = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
            opt.step()
        result.update({f"sync{int(sync)}.{k}": v for k, v in record(model, first).items()})
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
