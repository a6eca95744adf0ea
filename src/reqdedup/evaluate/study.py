"""The quality study (issue 12): request-level training against iid, swept over requests per
global step, data order and the fixes, every cell over several seeds with a 95% interval of
its change against iid. One process per GPU-host command, torch + numpy + pyarrow only:

    PYTHONPATH=src python3 -m reqdedup.evaluate.study --config configs/study_gpu.yaml --out $OUT

1. **Data**: synthetic days from `reqdedup.data.generator` (one process per day), or the
   landing folders of a real log (`reqdedup import-interactions`), split by dates into
   train / validation / eval. Training rows are put in the table's order (bucket, user,
   request) and cut into chunks of whole requests, which the request-level reader's own
   ordering (`reqdedup.train.reader.batches_in_order`: ``table``, ``request_shuffle`` with a
   bounded buffer, ``iid`` rows) turns into batches, as in training.
2. **Training length** (the same for every config, never tuned per config): iid, seed 0, at
   the budget's requests per step, evaluated on the VALIDATION dates (not the eval dates)
   at ``curve_points`` points up to ``max_epochs``; the row budget is the first point where
   its validation AUC is within ``tolerance`` of the best and stays there
   (`metrics.converged_rows`). Or a fixed ``budget.rows``. Or, with ``budget.select:
   best_validation``, early stopping: every run trains up to ``max_epochs`` (or
   ``budget.rows``) and is scored on the eval dates at the point of its own best
   validation AUC among ``curve_points`` points (the same rule for every config).
3. **Compute-matched** (optional, run alone on the device): iid and a request-level config
   train for the same training seconds; eval metrics against training seconds.
4. **Sweeps**: cells (variant, requests per global step, order), seeds, run by ``workers``
   processes sharing the device. One global step = ``devices`` simulated devices
   (`reqdedup.train.simdev`: per-device BatchNorm statistics and in-batch negatives, or
   SyncBN over the whole step). After each finished run, ``study.json`` and ``study.md``
   (tables with intervals) are rewritten under --out; plots at the end (and whenever
   matplotlib is importable).

Intervals: `metrics.relative_change_interval` (paired bootstrap over eval requests within
each seed + the spread over seeds), each cell against iid at the same requests per step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import math
import os
import queue
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from reqdedup.contract import BASELINE_CONFIG, parse_date
from reqdedup.errors import InputError

# What each variant changes (everything else is shared by the whole study).
VARIANTS: dict[str, dict] = {
    "iid": {"iid": True, "sync_bn": False, "mask_same_user": False},
    "naive": {"sync_bn": False, "mask_same_user": False},
    "syncbn": {"sync_bn": True, "mask_same_user": False},
    "masked": {"sync_bn": False, "mask_same_user": True},
    "fixed": {"sync_bn": True, "mask_same_user": True},
    "fixed_logq": {"sync_bn": True, "mask_same_user": True, "logq": True},
    "fixed_mixed": {"sync_bn": True, "mask_same_user": True, "mixed": True},
    "fixed_logq_mixed": {"sync_bn": True, "mask_same_user": True, "logq": True, "mixed": True},
}
# How a run's reported model is chosen: the model after the row budget, or (early stopping)
# the one at its best validation AUC among budget.curve_points points.
SELECT_RULES = ("last", "best_validation")
BASELINE = BASELINE_CONFIG  # the study's baseline variant is the evaluation's baseline config
DEFAULTS = {
    "name": "study",
    "data": {"source": "synthetic", "generator": {}, "landing": None, "train": None, "validation": None,
             "eval": None, "buckets": 8, "chunk_requests": 256, "eval_max_requests": None,
             "validation_max_requests": 1000},
    "model": {},
    "train": {"lr": 0.002, "weight_decay": 0.0, "temperature": 0.1, "retrieval_weight": 1.0, "devices": 4,
              "mixed_precision": "auto", "mixed_negatives": 256, "logq_alpha": 0.01, "threads": None},
    "budget": {"rows": None, "requests_per_step": 256, "max_epochs": 4, "curve_points": 8, "tolerance": 0.002,
               "select": "last"},
    "compute": None,
    "sweeps": [],
    "seeds": [0, 1, 2, 3, 4],
    "eval": {"k": 50, "bootstrap": 100, "level": 0.95, "batch_requests": 256, "curve_points": 4,
             "bootstrap_during": 20, "final_interval_s": 60},
    "gate": {"tolerance": 0.005, "metrics": ["auc", "recall"]},
    "workers": 1,
    "device": "auto",
    "time_limit_s": None,
}
COMPUTE_KEYS = {"variants", "requests_per_step", "order", "seconds", "seeds", "points"}
SWEEP_KEYS = {"name", "variants", "requests_per_step", "orders"}


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
def _merge(base: dict, raw: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (raw or {}).items():
        if k not in base:
            raise InputError(f"{source}: unknown key {where}{k}; known: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and base[k] and isinstance(v, dict) and k not in ("generator",):
            out[k] = _merge(base[k], v, f"{where}{k}.", source)
        else:
            out[k] = v
    return out


def parse_order(order: str, source: str) -> tuple[str, int | None]:
    """'table' | 'request_shuffle:N' | 'request_shuffle:all' -> (order, buffer_requests)."""
    if order == "table":
        return "table", None
    name, _, buf = str(order).partition(":")
    if name == "request_shuffle":
        if buf == "all":
            return "request_shuffle", None
        if buf.isdigit() and int(buf) >= 1:
            return "request_shuffle", int(buf)
    raise InputError(f"{source}: order {order!r} must be 'table', 'request_shuffle:N' (N >= 1 requests in the "
                     f"shuffle buffer) or 'request_shuffle:all'")


def load_study(path: str | Path, overrides: list[str] | None = None) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"study config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return parse_study(raw, str(path))


def parse_study(raw: dict, source: str = "study config") -> dict:
    if not isinstance(raw, dict):
        raise InputError(f"{source}: a study config must be a mapping")
    cfg = _merge(DEFAULTS, raw, "", source)
    d = cfg["data"]
    if d["source"] not in ("synthetic", "landing"):
        raise InputError(f"{source}: data.source must be 'synthetic' or 'landing', got {d['source']!r}")
    for split in ("train", "validation", "eval"):
        rng = d[split]
        if not (isinstance(rng, list) and len(rng) == 2):
            raise InputError(f"{source}: data.{split} must be a date range [first, last], got {rng!r}")
        try:
            a, b = (parse_date(x, f"{source}: data.{split}") for x in rng)
        except InputError:
            raise InputError(f"{source}: data.{split} = {rng!r} is not a pair of dates YYYY-MM-DD") from None
        if a > b:
            raise InputError(f"{source}: data.{split} ends before it starts: {rng!r}")
        d[split] = [str(a), str(b)]
    if not (d["train"][1] < d["validation"][0] <= d["validation"][1] < d["eval"][0]):
        raise InputError(f"{source}: dates must be train < validation < eval (no overlap), got train {d['train']}, "
                         f"validation {d['validation']}, eval {d['eval']}")
    if d["source"] == "landing" and not d["landing"]:
        raise InputError(f"{source}: data.source landing needs data.landing (the import-interactions output folder)")
    from reqdedup.train.model import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(cfg["model"]) - known)
    if bad:
        raise InputError(f"{source}: unknown model key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    seeds = cfg["seeds"]
    if not (isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds) and all(isinstance(s, int) for s in seeds)):
        raise InputError(f"{source}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if not isinstance(cfg["sweeps"], list) or not cfg["sweeps"]:
        raise InputError(f"{source}: sweeps must be a non-empty list")
    for i, sw in enumerate(cfg["sweeps"]):
        where = f"{source}: sweeps[{i}]"
        if not isinstance(sw, dict) or set(sw) - SWEEP_KEYS or "variants" not in sw:
            raise InputError(f"{where} must be a mapping with variants (and name, requests_per_step, orders); "
                             f"unknown: {sorted(set(sw) - SWEEP_KEYS) if isinstance(sw, dict) else sw!r}")
        for v in sw["variants"]:
            if v not in VARIANTS:
                raise InputError(f"{where}: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        sw.setdefault("name", f"sweep{i}")
        sw.setdefault("requests_per_step", [cfg["budget"]["requests_per_step"]])
        sw.setdefault("orders", ["request_shuffle:all"])
        for o in sw["orders"]:
            parse_order(o, where)
        for r in sw["requests_per_step"]:
            if not isinstance(r, int) or r < cfg["train"]["devices"]:
                raise InputError(f"{where}: requests_per_step {r!r} must be an integer >= train.devices "
                                 f"({cfg['train']['devices']})")
    if cfg["compute"] is not None:
        c = cfg["compute"]
        if not isinstance(c, dict) or set(c) - COMPUTE_KEYS:
            raise InputError(f"{source}: compute must be a mapping of {', '.join(sorted(COMPUTE_KEYS))}")
        c.setdefault("variants", ["iid", "fixed"])
        c.setdefault("requests_per_step", cfg["budget"]["requests_per_step"])
        c.setdefault("order", "request_shuffle:all")
        c.setdefault("seeds", seeds[:3])
        c.setdefault("points", 8)
        parse_order(c["order"], f"{source}: compute")
        if not (isinstance(c.get("seconds"), (int, float)) and c["seconds"] > 0):
            raise InputError(f"{source}: compute.seconds must be > 0 (training seconds per run)")
    if not isinstance(cfg["workers"], int) or cfg["workers"] < 1:
        raise InputError(f"{source}: workers must be an integer >= 1")
    b = cfg["budget"]
    if b["rows"] is not None and (not isinstance(b["rows"], int) or b["rows"] < 1):
        raise InputError(f"{source}: budget.rows must be null (the iid-converged rule) or an integer >= 1")
    if b["select"] not in SELECT_RULES:
        raise InputError(f"{source}: budget.select must be one of {', '.join(SELECT_RULES)}, got {b['select']!r}")
    cfg["source"] = source
    return cfg


def cells_of(cfg: dict) -> list[dict]:
    """Every (variant, requests per step, order) cell of the sweeps, in sweep order, once;
    each request-level cell's baseline is iid at the same requests per step (added)."""
    cells, seen = [], set()

    def add(variant, rps, order, sweep):
        key = cell_key(variant, rps, order)
        if key not in seen:
            seen.add(key)
            cells.append({"key": key, "variant": variant, "requests_per_step": rps,
                          "order": "iid" if variant == BASELINE else order, "sweep": sweep})

    for sw in cfg["sweeps"]:
        for rps in sw["requests_per_step"]:
            add(BASELINE, rps, "iid", sw["name"])
            for order in sw["orders"]:
                for v in sw["variants"]:
                    add(v, rps, order, sw["name"])
    return cells


