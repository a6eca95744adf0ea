"""Serving throughput and latency: request-level scoring vs per-candidate scoring, torch alone.

Same model, same requests, same process, two modes of `reqdedup.serve.scorer.RequestScorer`:

- request_level: the user tower (history transformer) runs once per request and every
  candidate is scored against that one user embedding;
- per_candidate: the row-level baseline, the user inputs are copied to every candidate and
  the user tower runs once per candidate (`RecModel.forward(mode="per_row")`).

A timed call is `scorer.score(requests)` end to end: validation, collation, host->device
copy, one forward per batch, the device->host copy of the scores. Requests are built once
(synthetic, tensors on the CPU, as a server holds them after parsing) and cycled.

For every candidates-per-request count (default 100, 500, 1,000) it measures
- single-request latency: batches of 1 request, p50/p99 per call;
- throughput: requests per second at a batch of several requests (request level: each batch
  size of `--batch-requests`, the best one reported; per candidate: enough requests for
  about `--pc-batch-sequences` user-tower sequences per call, at most the largest
  request-level batch);
medians over `--repeats` repeats. The per-candidate baseline at 1,000 candidates and a 1,024
history runs 1,000 full transformer encodings per request, so its number of calls per repeat
is bounded by a time budget (`--pc-budget-s`, at least `--pc-min-calls`) and it runs at most
`--pc-repeats` repeats; the JSON records how many calls each figure rests on.

Runs as `cd src && python -m reqdedup.bench.serve --json PATH ...` on a machine that has only
Python + torch (no numpy/pandas/mlflow), and as `reqdedup bench serve --json PATH ...`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from reqdedup.serve.scorer import Request, RequestScorer, collate
from reqdedup.train.batch import HISTORY_ID_SHIFT, synthetic_batch
from reqdedup.train.model import ModelConfig, RecModel

DTYPES = ("bf16", "fp32")


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def make_requests(cfg: ModelConfig, count: int, candidates: int, history_min: int, seed: int) -> list[Request]:
    """`count` distinct synthetic requests (CPU tensors), history lengths in [history_min, seq_len]."""
    b = synthetic_batch(count, candidates, cfg.seq_len, cfg.items, seed, "cpu", min_history=history_min)
    out = []
    for r in range(count):
        n = int(b.history_len[r])
        rows = slice(r * candidates, (r + 1) * candidates)
        out.append(Request(
            history=b.history[r, :n] - HISTORY_ID_SHIFT,  # raw ids, as a client sends them
            user_dense=b.user_dense[r], user_segment=int(b.user_segment[r]), user_country=int(b.user_country[r]),
            item_id=b.item_id[rows], item_category=b.item_category[rows], item_dense=b.item_dense[rows],
            request_id=f"bench-{candidates}-{r}"))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def time_calls(scorer: RequestScorer, pool: list[Request], mode: str, batch: int, *, calls: int, repeats: int,
               warmup: int, budget_s: float | None = None, min_calls: int = 2) -> dict:
    """Time `repeats` x `calls` calls of `scorer.score(batch requests, mode)`.

    With `budget_s`, the calls per repeat are cut to what fits in `budget_s` seconds at the
    warmup's pace (at least `min_calls`). Returns medians over repeats of requests/s and of
    the per-call p50/p99 latency (ms), and the per-repeat figures.
    """
    device = scorer.device
    k = 0

    def next_batch() -> list[Request]:
        nonlocal k
        reqs = [pool[(k * batch + j) % len(pool)] for j in range(batch)]
        k += 1
        return reqs

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_times = []
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            scorer.score(next_batch(), mode)
            warm_times.append(time.perf_counter() - t0)
        if budget_s is not None:
            per_call = min(warm_times[-1], statistics.median(warm_times))
            calls = max(min_calls, min(calls, int(budget_s / max(per_call, 1e-9))))
        rps, p50, p99 = [], [], []
        for _ in range(repeats):
            lat = []
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                t0 = time.perf_counter()
                scorer.score(next_batch(), mode)  # returns CPU tensors: the call includes the sync
                lat.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            rps.append(batch * calls / elapsed)
            p50.append(1e3 * percentile(lat, 50))
            p99.append(1e3 * percentile(lat, 99))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"mode": mode, "batch_requests": batch, "calls_per_repeat": calls, "repeats": repeats,
                "warmup_calls": max(1, warmup), "rps": statistics.median(rps), "p50_ms": statistics.median(p50),
                "p99_ms": statistics.median(p99), "rps_per_repeat": rps, "p50_ms_per_repeat": p50,
                "p99_ms_per_repeat": p99, "peak_memory_gb": peak, "error": None}
    except Exception as exc:
        if not _is_oom(exc):
            raise
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"mode": mode, "batch_requests": batch, "error": "out of memory", "rps": 0.0,
                "p50_ms": None, "p99_ms": None}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _agreement(scorer: RequestScorer, requests: list[Request]) -> dict:
    """Max |difference| between the two modes' outputs on the same requests (same function)."""
    a = scorer.score(requests, "request_level")
    b = scorer.score(requests, "per_candidate")
    return {
        "requests": len(requests),
        "max_abs_diff_probability": max(float((x.scores - y.scores).abs().max()) for x, y in zip(a, b)),
        "max_abs_diff_retrieval": max(float((x.retrieval_scores - y.retrieval_scores).abs().max())
                                      for x, y in zip(a, b)),
    }


