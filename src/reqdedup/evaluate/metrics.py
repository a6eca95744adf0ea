"""Evaluation metrics as pure functions over numpy arrays (no torch, no MLflow).

Ranking (every eval row): ``roc_auc`` (Mann-Whitney, ties averaged) and ``log_loss`` from
logits. Retrieval (every engaged eval (request, item) pair): ``retrieval_ranks`` turns a
score matrix over a candidate pool into the 1-based rank of the true item, then
``recall_at_k`` and ``ndcg_at_k`` score the ranks. Training-side figures come from the
training run's metrics.json: ``training_figures``. Seed aggregation: ``seed_summary`` and
``relative_change``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counted as 1/2 (average ranks). NaN when only one class is present."""
    y = _as_1d(labels, "labels")
    s = _as_1d(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    starts = np.r_[0, np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(labels, logits) -> float:
    """Mean binary cross entropy of sigmoid(logits) against 0/1 labels, computed stably from
    the logits: softplus(x) - y * x."""
    y = _as_1d(labels, "labels")
    x = _as_1d(logits, "logits")
    if y.shape != x.shape:
        raise ValueError(f"labels ({y.size}) and logits ({x.size}) differ in length")
    softplus = np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))
    return float(np.mean(softplus - y * x))


def retrieval_ranks(scores, target, exclude=None) -> np.ndarray:
    """1-based rank of each query's true item among a candidate pool.

    scores  [Q, M] score of every pool item for each query (higher = better)
    target  [Q]    pool index of the query's true item
    exclude [Q, M] optional bool: pool items left out of that query's ranking (e.g. the
                   request's other engaged items, "filtered" ranking); the target itself is
                   never excluded.

    Ties are pessimistic: rank = 1 + number of other, non-excluded pool items scoring >= the
    true item, so a model that scores everything alike gets the worst rank, never the best.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    if s.ndim != 2 or s.shape[0] != t.size:
        raise ValueError(f"scores must be [Q, M] with Q = len(target) = {t.size}, got {s.shape}")
    if t.size and (t.min() < 0 or t.max() >= s.shape[1]):
        raise ValueError("target index outside the pool")
    rows = np.arange(t.size)
    true = s[rows, t]
    beats = s >= true[:, None]
    beats[rows, t] = False
    if exclude is not None:
        ex = np.asarray(exclude, dtype=bool)
        if ex.shape != s.shape:
            raise ValueError(f"exclude must have the shape of scores {s.shape}, got {ex.shape}")
        beats &= ~ex
    return 1 + beats.sum(axis=1)


def recall_at_k(ranks, k: int) -> float:
    """Share of queries whose true item ranks in the top k (one relevant item per query)."""
    r = _as_1d(ranks, "ranks")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean(r <= k))


def ndcg_at_k(ranks, k: int) -> float:
    """Mean NDCG@k with one relevant item per query: 1 / log2(rank + 1) inside the top k, else 0
    (the ideal DCG is 1)."""
    r = _as_1d(ranks, "ranks")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gain = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    return float(np.mean(gain))


def training_figures(train_metrics: dict) -> dict:
    """In-batch false-negative rate, unique users per batch (means over epochs: they measure
    batch composition, which the order fixes) and training rows/s, from a run's metrics.json."""
    history = train_metrics.get("history") or []
    if not history:
        raise ValueError("training metrics hold no epoch history")
    return {
        "false_negative_rate": float(np.mean([h["false_negative_rate"] for h in history])),
        "unique_users_per_batch": float(np.mean([h["unique_users_per_batch"] for h in history])),
        "requests_per_batch": float(np.mean([h.get("requests_per_batch", float("nan")) for h in history])),
        "train_rows_per_s": float(train_metrics["rows_per_s"]),
        "train_seconds": float(train_metrics["train_seconds"]),
        "final_train_loss": float(history[-1]["loss"]),
    }


def seed_summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (ddof=1; 0 with one seed), min, max and n of a metric
    over seeds. NaN values are dropped (and counted in n_nan)."""
    a = np.asarray(list(values), dtype=np.float64)
    ok = a[~np.isnan(a)]
    n = int(ok.size)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"),
                "n": 0, "n_nan": int(a.size)}
    return {"mean": float(ok.mean()), "std": float(ok.std(ddof=1)) if n > 1 else 0.0,
            "min": float(ok.min()), "max": float(ok.max()), "n": n, "n_nan": int(a.size - n)}


def relative_change(value: float, baseline: float) -> float:
    """(value - baseline) / |baseline|; NaN when the baseline is 0 or NaN."""
    if baseline is None or value is None or not math.isfinite(baseline) or baseline == 0 or not math.isfinite(value):
        return float("nan")
    return float((value - baseline) / abs(baseline))


# Which direction is better, for the report and the gate.
HIGHER_IS_BETTER = {"auc": True, "log_loss": False, "recall": True, "ndcg": True,
                    "train_rows_per_s": True, "false_negative_rate": False}


def higher_is_better(metric: str) -> bool | None:
    base = metric.split("@")[0]
    return HIGHER_IS_BETTER.get(base)
