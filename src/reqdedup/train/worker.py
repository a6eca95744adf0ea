"""One training process, launched by torchrun (`reqdedup train` starts it).

Reads its rank from torchrun's environment, trains on its shard of the lake, and on rank 0
writes a checkpoint at the end of every epoch (atomic rename), logs params and metrics to
MLflow, and finally the model and its metrics. A rerun of the same config resumes from the
last checkpoint: a run killed mid-way ends where an unbroken run ends (data order, model
init and optimizer state are all functions of the seed and the epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from reqdedup.train.config import TrainConfig, load_config
from reqdedup.train.losses import recommendation_losses
from reqdedup.train.model import RecModel, load_checkpoint
from reqdedup.train.syncbn import convert_sync_batchnorm

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
METRICS = "metrics.json"
MLFLOW_RUN_ID = "mlflow_run_id"
# Test hook: SIGKILL rank 0 at this global step (a real kill, to test resume).
KILL_AT_STEP_ENV = "REQDEDUP_TRAIN_KILL_AT_STEP"


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.dist.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("dist.device = cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


class EpochMeter:
    """Sums over an epoch, kept on the device (no host sync per step), all-reduced across
    ranks at its end."""

    KEYS = ("rows", "requests", "unique_users", "batches", "loss", "ranking_bce", "retrieval_loss",
            "false_negative_rate", "fnr_batches")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.host = dict.fromkeys(("rows", "requests", "unique_users", "batches"), 0)

    def add(self, batch, unique_users: int, loss, stats) -> None:
        h = self.host
        h["rows"] += batch.num_rows
        h["requests"] += batch.num_requests
        h["unique_users"] += unique_users
        h["batches"] += 1
        parts = [loss, stats["ranking_bce"], stats["retrieval_loss"]]
        fnr = stats.get("false_negative_rate")
        parts += [fnr, torch.ones((), device=loss.device)] if fnr is not None else [torch.zeros((), device=loss.device)] * 2
        self.sums[4:] += torch.stack([torch.as_tensor(p, device=loss.device).detach().double().reshape(()) for p in parts])

    def reduce(self, device) -> dict:
        values = self.sums.clone()
        for i, k in enumerate(self.KEYS[:4]):
            values[i] = float(self.host[k])
        if dist.is_initialized():
            dist.all_reduce(values)
        total = dict(zip(self.KEYS, values.tolist()))
        b = max(total["batches"], 1)
        return {
            "rows": int(total["rows"]),
            "loss": total["loss"] / b,
            "ranking_bce": total["ranking_bce"] / b,
            "retrieval_loss": total["retrieval_loss"] / b,
            "false_negative_rate": total["false_negative_rate"] / max(total["fnr_batches"], 1),
            "unique_users_per_batch": total["unique_users"] / b,
            "requests_per_batch": total["requests"] / b,
        }


def check_item_ids_fit(max_item_id: int, items: int) -> None:
    """Item ids index the embedding tables: refuse data the model cannot embed."""
    from reqdedup.errors import InputError

    if max_item_id >= items:
        raise InputError(f"the data holds item id {max_item_id} but model.items = {items}: "
                         f"set model.items to at least {max_item_id + 1} (the catalog size)")


def reader_spec(cfg: TrainConfig):
    """The request-level reader's settings of a training config (its data section)."""
    from reqdedup.train.reader import ReaderSpec

    d = cfg.data
    return ReaderSpec(order=d.order, batch_rows=d.batch_rows, seq_len=cfg.model.seq_len, seed=cfg.train.seed,
                      buffer_requests=d.buffer_requests, buffer_rows=d.buffer_rows, streams=d.streams,
                      workers=d.workers, prefetch_batches=d.prefetch_batches,
                      feature_columns=tuple(d.feature_columns))


