"""Data path benchmark: today's RequestLoader vs the request-level reader, and end-to-end
training fed by the reader (per-row + iid vs request-level), in one run on the same data.

`reqdedup bench loader --requests R --candidates K --history H --json PATH` (or, on a host
with torch, numpy and pyarrow only: `PYTHONPATH=src python -m reqdedup.bench.loader ...`):

1. generates ``--dates`` days of synthetic request logs (the project's generator) under a
   bench home, and with ``--source iceberg`` ingests them with the project's Spark ingest
   (``landing`` reads the landed files, sorted once per date, as the GPU host does);
2. each loader variant runs in a fresh process (so its peak RSS is its own; DataLoader
   workers' RSS is added in): the old RequestLoader over date 1, the new reader over date 1
   (through the request-level projection where the source has one, and decoding every row),
   and the new reader over all dates (RSS must not grow with the dates), once as one pass
   and once epoch after epoch as training reads it (``--reader-epochs``, the next epoch
   started ahead, pinned on a GPU host: the reader-alone rate is that variant's median epoch
   after the first);
3. training through `reqdedup.train.worker.train` (the code `reqdedup train` runs), one
   process: per-row + iid, request-level + request_shuffle; and the request-level model
   alone on the same batches already on the device (no loader). Rates are medians over the
   epochs after the first; ``data_wait_share`` is the share of step time spent waiting for
   the next batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from reqdedup.bench.proctree import descendants

DATE0 = "2026-02-01"


# ---------------------------------------------------------------------------------------
# peak RSS of a process and its children, from /proc (no psutil on the GPU host)
# ---------------------------------------------------------------------------------------
def _rss_bytes(pid: int) -> int:
    """Proportional set size (PSS): pages a forked DataLoader worker shares with its parent
    are counted once across them, not once per process as VmRSS would."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples the memory (PSS) of this process plus its descendants every 20 ms; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes(me) + sum(_rss_bytes(c) for c in descendants(me)))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------
# one loader variant (run in its own process)
# ---------------------------------------------------------------------------------------
def run_variant(variant: str, args: dict) -> dict:
    from reqdedup.config import get_settings
    from reqdedup.train.reader import ReaderSpec, RequestReader, plan

    import reqdedup.train.loader  # noqa: F401 (every variant imports the same modules before the baseline)

    settings = get_settings()
    if settings.read_source == "iceberg":
        import pyiceberg.catalog.sql  # noqa: F401
    days = args["days"]
    end = days[-1] if variant.startswith("new_all_dates") or variant == "new_epochs" else days[0]
    epochs: list[dict] = []
    # The interpreter with torch, pyarrow and pyiceberg imported: what no loader goes under.
    baseline = _rss_bytes(os.getpid())
    with PeakRss() as rss:
        t0 = time.perf_counter()
        requests = rows = 0
        first = None
        if variant == "old":
            from reqdedup.train.loader import RequestLoader

            loader = RequestLoader.from_lake(days[0], end, settings=settings, order="sorted",
                                             batch_rows=args["batch_rows"], seq_len=args["seq_len"])
            for batch in loader.epoch(0):
                requests += batch.num_requests
                rows += batch.num_rows
        else:
            import torch

            spec = ReaderSpec(order="request_shuffle", batch_rows=args["batch_rows"], seq_len=args["seq_len"],
                              workers=args["workers"], streams=args["streams"], buffer_requests=args["buffer_requests"],
                              use_projection=variant != "new_wide")
            # new_epochs reads as training does: pinned where there is a GPU
            reader = RequestReader(plan(days[0], end, settings=settings), spec,
                                   pin_memory=variant == "new_epochs" and torch.cuda.is_available())
            if variant == "new_epochs":
                # epoch after epoch through RequestReader.epoch, the next epoch's pipeline
                # started while this one's last batches are taken
                for e in range(args["epochs"]):
                    t_e, rows_e = time.perf_counter(), 0
                    for batch in reader.epoch(e, next_epoch=e + 1 if e + 1 < args["epochs"] else None):
                        requests += batch.num_requests
                        rows_e += batch.num_rows
                    epochs.append({"rows": rows_e, "seconds": time.perf_counter() - t_e})
                    rows += rows_e
                reader.close()
            else:
                for batch in reader.batches(0):
                    if first is None:  # start-up: workers forked, first files opened, buffer filled
                        first = (time.perf_counter() - t0, batch.num_requests, batch.num_rows)
                    requests += batch.num_requests
                    rows += batch.num_rows
        seconds = time.perf_counter() - t0
    out = {"variant": variant, "dates": 1 if end == days[0] else len(days), "requests": requests, "rows": rows,
           "seconds": seconds, "requests_per_s": requests / seconds, "rows_per_s": rows / seconds,
           "peak_rss_gb": rss.peak / 1e9, "baseline_rss_gb": baseline / 1e9,
           "peak_rss_gb_above_baseline": (rss.peak - baseline) / 1e9}
    if epochs:
        rates = [e["rows"] / e["seconds"] for e in epochs]
        out.update(epochs=epochs, epoch_rows_per_s=rates,
                   epoch_rows_per_s_median_after_first=statistics.median(rates[1:] if len(rates) > 1 else rates))
    if first is not None and seconds > first[0]:
        out.update(first_batch_seconds=first[0],
                   steady_requests_per_s=(requests - first[1]) / (seconds - first[0]),
                   steady_rows_per_s=(rows - first[2]) / (seconds - first[0]))
    return out


