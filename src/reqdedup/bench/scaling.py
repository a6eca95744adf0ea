"""Data-parallel scaling of request-level-dedup training: rows/s on 1, 2, ... GPUs.

One torchrun launch per world size; every rank trains the same model (DDP, SyncBatchNorm
via `convert_sync_batchnorm`, bf16 autocast on CUDA, dedup forward, user-masked in-batch
softmax) on its own synthetic request-sorted batches of a fixed per-rank size (weak
scaling). Rank 0 appends one record to the JSON: global candidate rows per second, the
median over repeats. torch alone, so it runs on the GPU machine as it is:

    cd src && torchrun --standalone --nproc-per-node 2 -m reqdedup.bench.scaling --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from reqdedup.bench.train import _device_name, _sync, make_batches, train_step
from reqdedup.train.model import ModelConfig, RecModel
from reqdedup.train.syncbn import convert_sync_batchnorm


def run(args) -> dict | None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    cfg = ModelConfig(items=args.items, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers,
                      n_heads=args.n_heads, ff_dim=args.ff_dim, emb_dim=args.emb_dim)
    torch.manual_seed(0)
    model = convert_sync_batchnorm(RecModel(cfg).to(device))
    sync_bn = type(next(m for m in model.modules() if "BatchNorm" in type(m).__name__)).__name__
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3, fused=cuda)
    batches = make_batches(cfg, args.batch_requests, args.candidates, device, 2, seed=1000 * rank,
                           positive_rate=0.05, requests_per_user=4)
    dtype = torch.bfloat16 if cuda and args.dtype == "bf16" else None
    for i in range(args.warmup):
        train_step(ddp, optimizer, *batches[i % 2], "dedup", dtype)
    rows_per_step = world * args.batch_requests * args.candidates
    rates = []
    for _ in range(args.repeats):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = train_step(ddp, optimizer, *batches[i % 2], "dedup", dtype)
        _sync(device)
        dist.barrier()
        rates.append(args.steps * rows_per_step / (time.perf_counter() - t0))
    record = None
    if rank == 0:
        record = {
            "world_size": world, "device": _device_name(device), "sync_batchnorm": sync_bn,
            "rows_per_s": statistics.median(rates), "rows_per_s_repeats": rates,
            "rows_per_step_global": rows_per_step, "batch_requests_per_rank": args.batch_requests,
            "candidates_per_request": args.candidates, "seq_len": args.seq_len, "dtype": args.dtype if cuda else "fp32",
            "steps": args.steps, "repeats": args.repeats, "final_loss": float(loss),
            "model": cfg.to_dict(), "torch": torch.__version__,
            "command": "torchrun --standalone --nproc-per-node {} -m reqdedup.bench.scaling {}".format(
                world, " ".join(sys.argv[1:])),
        }
        path = Path(args.json)
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        runs = [r for r in runs if r["world_size"] != world] + [record]
        runs.sort(key=lambda r: r["world_size"])
        base = next((r["rows_per_s"] for r in runs if r["world_size"] == 1), None)
        for r in runs:
            r["speedup_vs_1"] = r["rows_per_s"] / base if base else None
            r["efficiency"] = r["speedup_vs_1"] / r["world_size"] if base else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
        print(json.dumps(record), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--batch-requests", type=int, default=256, help="requests per rank per step")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ff-dim", type=int, default=1024)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
