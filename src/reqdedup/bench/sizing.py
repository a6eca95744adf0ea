"""A sizing model on paper, computed from the rates measured here.

``reqdedup bench sizing configs/sizing.yaml [--json OUT] [--md OUT]`` (or
``python -m reqdedup.bench.sizing configs/sizing.yaml``). The YAML has two parts:

- ``workload``: the target shape (candidate rows a day, candidates per request, history
  length, the model's sequence length, epochs, the ingest and training windows, the target
  Iceberg file size) and the model's assumptions (how training and reading cost grow with the
  history: ``history_cost_exponent``);
- ``measured``: where each measured rate is, as a JSON file under ``bench/results`` and the
  dotted key of each value in it: ingest rows/s and the cores that gave them, landed and table
  bytes (compression), the request-level reader's requests/s on one GPU host, training rows/s
  on one GPU. The script reads the values from those files, so the plan follows the
  measurements when they are rerun.

Scaling rules (each stated in the output next to its number):

- ingest is bound by landed bytes: bytes/s per core measured, landed bytes per row scaled
  linearly with the history length (every landed candidate row carries the user's history);
- table bytes per day = user block per request (measured, scaled linearly with the history) x
  requests + item columns per row (measured) x rows;
- buckets = the largest power of two (at most ``max_buckets``) that keeps a day's bucket at
  least one target file; files per bucket = ceil(bucket bytes / target file);
- reader and training: rows/s per GPU measured at (history h0, candidates k0) scale with
  (k / k0) x (h0 / h) ** history_cost_exponent (the user side dominates at these shapes);
  the slower of the two sets the GPU's rate; GPU-hours = rows x epochs / rate (the reader was
  measured with one GPU per 16-core host: it assumes as many cores per GPU);
- first bottleneck: the stage that needs the most hosts to keep up with a day in its window
  (ingest on CPU hosts, training on GPU hosts).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from reqdedup.config import REPO_ROOT
from reqdedup.errors import InputError

WORKLOAD_KEYS = {"candidate_rows_per_day": float, "candidates_per_request": int, "history_items": int, "seq_len": int,
                 "epochs": float, "ingest_window_hours": float, "training_window_hours": float,
                 "target_file_mb": float, "max_buckets": int, "history_cost_exponent": float,
                 "cpu_cores_per_host": int, "gpus_per_host": int}
MEASURED = {
    "ingest": ("file", "rows_per_s", "rows", "landed_bytes", "history", "cores"),
    "table": ("file", "table_bytes", "user_bytes", "rows", "requests", "history", "candidates"),
    "reader": ("file", "requests_per_s", "history", "candidates"),
    "training": ("file", "rows_per_s", "seq_len", "candidates"),
}


def _lookup(data, dotted: str, source: str):
    cur = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise InputError(f"{source}: no key {dotted!r}")
        cur = cur[part]
    return cur


def _value(spec, data: dict, source: str) -> float:
    """A number in the YAML, or a dotted key of the JSON; ``local[N]`` (a Spark master) gives N."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    if not isinstance(spec, str):
        raise InputError(f"{source}: expected a number or a key of the JSON, got {spec!r}")
    v = _lookup(data, spec, source)
    if isinstance(v, str):
        m = re.fullmatch(r"local\[(\d+)\]", v)
        if m:
            return float(m.group(1))
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise InputError(f"{source}: {spec} = {v!r} is not a positive number")
    return float(v)