def _variant_in_subprocess(variant: str, args: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "reqdedup.bench.loader", "--_variant", variant,
                          "--_args", json.dumps(args)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loader variant {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# training through the worker
# ---------------------------------------------------------------------------------------
def _train_config(a, name: str, run_dir: Path, *, order: str, encoding: str, batch_rows: int, end: str,
                  buckets, epochs: int):
    from reqdedup.train.config import config_from_dict

    e = a.emb_dim
    return config_from_dict({
        "name": name,
        "data": {"train_start": DATE0, "train_end": end, "buckets": buckets, "order": order, "batch_rows": batch_rows,
                 "workers": a.workers, "streams": a.streams, "buffer_requests": a.buffer_requests, "buffer_rows": a.buffer_rows},
        "model": {"items": a.items, "seq_len": a.seq_len, "d_model": a.d_model, "n_layers": a.n_layers,
                  "n_heads": a.n_heads, "ff_dim": a.ff_dim, "emb_dim": e, "user_mlp": [2 * e], "item_mlp": [2 * e],
                  "head_mlp": [2 * e, e]},
        "train": {"epochs": epochs, "lr": 1e-3, "seed": 0, "user_encoding": encoding, "sync_bn": False,
                  "mask_same_user": encoding == "dedup", "mixed_precision": "auto" if a.dtype == "bf16" else "off"},
        "dist": {"nproc_per_node": 1, "device": a.device},
        "output": {"run_dir": str(run_dir / name)},
        "mlflow": {"enabled": False},
    }, f"bench {name}")


def _median_after_first(history: list[dict], key: str) -> float:
    values = [h[key] for h in history[1:]] or [h[key] for h in history]
    return statistics.median(values)


def model_only(cfg, settings, steps: int, repeats: int) -> float:
    """Rows/s of the same training step on batches already on the device (no loader)."""
    import torch

    from reqdedup.train.model import RecModel
    from reqdedup.train.reader import RequestReader, plan
    from reqdedup.train.worker import reader_spec, resolve_device, train_step

    device = resolve_device(cfg, 0)
    reader = RequestReader(plan(cfg.data.train_start, cfg.data.train_end, buckets=cfg.data.buckets,
                                settings=settings, feature_columns=cfg.data.feature_columns), reader_spec(cfg))
    batches, epoch = [], reader.epoch(0)
    for batch in epoch:
        batches.append(batch.to(device))
        if len(batches) == min(steps, reader.steps_per_epoch()):
            break
    epoch.close()  # stops the packing thread and the decode workers before timing
    torch.manual_seed(0)
    model = RecModel(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    amp = device.type == "cuda" and cfg.train.mixed_precision == "auto"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for b in batches[:2]:  # warm-up
        train_step(model, opt, b, cfg, amp)
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for b in batches:
            train_step(model, opt, b, cfg, amp)
        sync()
        rates.append(sum(b.num_rows for b in batches) / (time.perf_counter() - t0))
    return statistics.median(rates)


def already_ingested(day: str, settings) -> bool:
    """The table's main already holds as many rows of ``day`` as were landed, each data file
    with its request-level projection: a rerun on the same --home reuses them (an ingest takes
    minutes; the bench writes a date's landing files only when there are none)."""
    import pyarrow.parquet as pq

    from reqdedup.errors import InputError
    from reqdedup.lake.ingest import landing_files
    from reqdedup.train.reader import plan

    try:
        units = plan(day, day, settings=settings)
    except InputError:  # no table yet, or no rows of that date
        return False
    landed = sum(pq.ParquetFile(p).metadata.num_rows for p in landing_files(settings, day))
    return all(u.requests_path is not None for u in units) and sum(u.rows for u in units) == landed


def median_of_repeats(samples: list[dict]) -> dict:
    """One variant's repeats: the median of each number, every sample's rate and peak kept."""
    out = dict(samples[0])
    for k, v in samples[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(s[k] for s in samples)
    out["repeats"] = [{k: s[k] for k in ("requests_per_s", "rows_per_s", "peak_rss_gb")} for s in samples]
    return out


def run(a, command: str) -> dict:
    home = Path(a.home or tempfile.mkdtemp(prefix="reqdedup-bench-loader-"))
    env = {**os.environ, "REQDEDUP_HOME": str(home), "REQDEDUP_READ_SOURCE": a.source}
    os.environ.update({k: env[k] for k in ("REQDEDUP_HOME", "REQDEDUP_READ_SOURCE")})
    import datetime as dt

    from reqdedup.config import get_settings
    from reqdedup.contract import parse_date
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.train.reader import plan

    settings = get_settings()
    days = [(parse_date(DATE0) + dt.timedelta(days=i)).isoformat() for i in range(a.dates)]
    t0 = time.perf_counter()
    for i, day in enumerate(days):
        if not settings.landing_path(day).is_dir():
            write_landing(GeneratorConfig(date=day, users=a.users or max(1, a.requests // 4), requests=a.requests,
                                          candidates=a.candidates, history=a.history, items=a.items, seed=a.seed + i),
                          out_dir=settings.landing_dir)
        if a.source == "iceberg" and not already_ingested(day, settings):
            from reqdedup.lake.ingest import ingest_date

            ingest_date(day, settings, publish=True)
    units = plan(days[0], days[-1], settings=settings)  # landing: builds the sorted files once
    prepare_s = time.perf_counter() - t0
    print(f"[bench loader] data ready in {prepare_s:.0f} s: {sum(u.rows for u in units):,} rows in {len(units)} files",
          flush=True)

    vargs = {"days": days, "batch_rows": a.batch_rows_request_level, "seq_len": a.seq_len, "workers": a.workers,
             "streams": a.streams, "buffer_requests": a.buffer_requests}
    # Memory against dates read, at the same pipeline: a date has only so many files (streams),
    # so the all-dates variant keeps the first date's stream and worker count; the reader's rate
    # over all dates at the full worker count is its own variant.
    first_files = sum(1 for u in units if u.partition[0] == units[0].partition[0])
    capped = {**vargs, "workers": min(a.workers, first_files), "streams": min(a.streams, first_files)}
    # new_wide: the same reader decoding every row's user block instead of the projection
    variants = {"old": vargs, "new": vargs, "new_wide": vargs, "new_all_dates": capped, "new_all_dates_full": vargs,
                "new_epochs": {**vargs, "epochs": a.reader_epochs}}
    # each variant --loader-repeats times, the variants interleaved (drift hits all alike); medians
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.loader_repeats):
        for v, v_args in variants.items():
            samples[v].append(_variant_in_subprocess(v, v_args, env))
            got = samples[v][-1]
            print(f"[bench loader] {v} ({r + 1}/{a.loader_repeats}): {got['requests_per_s']:,.0f} requests/s, "
                  f"{got['rows_per_s']:,.0f} rows/s, peak RSS {got['peak_rss_gb']:.2f} GB", flush=True)
    loaders = {v: median_of_repeats(s) for v, s in samples.items()}

    # the reader reads the user block from the request-level projection of these files
    projected = {"data_files": len(units), "data_files_with_projection": sum(u.requests_path is not None for u in units)}
    if a.no_train:
        return _result(a, command, prepare_s, loaders, projected, None, None)
    from reqdedup.train.worker import train

    runs = home / "bench_runs"
    per_row_cfg = _train_config(a, "per_row_iid", runs, order="iid", encoding="per_row",
                                batch_rows=a.batch_rows_per_row, end=days[0],
                                buckets=None if a.per_row_buckets == "all" else [int(b) for b in a.per_row_buckets.split(",")],
                                epochs=a.epochs)
    request_cfg = _train_config(a, "request_level", runs, order="request_shuffle", encoding="dedup",
                                batch_rows=a.batch_rows_request_level, end=days[-1], buckets=None, epochs=a.epochs)
    trained = {}
    for cfg in (per_row_cfg, request_cfg):
        import shutil

        shutil.rmtree(cfg.run_dir(settings), ignore_errors=True)
        out = train(cfg, settings)
        trained[cfg.name] = {"rows_per_s": _median_after_first(out["history"], "rows_per_s"),
                             "data_wait_share": _median_after_first(out["history"], "data_wait_share"),
                             "epochs": [{k: h[k] for k in ("rows", "seconds", "rows_per_s", "data_wait_share")}
                                        for h in out["history"]], "batch_rows": cfg.data.batch_rows,
                             "buckets": cfg.data.buckets, "device": out["device"]}
        print(f"[bench loader] train {cfg.name}: {trained[cfg.name]['rows_per_s']:,.0f} rows/s, data wait "
              f"{100 * trained[cfg.name]['data_wait_share']:.1f}%", flush=True)
    alone = model_only(request_cfg, settings, steps=a.model_only_steps, repeats=3)
    print(f"[bench loader] model alone (request-level): {alone:,.0f} rows/s", flush=True)

    return _result(a, command, prepare_s, loaders, projected, trained, alone)


def _result(a, command, prepare_s, loaders, projected, trained, alone) -> dict:
    import torch

    old, new = loaders["old"], loaders["new"]
    result = {
        "benchmark": "loader",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "source": a.source,
        "requests_per_date": a.requests, "dates": a.dates, "candidates_per_request": a.candidates,
        "history_mean": a.history, "seq_len": a.seq_len, "workers": a.workers,
        "model": {k: getattr(a, k) for k in ("items", "d_model", "n_layers", "n_heads", "ff_dim", "emb_dim")},
        "dtype": a.dtype if a.device == "cuda" else "fp32",
        "prepare_seconds": prepare_s,
        "loaders": loaders,
        "requests_per_s_old": old["requests_per_s"],
        "requests_per_s_new": new["requests_per_s"],
        "reader_speedup": new["requests_per_s"] / old["requests_per_s"],
        "peak_rss_gb_old": old["peak_rss_gb"],
        "peak_rss_gb_new": new["peak_rss_gb"],
        "rss_ratio_new_over_old": new["peak_rss_gb"] / old["peak_rss_gb"],
        "rss_above_baseline_ratio_new_over_old": new["peak_rss_gb_above_baseline"] / old["peak_rss_gb_above_baseline"],
        **projected,
        "requests_per_s_new_without_projection": loaders["new_wide"]["requests_per_s"],
        "peak_rss_gb_new_without_projection": loaders["new_wide"]["peak_rss_gb"],
        "peak_rss_gb_new_all_dates": loaders["new_all_dates"]["peak_rss_gb"],
        "rss_growth_all_dates_over_one": loaders["new_all_dates"]["peak_rss_gb"] / new["peak_rss_gb"],
    }
    if trained is not None:
        rl, pr = trained["request_level"], trained["per_row_iid"]
        result.update({
            "train": trained,
            "train_rows_per_s_request_level": rl["rows_per_s"],
            "train_rows_per_s_per_row": pr["rows_per_s"],
            "end_to_end_speedup": rl["rows_per_s"] / pr["rows_per_s"],
            "model_only_rows_per_s_request_level": alone,
            "end_to_end_share_of_model_only": rl["rows_per_s"] / alone,
            "data_wait_share": rl["data_wait_share"],
            "data_wait_share_per_row": pr["data_wait_share"],
            "reader_rows_per_s_over_training": loaders["new_all_dates_full"]["rows_per_s"] / rl["rows_per_s"],
            "reader_steady_rows_per_s_over_training":
                loaders["new_all_dates_full"].get("steady_rows_per_s", float("nan")) / rl["rows_per_s"],
            # the reader as training reads it (epochs with the next one started ahead), median after the first
            "reader_epoch_rows_per_s_over_training":
                loaders["new_epochs"]["epoch_rows_per_s_median_after_first"] / rl["rows_per_s"],
        })
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reqdedup bench loader", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per date")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--history", type=int, default=1000, help="mean history length of the generator")
    p.add_argument("--users", type=int, default=None, help="default: requests // 4")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dates", type=int, default=4, help="dates generated; the loaders compare on the first")
    p.add_argument("--seq-len", type=int, default=None, help="model history length (default: --history)")
    p.add_argument("--source", choices=("iceberg", "landing"), default="iceberg")
    p.add_argument("--home", default=None, help="bench home (default: a new temp folder); data is reused there")
    p.add_argument("--workers", type=int, default=2, help="reader DataLoader workers")
    p.add_argument("--streams", type=int, default=None, help="interleaved file streams (default: --workers, >= 4)")
    p.add_argument("--buffer-requests", type=int, default=1024)
    p.add_argument("--buffer-rows", type=int, default=262144)
    p.add_argument("--batch-rows-per-row", type=int, default=1024)
    p.add_argument("--batch-rows-request-level", type=int, default=8192)
    p.add_argument("--per-row-buckets", default="0",
                   help="the per-row run trains on these buckets of date 1 (it is slow): 0,1,... or all")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model-only-steps", type=int, default=20)
    p.add_argument("--reader-epochs", type=int, default=4, help="epochs of the reader-alone variant read as training does")
    p.add_argument("--loader-repeats", type=int, default=3,
                   help="runs of each loader variant (interleaved); rates and peak memory are their medians")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ff-dim", type=int, default=1024)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="loaders only (e.g. on a CPU box)")
    p.add_argument("--json", default=None)
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a._variant:
        print(json.dumps(run_variant(a._variant, json.loads(a._args))))
        return 0
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.seq_len = a.seq_len or a.history
    a.streams = a.streams or max(4, a.workers)
    if a.loader_repeats < 1:
        build_parser().error(f"--loader-repeats must be >= 1, got {a.loader_repeats}")
    result = run(a, shlex.join(["reqdedup", "bench", "loader", *argv]))
    keys = ("device", "candidates_per_request", "seq_len", "requests_per_s_old", "requests_per_s_new", "reader_speedup",
            "peak_rss_gb_old", "peak_rss_gb_new", "rss_growth_all_dates_over_one", "train_rows_per_s_request_level",
            "train_rows_per_s_per_row", "end_to_end_speedup", "model_only_rows_per_s_request_level",
            "end_to_end_share_of_model_only", "data_wait_share", "reader_epoch_rows_per_s_over_training")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