def cell_key(variant: str, rps: int, order: str) -> str:
    return f"{variant}|{rps}|{'iid' if variant == BASELINE else order}"


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def _dates(rng: list[str]) -> list[str]:
    a, b = (parse_date(x) for x in rng)
    return [str(a + dt.timedelta(days=i)) for i in range((b - a).days + 1)]


def _generate_day(args) -> str:
    gen, date, path = args
    import pyarrow.parquet as pq

    from reqdedup.data.generator import GeneratorConfig, generate_table

    pq.write_table(generate_table(GeneratorConfig(**{**gen, "date": date, "progress": False})), path)
    return path


def prepare_data(cfg: dict, work: Path, log) -> dict:
    """Parquet files per split under ``work`` (generated in parallel, or read from the
    landing folders); returns {split: [paths]}."""
    d = cfg["data"]
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    if d["source"] == "synthetic":
        jobs = []
        for split in ("train", "validation", "eval"):
            out[split] = []
            for date in _dates(d[split]):
                path = str(work / f"{split}-{date}.parquet")
                out[split].append(path)
                if not Path(path).exists():
                    jobs.append((dict(d["generator"]), date, path))
        t0 = time.perf_counter()
        small = sum(j[0].get("requests", 2000) * j[0].get("candidates", 50) for j in jobs) < 200_000
        if jobs and (small or len(jobs) == 1 or (os.cpu_count() or 1) < 2):  # a pool's start-up costs more
            for job in jobs:
                log(f"generated {Path(_generate_day(job)).name} ({time.perf_counter() - t0:.0f} s)")
        elif jobs:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
                for p in pool.imap_unordered(_generate_day, jobs):
                    log(f"generated {Path(p).name} ({time.perf_counter() - t0:.0f} s)")
        return out
    root = Path(d["landing"])
    for split in ("train", "validation", "eval"):
        out[split] = []
        for date in _dates(d[split]):
            out[split] += sorted(str(p) for p in (root / f"date={date}").glob("*.parquet"))
        if not out[split]:
            raise InputError(f"{root}: no landing files for the {split} dates {d[split]} (date=YYYY-MM-DD/*.parquet)")
    return out


