"""Training throughput: per-row user encoding vs request-level dedup, torch alone.

Measures candidate rows per second of full training steps (forward, ranking BCE, in-batch
softmax with user masking, backward, AdamW step) for the same model, the same data generator
and the same process, in two modes:

- naive ("per_row"): the user inputs are copied to every candidate row and the user tower
  (the history transformer) runs once per row, as a row-level pipeline does;
- dedup: the user tower runs once per request and its output is expanded by inverse index.

Each mode runs at its own saturating batch size (found by doubling the number of requests
per step until rows/s stops improving by more than 5%, memory runs out, or a time budget is
spent), and the dedup mode also runs at the naive batch size, so the JSON reports the speedup
both at each mode's best batch and at equal rows per step.

Runs as `cd src && python -m reqdedup.bench.train --json PATH ...` on a machine that has only
Python + torch (no numpy/pyarrow).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from reqdedup.train.batch import RequestBatch, synthetic_batch
from reqdedup.train.losses import positive_row_indices, recommendation_losses
from reqdedup.train.model import ModelConfig, RecModel

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MIN_GAIN = 1.05  # doubling the batch must raise rows/s by more than 5% to continue


@dataclass
class Trial:
    """One measured (mode, batch size): rows/s per repeat, or why it could not run."""

    mode: str
    batch_requests: int
    rows_per_step: int
    rows_per_s: list[float]
    seconds_per_step: float | None
    peak_memory_gb: float | None
    error: str | None = None

    @property
    def median_rows_per_s(self) -> float:
        return statistics.median(self.rows_per_s) if self.rows_per_s else 0.0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "batch_requests": self.batch_requests, "rows_per_step": self.rows_per_step,
                "rows_per_s_median": self.median_rows_per_s, "rows_per_s": self.rows_per_s,
                "seconds_per_step": self.seconds_per_step, "peak_memory_gb": self.peak_memory_gb,
                "error": self.error}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batches(cfg: ModelConfig, requests: int, candidates: int, device: torch.device,
                 n_batches: int, seed: int, positive_rate: float, requests_per_user: int) -> list[tuple[RequestBatch, torch.Tensor]]:
    """`n_batches` distinct synthetic batches already on `device`, with their positive rows."""
    out = []
    for i in range(n_batches):
        users = max(1, requests // max(1, requests_per_user))
        b = synthetic_batch(requests, candidates, cfg.seq_len, cfg.items, seed + i, device,
                            users=users, positive_rate=positive_rate)
        out.append((b, positive_row_indices(b)))
    return out


def train_step(model: RecModel, optimizer: torch.optim.Optimizer, batch: RequestBatch,
               positive_rows: torch.Tensor, mode: str, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """One full training step; returns the (detached) loss without syncing the device."""
    device_type = batch.device.type
    with torch.autocast(device_type=device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        outputs = model(batch, mode=mode)
        loss, _ = recommendation_losses(outputs, batch, temperature=0.1, positive_rows=positive_rows)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def measure(cfg: ModelConfig, mode: str, batch_requests: int, candidates: int, device: torch.device,
            autocast_dtype: torch.dtype | None, steps: int, warmup: int, repeats: int, seed: int,
            positive_rate: float, requests_per_user: int) -> Trial:
    """rows/s of `repeats` timed runs of `steps` steps each, after `warmup` steps; OOM -> error."""
    rows = batch_requests * candidates
    model = optimizer = batches = None
    gc.collect()  # drop what a previous (maybe out-of-memory) trial left behind
    _free_memory(device)
    try:
        torch.manual_seed(seed)
        model = RecModel(cfg).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        batches = make_batches(cfg, batch_requests, candidates, device, 2, seed, positive_rate, requests_per_user)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup):
            train_step(model, optimizer, *batches[i % len(batches)], mode, autocast_dtype)
        _sync(device)
        rates, step_seconds = [], []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                loss = train_step(model, optimizer, *batches[i % len(batches)], mode, autocast_dtype)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in {mode} at batch_requests={batch_requests}")
            rates.append(steps * rows / elapsed)
            step_seconds.append(elapsed / steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return Trial(mode, batch_requests, rows, rates, statistics.median(step_seconds), peak)
    except Exception as exc:  # OOM is an expected outcome of the batch-size search
        if not _is_oom(exc):
            raise
        return Trial(mode, batch_requests, rows, [], None, None, error="out of memory")
    finally:
        del model, optimizer, batches
        _free_memory(device)


def search_batch_size(cfg: ModelConfig, mode: str, start: int, max_requests: int, time_budget_s: float,
                      measure_kwargs: dict, log=print) -> tuple[int, list[Trial]]:
    """Double batch_requests from `start` while rows/s improves by > 5%; stop on OOM, at
    `max_requests`, or once `time_budget_s` is spent. Returns (best batch_requests, trials)."""
    trials: list[Trial] = []
    deadline = time.perf_counter() + time_budget_s
    best: Trial | None = None
    b = max(1, start)
    while b <= max_requests:
        trial = measure(cfg, mode, b, **measure_kwargs)
        trials.append(trial)
        log(f"[search {mode}] batch_requests={b} rows/step={trial.rows_per_step} "
            f"rows/s={trial.median_rows_per_s:,.0f} peak_gb={trial.peak_memory_gb} {trial.error or ''}")
        if trial.error:
            break
        improved = best is None or trial.median_rows_per_s > MIN_GAIN * best.median_rows_per_s
        if best is None or trial.median_rows_per_s > best.median_rows_per_s:
            best = trial
        if not improved or time.perf_counter() > deadline:
            break
        b *= 2
    if best is None:
        raise RuntimeError(f"{mode}: even batch_requests={start} does not fit in memory")
    return best.batch_requests, trials


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_train_bench(
    device: str = "cuda",
    seq_len: int = 1024,
    candidates: int = 256,
    dtype: str = "bf16",
    batch_requests_naive: int | None = None,
    batch_requests_dedup: int | None = None,
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 5,
    json_path: str | None = None,
    *,
    items: int = 100_000,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    ff_dim: int = 1024,
    emb_dim: int = 64,
    search_start_naive: int = 1,
    search_start_dedup: int = 8,
    search_max_requests: int = 8192,
    search_steps: int = 3,
    search_time_budget_s: float = 90.0,
    positive_rate: float = 0.05,
    requests_per_user: int = 4,
    seed: int = 0,
    command: str | None = None,
    log=print,
) -> dict:
    """Benchmark naive vs dedup training throughput; writes and returns the result dict.

    A batch size left as None is found by `search_batch_size`. bf16 means autocast on CUDA
    (parameters and optimizer stay float32); on CPU the run is float32 whatever `dtype` says,
    and the JSON records the dtype actually used.
    """
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    autocast_dtype = DTYPES[dtype] if dev.type == "cuda" and dtype != "fp32" else None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ModelConfig(items=items, seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      ff_dim=ff_dim, emb_dim=emb_dim, dropout=0.0,
                      user_mlp=(2 * emb_dim,), item_mlp=(2 * emb_dim,), head_mlp=(2 * emb_dim, emb_dim))
    common = dict(candidates=candidates, device=dev, autocast_dtype=autocast_dtype, seed=seed,
                  positive_rate=positive_rate, requests_per_user=requests_per_user)
    search_kwargs = dict(common, steps=search_steps, warmup=1, repeats=1)
    started = time.perf_counter()

    searches: dict[str, list[dict]] = {}
    chosen = {"per_row": batch_requests_naive, "dedup": batch_requests_dedup}
    starts = {"per_row": search_start_naive, "dedup": search_start_dedup}
    for mode in ("per_row", "dedup"):
        if chosen[mode] is None:
            chosen[mode], trials = search_batch_size(cfg, mode, starts[mode], search_max_requests,
                                                     search_time_budget_s, search_kwargs, log)
            searches[mode] = [t.to_dict() for t in trials]

    timed = dict(common, steps=steps, warmup=warmup, repeats=repeats)
    naive = measure(cfg, "per_row", chosen["per_row"], **timed)
    dedup = measure(cfg, "dedup", chosen["dedup"], **timed)
    dedup_equal = measure(cfg, "dedup", chosen["per_row"], **timed)
    for t in (naive, dedup, dedup_equal):
        log(f"[final {t.mode}] batch_requests={t.batch_requests} rows/s={t.median_rows_per_s:,.0f} "
            f"s/step={t.seconds_per_step} peak_gb={t.peak_memory_gb} {t.error or ''}")
        if t.error:
            raise RuntimeError(f"{t.mode} at batch_requests={t.batch_requests}: {t.error}")

    result = {
        "benchmark": "train_throughput_naive_vs_dedup",
        "device": _device_name(dev),
        "seq_len": seq_len,
        "candidates_per_request": candidates,
        "dtype": dtype if autocast_dtype is not None else "fp32",
        "rows_per_s_naive": naive.median_rows_per_s,
        "rows_per_s_dedup": dedup.median_rows_per_s,
        "speedup": dedup.median_rows_per_s / naive.median_rows_per_s,
        "batch_requests_naive": naive.batch_requests,
        "batch_requests_dedup": dedup.batch_requests,
        "rows_per_step_naive": naive.rows_per_step,
        "rows_per_step_dedup": dedup.rows_per_step,
        "rows_per_s_naive_equal": naive.median_rows_per_s,
        "rows_per_s_dedup_equal": dedup_equal.median_rows_per_s,
        "speedup_equal_rows": dedup_equal.median_rows_per_s / naive.median_rows_per_s,
        "equal_rows_batch_requests": naive.batch_requests,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median over repeats of rows/s, each repeat = steps timed training steps",
        "trials": {"naive": naive.to_dict(), "dedup": dedup.to_dict(), "dedup_equal_rows": dedup_equal.to_dict()},
        "batch_size_search": {
            "rule": "double batch_requests until rows/s improves by <= 5%, OOM, max requests or time budget; keep the best",
            "max_requests": search_max_requests, "time_budget_s_per_mode": search_time_budget_s,
            "steps_per_trial": search_steps, "trials": searches,
        },
        "model_config": cfg.to_dict(),
        "loss": "ranking BCE over all rows + in-batch softmax (temperature 0.1, user+item masking) over label-1 rows",
        "optimizer": "AdamW lr=1e-3" + (" fused" if dev.type == "cuda" else ""),
        "data": {"generator": "reqdedup.train.batch.synthetic_batch", "positive_rate": positive_rate,
                 "requests_per_user": requests_per_user, "history_len": "uniform in [seq_len/2, seq_len]",
                 "seed": seed},
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "command": command or shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "wall_seconds": time.perf_counter() - started,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reqdedup.bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--candidates", type=int, default=256, help="candidate rows per request")
    p.add_argument("--batch-requests-naive", type=int, default=None, help="default: search")
    p.add_argument("--batch-requests-dedup", type=int, default=None, help="default: search")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ff-dim", type=int, default=1024)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--search-start-naive", type=int, default=1)
    p.add_argument("--search-start-dedup", type=int, default=8)
    p.add_argument("--search-max-requests", type=int, default=8192)
    p.add_argument("--search-steps", type=int, default=3)
    p.add_argument("--search-time-budget-s", type=float, default=90.0)
    p.add_argument("--positive-rate", type=float, default=0.05)
    p.add_argument("--requests-per-user", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="where to write the result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    result = run_train_bench(
        device=a.device, seq_len=a.seq_len, candidates=a.candidates, dtype=a.dtype,
        batch_requests_naive=a.batch_requests_naive, batch_requests_dedup=a.batch_requests_dedup,
        steps=a.steps, warmup=a.warmup, repeats=a.repeats, json_path=a.json,
        items=a.items, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, ff_dim=a.ff_dim,
        emb_dim=a.emb_dim, search_start_naive=a.search_start_naive, search_start_dedup=a.search_start_dedup,
        search_max_requests=a.search_max_requests, search_steps=a.search_steps,
        search_time_budget_s=a.search_time_budget_s, positive_rate=a.positive_rate,
        requests_per_user=a.requests_per_user, seed=a.seed,
        command=shlex.join(["python", "-m", "reqdedup.bench.train", *argv]),
    )
    print(json.dumps({k: result[k] for k in (
        "device", "seq_len", "candidates_per_request", "dtype", "batch_requests_naive", "batch_requests_dedup",
        "rows_per_s_naive", "rows_per_s_dedup", "speedup", "rows_per_s_dedup_equal", "speedup_equal_rows")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