def load_inputs(path: str | Path) -> tuple[dict, dict]:
    """(workload, measured values with their sources) from the sizing YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"sizing config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) != {"workload", "measured"}:
        raise InputError(f"{path}: needs exactly the sections workload and measured")
    wl_raw = raw["workload"] or {}
    unknown, missing = set(wl_raw) - set(WORKLOAD_KEYS), set(WORKLOAD_KEYS) - set(wl_raw)
    if unknown or missing:
        raise InputError(f"{path}: workload keys unknown {sorted(unknown)} / missing {sorted(missing)}")
    workload = {}
    for k, typ in WORKLOAD_KEYS.items():
        v = wl_raw[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"{path}: workload.{k} must be a positive number, got {v!r}")
        workload[k] = typ(v)
    measured = {}
    m_raw = raw["measured"] or {}
    if set(m_raw) != set(MEASURED):
        raise InputError(f"{path}: measured needs exactly {sorted(MEASURED)}, got {sorted(m_raw)}")
    for section, keys in MEASURED.items():
        spec = m_raw[section] or {}
        if set(spec) != set(keys):
            raise InputError(f"{path}: measured.{section} needs the keys {sorted(keys)}, got {sorted(spec)}")
        file = Path(spec["file"])
        file = file if file.is_absolute() else (path.parent.parent / file if not (REPO_ROOT / file).exists()
                                                else REPO_ROOT / file)
        if not file.is_file():
            raise InputError(f"{path}: measured.{section}.file {spec['file']} does not exist")
        data = json.loads(file.read_text())
        src = f"{file.name} (measured.{section})"
        measured[section] = {"file": str(file.relative_to(REPO_ROOT)) if file.is_relative_to(REPO_ROOT) else str(file),
                             **{k: _value(spec[k], data, src) for k in keys if k != "file"},
                             **({"device": data["device"]} if "device" in data else {})}
    return workload, measured


def size(workload: dict, measured: dict) -> dict:
    """The plan: Spark, the table, storage, GPUs, and the first bottleneck."""
    w, m = workload, measured
    rows = w["candidate_rows_per_day"]
    k = w["candidates_per_request"]
    requests = rows / k
    hist = w["history_items"]

    # ingest: landed bytes per row scale with the history every candidate row carries
    ing = m["ingest"]
    landed_per_row = ing["landed_bytes"] / ing["rows"] * (hist / ing["history"])
    bytes_per_s_per_core = ing["rows_per_s"] / ing["cores"] * (ing["landed_bytes"] / ing["rows"])
    landed_per_day = landed_per_row * rows
    ingest_window_s = w["ingest_window_hours"] * 3600
    executor_cores = math.ceil(landed_per_day / (bytes_per_s_per_core * ingest_window_s))

    # table: one user block per request (scaled with the history) + item columns per row
    tab = m["table"]
    user_per_request = tab["user_bytes"] / tab["requests"] * (hist / tab["history"])
    item_per_row = (tab["table_bytes"] - tab["user_bytes"]) / tab["rows"]
    table_per_day = user_per_request * requests + item_per_row * rows
    target = w["target_file_mb"] * 2**20
    buckets = 1
    while buckets * 2 <= w["max_buckets"] and table_per_day / (buckets * 2) >= target:
        buckets *= 2
    files_per_bucket = math.ceil(table_per_day / buckets / target)

    # GPUs: the slower of the reader and the training step sets a GPU's rows/s
    e = w["history_cost_exponent"]
    rd, tr = m["reader"], m["training"]
    reader_rows_per_s = rd["requests_per_s"] * rd["candidates"] * (k / rd["candidates"]) * (rd["history"] / hist) ** e
    train_rows_per_s = tr["rows_per_s"] * (k / tr["candidates"]) * (tr["seq_len"] / w["seq_len"]) ** e
    gpu_rows_per_s = min(reader_rows_per_s, train_rows_per_s)
    gpu_hours = rows * w["epochs"] / gpu_rows_per_s / 3600
    gpus = math.ceil(gpu_hours / w["training_window_hours"])

    # hosts each stage needs to keep up with a day in its window; the most is the first bottleneck
    ingest_hosts = math.ceil(executor_cores / w["cpu_cores_per_host"])
    gpu_hosts = math.ceil(gpus / w["gpus_per_host"])
    limiter = "the request-level reader (host-side decode)" if reader_rows_per_s < train_rows_per_s else "the GPU training step"
    stages = {"ingest": {"hosts": ingest_hosts, "of": f"{w['cpu_cores_per_host']}-core CPU hosts",
                         "window_hours": w["ingest_window_hours"]},
              "training": {"hosts": gpu_hosts, "of": f"{w['gpus_per_host']}-GPU hosts", "limited_by": limiter,
                           "window_hours": w["training_window_hours"]}}
    if ingest_hosts >= gpu_hosts:
        first = (f"ingest: {executor_cores:,} executor-cores ({ingest_hosts} hosts) at the measured landed-bytes rate, "
                 f"more hosts than training's {gpu_hosts}; within training, {limiter} limits a GPU")
    else:
        first = f"training: {gpu_hosts} GPU hosts, limited by {limiter}; ingest needs {ingest_hosts} CPU hosts"
    gib, tib = 2**30, 2**40
    return {
        "workload": w,
        "measured": m,
        "requests_per_day": requests,
        "spark": {"landed_bytes_per_row": round(landed_per_row), "landed_tib_per_day": round(landed_per_day / tib, 2),
                  "ingest_mb_per_s_per_core": round(bytes_per_s_per_core / 1e6, 3),
                  "executor_cores": executor_cores,
                  "rule": "landed bytes/day / (measured landed bytes/s per core x ingest window)"},
        "table": {"user_block_bytes_per_request": round(user_per_request), "item_bytes_per_row": round(item_per_row, 2),
                  "gib_per_day": round(table_per_day / gib, 1), "tib_per_year": round(table_per_day * 365 / tib, 1),
                  "compression_vs_landed": round(landed_per_day / table_per_day, 1),
                  "buckets": buckets, "files_per_bucket_per_day": files_per_bucket,
                  "target_file_mb": w["target_file_mb"]},
        "gpus": {"reader_rows_per_s_per_gpu": round(reader_rows_per_s), "train_rows_per_s_per_gpu": round(train_rows_per_s),
                 "rows_per_s_per_gpu": round(gpu_rows_per_s), "gpu_hours_per_day": round(gpu_hours, 1),
                 "gpus_for_window": gpus, "training_window_hours": w["training_window_hours"],
                 "device": tr.get("device")},
        "stages": stages,
        "first_bottleneck": first,
    }


def to_markdown(plan: dict) -> str:
    w, s, t, g = plan["workload"], plan["spark"], plan["table"], plan["gpus"]
    lines = [
        f"Workload: {w['candidate_rows_per_day']:.3g} candidate rows/day, {w['candidates_per_request']} candidates/request "
        f"({plan['requests_per_day']:.3g} requests/day), {w['history_items']}-item histories, model seq_len {w['seq_len']}, "
        f"{w['epochs']:g} epoch(s); ingest window {w['ingest_window_hours']:g} h, training window {w['training_window_hours']:g} h.",
        "",
        "| quantity | value | from |",
        "| --- | --- | --- |",
        f"| landed bytes per candidate row | {s['landed_bytes_per_row']:,} | measured landed bytes/row x history ratio |",
        f"| landed per day | {s['landed_tib_per_day']} TiB | |",
        f"| ingest rate per core | {s['ingest_mb_per_s_per_core']} MB/s | {plan['measured']['ingest']['file']} |",
        f"| **Spark executor-cores** | **{s['executor_cores']:,}** | {s['rule']} |",
        f"| user block per request (sorted table) | {t['user_block_bytes_per_request']:,} B | {plan['measured']['table']['file']} |",
        f"| item columns per row | {t['item_bytes_per_row']} B | same |",
        f"| **storage per day** | **{t['gib_per_day']:,} GiB** ({t['tib_per_year']} TiB/year; {t['compression_vs_landed']}x under landed) | |",
        f"| **buckets** | **{t['buckets']}** | largest power of two with >= one {t['target_file_mb']:g} MiB file per bucket-day |",
        f"| **files per bucket per day** | **{t['files_per_bucket_per_day']}** | |",
        f"| reader rows/s per GPU host | {g['reader_rows_per_s_per_gpu']:,} | {plan['measured']['reader']['file']} |",
        f"| training rows/s per GPU | {g['train_rows_per_s_per_gpu']:,} | {plan['measured']['training']['file']} ({g['device']}) |",
        f"| **GPU-hours per day** | **{g['gpu_hours_per_day']:,}** | rows x epochs / min(reader, training) |",
        f"| **GPUs for the {g['training_window_hours']:g} h window** | **{g['gpus_for_window']:,}** | |",
        f"| ingest hosts / training hosts | {plan['stages']['ingest']['hosts']} x {plan['stages']['ingest']['of']} / "
        f"{plan['stages']['training']['hosts']} x {plan['stages']['training']['of']} | to keep up with a day in each window |",
        "",
        f"First bottleneck: {plan['first_bottleneck']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reqdedup bench sizing", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="sizing YAML (configs/sizing.yaml)")
    p.add_argument("--json", help="write the plan as JSON here")
    p.add_argument("--md", help="write the plan as a Markdown table here")
    a = p.parse_args(argv)
    try:
        plan = size(*load_inputs(a.config))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps(plan, indent=2))
    md = to_markdown(plan)
    if a.md:
        Path(a.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
