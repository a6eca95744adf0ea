"""Evaluation metrics and gate on small hand-computed cases (no torchrun, no MLflow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reqdedup.evaluate import metrics as M
from reqdedup.evaluate.gate import beats, decide, within_tolerance


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert M.roc_auc([1, 0, 1, 0], [0.8, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    assert M.roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert M.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # ties count 1/2: one positive tied with one of two negatives -> (1 + 0.5) / 2
    assert M.roc_auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    assert M.roc_auc([1, 0, 0, 1], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)
    assert math.isnan(M.roc_auc([1, 1], [0.1, 0.2]))


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(size=200), 1)  # many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert M.roc_auc(y, s) == pytest.approx(pairwise)


def test_log_loss_hand_computed_and_stable():
    # logit 0 -> p = 0.5 -> -log 0.5 for either label
    assert M.log_loss([1, 0], [0.0, 0.0]) == pytest.approx(math.log(2))
    # logit log(3) -> p = 0.75: label 1 costs -log .75, label 0 costs -log .25
    x = math.log(3)
    assert M.log_loss([1, 0], [x, x]) == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)
    # huge logits do not overflow
    assert M.log_loss([1, 0], [1000.0, -1000.0]) == pytest.approx(0.0)
    assert M.log_loss([0], [1000.0]) == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        M.log_loss([1, 0], [0.0])


def test_retrieval_ranks_recall_ndcg():
    scores = np.array([[0.9, 0.5, 0.1, 0.3],   # true 1: only 0.9 is higher -> rank 2
                       [0.2, 0.2, 0.8, 0.1],   # true 0: 0.8 higher, 0.2 tie (pessimistic) -> rank 3
                       [0.1, 0.2, 0.3, 0.4]])  # true 3: best -> rank 1
    ranks = M.retrieval_ranks(scores, [1, 0, 3])
    assert ranks.tolist() == [2, 3, 1]
    # filtering query 0's column 0 (another engaged item of the request) lifts it to rank 1
    exclude = np.zeros_like(scores, dtype=bool)
    exclude[0, 0] = True
    assert M.retrieval_ranks(scores, [1, 0, 3], exclude).tolist() == [1, 3, 1]
    # a constant scorer gets the worst rank, never the best
    assert M.retrieval_ranks(np.zeros((2, 5)), [0, 4]).tolist() == [5, 5]
    assert M.recall_at_k([2, 3, 1], 1) == pytest.approx(1 / 3)
    assert M.recall_at_k([2, 3, 1], 2) == pytest.approx(2 / 3)
    # NDCG@2: 1/log2(3) for rank 2, 0 for rank 3, 1 for rank 1
    assert M.ndcg_at_k([2, 3, 1], 2) == pytest.approx((1 / math.log2(3) + 0 + 1) / 3)
    assert M.ndcg_at_k([1, 1], 10) == 1.0
    with pytest.raises(ValueError):
        M.recall_at_k([1], 0)


def test_torch_ranks_match_numpy_ranks():
    torch = pytest.importorskip("torch")
    from reqdedup.evaluate.matrix_worker import ranks_torch

    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(30, 40)), 1)
    target = rng.integers(0, 40, 30)
    ex = rng.random((30, 40)) < 0.1
    ex[np.arange(30), target] = False
    qi, qj = np.nonzero(ex)
    got = ranks_torch(torch.tensor(scores), torch.tensor(target), torch.tensor(qi), torch.tensor(qj))
    assert got.tolist() == M.retrieval_ranks(scores, target, ex).tolist()


def test_seed_summary_and_relative_change():
    st = M.seed_summary([1.0, 2.0, 3.0])
    assert st["mean"] == 2.0 and st["std"] == pytest.approx(1.0) and st["n"] == 3
    assert M.seed_summary([5.0])["std"] == 0.0
    st = M.seed_summary([1.0, float("nan")])
    assert st["n"] == 1 and st["n_nan"] == 1
    assert M.relative_change(0.99, 1.0) == pytest.approx(-0.01)
    assert M.relative_change(-1.1, -1.0) == pytest.approx(-0.1)
    assert math.isnan(M.relative_change(1.0, 0.0))


def test_training_figures():
    tm = {"rows_per_s": 1000.0, "train_seconds": 5.0,
          "history": [{"false_negative_rate": 0.2, "unique_users_per_batch": 4.0, "requests_per_batch": 8.0, "loss": 1.0},
                      {"false_negative_rate": 0.4, "unique_users_per_batch": 6.0, "requests_per_batch": 8.0, "loss": 0.5}]}
    f = M.training_figures(tm)
    assert f["false_negative_rate"] == pytest.approx(0.3) and f["unique_users_per_batch"] == 5.0
    assert f["train_rows_per_s"] == 1000.0 and f["final_train_loss"] == 0.5


def _summary(cand: dict, base: dict, eval_set="es-1", intervals=None):
    def cfg(means):
        return {m: {"mean": v} for m, v in means.items()}
    return {"status": "succeeded", "eval_set_id": eval_set,
            "aggregate": {"configs": {"iid": cfg(base), "sorted_fixed": cfg(cand)},
                          "intervals": {"sorted_fixed": intervals or {}}}}


def _iv(low, high):
    return {"point": (low + high) / 2, "low": low, "high": high, "level": 0.95, "n_seeds": 5}


def test_gate_tolerance_and_champion():
    assert within_tolerance(0.996, 1.0, 0.005, "auc") and not within_tolerance(0.994, 1.0, 0.005, "auc")
    assert within_tolerance(0.502, 0.5, 0.005, "log_loss") and not within_tolerance(0.51, 0.5, 0.005, "log_loss")
    metrics = ["auc", "recall@10"]
    ok = {"auc": _iv(-0.004, 0.002), "recall@10": _iv(0.001, 0.01)}
    s = _summary({"auc": 0.70, "recall@10": 0.30}, {"auc": 0.701, "recall@10": 0.30}, intervals=ok)
    # interval above -0.5% on both metrics, no champion -> promote
    d = decide(s, tolerance=0.005, metrics=metrics, model_metrics={"auc": 0.70, "recall@10": 0.3}, champion=None)
    assert d.promote and "no current champion" in d.notes[0]
    # tolerance 0: the AUC interval reaches -0.4% -> refused, reason names the metric
    d = decide(s, tolerance=0.0, metrics=metrics, model_metrics={"auc": 0.70, "recall@10": 0.3}, champion=None)
    assert not d.promote and "auc" in d.reasons[0] and "recall" not in " ".join(d.reasons)
    # champion on the same eval set and better -> refused
    champ = {"version": "1", "eval_set_id": "es-1", "metrics": {"auc": 0.71, "recall@10": 0.3}}
    d = decide(s, tolerance=0.005, metrics=metrics, model_metrics={"auc": 0.70, "recall@10": 0.3}, champion=champ)
    assert not d.promote and "champion version 1" in d.reasons[0]
    # champion on another eval set: said, and the IID gate decides alone
    champ_other = {**champ, "eval_set_id": "es-2"}
    d = decide(s, tolerance=0.005, metrics=metrics, model_metrics={"auc": 0.70, "recall@10": 0.3}, champion=champ_other)
    assert d.promote and "different evaluation set" in d.notes[0]
    # beats: no metric worse, one strictly better; a tie is not a win
    assert beats({"auc": 0.72, "recall@10": 0.3}, champ["metrics"], metrics)[0]
    assert not beats(champ["metrics"], champ["metrics"], metrics)[0]
    assert not decide({"status": "failed"}, tolerance=1, metrics=metrics, model_metrics={}, champion=None).promote


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise_instead_of_reaching_the_metrics(bad):
    """A NaN score compares false with everything: retrieval_ranks would give it rank 1 and
    recall@K could pass the gate. Every metric entry point refuses non-finite scores."""
    from reqdedup.errors import NonFiniteScoresError

    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, bad, 0.3, 0.4])
    with pytest.raises(NonFiniteScoresError, match="NaN or infinite"):
        M.roc_auc(labels, scores)
    with pytest.raises(NonFiniteScoresError):
        M.log_loss(labels, scores)
    pool = np.array([[0.1, 0.2, 0.3], [bad, 0.0, 0.5]])
    with pytest.raises(NonFiniteScoresError, match=r"index \(1, 0\)"):
        M.retrieval_ranks(pool, np.array([0, 0]))


def test_evaluate_shard_refuses_a_model_that_scores_nan():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from reqdedup.errors import NonFiniteScoresError
    from reqdedup.evaluate.matrix_worker import evaluate_shard

    class NanModel:
        def eval(self):
            return self

        def item_tower(self, item, category, dense):
            return torch.ones(item.numel(), 4)

        def score_candidates(self, batch, mode):
            return {"logit": torch.tensor([0.5, float("nan")]), "user_emb": torch.ones(1, 4)}

    batch = SimpleNamespace(label=torch.tensor([1.0, 0.0]), row_request=torch.tensor([0, 0]),
                            item_id=torch.tensor([3, 5]))
    data = SimpleNamespace(pool_item=torch.tensor([3, 5]), pool_category=torch.tensor([0, 1]),
                           pool_dense=torch.zeros(2, 4), pool_ids=np.array([3, 5]), batches=[batch])
    with pytest.raises(NonFiniteScoresError, match="evaluation logits"):
        evaluate_shard(NanModel(), data)


def test_gate_decides_on_the_interval_not_the_mean():
    metrics = ["auc", "recall@10"]
    means = ({"auc": 0.70, "recall@10": 0.30}, {"auc": 0.70, "recall@10": 0.30})  # equal means
    mm = {"auc": 0.70, "recall@10": 0.3}
    # equal means but a wide interval (lower bound -2%): refused
    wide = _summary(*means, intervals={"auc": _iv(-0.02, 0.02), "recall@10": _iv(-0.001, 0.001)})
    d = decide(wide, tolerance=0.005, metrics=metrics, model_metrics=mm, champion=None)
    assert not d.promote and "auc" in d.reasons[0]
    # no interval at all: refused, whatever the means
    d = decide(_summary(*means), tolerance=0.005, metrics=metrics, model_metrics=mm, champion=None)
    assert not d.promote and len(d.reasons) == 2 and "no interval" in d.reasons[0]
    # the boundary: lower bound exactly -tolerance passes, a hair below fails
    edge = _summary(*means, intervals={"auc": _iv(-0.005, 0.0), "recall@10": _iv(-0.005, 0.0)})
    assert decide(edge, tolerance=0.005, metrics=metrics, model_metrics=mm, champion=None).promote
    below = _summary(*means, intervals={"auc": _iv(-0.00501, 0.0), "recall@10": _iv(-0.005, 0.0)})
    assert not decide(below, tolerance=0.005, metrics=metrics, model_metrics=mm, champion=None).promote
    # one seed: no estimate of the seed spread, never non-inferior
    one = _summary(*means, intervals={"auc": {**_iv(0.0, 0.001), "n_seeds": 1}, "recall@10": _iv(0.0, 0.001)})
    assert not decide(one, tolerance=0.005, metrics=metrics, model_metrics=mm, champion=None).promote
    # log loss: lower is better, the upper bound decides
    ll = _summary({"log_loss": 0.5}, {"log_loss": 0.5}, intervals={"log_loss": _iv(-0.05, 0.004)})
    assert decide(ll, tolerance=0.005, metrics=["log_loss"], model_metrics={"log_loss": 0.5}, champion=None).promote
    ll_bad = _summary({"log_loss": 0.5}, {"log_loss": 0.5}, intervals={"log_loss": _iv(-0.05, 0.006)})
    assert not decide(ll_bad, tolerance=0.005, metrics=["log_loss"], model_metrics={"log_loss": 0.5},
                      champion=None).promote