class Negatives:
    """The run's logQ estimate and mixed-negative pool (train.logq / train.mixed_negatives),
    updated with every batch this rank trains on."""

    def __init__(self, cfg: TrainConfig, device, seed: int):
        from reqdedup.train.batch import ITEM_DENSE_DIM
        from reqdedup.train.negatives import StreamingFrequency, UniformItemPool

        t, items = cfg.train, cfg.model.items
        self.freq = StreamingFrequency(items, t.logq_alpha, device) if t.logq else None
        self.pool = UniformItemPool(items, ITEM_DENSE_DIM, device) if t.mixed_negatives else None
        self.m = t.mixed_negatives
        self.gen = torch.Generator().manual_seed(10_000 + seed)

    def loss_kwargs(self, model, batch) -> dict:
        kw = {}
        if self.freq is not None:
            self.freq.update(batch.item_id[batch.label > 0.5])
            kw["log_q"] = self.freq.log_q(batch.item_id)
        if self.pool is not None:
            self.pool.add(batch.item_id, batch.item_category, batch.item_dense)
            ids, cat, dense, lq = self.pool.sample(self.m, self.gen)
            kw.update(extra_item_emb=unwrap(model).item_tower(ids, cat, dense), extra_item_ids=ids,
                      extra_log_q=lq if self.freq is not None else None)
        return kw


