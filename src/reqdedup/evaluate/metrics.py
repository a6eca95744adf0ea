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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reqdedup.errors import NonFiniteScoresError


def check_finite(values, what: str) -> None:
    """NonFiniteScoresError when ``values`` (numpy or torch) hold a NaN or an infinity: a NaN
    score compares false with everything, so it would rank first and could pass the gate."""
    a = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        n = int(bad.sum())
        first = np.unravel_index(int(np.argmax(bad)), a.shape) if a.ndim else ()
        raise NonFiniteScoresError(f"{what}: {n} of {a.size} values are NaN or infinite (first at index "
                                   f"{tuple(int(i) for i in first)}: {a[first] if a.ndim else a}); "
                                   f"no metric is computed from them")


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
    check_finite(s, "roc_auc scores")
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
    check_finite(x, "log_loss logits")
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
    check_finite(s, "retrieval scores")
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


# ---------------------------------------------------------------------------------------
# Intervals of the relative change against a baseline (issue 12)
# ---------------------------------------------------------------------------------------
# Two sources of uncertainty, estimated separately and added as variances:
#   * the eval requests (which requests the eval day happens to hold): a PAIRED bootstrap
#     over eval requests, the same resampled requests for every run of both configs, of the
#     relative change of the seed means;
#   * training randomness (the seed): the spread over seeds of the per-seed relative change
#     (seed s of the config against seed s of the baseline), variance / n_seeds.
# point +- t_df * sqrt(v_requests + v_seeds), df by Welch-Satterthwaite (n_seeds - 1 for the
# seed part, infinite for the bootstrap part). See docs/evaluation.md.


@dataclass
class EvalArrays:
    """One run's evaluation outputs, indexed by eval request (the same request index in every
    run of one evaluation): ranking rows (label, logit, request) and retrieval queries (the
    true item's rank, request)."""

    labels: np.ndarray
    logits: np.ndarray
    row_request: np.ndarray
    ranks: np.ndarray
    rank_request: np.ndarray
    n_requests: int

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.float64).reshape(-1)
        self.logits = np.asarray(self.logits, dtype=np.float64).reshape(-1)
        self.row_request = np.asarray(self.row_request, dtype=np.int64).reshape(-1)
        self.ranks = np.asarray(self.ranks, dtype=np.float64).reshape(-1)
        self.rank_request = np.asarray(self.rank_request, dtype=np.int64).reshape(-1)
        if not (self.labels.size == self.logits.size == self.row_request.size):
            raise ValueError("labels, logits and row_request differ in length")
        if self.ranks.size != self.rank_request.size:
            raise ValueError("ranks and rank_request differ in length")
        for name in ("row_request", "rank_request"):
            a = getattr(self, name)
            if a.size and (a.min() < 0 or a.max() >= self.n_requests):
                raise ValueError(f"{name} outside 0..n_requests-1 ({self.n_requests})")
        self._auc_prep = None

    def auc_prep(self):
        """Score groups (ties share a group) in ascending order, computed once per run."""
        if self._auc_prep is None:
            order = np.argsort(self.logits, kind="mergesort")
            s = self.logits[order]
            group = np.r_[0, np.cumsum(s[1:] != s[:-1])]
            self._auc_prep = (order, group, int(group[-1]) + 1 if group.size else 0)
        return self._auc_prep


def weighted_auc(arr: EvalArrays, request_weights: np.ndarray | None = None) -> float:
    """AUC with every row weighted by its request's weight (a bootstrap replicate's request
    counts); ties count 1/2. Equals ``roc_auc`` with unit weights."""
    w = np.ones(arr.labels.size) if request_weights is None else np.asarray(request_weights, np.float64)[arr.row_request]
    order, group, n_groups = arr.auc_prep()
    pos = arr.labels[order] > 0.5
    wo = w[order]
    gp = np.bincount(group, weights=np.where(pos, wo, 0.0), minlength=n_groups)
    gn = np.bincount(group, weights=np.where(pos, 0.0, wo), minlength=n_groups)
    tp, tn = gp.sum(), gn.sum()
    if tp <= 0 or tn <= 0:
        return float("nan")
    below = np.cumsum(gn) - gn
    return float((gp * (below + 0.5 * gn)).sum() / (tp * tn))