def _read(paths: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def table_order(table, buckets: int):
    """Rows sorted as the sorted landing / Iceberg table: (bucket(user_id), user_id, request_id)."""
    import pyarrow as pa

    from reqdedup.train.reader import iceberg_bucket

    user = table.column("user_id").to_numpy()
    bucket = iceberg_bucket(user, buckets)
    order = np.lexsort((np.arange(user.size), table.column("request_id").to_numpy(), user, bucket))
    return table.take(pa.array(order))


def request_chunks(table, seq_len: int, chunk_requests: int, where: str) -> list:
    """Whole requests in table order -> RequestChunks of about chunk_requests requests."""
    from reqdedup.train.reader import rows_to_chunk

    ids = table.column("request_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    bounds = list(starts[::chunk_requests]) + [ids.size]
    return [rows_to_chunk(table.slice(int(a), int(b - a)), seq_len, where, check=False)
            for a, b in zip(bounds[:-1], bounds[1:])]


class EvalSet:
    """Eval (or validation) requests as RequestBatches on the device, each request's index
    (0..n_requests-1, the bootstrap's unit) and the candidate pool (every distinct item)."""

    def __init__(self, table, seq_len: int, batch_requests: int, max_requests: int | None, device, seed: int = 0):
        import pyarrow as pa
        import torch

        from reqdedup.train.reader import requests_to_batch, rows_to_chunk

        ids = table.column("request_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        table = table.take(pa.array(order))
        ids = ids[order]
        chunk = rows_to_chunk(table, seq_len, "eval", check=False)
        n = chunk.num_requests
        keep = np.arange(n)
        if max_requests and max_requests < n:
            keep = np.sort(np.random.default_rng(seed).choice(n, size=max_requests, replace=False))
        self.n_requests = int(keep.size)
        self.batches, self.request_index = [], []
        for i in range(0, keep.size, batch_requests):
            req = keep[i:i + batch_requests]
            self.batches.append(requests_to_batch(chunk, req).to(device))
            self.request_index.append(torch.arange(i, i + req.size, device=device))
        item = chunk.item_id.numpy()
        pool, first = np.unique(item, return_index=True)
        self.pool_ids = torch.from_numpy(pool.astype(np.int64)).to(device)
        self.pool_category = chunk.item_category[torch.from_numpy(first)].to(device)
        self.pool_dense = chunk.item_dense[torch.from_numpy(first)].to(device)
        self.rows = sum(b.num_rows for b in self.batches)


def score(model, es: EvalSet, k: int, full: bool = True) -> tuple[dict, dict | None]:
    """(metrics, arrays for the bootstrap or None): AUC / log loss over every eval row,
    recall@k / NDCG@k of every engaged (request, item) among the pool by user . item, the
    request's other engaged items filtered, ties pessimistic (as `reqdedup evaluate`)."""
    import torch

    from reqdedup.evaluate import metrics as M
    from reqdedup.evaluate.matrix_worker import ranks_torch

    was = model.training
    model.eval()
    logits, labels, row_req, ranks, rank_req = [], [], [], [], []
    with torch.no_grad():
        pool_emb = model.item_tower(es.pool_ids, es.pool_category, es.pool_dense).float()
        for batch, index in zip(es.batches, es.request_index):
            out = model.score_candidates(batch, mode="dedup")
            logits.append(out["logit"].float())
            labels.append(batch.label)
            row_req.append(index[batch.row_request])
            pos = torch.nonzero(batch.label > 0.5).squeeze(1)
            if pos.numel() == 0:
                continue
            req = batch.row_request[pos]
            target = torch.searchsorted(es.pool_ids, batch.item_id[pos].long())
            scores = out["user_emb"].float()[req] @ pool_emb.T
            same = (req[:, None] == req[None, :]) & ~torch.eye(pos.numel(), dtype=torch.bool, device=req.device)
            qi, qj = torch.nonzero(same, as_tuple=True)
            ranks.append(ranks_torch(scores, target, qi, target[qj]))
            rank_req.append(index[req])
    model.train(was)
    cat = lambda xs: torch.cat(xs).cpu().numpy() if xs else np.zeros(0)  # noqa: E731
    arr = M.EvalArrays(labels=cat(labels), logits=cat(logits), row_request=cat(row_req), ranks=cat(ranks),
                       rank_request=cat(rank_req), n_requests=es.n_requests)
    metrics = {"auc": M.weighted_auc(arr), "log_loss": M.weighted_log_loss(arr),
               f"recall@{k}": M.weighted_recall(arr, k), f"ndcg@{k}": M.weighted_ndcg(arr, k)}
    return metrics, (arr if full else None)


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------
class Data:
    """What a worker holds: training chunks in table order, eval and validation sets."""

    def __init__(self, cfg: dict, files: dict, device):
        from reqdedup.train.model import ModelConfig

        d = cfg["data"]
        self.model_cfg = ModelConfig.from_dict(cfg["model"])
        seq = self.model_cfg.seq_len
        train = table_order(_read(files["train"]), d["buckets"])
        self.max_item = int(max(np.max(train.column("item_id").to_numpy()), 0))
        self.chunks = request_chunks(train, seq, d["chunk_requests"], "train")
        self.rows = sum(c.num_rows for c in self.chunks)
        self.requests = sum(c.num_requests for c in self.chunks)
        self.candidates = self.rows / max(self.requests, 1)
        self.max_candidates = int(max(int(c.cand_count.max()) for c in self.chunks))
        self.eval = EvalSet(_read(files["eval"]), seq, cfg["eval"]["batch_requests"], d["eval_max_requests"], device)
        self.validation = EvalSet(_read(files["validation"]), seq, cfg["eval"]["batch_requests"],
                                  d["validation_max_requests"], device, seed=1)
        if self.max_item >= self.model_cfg.items:
            raise InputError(f"the data holds item id {self.max_item} but model.items = {self.model_cfg.items}")


def resolve_device(want: str):
    import torch

    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def run_one(cfg: dict, data: Data, task: dict, device) -> dict:
    """Train one (cell, seed) for the task's row budget (or seconds), evaluating at curve
    points; returns metrics, the learning curve and the eval arrays."""
    import torch

    from reqdedup.train import simdev
    from reqdedup.train.batch import ITEM_DENSE_DIM
    from reqdedup.train.losses import recommendation_losses
    from reqdedup.train.model import RecModel
    from reqdedup.train.negatives import StreamingFrequency, UniformItemPool
    from reqdedup.train.reader import ReaderSpec, batches_in_order

    t_cfg, k = cfg["train"], cfg["eval"]["k"]
    variant = VARIANTS[task["variant"]]
    seed, rps = task["seed"], task["requests_per_step"]
    is_iid = variant.get("iid", False)
    order, buffer = ("iid", None) if is_iid else parse_order(task["order"], "task")
    batch_rows = max(int(round(rps * data.candidates)), data.max_candidates)
    spec = ReaderSpec(order=order, batch_rows=batch_rows, seq_len=data.model_cfg.seq_len, seed=seed,
                      buffer_requests=buffer, buffer_rows=None, streams=1, workers=0)
    torch.manual_seed(seed)
    model = RecModel(data.model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg["lr"], weight_decay=t_cfg["weight_decay"])
    amp = device.type == "cuda" and t_cfg["mixed_precision"] == "auto"
    freq = StreamingFrequency(data.model_cfg.items, t_cfg["logq_alpha"], device) if variant.get("logq") else None
    pool = UniformItemPool(data.model_cfg.items, ITEM_DENSE_DIM, device) if variant.get("mixed") else None
    gen = torch.Generator().manual_seed(10_000 + seed)
    n_dev = t_cfg["devices"]
    loss_kw = {"temperature": t_cfg["temperature"], "retrieval_weight": t_cfg["retrieval_weight"],
               "mask_same_user": variant["mask_same_user"], "mask_same_item": True}

    def loss_fn(outputs, b):
        kw = dict(loss_kw)
        if freq is not None:
            kw["log_q"] = freq.log_q(b.item_id)
        if pool is not None and pool.size:
            ids, cat, dense, lq = pool.sample(t_cfg["mixed_negatives"], gen)
            kw.update(extra_item_emb=model.item_tower(ids, cat, dense).to(outputs["item_emb"].dtype),
                      extra_item_ids=ids, extra_log_q=lq if freq is not None else None)
        return recommendation_losses(outputs, b, **kw)

    budget_rows = task.get("rows")
    budget_s = task.get("seconds")
    points = task.get("curve_points", 0)
    curve_set = data.validation if task.get("curve_on") == "validation" else data.eval
    early_stop = task.get("select") == "best_validation"
    best = {"auc": -math.inf, "rows": 0, "state": None}
    marks = ([budget_rows * (i + 1) / points for i in range(points)] if budget_rows and points else
             [budget_s * (i + 1) / points for i in range(points)] if budget_s and points else [])
    curve, rows_seen, steps, train_s = [], 0, 0, 0.0
    fnr, users, masked = [], [], []
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def at_mark():
        nonlocal marks
        m, _ = score(model, curve_set, k, full=False)
        point = {"rows": rows_seen, "train_seconds": train_s, "steps": steps, **m}
        if early_stop:  # select on validation; the curve stays the eval metrics
            v_auc = score(model, data.validation, k, full=False)[0]["auc"]
            point["validation_auc"] = v_auc
            if v_auc > best["auc"]:
                best.update(auc=v_auc, rows=rows_seen,
                            state={n: t.detach().clone() for n, t in model.state_dict().items()})
        curve.append(point)
        marks = marks[1:]

    epoch, done = 0, False
    t_last = time.perf_counter()
    while not done:
        for batch in batches_in_order(iter(data.chunks), spec, epoch, 0):
            if batch.num_requests < n_dev:
                continue
            uid = batch.user_ids.numpy()
            cut = [(batch.num_requests * d) // n_dev for d in range(n_dev + 1)]  # simdev.split_requests' bounds
            stats_users = [np.unique(uid[a:b]).size for a, b in zip(cut[:-1], cut[1:])]
            batch = batch.to(device)
            if freq is not None:
                freq.update(batch.item_id[batch.label > 0.5])
            if pool is not None:
                pool.add(batch.item_id, batch.item_category, batch.item_dense)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, stats = simdev.device_losses(model, batch, n_dev, sync_bn=variant["sync_bn"], mode="dedup",
                                                   loss_fn=loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows_seen += batch.num_rows
            steps += 1
            users.append(float(np.mean(stats_users)))
            if steps % 8 == 1:  # a host sync now and then, not every step
                have = [st for st in stats if "false_negative_rate" in st]
                if have:
                    fnr.append(float(np.mean([float(st["false_negative_rate"]) for st in have])))
                    masked.append(float(np.mean([float(st["masked_fraction"]) for st in have])))
            # seconds budget: the unsynchronized clock never runs ahead of the device, so
            # synchronize only once it says a mark may have been reached
            if marks and ((budget_rows and rows_seen >= marks[0]) or
                          (budget_s and train_s + time.perf_counter() - t_last >= marks[0])):
                sync()
                now = time.perf_counter()
                train_s += now - t_last
                if budget_rows or train_s >= marks[0]:
                    at_mark()
                t_last = time.perf_counter()
            if (budget_rows and rows_seen >= budget_rows) or (budget_s and train_s >= budget_s):
                done = True
                break
        epoch += 1
        if task.get("max_epochs") and epoch >= task["max_epochs"]:
            done = True
    sync()
    train_s += time.perf_counter() - t_last
    if marks:  # budget reached between marks (or at the last one)
        at_mark()
    if early_stop and best["state"] is not None:
        model.load_state_dict(best["state"])
    metrics, arrays = score(model, data.eval, k, full=True)
    return {**{key: task[key] for key in ("cell", "variant", "requests_per_step", "order", "seed", "phase")},
            "metrics": metrics, "curve": curve, "rows_seen": rows_seen, "steps": steps, "epochs_started": epoch,
            "train_seconds": train_s, "rows_per_s": rows_seen / max(train_s, 1e-9), "batch_rows": batch_rows,
            "selected_rows": best["rows"] if early_stop else rows_seen,
            "false_negative_rate": float(np.mean(fnr)) if fnr else float("nan"),
            "masked_fraction": float(np.mean(masked)) if masked else float("nan"),
            "users_per_device_batch": float(np.mean(users)) if users else float("nan"),
            "devices": n_dev, "arrays": arrays}


def _worker(cfg: dict, files: dict, tasks, results, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        device = resolve_device(cfg["device"])
        data = Data(cfg, files, device)
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (slow)
        results.put({"ready": True, "rows": data.rows, "requests": data.requests})
        while True:
            task = tasks.get()
            if task is None:
                return
            try:
                results.put(run_one(cfg, data, task, device))
            except Exception:
                results.put({"error": traceback.format_exc(), "task": task})
    except Exception:
        results.put({"fatal": traceback.format_exc()})


# ---------------------------------------------------------------------------------------
# the study (parent)
# ---------------------------------------------------------------------------------------
ARRAY_FIELDS = ("labels", "logits", "row_request", "ranks", "rank_request")


def arrays_file(folder: Path, cell: str, seed: int) -> Path:
    return folder / f"{cell.replace('|', '__').replace(':', '-')}-seed{seed}.npz"


def save_arrays(folder: Path, cell: str, seed: int, arrays) -> None:
    """One sweep run's eval arrays (what the paired bootstrap needs), for --compare."""
    folder.mkdir(parents=True, exist_ok=True)
    path = arrays_file(folder, cell, seed)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, n_requests=arrays.n_requests, **{f: getattr(arrays, f) for f in ARRAY_FIELDS})
    os.replace(tmp, path)


def load_arrays(folder: Path, cell: str, seed: int):
    from reqdedup.evaluate.metrics import EvalArrays

    path = arrays_file(folder, cell, seed)
    if not path.is_file():
        raise InputError(f"{path}: no eval arrays of {cell} seed {seed} (was the study run with this --work?)")
    with np.load(path) as z:
        return EvalArrays(**{f: z[f] for f in ARRAY_FIELDS}, n_requests=int(z["n_requests"]))


class Study:
    def __init__(self, cfg: dict, out: Path, work: Path):
        self.cfg, self.out, self.work = cfg, out, work
        self.arrays_dir = work / "arrays" / cfg["name"]
        self.t0 = time.perf_counter()
        self.runs: list[dict] = []
        self.arrays: dict[tuple, object] = {}
        self.intervals: dict[str, dict] = {}
        self.calibration: dict | None = None
        self.errors: list[str] = []
        self.data_info: dict = {}
        self.notes: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        print(f"[study {time.perf_counter() - self.t0:6.0f}s] {msg}", flush=True)

    def left(self) -> float:
        lim = self.cfg["time_limit_s"]
        return math.inf if lim is None else lim - (time.perf_counter() - self.t0)

    # ----- workers -----
    def start_workers(self, files: dict, n: int):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        threads = self.cfg["train"]["threads"] or max(1, (os.cpu_count() or 1) // n)
        self.procs = [ctx.Process(target=_worker, args=(self.cfg, files, self.tasks, self.results, threads), daemon=True)
                      for _ in range(n)]
        for p in self.procs:
            p.start()
        for _ in range(n):
            while True:
                try:
                    msg = self.results.get(timeout=5.0)
                    break
                except queue.Empty:
                    self.check_alive()
            if "fatal" in msg:
                raise RuntimeError(f"a study worker failed to start:\n{msg['fatal']}")
            self.data_info = {"train_rows": msg["rows"], "train_requests": msg["requests"]}
        self.log(f"{n} worker(s) ready: {self.data_info['train_rows']:,} training rows, "
                 f"{self.data_info['train_requests']:,} requests")

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"study worker(s) died: exit codes {[p.exitcode for p in dead]} (killed for memory?)")

    def stop_workers(self):
        """Ask the workers to finish; past the time limit, stop them at once (runs in flight
        are lost, everything finished is already written)."""
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=0 if self.left() <= 0 else 30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def run_tasks(self, tasks: list[dict], on_result, estimate_s: float | None = None,
                  concurrency: int | None = None) -> None:
        """Feed tasks (in order) to the workers, keeping ``concurrency`` (default: all) busy,
        never starting one that the time limit cannot fit (estimate: the mean of this phase's
        finished runs)."""
        pending, busy, durations = list(tasks), 0, []
        n = concurrency or len(self.procs)
        started = {}
        while pending or busy:
            while pending and busy < n:
                est = float(np.mean(durations)) if durations else (estimate_s or 0.0)
                if self.left() < est * 1.1 + 10:
                    self.notes.append(f"time limit: {len(pending)} run(s) not started ({pending[0]['cell']} seed "
                                      f"{pending[0]['seed']} first)")
                    self.log(self.notes[-1])
                    pending = []
                    break
                task = pending.pop(0)
                started[(task["cell"], task["seed"], task["phase"])] = time.perf_counter()
                self.tasks.put(task)
                busy += 1
            if not busy:
                break
            try:
                msg = self.results.get(timeout=5.0)
            except queue.Empty:
                self.check_alive()
                if self.left() <= 0:
                    self.notes.append(f"time limit reached with {busy} run(s) in flight")
                    self.log(self.notes[-1])
                    return
                continue
            busy -= 1
            if "error" in msg:
                t = msg["task"]
                self.errors.append(f"{t['cell']} seed {t['seed']}: {msg['error'].strip().splitlines()[-1]}")
                self.log(f"FAILED {t['cell']} seed {t['seed']}:\n{msg['error']}")
                continue
            if "fatal" in msg:
                raise RuntimeError(msg["fatal"])
            durations.append(time.perf_counter() - started[(msg["cell"], msg["seed"], msg["phase"])])
            on_result(msg)

    # ----- phases -----
    def calibrate(self) -> int:
        b = self.cfg["budget"]
        rows = self.data_info["train_rows"]
        max_rows = int(b["max_epochs"] * rows)
        if b["select"] == "best_validation":
            cap = int(b["rows"]) if b["rows"] is not None else max_rows
            self.calibration = {"rule": f"early stopping: every run trains up to {cap:,} rows and is scored at the "
                                        f"point of its best validation AUC among {b['curve_points']} points",
                                "rows": cap, "epochs": cap / rows, "select": "best_validation"}
            self.log(f"training length: {self.calibration['rule']}")
            return cap
        if b["rows"] is not None:
            self.calibration = {"rule": "fixed", "rows": b["rows"]}
            return int(b["rows"])
        task = {"cell": cell_key(BASELINE, b["requests_per_step"], "iid"), "variant": BASELINE,
                "requests_per_step": b["requests_per_step"], "order": "iid", "seed": self.cfg["seeds"][0],
                "phase": "calibration", "rows": max_rows, "curve_points": b["curve_points"], "curve_on": "validation"}
        got = []
        self.log(f"calibration: iid seed {task['seed']} at {task['requests_per_step']} requests/step up to "
                 f"{max_rows:,} rows ({b['max_epochs']} epochs), validation AUC at {b['curve_points']} points")
        self.run_tasks([task], got.append, concurrency=1)
        if not got:
            raise RuntimeError("the calibration run did not finish: " + "; ".join(self.errors or self.notes))
        curve = got[0]["curve"]
        budget = int(__import__("reqdedup.evaluate.metrics", fromlist=["x"]).converged_rows(
            [p["rows"] for p in curve], [p["auc"] for p in curve], tolerance=b["tolerance"]))
        aucs = [p["auc"] for p in curve]
        converged = not (budget >= curve[-1]["rows"] and len(aucs) > 1 and aucs[-1] > aucs[-2] * (1 + b["tolerance"]))
        self.calibration = {"rule": f"first point where iid's validation AUC is within {100 * b['tolerance']:.2g}% of its best",
                            "rows": budget, "epochs": budget / rows, "curve": curve, "converged": converged,
                            "seconds": got[0]["train_seconds"], "max_rows": max_rows}
        if not converged:
            self.notes.append(f"iid had NOT converged on the validation split within budget.max_epochs = "
                              f"{b['max_epochs']} (AUC still rising by more than {100 * b['tolerance']:.2g}% at the last "
                              f"point): every config trains for the maximum, {budget:,} rows; convergence-speed "
                              "differences are part of what the cells measure")
            self.log(self.notes[-1])
        self.log(f"row budget {budget:,} rows ({budget / rows:.2f} epochs); validation AUC curve "
                 + ", ".join(f"{p['rows']:,}: {p['auc']:.4f}" for p in curve))
        self.write()
        return budget

    def compute_matched(self) -> None:
        c = self.cfg["compute"]
        if c is None:
            return
        tasks = []
        for seed in c["seeds"]:
            for v in c["variants"]:
                tasks.append({"cell": cell_key(v, c["requests_per_step"], c["order"]), "variant": v,
                              "requests_per_step": c["requests_per_step"], "order": c["order"], "seed": seed,
                              "phase": "compute", "seconds": float(c["seconds"]), "curve_points": c["points"]})
        self.log(f"compute-matched: {len(tasks)} runs of {c['seconds']} training seconds each, one at a time")
        self.run_tasks(tasks, self.add_run, estimate_s=c["seconds"] * 1.5, concurrency=1)

    def sweeps(self, budget: int) -> None:
        cells = cells_of(self.cfg)
        tasks = []
        # sweep by sweep; inside a sweep seed-major, so a cut-off study has even seeds per cell
        by_sweep: dict[str, list[dict]] = {}
        for c in cells:
            by_sweep.setdefault(c["sweep"], []).append(c)
        b = self.cfg["budget"]
        early_stop = b["select"] == "best_validation"
        # early stopping measures validation AUC at the budget's points (and the eval curve with it)
        points = ({"select": "best_validation", "curve_points": b["curve_points"]} if early_stop
                  else {"curve_points": self.cfg["eval"]["curve_points"]})
        for sweep, cs in by_sweep.items():
            for seed in self.cfg["seeds"]:
                for c in cs:
                    tasks.append({"cell": c["key"], "variant": c["variant"], "requests_per_step": c["requests_per_step"],
                                  "order": c["order"], "seed": seed, "phase": "sweep", "sweep": sweep, "rows": budget,
                                  "curve_on": "eval", **points})
        self.log(f"sweeps: {len(cells)} cells x {len(self.cfg['seeds'])} seeds = {len(tasks)} runs, "
                 f"{budget:,} training rows each" + (" at most (early stopping)" if early_stop else ""))
        self.run_tasks(tasks, self.add_run)

    def add_run(self, r: dict) -> None:
        arr = r.pop("arrays")
        self.runs.append(r)
        if r["phase"] == "sweep":
            self.arrays[(r["cell"], r["seed"])] = arr
            save_arrays(self.arrays_dir, r["cell"], r["seed"], arr)
            self.update_interval(r["cell"], final=False)
            if r["variant"] == BASELINE:
                for key in {x["cell"] for x in self.runs if x["phase"] == "sweep"
                            and x["requests_per_step"] == r["requests_per_step"] and x["variant"] != BASELINE}:
                    self.update_interval(key, final=False)
        m = r["metrics"]
        k = self.cfg["eval"]["k"]
        self.log(f"{r['phase']} {r['cell']} seed {r['seed']}: auc {m['auc']:.4f} recall@{k} {m[f'recall@{k}']:.4f} "
                 f"fnr {r['false_negative_rate']:.3f} users/device batch {r['users_per_device_batch']:.1f} "
                 f"{r['rows_seen']:,} rows in {r['train_seconds']:.1f} s ({r['rows_per_s']:,.0f} rows/s)")
        self.write()

    def final_intervals(self) -> None:
        """Every cell's interval with the full eval.bootstrap replicates (during the run they
        use at most eval.bootstrap_during replicates, so the parent keeps feeding the
        workers), within eval.final_interval_s; cells left show their coarser interval."""
        t0 = time.perf_counter()
        cells = list(dict.fromkeys(r["cell"] for r in self.runs if r["phase"] == "sweep"))
        for i, cell in enumerate(cells):
            if time.perf_counter() - t0 > self.cfg["eval"]["final_interval_s"]:
                self.notes.append(f"intervals of {len(cells) - i} cell(s) kept at "
                                  f"{self.cfg['eval']['bootstrap_during']} bootstrap replicates (eval.final_interval_s)")
                self.log(self.notes[-1])
                break
            self.update_interval(cell, final=True)

    def update_interval(self, cell: str, final: bool = True) -> None:
        from reqdedup.evaluate import metrics as M

        variant, rps, _ = cell.split("|")
        if variant == BASELINE:
            return
        base = cell_key(BASELINE, int(rps), "iid")
        seeds = sorted(s for (c, s) in self.arrays if c == cell and (base, s) in self.arrays)
        if not seeds:
            return
        k = self.cfg["eval"]["k"]
        names = [f"{m}@{k}" if m in ("recall", "ndcg") else m for m in self.cfg["gate"]["metrics"]]
        self.intervals[cell] = {m: M.relative_change_interval(
            [self.arrays[(cell, s)] for s in seeds], [self.arrays[(base, s)] for s in seeds], m,
            n_boot=self.cfg["eval"]["bootstrap"] if final else min(self.cfg["eval"]["bootstrap"],
                                                                    self.cfg["eval"]["bootstrap_during"]),
            level=self.cfg["eval"]["level"]) for m in names}
        for m in names:
            self.intervals[cell][m]["seeds"] = seeds

    # ----- output -----
    def summary(self) -> dict:
        return {"name": self.cfg["name"], "config": {k: v for k, v in self.cfg.items() if k != "source"},
                "config_source": self.cfg["source"],
                "command": "python -m reqdedup.evaluate.study " + " ".join(sys.argv[1:]),
                "elapsed_s": round(time.perf_counter() - self.t0, 1), "data": self.data_info,
                "calibration": self.calibration, "runs": self.runs, "intervals": self.intervals,
                "errors": self.errors, "notes": self.notes, "arrays_dir": str(self.arrays_dir),
                "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def write(self) -> None:
        s = self.summary()
        tmp = self.out / "study.json.tmp"
        tmp.write_text(json.dumps(s, indent=1, default=float))
        os.replace(tmp, self.out / "study.json")
        (self.out / "study.md").write_text(markdown(s))


def _pct_interval(iv: dict) -> str:
    """'+1.23% [-0.45, +2.91]': a relative change and its interval, in percent."""
    return f"{100 * iv['point']:+.2f}% [{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}]"


def _error_bars(ivs: list[dict]) -> list[list[float]]:
    """matplotlib's asymmetric error bars (below, above the point) of intervals, in percent."""
    return [[100 * (iv["point"] - iv["low"]) for iv in ivs], [100 * (iv["high"] - iv["point"]) for iv in ivs]]


def _mean(xs):
    xs = [x for x in xs if x == x]
    return float(np.mean(xs)) if xs else float("nan")


def markdown(s: dict) -> str:
    from reqdedup.evaluate import metrics as M

    cfg = s["config"]
    k = cfg["eval"]["k"]
    tol = cfg["gate"]["tolerance"]
    gm = [f"{m}@{k}" if m in ("recall", "ndcg") else m for m in cfg["gate"]["metrics"]]
    lines = [f"# Study `{s['name']}`", "",
             f"- command: `{s['command']}` (config `{s['config_source']}`); {s['elapsed_s']} s elapsed; "
             f"written {s['written_at']}",
             f"- data: {json.dumps(cfg['data'])}; {s['data']}",
             f"- model: {json.dumps(cfg['model'])}; train: {json.dumps(cfg['train'])}",
             f"- one global step = {cfg['train']['devices']} simulated devices (per-device BatchNorm statistics and "
             "in-batch negatives; SyncBN = statistics over the whole step); eval on the eval dates, every "
             f"engaged pair ranked among all eval items; intervals: {100 * cfg['eval']['level']:.0f}% of the relative "
             "change of the seed mean against iid at the same requests per step (paired bootstrap over eval requests, "
             f"{cfg['eval']['bootstrap']} replicates, + seed spread); non-inferior = lower bound >= -{100 * tol:.2g}%.",
             ""]
    cal = s.get("calibration")
    if cal:
        lines += [f"Training length: {cal['rule']}: **{cal['rows']:,} rows**"
                  + (f" ({cal['epochs']:.2f} epochs; validation AUC curve: "
                     + ", ".join(f"{p['rows']:,} rows {p['auc']:.4f}" for p in cal["curve"]) + ")"
                     if cal.get("curve") else ""), ""]
    sweep_runs = [r for r in s["runs"] if r["phase"] == "sweep"]
    cells = []
    for r in sweep_runs:
        if r["cell"] not in cells:
            cells.append(r["cell"])
    head = ("| cell (variant / requests per step / order) | seeds | AUC | recall@%d | " % k
            + " | ".join(f"Δ {m} vs iid [interval]" for m in gm)
            + f" | non-inferior at {100 * tol:.2g}% | FNR | users per device batch | rows/s |")
    lines += ["## Cells", "", head, "| --- |" + " ---: |" * (6 + len(gm))]
    for c in cells:
        rs = [r for r in sweep_runs if r["cell"] == c]
        iv = s["intervals"].get(c, {})
        ivcells = []
        for m in gm:
            x = iv.get(m)
            ivcells.append(_pct_interval(x) if x else "")
        ni = ("yes" if all(iv.get(m) and M.non_inferior(iv[m], tol, m) for m in gm) else
              "no (1 seed)" if any(iv.get(m) and iv[m]["n_seeds"] < 2 for m in gm) else "no") if iv else ""
        v, rps, order = c.split("|")
        lines.append(f"| {v} / {rps} / {order} | {len(rs)} | {_mean([r['metrics']['auc'] for r in rs]):.4f} | "
                     f"{_mean([r['metrics'][f'recall@{k}'] for r in rs]):.4f} | " + " | ".join(ivcells)
                     + f" | {ni} | {_mean([r['false_negative_rate'] for r in rs]):.3f} | "
                     f"{_mean([r['users_per_device_batch'] for r in rs]):.1f} | "
                     f"{_mean([r['rows_per_s'] for r in rs]):,.0f} |")
    if (cal or {}).get("select") == "best_validation" and sweep_runs:
        lines += ["", "## Training length each run selected (early stopping on the validation dates)", "",
                  "| cell | rows at the best validation AUC: mean (min-max) | epochs (mean) |", "| --- | ---: | ---: |"]
        for c in cells:
            sel = [r["selected_rows"] for r in sweep_runs if r["cell"] == c]
            lines.append(f"| {c.replace('|', ' / ')} | {_mean(sel):,.0f} ({min(sel):,}-{max(sel):,}) | "
                         f"{_mean(sel) / s['data']['train_rows']:.2f} |")
    comp = [r for r in s["runs"] if r["phase"] == "compute"]
    if comp:
        lines += ["", "## Compute-matched (same training seconds, run alone on the device)", "",
                  "| variant / requests per step / order | seeds | train s | rows seen | AUC | recall@%d |" % k,
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for c in dict.fromkeys(r["cell"] for r in comp):
            rs = [r for r in comp if r["cell"] == c]
            lines.append(f"| {c.replace('|', ' / ')} | {len(rs)} | {_mean([r['train_seconds'] for r in rs]):.1f} | "
                         f"{_mean([r['rows_seen'] for r in rs]):,.0f} | {_mean([r['metrics']['auc'] for r in rs]):.4f} | "
                         f"{_mean([r['metrics'][f'recall@{k}'] for r in rs]):.4f} |")
        lines += ["", "Curves (mean over seeds at each point): " + "; ".join(
            f"{c.split('|')[0]}: " + ", ".join(
                f"{p['train_seconds']:.0f}s {p['auc']:.4f}/{p[f'recall@{k}']:.4f}"
                for p in _mean_curve([r for r in comp if r["cell"] == c]))
            for c in dict.fromkeys(r["cell"] for r in comp))]
    if s["notes"] or s["errors"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in s["notes"]] + [f"- error: {e}" for e in s["errors"]]
    lines += ["", "Plots (when matplotlib is importable): study_intervals.png, study_curves.png, "
              "study_compute.png.", ""]
    return "\n".join(lines)


def _mean_curve(runs: list[dict]) -> list[dict]:
    n = min((len(r["curve"]) for r in runs), default=0)
    out = []
    for i in range(n):
        pts = [r["curve"][i] for r in runs]
        out.append({key: _mean([p[key] for p in pts]) for key in pts[0]})
    return out


def plots(s: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    k = s["config"]["eval"]["k"]
    tol = s["config"]["gate"]["tolerance"]
    paths = []
    cells = list(s["intervals"])
    if cells:
        metrics = list(next(iter(s["intervals"].values())))
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 0.35 * len(cells) + 1.8), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            ys = range(len(cells))
            pts = [s["intervals"][c].get(m) for c in cells]
            ax.errorbar([100 * p["point"] for p in pts], list(ys),
                        xerr=_error_bars(pts),
                        fmt="o", capsize=3)
            ax.axvline(0, color="gray", lw=0.8)
            ax.axvline(-100 * tol, color="tab:red", lw=0.8, ls="--")
            ax.set_yticks(list(ys))
            ax.set_yticklabels([c.replace("|", " / ") for c in cells], fontsize=7)
            ax.set_xlabel(f"Δ {m} vs iid, % (95% interval)")
            ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "study_intervals.png", dpi=110)
        plt.close(fig)
        paths.append(out / "study_intervals.png")
    for phase, x, name in (("sweep", "rows", "study_curves.png"), ("compute", "train_seconds", "study_compute.png")):
        runs = [r for r in s["runs"] if r["phase"] == phase and r["curve"]]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        cells_here = list(dict.fromkeys(r["cell"] for r in runs))
        if phase == "sweep" and len(cells_here) > 10:  # the headline cells only
            cells_here = [c for c in cells_here if c.split("|")[1] == str(s["config"]["budget"]["requests_per_step"])][:10]
        for i, c in enumerate(cells_here):
            mc = _mean_curve([r for r in runs if r["cell"] == c])
            for ax, m in zip(axes, ("auc", f"recall@{k}")):
                ax.plot([p[x] for p in mc], [p[m] for p in mc], marker=".", label=c.replace("|", " / "), color=f"C{i % 10}")
        for ax, m in zip(axes, ("AUC", f"recall@{k}")):
            ax.set_xlabel("training rows seen" if x == "rows" else "training seconds (the study device, run alone)")
            ax.set_ylabel(m + " (eval, mean over seeds)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def run_study(cfg: dict, out: Path, work: Path) -> dict:
    st = Study(cfg, out, work)
    st.log(f"{cfg['name']}: data -> {work}")
    files = prepare_data(cfg, work, st.log)
    st.start_workers(files, cfg["workers"])
    try:
        budget = st.calibrate()  # one run at a time (the others idle)
        st.compute_matched()  # one at a time: its clock is the device's alone
        st.sweeps(budget)  # every worker busy
    except RuntimeError as e:  # what finished is kept and written below
        st.errors.append(f"study stopped: {e}")
        st.log(st.errors[-1])
    finally:
        st.stop_workers()
    st.final_intervals()
    st.write()
    made = plots(st.summary(), out)
    st.log(f"done: {out / 'study.md'}" + (f", plots {', '.join(p.name for p in made)}" if made else
                                         " (no matplotlib here: no plots; `--replot` elsewhere)"))
    return st.summary()


# ---------------------------------------------------------------------------------------
# two studies that differ in one model setting: each cell of one against the same cell of the other
# ---------------------------------------------------------------------------------------
def config_section(study: dict, key: str):
    """A finished study's ``config[key]``, with the defaults of settings added after it ran (a
    study written before e.g. budget.select existed ran with its default, "last")."""
    value = study["config"][key]
    return {**DEFAULTS[key], **value} if isinstance(value, dict) and isinstance(DEFAULTS.get(key), dict) else value


def compare_studies(base_dir: Path, cand_dir: Path, out: Path) -> dict:
    """The relative change of every cell of the candidate study against the same cell of the
    baseline study, with the study's interval (paired by seed, bootstrap over the same eval
    requests + the seed spread). The two studies must share data, training and eval settings
    and differ only in ``model`` (e.g. ``model.ranking`` crossing vs two_tower)."""
    from reqdedup.evaluate import metrics as M

    base, cand = (json.loads((d / "study.json").read_text()) for d in (base_dir, cand_dir))
    for key in ("data", "train", "budget", "eval", "seeds"):
        if config_section(base, key) != config_section(cand, key):
            raise InputError(f"{cand_dir}: config.{key} differs from {base_dir}'s; the studies compare only when "
                             "they differ in model settings alone")
    model_diff = {k: [base["config"]["model"].get(k), v] for k, v in cand["config"]["model"].items()
                  if base["config"]["model"].get(k) != v}
    model_diff.update({k: [v, None] for k, v in base["config"]["model"].items() if k not in cand["config"]["model"]})
    cfg = base["config"]
    k = cfg["eval"]["k"]
    names = [f"{m}@{k}" if m in ("recall", "ndcg") else m for m in cfg["gate"]["metrics"]]

    def seeds_by_cell(study: dict) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for r in study["runs"]:
            if r["phase"] == "sweep":
                out.setdefault(r["cell"], set()).add(r["seed"])
        return out

    base_seeds, cand_seeds = seeds_by_cell(base), seeds_by_cell(cand)
    rows = []
    for cell in [c for c in base_seeds if c in cand_seeds]:
        seeds = sorted(base_seeds[cell] & cand_seeds[cell])
        a = [load_arrays(Path(cand["arrays_dir"]), cell, s) for s in seeds]
        b = [load_arrays(Path(base["arrays_dir"]), cell, s) for s in seeds]
        intervals = {m: M.relative_change_interval(a, b, m, n_boot=cfg["eval"]["bootstrap"], level=cfg["eval"]["level"])
                     for m in names}
        rows.append({"cell": cell, "seeds": seeds, "intervals": intervals})
    result = {"baseline": str(base_dir), "candidate": str(cand_dir), "model_difference": model_diff,
              "calibration": {"baseline": base.get("calibration"), "candidate": cand.get("calibration")},
              "metrics": names, "level": cfg["eval"]["level"], "cells": rows,
              "command": "python -m reqdedup.evaluate.study " + " ".join(sys.argv[1:]),
              "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=float))

    def rows_of(study: dict) -> str:
        rows = (study.get("calibration") or {}).get("rows")
        return f"{rows:,}" if isinstance(rows, int) else "n/a"

    lines = [f"# {cand['name']} ({cand_dir}) against {base['name']} ({base_dir})", "",
             f"- command: `{result['command']}`",
             f"- model settings that differ (baseline, candidate): {json.dumps(model_diff)}",
             f"- training length, the same rule in both ({(base.get('calibration') or {}).get('rule', 'fixed')}): "
             f"baseline {rows_of(base)} rows, candidate {rows_of(cand)} rows",
             f"- the same data, training length rule, seeds and eval requests; change = candidate / baseline - 1 "
             f"of the seed means, {int(100 * cfg['eval']['level'])}% interval (paired bootstrap over eval requests, "
             f"{cfg['eval']['bootstrap']} replicates, + seed spread)", "",
             "| cell | seeds | " + " | ".join(f"{m} baseline | {m} candidate | Δ {m} [interval]" for m in names) + " |",
             "| --- | ---: | " + " | ".join("---: | ---: | ---:" for _ in names) + " |"]
    for r in rows:
        cells = []
        for m in names:
            iv = r["intervals"][m]
            cells.append(f"{iv['baseline_mean']:.4f} | {iv['candidate_mean']:.4f} | {_pct_interval(iv)}")
        lines.append(f"| {r['cell'].replace('|', ' / ')} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return result


# ---------------------------------------------------------------------------------------
# several studies that differ in one setting (e.g. train.devices): each variant's change
# against iid, with its interval, against the users per device batch
# ---------------------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "generator":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def across_studies(study_dirs: list[Path]) -> dict:
    """Rows (study, cell, users per device batch, each gate metric's change against iid with
    its interval) of studies that share data, eval and seeds and differ in other settings,
    which are named (``varied``). Each study's intervals are its own (against its own iid)."""
    studies = [json.loads((d / "study.json").read_text()) for d in study_dirs]
    if len(studies) < 2:
        raise InputError("--across needs at least two study folders")
    first = studies[0]
    for d, st in zip(study_dirs[1:], studies[1:]):
        for key in ("data", "eval", "seeds", "gate"):
            if config_section(st, key) != config_section(first, key):
                raise InputError(f"{d}: config.{key} differs from {study_dirs[0]}'s; studies compare across a "
                                 "setting only on the same data, eval requests and seeds")
    flat = [_flat({k: config_section(st, k) for k in st["config"] if k not in ("name", "sweeps", "time_limit_s", "workers")})
            for st in studies]
    varied = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1)
    rows = []
    for d, st, f in zip(study_dirs, studies, flat):
        for cell in sorted(st["intervals"], key=lambda c: (list(VARIANTS).index(c.split("|")[0]), c)):
            runs = [r for r in st["runs"] if r["phase"] == "sweep" and r["cell"] == cell]
            rows.append({"study": st["name"], "folder": str(d), "cell": cell, "variant": cell.split("|")[0],
                         "setting": {k: f.get(k) for k in varied}, "intervals": st["intervals"][cell],
                         "training_rows": _mean([r.get("selected_rows", r["rows_seen"]) for r in runs]),
                         "users_per_device_batch": _mean([r["users_per_device_batch"] for r in runs]),
                         "false_negative_rate": _mean([r["false_negative_rate"] for r in runs])})
    return {"studies": [str(d) for d in study_dirs], "varied": varied, "rows": rows,
            "metrics": list(next(iter(studies[0]["intervals"].values()))) if studies[0]["intervals"] else [],
            "tolerance": first["config"]["gate"]["tolerance"]}


def write_across(result: dict, out: Path) -> list[Path]:
    """across.json, across.md (one row per study and cell) and across.png (per gate metric: each
    variant's change against iid and its interval against the users per device batch)."""
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "command": "python -m reqdedup.evaluate.study " + " ".join(sys.argv[1:]),
              "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (out / "across.json").write_text(json.dumps(result, indent=1, default=float))
    names = result["metrics"]
    lines = [f"# Studies across {', '.join(result['varied']) or 'no setting'}", "",
             f"- command: `{result['command']}`",
             "- each change is against the same study's iid, with that study's 95% interval (paired bootstrap "
             "over eval requests + seed spread)", "",
             "| study | " + " | ".join(result["varied"]) + " | cell | training rows | users per device batch | FNR | "
             + " | ".join(f"Δ {m} vs iid [interval]" for m in names) + " |",
             "| --- | " + " | ".join("---:" for _ in result["varied"]) + " | --- | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in names) + " |"]
    for r in result["rows"]:
        ivs = [r["intervals"].get(m) for m in names]
        lines.append(f"| {r['study']} | " + " | ".join(str(v) for v in r["setting"].values()) + f" | "
                     f"{r['cell'].replace('|', ' / ')} | {r['training_rows']:,.0f} | {r['users_per_device_batch']:.1f} | "
                     f"{r['false_negative_rate']:.3f} | "
                     + " | ".join(_pct_interval(iv) if iv else "" for iv in ivs) + " |")
    (out / "across.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return [out / "across.json", out / "across.md"]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"] if r["intervals"]))
    for ax, m in zip(axes[0], names):
        for i, v in enumerate(variants):
            rs = sorted((r for r in result["rows"] if r["variant"] == v and r["intervals"].get(m)),
                        key=lambda r: r["users_per_device_batch"])
            x = [r["users_per_device_batch"] * (1 + 0.02 * (i - len(variants) / 2)) for r in rs]  # dodge
            p = [r["intervals"][m] for r in rs]
            ax.errorbar(x, [100 * q["point"] for q in p], yerr=_error_bars(p), capsize=3, marker="o", label=v,
                        color=f"C{i % 10}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(-100 * result["tolerance"], color="tab:red", lw=0.8, ls="--")
        ax.set_xscale("log")
        ticks = sorted({round(r["users_per_device_batch"], 1) for r in result["rows"]})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("users per device batch (log)")
        ax.set_ylabel(f"Δ {m} vs iid, % (95% interval)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("varied: " + ", ".join(result["varied"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "across.png", dpi=110)
    plt.close(fig)
    return [out / "across.json", out / "across.md", out / "across.png"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the request-level vs iid quality study (issue 12)")
    p.add_argument("--config", help="study YAML (configs/study_*.yaml)")
    p.add_argument("--out", required=True, help="folder for study.json, study.md and the plots")
    p.add_argument("--work", default=None, help="data folder (default: <out>/../study-work or $TMPDIR)")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value")
    p.add_argument("--replot", action="store_true", help="only draw the plots of an existing <out>/study.json")
    p.add_argument("--compare", nargs=2, metavar=("BASELINE_OUT", "CANDIDATE_OUT"),
                   help="compare two finished studies that differ only in model settings, cell by cell, into --out")
    p.add_argument("--across", nargs="+", metavar="STUDY_OUT",
                   help="several finished studies that differ in a setting (e.g. train.devices): each variant's "
                        "change against iid against the users per device batch, into --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.across:
        paths = write_across(across_studies([Path(d) for d in a.across]), out)
        print((out / "across.md").read_text() + "\n".join(str(x) for x in paths))
        return 0
    if a.compare:
        result = compare_studies(Path(a.compare[0]), Path(a.compare[1]), out)
        print((out / "compare.md").read_text())
        return 0 if result["cells"] else 2
    if a.replot:
        s = json.loads((out / "study.json").read_text())
        (out / "study.md").write_text(markdown(s))
        print("\n".join(str(x) for x in plots(s, out)))
        return 0
    if not a.config:
        p.error("--config is required (unless --replot)")
    cfg = load_study(a.config, a.set)
    work = Path(a.work) if a.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"reqdedup-study-{cfg['name']}"
    run_study(cfg, out, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