def train_step(model, optimizer, batch, cfg: TrainConfig, amp: bool, negatives: Negatives | None = None):
    """One optimizer step on a batch already on the device; (detached loss, loss stats)."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(batch, mode=cfg.train.user_encoding)
        extra = negatives.loss_kwargs(model, batch) if negatives is not None else {}
        if "extra_item_emb" in extra:
            extra["extra_item_emb"] = extra["extra_item_emb"].to(outputs["item_emb"].dtype)
        loss, stats = recommendation_losses(
            outputs, batch, retrieval_weight=cfg.train.retrieval_weight, temperature=cfg.train.temperature,
            mask_same_user=cfg.train.mask_same_user, mask_same_item=cfg.train.mask_same_item, **extra)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), stats


def _mlflow_run(cfg: TrainConfig, settings, run_dir: Path):
    import mlflow

    from reqdedup.registry.tracking import init_tracking

    init_tracking(settings, cfg.mlflow.experiment)
    run_id_file = run_dir / MLFLOW_RUN_ID
    if run_id_file.exists():  # resume: continue the same MLflow run
        return mlflow.start_run(run_id=run_id_file.read_text().strip())
    run = mlflow.start_run(run_name=cfg.name, parent_run_id=cfg.mlflow.parent_run_id,
                           tags={"reqdedup.stage": "train", **cfg.mlflow.tags})
    run_id_file.write_text(run.info.run_id)
    mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in cfg.flat_params().items()})
    return run


def train(cfg: TrainConfig, settings, progress=None, progress_every_steps: int | None = None) -> dict:
    """Train one run. ``progress(model, rows_seen, train_seconds, epoch)``, if given, is
    called on every rank (the evaluation matrix's learning curves) every
    ``progress_every_steps`` steps (None: at every epoch end only) and at every epoch end,
    with the unwrapped model; ``rows_seen`` = training rows over all ranks so far,
    ``train_seconds`` = training time so far (the callback's own time not included)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg, local_rank)
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    # Several runs may share one torchrun launch (the evaluation matrix): the group is
    # created once and left to whoever created it.
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend)
    torch.manual_seed(cfg.train.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    run_dir = cfg.run_dir(settings)
    run_dir.mkdir(parents=True, exist_ok=True)

    from reqdedup.train.reader import RequestReader, max_item_id, plan

    units = plan(cfg.data.train_start, cfg.data.train_end, buckets=cfg.data.buckets, settings=settings,
                 feature_columns=cfg.data.feature_columns)
    check_item_ids_fit(max_item_id(units), cfg.model.items)
    loader = RequestReader(units, reader_spec(cfg), rank=rank, world_size=world, pin_memory=device.type == "cuda")
    if rank == 0:
        projected = sum(u.requests_path is not None for u in units)
        print(f"[train] {cfg.name}: {len(units)} data files, {projected} with their request-level projection "
              "(the others decode every row's user block)", flush=True)
    model = RecModel(cfg.model)
    if cfg.train.sync_bn and world > 1:
        model = convert_sync_batchnorm(model.to(device))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start_epoch, history = 0, []
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        if rank == 0:
            print(f"[train] resuming {cfg.name} from epoch {start_epoch} ({ckpt_path})", flush=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    amp = device.type == "cuda" and cfg.train.mixed_precision == "auto"
    negatives = Negatives(cfg, device, cfg.train.seed) if (cfg.train.logq or cfg.train.mixed_negatives) else None

    run = _mlflow_run(cfg, settings, run_dir) if (rank == 0 and cfg.mlflow.enabled) else None
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    steps_per_epoch = loader.steps_per_epoch()
    train_seconds = sum(h["seconds"] for h in history)
    rows_before = sum(h["rows"] for h in history)

    def report_progress(epoch_rows: int, epoch_seconds: float, epoch: int) -> float:
        """Call the progress hook; returns the seconds it took (kept off the training clock)."""
        t_cb = time.perf_counter()
        rows = torch.tensor([float(epoch_rows)], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(rows)
        progress(unwrap(ddp), rows_before + int(rows.item()), train_seconds + epoch_seconds, epoch)
        ddp.train()
        return time.perf_counter() - t_cb

    for epoch in range(start_epoch, cfg.train.epochs):
        ddp.train()
        meter = EpochMeter(device)
        t0 = time.perf_counter()
        paused = 0.0
        for step, batch in enumerate(loader.epoch(epoch, next_epoch=epoch + 1 if epoch + 1 < cfg.train.epochs else None)):
            if rank == 0 and epoch * steps_per_epoch + step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            unique_users = int(batch.unique_users().numel())  # on the host, before the copy
            batch = batch.to(device)
            loss, stats = train_step(ddp, optimizer, batch, cfg, amp, negatives)
            meter.add(batch, unique_users, loss, stats)
            if (progress is not None and progress_every_steps and (step + 1) % progress_every_steps == 0
                    and step + 1 < steps_per_epoch):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                paused += report_progress(meter.host["rows"], time.perf_counter() - t0 - paused, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0 - paused
        epoch_metrics = meter.reduce(device)
        epoch_metrics.update(epoch=epoch, seconds=seconds, rows_per_s=epoch_metrics["rows"] / max(seconds, 1e-9),
                             data_wait_seconds=loader.times.wait_seconds,
                             data_wait_share=loader.times.wait_seconds / max(seconds, 1e-9))
        history.append(epoch_metrics)
        if progress is not None:
            report_progress(meter.host["rows"], seconds, epoch)
        train_seconds += seconds
        rows_before += epoch_metrics["rows"]
        if rank == 0:
            print(f"[train] {cfg.name} epoch {epoch + 1}/{cfg.train.epochs}: loss {epoch_metrics['loss']:.4f} "
                  f"fnr {epoch_metrics['false_negative_rate']:.3f} users/batch {epoch_metrics['unique_users_per_batch']:.1f} "
                  f"{epoch_metrics['rows_per_s']:.0f} rows/s", flush=True)
            atomic_save({"model": unwrap(ddp).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "history": history, "config": cfg.to_dict()}, ckpt_path)
            if run is not None:
                import mlflow

                mlflow.log_metrics({k: v for k, v in epoch_metrics.items() if k != "epoch"}, step=epoch)
        if world > 1:
            dist.barrier()

    final = {
        "name": cfg.name,
        "epochs": cfg.train.epochs,
        "world_size": world,
        "device": str(device),
        "train_seconds": train_seconds,
        "rows_per_s": sum(h["rows"] for h in history) / max(train_seconds, 1e-9),
        "final": history[-1],
        "history": history,
        "mlflow_run_id": run.info.run_id if run is not None else None,
    }
    if rank == 0:
        # Plain BatchNorm state (SyncBN keys are the same), so eval/serving need no process group.
        atomic_save({"model": unwrap(ddp).state_dict(), "model_config": cfg.model.to_dict(), "config": cfg.to_dict()},
                    run_dir / FINAL_MODEL)
        (run_dir / METRICS).write_text(json.dumps(final, indent=2))
        if run is not None:
            import mlflow

            mlflow.log_metric("train_rows_per_s", final["rows_per_s"])
            mlflow.log_artifact(str(run_dir / METRICS))
            mlflow.end_run()
    if world > 1:
        dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one torchrun training process (use `reqdedup train`)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    from reqdedup.config import get_settings

    train(load_config(args.config), get_settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
