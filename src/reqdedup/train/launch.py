"""`reqdedup train --config FILE`: check the config, then run torchrun as a subprocess.

A subprocess (not multiprocessing) so it also works inside an Airflow task, where spawn
fails. gloo on CPU, NCCL on CUDA; processes per node from the config.

Several nodes (``dist.nnodes > 1``): every node runs the same command with the same config
except ``dist.node_rank``; torchrun's c10d rendezvous at ``dist.rdzv_endpoint`` joins them
(node 0 hosts the rendezvous store). The rendezvous assigns the global ranks, so rank 0 (which
writes the checkpoints, metrics and MLflow run) may be on any node: the run folder must be
on storage that every node sees, as the checkpoints of one run already are.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.train.config import TrainConfig, dump_config, load_config
from reqdedup.train.worker import METRICS


def torchrun_args(dist, nproc: int, rdzv_id: str) -> list[str]:
    """torchrun's own arguments for a dist section (a DistConfig, or the evaluation's mapping):
    ``--standalone`` on one node, else a c10d rendezvous of ``nnodes`` nodes at
    ``rdzv_endpoint`` with ``rdzv_id`` (the same on every node: derived from the run)."""
    get = (lambda k, d=None: dist.get(k, d)) if isinstance(dist, dict) else (lambda k, d=None: getattr(dist, k, d))
    nnodes, node_rank, endpoint = int(get("nnodes", 1)), int(get("node_rank", 0)), get("rdzv_endpoint")
    if nnodes == 1 and endpoint is None:
        return ["--standalone", "--nproc-per-node", str(nproc)]
    # node 0 hosts the c10d store; the others only connect (on one host every node would
    # otherwise guess it is the host from the endpoint's address)
    return ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", str(endpoint), "--rdzv-id", rdzv_id,
            "--rdzv-conf", f"is_host={'true' if node_rank == 0 else 'false'}"]


def rdzv_id_of(*parts: str) -> str:
    """A rendezvous id every node derives alike from what identifies the run."""
    return "reqdedup-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def torchrun_command(cfg_path: Path, nproc: int, dist=None, rdzv_id: str = "reqdedup") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(dist or {}, nproc, rdzv_id),
            "-m", "reqdedup.train.worker", "--config", str(cfg_path)]


def run_training(cfg: TrainConfig | str | Path, settings: Settings | None = None, extra_env: dict | None = None) -> dict:
    """Train through torchrun; returns the run's metrics (metrics.json of rank 0)."""
    settings = settings or get_settings()
    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg)
    run_dir = cfg.run_dir(settings)
    # the exact config the workers read (one per node: they differ in dist.node_rank)
    cfg_path = dump_config(cfg, run_dir / ("config.yaml" if cfg.dist.nnodes == 1 else f"config.node{cfg.dist.node_rank}.yaml"))
    nproc = cfg.dist.nproc_per_node
    env = {**os.environ, **settings.as_env(), **(extra_env or {})}
    # Share the cores between the ranks instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    rdzv_id = rdzv_id_of("train", cfg.name, str(run_dir))
    proc = subprocess.run(torchrun_command(cfg_path, nproc, cfg.dist, rdzv_id), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {cfg.name!r} failed: torchrun exited with {proc.returncode} (its log is above)")
    metrics_path = run_dir / METRICS
    if cfg.dist.nnodes > 1 and not metrics_path.exists():
        if cfg.dist.node_rank != 0:  # rank 0 ran elsewhere and wrote them there
            return {"node_rank": cfg.dist.node_rank, "nnodes": cfg.dist.nnodes, "run_dir": str(run_dir)}
        raise RuntimeError(f"training {cfg.name!r}: no {metrics_path} after a {cfg.dist.nnodes}-node run; global rank 0 "
                           f"ran on another node: put the run folder (output.run_dir / checkpoints_dir) on shared storage")
    return json.loads(metrics_path.read_text())