def host_prep_ms(scorer: RequestScorer, requests: list[Request], repeats: int = 5) -> float:
    """Median ms of the host side of one call (validate + collate on the CPU), no device work."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for group in scorer.chunks(scorer.check(requests)):
            collate(group, scorer.cfg.seq_len)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_serve_bench(
    device: str = "cuda",
    dtype: str = "bf16",
    seq_len: int | None = None,
    history_min: int | None = None,
    candidates: tuple[int, ...] = (100, 500, 1000),
    batch_requests: tuple[int, ...] = (16, 64, 256),
    pc_batch_sequences: int = 1024,
    single_calls: int = 50,
    batch_calls: int = 10,
    repeats: int = 5,
    warmup: int = 3,
    pc_repeats: int = 3,
    pc_budget_s: float = 2.0,
    pc_min_calls: int = 2,
    pool: int | None = None,
    json_path: str | None = None,
    *,
    items: int = 100_000,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    ff_dim: int = 1024,
    emb_dim: int = 64,
    seed: int = 0,
    command: str | None = None,
    log=print,
) -> dict:
    """Benchmark request-level vs per-candidate scoring; writes and returns the result dict.

    `seq_len` defaults to 1,024 on CUDA and 32 on CPU; `history_min` (shortest history of
    the synthetic requests) defaults to `seq_len`, i.e. every request carries a full history.
    bf16 means autocast on CUDA; on CPU the run is fp32 and the JSON says so.
    """
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if seq_len is None:
        seq_len = 1024 if dev.type == "cuda" else 32
    history_min = seq_len if history_min is None else max(0, min(history_min, seq_len))
    if not candidates or min(candidates) < 1 or not batch_requests or min(batch_requests) < 1:
        raise ValueError("candidates and batch_requests must be non-empty lists of positive integers")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ModelConfig(items=items, seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      ff_dim=ff_dim, emb_dim=emb_dim, dropout=0.0,
                      user_mlp=(2 * emb_dim,), item_mlp=(2 * emb_dim,), head_mlp=(2 * emb_dim, emb_dim))
    torch.manual_seed(seed)
    model = RecModel(cfg)
    # Give BatchNorm non-trivial running statistics, as a trained model has.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    scorer = RequestScorer(model, dev, precision=dtype, max_batch_requests=max(batch_requests),
                           max_batch_rows=max(batch_requests) * max(candidates))
    started = time.perf_counter()
    pool_size = pool or max(max(batch_requests), 8)
    per_count: dict[str, dict] = {}
    for c in candidates:
        t_c = time.perf_counter()
        requests = make_requests(cfg, pool_size, c, history_min, seed + c)
        # about pc_batch_sequences user-tower runs per call, never more requests than request level gets
        pc_batch = max(1, min(round(pc_batch_sequences / c), max(batch_requests)))
        agreement = _agreement(scorer, requests[:2])
        common = dict(warmup=warmup)
        single_rl = time_calls(scorer, requests, "request_level", 1, calls=single_calls, repeats=repeats, **common)
        log(f"[C={c}] request_level single: p50 {single_rl['p50_ms']:.2f} ms p99 {single_rl['p99_ms']:.2f} ms "
            f"{single_rl['rps']:,.1f} req/s")
        sweep = []
        for b in batch_requests:
            t = time_calls(scorer, requests, "request_level", b, calls=batch_calls, repeats=repeats, **common)
            sweep.append(t)
            log(f"[C={c}] request_level batch {b}: {t['rps']:,.1f} req/s p50 {t['p50_ms']} ms {t['error'] or ''}")
        pc_kw = dict(warmup=1, budget_s=pc_budget_s, min_calls=pc_min_calls)
        single_pc = time_calls(scorer, requests, "per_candidate", 1, calls=single_calls, repeats=pc_repeats, **pc_kw)
        log(f"[C={c}] per_candidate single: p50 {single_pc['p50_ms']} ms {single_pc['rps']:,.2f} req/s "
            f"({single_pc.get('calls_per_repeat')} calls x {pc_repeats}) {single_pc['error'] or ''}")
        if pc_batch > 1:
            batch_pc = time_calls(scorer, requests, "per_candidate", pc_batch, calls=batch_calls, repeats=pc_repeats,
                                  **pc_kw)
            log(f"[C={c}] per_candidate batch {pc_batch}: {batch_pc['rps']:,.2f} req/s {batch_pc['error'] or ''}")
        else:
            batch_pc = single_pc
        ok = [t for t in sweep if not t["error"]]
        if not ok:
            raise RuntimeError(f"request_level ran out of memory at every batch size for {c} candidates")
        best_rl = max(ok, key=lambda t: t["rps"])
        host_ms = {"single": host_prep_ms(scorer, requests[:1]),
                   "batch": host_prep_ms(scorer, requests[:best_rl["batch_requests"]])}
        pc_options = [t for t in (single_pc, batch_pc) if not t["error"]]
        if not pc_options:
            raise RuntimeError(f"per_candidate ran out of memory for {c} candidates")
        best_pc = max(pc_options, key=lambda t: t["rps"])
        per_count[str(c)] = {
            "candidates": c,
            "rps_request_level": best_rl["rps"],
            "rps_per_candidate": best_pc["rps"],
            "speedup": best_rl["rps"] / best_pc["rps"],
            "batch_requests_request_level": best_rl["batch_requests"],
            "batch_requests_per_candidate": best_pc["batch_requests"],
            "p50_ms_request_level": single_rl["p50_ms"],
            "p99_ms_request_level": single_rl["p99_ms"],
            "p50_ms_per_candidate": single_pc["p50_ms"],
            "p99_ms_per_candidate": single_pc["p99_ms"],
            "single_rps_request_level": single_rl["rps"],
            "single_rps_per_candidate": single_pc["rps"],
            "single_speedup": single_rl["rps"] / single_pc["rps"],
            "batch_p50_ms_request_level": best_rl["p50_ms"],
            "batch_p99_ms_request_level": best_rl["p99_ms"],
            "batch_p50_ms_per_candidate": best_pc["p50_ms"],
            "batch_p99_ms_per_candidate": best_pc["p99_ms"],
            "host_prep_ms_request_level": host_ms,
            "agreement": agreement,
            "trials": {"request_level_single": single_rl, "request_level_batches": sweep,
                       "per_candidate_single": single_pc, "per_candidate_batch": batch_pc},
            "seconds": time.perf_counter() - t_c,
        }
        r = per_count[str(c)]
        log(f"[C={c}] throughput {r['rps_request_level']:,.1f} vs {r['rps_per_candidate']:,.2f} req/s: "
            f"{r['speedup']:,.1f}x; single request p50 {r['p50_ms_request_level']:.2f} vs "
            f"{r['p50_ms_per_candidate']:.1f} ms; host prep {host_ms}; agreement {agreement}")
        del requests
        gc.collect()

    result = {
        "benchmark": "serve_request_level_vs_per_candidate",
        "device": _device_name(dev),
        "device_type": dev.type,
        "torch_threads": torch.get_num_threads(),
        "dtype": scorer.effective_precision,
        "seq_len": seq_len,
        "history_len": {"min": history_min, "max": seq_len},
        "candidates": list(candidates),
        "results": per_count,
        "pool_requests": pool_size,
        "batch_requests_sweep": list(batch_requests),
        "pc_batch_sequences": pc_batch_sequences,
        "single_calls": single_calls,
        "batch_calls": batch_calls,
        "repeats": repeats,
        "warmup": warmup,
        "pc_repeats": pc_repeats,
        "pc_budget_s": pc_budget_s,
        "pc_min_calls": pc_min_calls,
        "statistic": ("a call = RequestScorer.score(requests) end to end (validate, collate, host->device, forward, "
                      "device->host); rps = requests / wall time of a repeat; p50/p99 = per-call latency percentiles "
                      "within a repeat; every figure is the median over repeats. rps_* = best batch size of each "
                      "mode; p50/p99_ms_* = single request (batch of 1); host_prep_ms_request_level = validate + collate "
                      "alone (CPU) for 1 request and for the best request-level batch."),
        "model_config": cfg.to_dict(),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "data": {"generator": "reqdedup.train.batch.synthetic_batch", "seed": seed,
                 "history_len": f"uniform in [{history_min}, {seq_len}]"},
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


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reqdedup.bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="bf16 = autocast on CUDA (CPU runs fp32)")
    p.add_argument("--seq-len", type=int, default=None, help="history length (default 1024 on CUDA, 32 on CPU)")
    p.add_argument("--history-min", type=int, default=None, help="shortest history (default: seq-len, full)")
    p.add_argument("--candidates", type=_ints, default=(100, 500, 1000), help="candidates per request, e.g. 100,500,1000")
    p.add_argument("--batch-requests", type=_ints, default=(16, 64, 256),
                   help="request-level throughput batch sizes (requests per call)")
    p.add_argument("--pc-batch-sequences", type=int, default=1024,
                   help="per-candidate throughput batch: about this many user-tower sequences per call")
    p.add_argument("--single-calls", type=int, default=50, help="timed single-request calls per repeat")
    p.add_argument("--batch-calls", type=int, default=10, help="timed batch calls per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pc-repeats", type=int, default=3, help="repeats of the per-candidate baseline")
    p.add_argument("--pc-budget-s", type=float, default=2.0, help="per-candidate: seconds per repeat (calls cut to fit)")
    p.add_argument("--pc-min-calls", type=int, default=2)
    p.add_argument("--pool", type=int, default=None, help="distinct requests per candidates count (default max batch, >= 8)")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ff-dim", type=int, default=1024)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="where to write the result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run_serve_bench(
        device=a.device, dtype=a.dtype, seq_len=a.seq_len, history_min=a.history_min, candidates=a.candidates,
        batch_requests=a.batch_requests, pc_batch_sequences=a.pc_batch_sequences, single_calls=a.single_calls,
        batch_calls=a.batch_calls, repeats=a.repeats, warmup=a.warmup, pc_repeats=a.pc_repeats,
        pc_budget_s=a.pc_budget_s, pc_min_calls=a.pc_min_calls, pool=a.pool, json_path=a.json,
        items=a.items, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, ff_dim=a.ff_dim,
        emb_dim=a.emb_dim, seed=a.seed,
        command=shlex.join(["python", "-m", "reqdedup.bench.serve", *argv]),
    )
    summary = {c: {k: r[k] for k in ("rps_request_level", "rps_per_candidate", "speedup",
                                     "batch_requests_request_level", "batch_requests_per_candidate",
                                     "p50_ms_request_level", "p99_ms_request_level",
                                     "p50_ms_per_candidate", "p99_ms_per_candidate")}
               for c, r in result["results"].items()}
    print(json.dumps({"device": result["device"], "dtype": result["dtype"], "seq_len": result["seq_len"],
                      "results": summary, "wall_seconds": result["wall_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