def weighted_log_loss(arr: EvalArrays, request_weights: np.ndarray | None = None) -> float:
    w = np.ones(arr.labels.size) if request_weights is None else np.asarray(request_weights, np.float64)[arr.row_request]
    x, y = arr.logits, arr.labels
    per_row = np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x))) - y * x
    return float((w * per_row).sum() / w.sum()) if w.sum() > 0 else float("nan")


def weighted_recall(arr: EvalArrays, k: int, request_weights: np.ndarray | None = None) -> float:
    if arr.ranks.size == 0:
        return float("nan")
    w = np.ones(arr.ranks.size) if request_weights is None else np.asarray(request_weights, np.float64)[arr.rank_request]
    return float((w * (arr.ranks <= k)).sum() / w.sum()) if w.sum() > 0 else float("nan")


def weighted_ndcg(arr: EvalArrays, k: int, request_weights: np.ndarray | None = None) -> float:
    if arr.ranks.size == 0:
        return float("nan")
    w = np.ones(arr.ranks.size) if request_weights is None else np.asarray(request_weights, np.float64)[arr.rank_request]
    gain = np.where(arr.ranks <= k, 1.0 / np.log2(arr.ranks + 1.0), 0.0)
    return float((w * gain).sum() / w.sum()) if w.sum() > 0 else float("nan")


def metric_value(arr: EvalArrays, metric: str, request_weights: np.ndarray | None = None) -> float:
    """auc | log_loss | recall@K | ndcg@K of one run, rows weighted by request weights."""
    if metric == "auc":
        return weighted_auc(arr, request_weights)
    if metric == "log_loss":
        return weighted_log_loss(arr, request_weights)
    base, _, k = metric.partition("@")
    if base in ("recall", "ndcg") and k.isdigit():
        fn = weighted_recall if base == "recall" else weighted_ndcg
        return fn(arr, int(k), request_weights)
    raise ValueError(f"no interval for metric {metric!r} (auc, log_loss, recall@K, ndcg@K)")


def _t_cdf(x: float, df: float) -> float:
    """Student t CDF by Simpson integration of the density from 0 (x >= 0)."""
    if math.isinf(df):
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    n = 4000
    grid = np.linspace(0.0, x, n + 1)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid * grid / df))
    h = x / n
    simpson = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return 0.5 + float(simpson)


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with df degrees of freedom (inf: the normal), 0.5 < p < 1."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e6:
            break
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def bootstrap_request_weights(n_requests: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_requests] request counts of paired bootstrap replicates (resampling the
    eval requests with replacement); the same rows are used for every run compared."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_requests, np.full(n_requests, 1.0 / n_requests), size=n_boot).astype(np.float64)


