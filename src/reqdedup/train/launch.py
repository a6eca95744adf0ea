"""`reqdedup train --config FILE`: check the config, then run torchrun as a subprocess.

A subprocess (not multiprocessing) so it also works inside an Airflow task, where spawn
fails. gloo on CPU, NCCL on CUDA; processes per node from the config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.train.config import TrainConfig, dump_config, load_config
from reqdedup.train.worker import METRICS


def torchrun_command(cfg_path: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "reqdedup.train.worker", "--config", str(cfg_path)]


def run_training(cfg: TrainConfig | str | Path, settings: Settings | None = None, extra_env: dict | None = None) -> dict:
    """Train through torchrun; returns the run's metrics (metrics.json of rank 0)."""
    settings = settings or get_settings()
    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg)
    run_dir = cfg.run_dir(settings)
    cfg_path = dump_config(cfg, run_dir / "config.yaml")  # the exact config the workers read
    nproc = cfg.dist.nproc_per_node
    env = {**os.environ, **settings.as_env(), **(extra_env or {})}
    # Share the cores between the ranks instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.run(torchrun_command(cfg_path, nproc), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {cfg.name!r} failed: torchrun exited with {proc.returncode} (its log is above)")
    return json.loads((run_dir / METRICS).read_text())
