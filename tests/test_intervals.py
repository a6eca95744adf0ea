"""Intervals of the relative change against iid (metrics.relative_change_interval), the
request-weighted metrics they resample, the t quantile and the training-length rule:
known-answer cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reqdedup.evaluate import metrics as M


def _arrays(hits_per_request, queries_per_request=100, n_requests=40, k=10, rng=None):
    """Retrieval-only runs: request r has queries_per_request queries, hits_per_request[r] of
    them ranked 1 (inside the top k), the rest ranked 1000. One ranking row per request."""
    hits = np.broadcast_to(np.asarray(hits_per_request), (n_requests,))
    ranks, req = [], []
    for r in range(n_requests):
        ranks += [1] * int(hits[r]) + [1000] * (queries_per_request - int(hits[r]))
        req += [r] * queries_per_request
    rows = np.arange(n_requests)
    return M.EvalArrays(labels=rows % 2, logits=rows.astype(float), row_request=rows, ranks=ranks,
                        rank_request=req, n_requests=n_requests)


def test_weighted_auc_is_roc_auc_and_weights_duplicate_requests():
    rng = np.random.default_rng(3)
    n_req = 30
    row_request = np.repeat(np.arange(n_req), 7)
    labels = rng.integers(0, 2, row_request.size)
    logits = np.round(rng.normal(size=row_request.size), 1)  # many ties
    arr = M.EvalArrays(labels, logits, row_request, ranks=[], rank_request=[], n_requests=n_req)
    assert M.weighted_auc(arr) == pytest.approx(M.roc_auc(labels, logits), abs=1e-12)
    # integer request weights = the requests duplicated that many times (0 = dropped)
    w = rng.integers(0, 4, n_req).astype(float)
    rep = np.repeat(np.arange(row_request.size), w[row_request].astype(int))
    assert M.weighted_auc(arr, w) == pytest.approx(M.roc_auc(labels[rep], logits[rep]), abs=1e-12)
    assert M.weighted_log_loss(arr, w) == pytest.approx(M.log_loss(labels[rep], logits[rep]), abs=1e-12)


def test_weighted_recall_and_ndcg():
    arr = M.EvalArrays([0, 1], [0.0, 1.0], [0, 1], ranks=[1, 3, 20, 2], rank_request=[0, 0, 1, 1], n_requests=2)
    assert M.metric_value(arr, "recall@5") == pytest.approx(0.75)
    assert M.metric_value(arr, "recall@5", np.array([0.0, 1.0])) == pytest.approx(0.5)
    assert M.metric_value(arr, "ndcg@5", np.array([1.0, 0.0])) == pytest.approx((1 + 1 / math.log2(4)) / 2)
    with pytest.raises(ValueError, match="no interval"):
        M.metric_value(arr, "mean_rank")


@pytest.mark.parametrize("p, df, expected", [(0.975, 4, 2.776445), (0.975, 1, 12.7062), (0.975, math.inf, 1.959964),
                                             (0.95, 10, 1.812461), (0.975, 30, 2.042272)])
def test_t_quantile(p, df, expected):
    assert M.t_quantile(p, df) == pytest.approx(expected, rel=2e-4)


def test_interval_seed_spread_only_known_answer():
    """Every request identical -> the bootstrap adds nothing; baseline recall 0.5 in every
    seed, candidate 0.51, 0.53, 0.52, 0.50, 0.54: per-seed changes 2, 6, 4, 0, 8%:
    mean 4%, sample variance 0.001, se sqrt(0.001 / 5), t(0.975, 4) = 2.7764."""
    base = [_arrays(50) for _ in range(5)]
    cand = [_arrays(h) for h in (51, 53, 52, 50, 54)]
    iv = M.relative_change_interval(cand, base, "recall@10", n_boot=50)
    half = 2.776445 * math.sqrt(0.001 / 5)
    assert iv["point"] == pytest.approx(0.04)
    assert iv["se_requests"] == pytest.approx(0.0, abs=1e-12)
    assert iv["df"] == pytest.approx(4.0)
    assert iv["low"] == pytest.approx(0.04 - half, rel=1e-4)
    assert iv["high"] == pytest.approx(0.04 + half, rel=1e-4)
    assert iv["n_seeds"] == 5 and iv["per_seed"] == pytest.approx([0.02, 0.06, 0.04, 0.0, 0.08])
    assert M.non_inferior(iv, 0.005, "recall@10") and not M.non_inferior({**iv, "low": -0.006}, 0.005, "recall@10")


def test_interval_request_bootstrap_matches_the_analytic_standard_error():
    """One seed, baseline recall 0.5 everywhere, candidate 0.6 on half the requests and 0.4 on
    the other half: no change on average, and the request-to-request spread gives the
    change a standard error of sd / sqrt(Q) / 0.5 = 0.1 / 20 / 0.5 = 1% (Q = 400)."""
    q = 400
    hits = np.where(np.arange(q) % 2 == 0, 60, 40)
    iv = M.relative_change_interval([_arrays(hits, n_requests=q)], [_arrays(50, n_requests=q)], "recall@10",
                                    n_boot=1500, seed=1)
    assert iv["point"] == pytest.approx(0.0, abs=1e-12)
    assert iv["se_seeds"] == 0.0 and math.isinf(iv["df"])
    assert iv["se_requests"] == pytest.approx(0.01, rel=0.08)
    assert iv["low"] == pytest.approx(-1.96 * iv["se"], rel=1e-3)


def test_interval_pairs_the_requests():
    """The same requests are resampled for both configs: a candidate that is the baseline
    plus 2% on every request has a zero-width request part, however much requests differ."""
    q = 200
    base_hits = np.random.default_rng(0).integers(10, 90, q)
    base = [_arrays(base_hits, n_requests=q)]
    cand = [_arrays(base_hits, n_requests=q)]
    cand[0].ranks = np.where(cand[0].ranks <= 10, 1, 1000).astype(float)  # same hits
    iv = M.relative_change_interval(cand, base, "recall@10", n_boot=200)
    assert iv["point"] == 0.0 and iv["se"] == 0.0
    with pytest.raises(ValueError, match="same number"):
        M.relative_change_interval(cand, base + base, "recall@10")


def test_converged_rows():
    rows = [100, 200, 400, 800, 1600]
    assert M.converged_rows(rows, [0.60, 0.70, 0.749, 0.75, 0.7495], tolerance=0.002) == 400
    # overfitting: the curve peaks, then falls -> the peak
    assert M.converged_rows(rows, [0.60, 0.667, 0.665, 0.647, 0.642], tolerance=0.002) == 200
    # still rising at the end -> the last point
    assert M.converged_rows(rows, [0.53, 0.56, 0.61, 0.64, 0.68], tolerance=0.002) == 1600
    # lower is better (log loss)
    assert M.converged_rows(rows, [0.9, 0.5, 0.45, 0.45, 0.451], tolerance=0.01, higher=False) == 400
    with pytest.raises(ValueError):
        M.converged_rows([], [], tolerance=0.01)
