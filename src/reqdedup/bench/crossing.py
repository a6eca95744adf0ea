"""Crossing ranker: context/crossing dedup vs the naive per-candidate baseline, torch alone.

Same crossing model (`ModelConfig(ranking="crossing")`), same data generator, same process;
for each candidates-per-request count (default 100, 500, 1,000) at a 1,024-token history:

- training rows/s: full training steps (forward, ranking BCE + in-batch softmax, backward,
  AdamW) with `bench.train.measure`, in mode "dedup" (history once per request, candidates
  attend to the cached K/V) and "per_row" (each candidate row runs [history; candidate]
  through the layers). The naive step holds ONE request of ``min(C, naive_train_rows)``
  candidates: a naive row costs the same whatever the candidates per request (it shares
  nothing with the other rows of its request), so its rows/s is measured on that subset and
  used for the shape as it is, and the JSON says so;
- serving requests/s and single-request p50/p99: `RequestScorer.score` end to end with
  `bench.serve.time_calls`, "request_level" (one context pass + one crossing pass over all
  candidates) vs "per_candidate" (the naive function); the naive calls per repeat are cut to
  a time budget. With ``naive_serve_max_candidates`` below C, the naive serving call holds
  that many candidates and its requests/s is scaled by subset / C (cost per candidate is
  constant), again stated in the JSON.

Speedups are ratios of medians over repeats. Run on a host with only Python + torch:
``PYTHONPATH=src python3 -m reqdedup.bench.crossing --json PATH`` (or `reqdedup bench crossing`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone

import torch

from reqdedup.bench.serve import make_requests, time_calls
from reqdedup.bench.train import DTYPES, measure
from reqdedup.serve.scorer import RequestScorer
from reqdedup.train.model import ModelConfig, RecModel


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _serving_model(cfg: ModelConfig, seed: int) -> RecModel:
    torch.manual_seed(seed)
    model = RecModel(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _agreement(scorer: RequestScorer, request) -> float:
    """Max |probability difference| of the two serving modes on one request (same function)."""
    a = scorer.score([request], "request_level")[0].scores
    b = scorer.score([request], "per_candidate")[0].scores
    return float((a - b).abs().max())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_crossing_bench(
    device: str = "cuda",
    dtype: str = "bf16",
    seq_len: int = 1024,
    candidates: tuple[int, ...] = (100, 500, 1000),
    train_rows: int = 16384,
    naive_train_rows: int = 128,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 5,
    naive_repeats: int = 3,
    serve_batch_requests: tuple[int, ...] = (1, 8, 32),
    naive_serve_max_candidates: int | None = None,
    single_calls: int = 30,
    serve_calls: int = 5,
    naive_budget_s: float = 2.0,
    json_path: str | None = None,
    md_path: str | None = None,
    *,
    items: int = 100_000,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    ff_dim: int = 1024,
    emb_dim: int = 64,
    crossing_layers: int | None = None,
    positive_rate: float = 0.05,
    requests_per_user: int = 4,
    seed: int = 0,
    command: str | None = None,
    log=print,
) -> dict:
    """Benchmark the crossing ranker's dedup vs naive paths; writes and returns the result dict."""
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not candidates or min(candidates) < 1 or min(serve_batch_requests) < 1:
        raise ValueError("candidates and serve_batch_requests must be positive integers")
    autocast_dtype = DTYPES[dtype] if dev.type == "cuda" and dtype != "fp32" else None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ModelConfig(items=items, seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      ff_dim=ff_dim, emb_dim=emb_dim, dropout=0.0, user_mlp=(2 * emb_dim,), item_mlp=(2 * emb_dim,),
                      head_mlp=(2 * emb_dim, emb_dim), ranking="crossing", crossing_layers=crossing_layers)
    started = time.perf_counter()
    common = dict(device=dev, autocast_dtype=autocast_dtype, seed=seed, positive_rate=positive_rate,
                  requests_per_user=requests_per_user)
    model = _serving_model(cfg, seed)
    max_batch = max(serve_batch_requests)
    scorer = RequestScorer(model, dev, precision=dtype, max_batch_requests=max_batch,
                           max_batch_rows=max_batch * max(candidates))
    shapes = []
    for c in candidates:
        t_shape = time.perf_counter()
        # ---- training ----
        dedup_requests = max(1, train_rows // c)
        naive_c = min(c, naive_train_rows)
        dedup_t = measure(cfg, "dedup", dedup_requests, c, steps=steps, warmup=warmup, repeats=repeats, **common)
        naive_t = measure(cfg, "per_row", 1, naive_c, steps=steps, warmup=1, repeats=naive_repeats, **common)
        for t in (dedup_t, naive_t):
            log(f"[C={c} train {t.mode}] {t.batch_requests} req x {t.rows_per_step // t.batch_requests} cand: "
                f"{t.median_rows_per_s:,.0f} rows/s peak_gb={t.peak_memory_gb} {t.error or ''}")
            if t.error:
                raise RuntimeError(f"training {t.mode} at {t.batch_requests} requests x {c} candidates: {t.error}")
        _free(dev)
        # ---- serving ----
        naive_serve_c = c if naive_serve_max_candidates is None else min(c, naive_serve_max_candidates)
        pool = make_requests(cfg, max(max_batch, 8), c, seq_len, seed + c)
        naive_pool = pool if naive_serve_c == c else make_requests(cfg, 8, naive_serve_c, seq_len, seed + c)
        agreement = _agreement(scorer, naive_pool[0])
        single = time_calls(scorer, pool, "request_level", 1, calls=single_calls, repeats=repeats, warmup=3)
        sweep = [time_calls(scorer, pool, "request_level", b, calls=serve_calls, repeats=repeats, warmup=2)
                 for b in serve_batch_requests]
        ok = [t for t in sweep if not t["error"]]
        if not ok:
            raise RuntimeError(f"request-level serving ran out of memory at every batch size for {c} candidates")
        best = max(ok, key=lambda t: t["rps"])
        naive_batch = max(1, min(round(1024 / naive_serve_c), max_batch))
        naive_s = time_calls(scorer, naive_pool, "per_candidate", naive_batch, calls=serve_calls,
                             repeats=naive_repeats, warmup=1, budget_s=naive_budget_s, min_calls=2)
        if naive_s["error"]:
            raise RuntimeError(f"per-candidate serving ran out of memory at {naive_serve_c} candidates")
        naive_rps = naive_s["rps"] * naive_serve_c / c  # requests of C candidates per second
        entry = {
            "candidates_per_request": c,
            "seq_len": seq_len,
            "train_speedup": dedup_t.median_rows_per_s / naive_t.median_rows_per_s,
            "serve_speedup": best["rps"] / naive_rps,
            "p50_ms_request_level": single["p50_ms"],
            "p99_ms_request_level": single["p99_ms"],
            "train_rows_per_s_dedup": dedup_t.median_rows_per_s,
            "train_rows_per_s_naive": naive_t.median_rows_per_s,
            "train_dedup_requests_per_step": dedup_requests,
            "train_naive_candidates_per_step": naive_c,
            "train_naive_subset": naive_c < c,
            "serve_rps_dedup": best["rps"],
            "serve_rps_naive": naive_rps,
            "serve_rps_naive_measured": naive_s["rps"],
            "serve_naive_candidates_per_request": naive_serve_c,
            "serve_naive_subset": naive_serve_c < c,
            "serve_batch_requests_dedup": best["batch_requests"],
            "serve_batch_requests_naive": naive_batch,
            "single_rps_request_level": single["rps"],
            "max_abs_diff_probability_dedup_vs_naive": agreement,
            "trials": {"train_dedup": dedup_t.to_dict(), "train_naive": naive_t.to_dict(),
                       "serve_single": single, "serve_dedup_batches": sweep, "serve_naive": naive_s},
            "seconds": time.perf_counter() - t_shape,
        }
        shapes.append(entry)
        log(f"[C={c}] train {entry['train_speedup']:,.1f}x ({entry['train_rows_per_s_dedup']:,.0f} vs "
            f"{entry['train_rows_per_s_naive']:,.0f} rows/s); serve {entry['serve_speedup']:,.1f}x "
            f"({entry['serve_rps_dedup']:,.1f} vs {naive_rps:,.2f} req/s); one request p50 "
            f"{entry['p50_ms_request_level']:.2f} ms p99 {entry['p99_ms_request_level']:.2f} ms; "
            f"agreement {agreement:.2e}; {entry['seconds']:.0f} s")
        del pool, naive_pool
        _free(dev)

    result = {
        "benchmark": "crossing_dedup_vs_naive",
        "device": _device_name(dev),
        "device_type": dev.type,
        "dtype": dtype if autocast_dtype is not None else "fp32",
        "seq_len": seq_len,
        "history_len": {"train": "uniform in [seq_len/2, seq_len]", "serve": f"{seq_len} (full)"},
        "results": shapes,
        "steps": steps, "warmup": warmup, "repeats": repeats, "naive_repeats": naive_repeats,
        "single_calls": single_calls, "serve_calls": serve_calls, "naive_budget_s": naive_budget_s,
        "statistic": ("medians over repeats. train: rows/s of full training steps (bench.train.measure), each "
                      "repeat = `steps` steps; serve: RequestScorer.score end to end (bench.serve.time_calls), "
                      "rps at the best batch of serve_batch_requests (dedup) and at ~1,024 naive sequences per "
                      "call (naive); p50/p99 = single-request calls. speedup = dedup / naive, same run, same model."),
        "naive_baseline": ("training: one request of train_naive_candidates_per_step candidates per step (a naive "
                           "row shares nothing with its request's other rows, so rows/s does not depend on the "
                           "candidates per request); serving: requests of serve_naive_candidates_per_request "
                           "candidates, rps scaled by that / candidates_per_request when it is a subset; naive "
                           "serving calls per repeat cut to naive_budget_s"),
        "model_config": cfg.to_dict(),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "data": {"generator": "reqdedup.train.batch.synthetic_batch", "seed": seed, "positive_rate": positive_rate,
                 "requests_per_user": requests_per_user},
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
        md_path = md_path or os.path.splitext(json_path)[0] + ".md"
    if md_path:
        with open(md_path, "w") as f:
            f.write(markdown(result))
    return result


def markdown(result: dict) -> str:
    """A short table of the result (the .md next to the JSON)."""
    lines = [f"# Crossing ranker: context/crossing dedup vs naive per-candidate ({result['device']}, {result['dtype']})",
             "", f"History {result['seq_len']}; model {result['model_config']['n_layers']} layers, d_model "
             f"{result['model_config']['d_model']}, crossing_layers {result['model_config']['crossing_layers'] or 'all'}; "
             f"{result['wall_seconds']:.0f} s; command `{result['command']}`.", "",
             "| candidates | train rows/s dedup | train rows/s naive | train speedup | serve req/s dedup | "
             "serve req/s naive | serve speedup | p50 ms (1 request) | p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(f"| {r['candidates_per_request']:,} | {r['train_rows_per_s_dedup']:,.0f} | "
                     f"{r['train_rows_per_s_naive']:,.0f}{'*' if r['train_naive_subset'] else ''} | "
                     f"{r['train_speedup']:,.1f}x | {r['serve_rps_dedup']:,.1f} | "
                     f"{r['serve_rps_naive']:,.2f}{'*' if r['serve_naive_subset'] else ''} | {r['serve_speedup']:,.1f}x | "
                     f"{r['p50_ms_request_level']:.2f} | {r['p99_ms_request_level']:.2f} |")
    lines += ["", "`*`: naive timed on a subset of the candidates (see `naive_baseline` in the JSON).",
              "", f"Statistic: {result['statistic']}", "", f"Naive baseline: {result['naive_baseline']}", ""]
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reqdedup.bench.crossing", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="bf16 = autocast on CUDA (CPU runs fp32)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--candidates", type=_ints, default=(100, 500, 1000))
    p.add_argument("--train-rows", type=int, default=16384, help="dedup training: about this many rows per step")
    p.add_argument("--naive-train-rows", type=int, default=128, help="naive training: candidates per step (1 request)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--serve-batch-requests", type=_ints, default=(1, 8, 32))
    p.add_argument("--naive-serve-max-candidates", type=int, default=None,
                   help="naive serving: time requests of at most this many candidates and scale (default: all)")
    p.add_argument("--single-calls", type=int, default=30)
    p.add_argument("--serve-calls", type=int, default=5)
    p.add_argument("--naive-budget-s", type=float, default=2.0)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ff-dim", type=int, default=1024)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--crossing-layers", type=int, default=None, help="default: all layers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="where to write the result JSON")
    p.add_argument("--md", default=None, help="where to write the table (default: the JSON path with .md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run_crossing_bench(
        device=a.device, dtype=a.dtype, seq_len=a.seq_len, candidates=a.candidates, train_rows=a.train_rows,
        naive_train_rows=a.naive_train_rows, steps=a.steps, warmup=a.warmup, repeats=a.repeats,
        naive_repeats=a.naive_repeats, serve_batch_requests=a.serve_batch_requests,
        naive_serve_max_candidates=a.naive_serve_max_candidates, single_calls=a.single_calls,
        serve_calls=a.serve_calls, naive_budget_s=a.naive_budget_s, json_path=a.json, md_path=a.md,
        items=a.items, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, ff_dim=a.ff_dim,
        emb_dim=a.emb_dim, crossing_layers=a.crossing_layers, seed=a.seed,
        command=shlex.join(["python", "-m", "reqdedup.bench.crossing", *argv]),
    )
    keys = ("candidates_per_request", "train_speedup", "serve_speedup", "p50_ms_request_level", "p99_ms_request_level")
    print(json.dumps({"device": result["device"], "dtype": result["dtype"], "seq_len": result["seq_len"],
                      "results": [{k: r[k] for k in keys} for r in result["results"]],
                      "wall_seconds": result["wall_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