def relative_change_interval(candidate: Sequence[EvalArrays], baseline: Sequence[EvalArrays], metric: str, *,
                             n_boot: int = 200, level: float = 0.95, seed: int = 0,
                             weights: np.ndarray | None = None) -> dict:
    """Interval of the relative change of the seed-mean metric of ``candidate`` runs against
    ``baseline`` runs (paired by position = seed), over the same eval requests.

    point   = mean_s m(cand_s) / mean_s m(base_s) - 1
    v_req   = variance over paired request-bootstrap replicates of that ratio
    v_seed  = sample variance over seeds of m(cand_s) / m(base_s) - 1, divided by n_seeds
    interval = point -+ t_{level, df} * sqrt(v_req + v_seed), df = Welch-Satterthwaite.
    """
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(f"need the same number (>= 1) of candidate and baseline runs, got {len(candidate)} "
                         f"and {len(baseline)}")
    n_req = candidate[0].n_requests
    if any(a.n_requests != n_req for a in [*candidate, *baseline]):
        raise ValueError("every run must be evaluated on the same eval requests")
    n = len(candidate)
    c_vals = np.array([metric_value(a, metric) for a in candidate])
    b_vals = np.array([metric_value(a, metric) for a in baseline])
    point = relative_change(float(c_vals.mean()), float(b_vals.mean()))
    per_seed = np.array([relative_change(c, b) for c, b in zip(c_vals, b_vals)])
    w = bootstrap_request_weights(n_req, n_boot, seed) if weights is None else np.asarray(weights, np.float64)
    reps = np.empty(w.shape[0])
    for i in range(w.shape[0]):
        cm = np.mean([metric_value(a, metric, w[i]) for a in candidate])
        bm = np.mean([metric_value(a, metric, w[i]) for a in baseline])
        reps[i] = relative_change(float(cm), float(bm))
    reps = reps[np.isfinite(reps)]
    v_req = float(reps.var(ddof=1)) if reps.size > 1 else 0.0
    v_seed = float(per_seed.var(ddof=1)) / n if n > 1 else 0.0
    total = v_req + v_seed
    if n > 1 and v_seed > 0:
        df = total * total / (v_seed * v_seed / (n - 1))
    else:
        df = math.inf
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(total) if total > 0 else 0.0
    return {"metric": metric, "point": point, "low": point - half, "high": point + half, "level": level,
            "se": math.sqrt(total), "se_requests": math.sqrt(v_req), "se_seeds": math.sqrt(v_seed), "df": df,
            "n_seeds": n, "n_boot": int(w.shape[0]), "n_requests": int(n_req),
            "candidate_mean": float(c_vals.mean()), "baseline_mean": float(b_vals.mean()),
            "per_seed": per_seed.tolist()}


def non_inferior(interval: dict, tolerance: float, metric: str, min_seeds: int = 2) -> bool:
    """Non-inferiority on the interval: the worst end of the relative change is within the
    tolerance (low >= -tolerance when higher is better; high <= +tolerance for log loss).
    An interval over fewer than ``min_seeds`` seeds has no estimate of the training
    randomness and never passes."""
    if int(interval.get("n_seeds") or 0) < min_seeds:
        return False
    low, high = interval.get("low"), interval.get("high")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
        return False
    if higher_is_better(metric) is False:
        return high <= tolerance
    return low >= -tolerance


def converged_rows(rows: Sequence[float], values: Sequence[float], *, tolerance: float, higher: bool = True) -> float:
    """Training-length rule: the first curve point whose validation metric is within
    ``tolerance`` (relative) of the best value on the curve (on a curve that rises and then
    falls, overfitting, that is at the peak; on one still rising, the last point). The rows
    seen at that point are the row budget every config trains for."""
    r = np.asarray(rows, np.float64)
    v = np.asarray(values, np.float64)
    if r.size == 0 or r.size != v.size or not np.all(np.isfinite(v)):
        raise ValueError("need a non-empty curve of finite values")
    best = v.max() if higher else v.min()
    ok = (v >= best - tolerance * abs(best)) if higher else (v <= best + tolerance * abs(best))
    return float(r[int(np.flatnonzero(ok)[0])])


EVAL_ARRAYS = "eval_arrays.npz"


def save_eval_arrays(parts: list[dict], n_requests: int, path) -> None:
    """The per-row / per-query outputs of every shard, for the paired bootstrap of the report."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("labels", "logits", "row_request", "ranks", "rank_request")}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, n_requests=np.int64(n_requests), **cat)
    os.replace(tmp, path)


def load_eval_arrays(path) -> EvalArrays:
    with np.load(path) as z:
        return EvalArrays(labels=z["labels"], logits=z["logits"], row_request=z["row_request"], ranks=z["ranks"],
                            rank_request=z["rank_request"], n_requests=int(z["n_requests"]))
