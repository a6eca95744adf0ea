"""In-batch softmax with user-level masking, checked against hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch

from reqdedup.train.batch import synthetic_batch
from reqdedup.train.losses import in_batch_softmax_loss, ranking_bce_loss, recommendation_losses

U3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
I3 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
# Dot products U3 @ I3.T, written out:
#   row 0: [2, 1, 0]   row 1: [0, 1, 3]   row 2: [2, 2, 3]
DOTS = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [2.0, 2.0, 3.0]]


def _ce(row: list[float], target: int, allowed: list[int]) -> float:
    """-log softmax at `target` over the `allowed` columns, log-sum-exp written out."""
    return -(row[target] - math.log(sum(math.exp(row[j]) for j in allowed)))


def test_three_by_three_no_masking_matches_hand_formula():
    loss, _ = in_batch_softmax_loss(U3, I3, torch.tensor([0, 1, 2]), torch.tensor([10, 11, 12]), temperature=0.5)
    scaled = [[v / 0.5 for v in row] for row in DOTS]
    expected = sum(_ce(scaled[i], i, [0, 1, 2]) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_log_q_is_subtracted_from_every_column_including_the_positive():
    log_q = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)], dtype=torch.float64)
    loss, _ = in_batch_softmax_loss(U3, I3, torch.tensor([0, 1, 2]), torch.tensor([10, 11, 12]), log_q=log_q)
    corrected = [[DOTS[i][j] - log_q[j].item() for j in range(3)] for i in range(3)]
    expected = sum(_ce(corrected[i], i, [0, 1, 2]) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_same_user_columns_leave_the_denominator():
    # rows 0 and 1 belong to user 7: row 0 may not use column 1 as a negative, nor row 1 column 0.
    users = torch.tensor([7, 7, 8])
    loss, stats = in_batch_softmax_loss(U3, I3, users, torch.tensor([10, 11, 12]))
    expected = (_ce(DOTS[0], 0, [0, 2]) + _ce(DOTS[1], 1, [1, 2]) + _ce(DOTS[2], 2, [0, 1, 2])) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["false_negative_rate"].item() == pytest.approx(2 / 6)
    assert stats["masked_fraction"].item() == pytest.approx(2 / 6)
    assert stats["unique_users"].item() == 2

    unmasked, stats_unmasked = in_batch_softmax_loss(U3, I3, users, torch.tensor([10, 11, 12]), mask_same_user=False)
    expected_unmasked = sum(_ce(DOTS[i], i, [0, 1, 2]) for i in range(3)) / 3
    assert unmasked.item() == pytest.approx(expected_unmasked, rel=1e-12)
    # the false-negative rate is measured before masking, so it does not depend on the switch
    assert stats_unmasked["false_negative_rate"].item() == pytest.approx(2 / 6)
    assert stats_unmasked["masked_fraction"].item() == 0


def test_same_item_columns_are_accidental_hits():
    items = torch.tensor([10, 12, 12])  # rows 1 and 2 share a positive item
    loss, stats = in_batch_softmax_loss(U3, I3, torch.tensor([0, 1, 2]), items)
    expected = (_ce(DOTS[0], 0, [0, 1, 2]) + _ce(DOTS[1], 1, [0, 1]) + _ce(DOTS[2], 2, [0, 2])) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["false_negative_rate"].item() == 0
    assert stats["masked_fraction"].item() == pytest.approx(2 / 6)
    off, _ = in_batch_softmax_loss(U3, I3, torch.tensor([0, 1, 2]), items, mask_same_item=False)
    assert off.item() == pytest.approx(sum(_ce(DOTS[i], i, [0, 1, 2]) for i in range(3)) / 3, rel=1e-12)


def _reference_loss(u, v, users, items, mask_user, mask_item) -> float:
    """Loop version: for each anchor, list the allowed columns explicitly."""
    logits = (u @ v.T).tolist()
    total = 0.0
    n = len(users)
    for i in range(n):
        allowed = [j for j in range(n) if j == i or not (
            (mask_user and users[j] == users[i]) or (mask_item and items[j] == items[i]))]
        total += _ce(logits[i], i, allowed)
    return total / n


@pytest.mark.parametrize("mask_user,mask_item", [(True, True), (True, False), (False, True), (False, False)])
def test_random_batches_match_the_loop_reference(mask_user, mask_item):
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    users = torch.tensor([1, 1, 1, 2, 2, 3, 4, 4, 4])
    items = torch.tensor([5, 6, 5, 7, 8, 9, 5, 1, 2])
    loss, _ = in_batch_softmax_loss(u, v, users, items, mask_same_user=mask_user, mask_same_item=mask_item)
    expected = _reference_loss(u, v, users.tolist(), items.tolist(), mask_user, mask_item)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_false_negative_rate_for_known_compositions():
    emb = torch.randn(12, 3)
    _, s_distinct = in_batch_softmax_loss(emb, emb, torch.arange(12), torch.arange(12))
    assert s_distinct["false_negative_rate"].item() == 0 and s_distinct["unique_users"].item() == 12
    # 4 users x 3 rows: each anchor has k - 1 = 2 same-user negatives among N - 1 = 11
    _, s_blocks = in_batch_softmax_loss(emb, emb, torch.arange(4).repeat_interleave(3), torch.arange(12))
    assert s_blocks["false_negative_rate"].item() == pytest.approx(2 / 11)
    assert s_blocks["unique_users"].item() == 4
    # uneven: users [a,a,a,b,b,c]: 3*2 + 2*1 = 8 same-user pairs of 6*5 = 30
    _, s_uneven = in_batch_softmax_loss(emb[:6], emb[:6], torch.tensor([0, 0, 0, 1, 1, 2]), torch.arange(6))
    assert s_uneven["false_negative_rate"].item() == pytest.approx(8 / 30)


def test_diagonal_is_never_masked():
    # one user, one item on every row: only the diagonal survives, so each row's softmax is 1
    emb = torch.randn(4, 3)
    loss, stats = in_batch_softmax_loss(emb, emb, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert stats["masked_fraction"].item() == 1.0
    same = torch.ones(4, 3)
    unmasked, _ = in_batch_softmax_loss(same, same, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                                        mask_same_user=False, mask_same_item=False)
    assert unmasked.item() == pytest.approx(math.log(4), rel=1e-6)


def test_gradient_flows_and_masked_columns_get_none_from_their_anchor():
    u = U3.clone().requires_grad_()
    v = I3.clone().requires_grad_()
    loss, _ = in_batch_softmax_loss(u, v, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0 and v.grad.abs().sum() > 0

    # users [7, 7]: each anchor's only other column is masked, so nothing is learned from it
    u2 = U3[:2].clone().requires_grad_()
    v2 = I3[:2].clone().requires_grad_()
    loss2, _ = in_batch_softmax_loss(u2, v2, torch.tensor([7, 7]), torch.tensor([0, 1]))
    loss2.backward()
    assert loss2.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.count_nonzero(u2.grad) == 0 and torch.count_nonzero(v2.grad) == 0


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="at least one"):
        in_batch_softmax_loss(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="same number of rows"):
        in_batch_softmax_loss(U3, I3[:2], torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="temperature"):
        in_batch_softmax_loss(U3, I3, torch.arange(3), torch.arange(3), temperature=0.0)


def test_ranking_bce_matches_formula():
    logit = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    label = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(math.log(sig(0.0)) + math.log(1 - sig(2.0)) + math.log(sig(-1.0))) / 3
    assert ranking_bce_loss(logit, label).item() == pytest.approx(expected, rel=1e-12)


def test_recommendation_losses_use_only_engaged_rows_and_survive_none():
    batch = synthetic_batch(3, 4, 8, 20, 0, users=1, positive_rate=0.5)
    n = batch.num_rows
    g = torch.Generator().manual_seed(0)
    outputs = {"logit": torch.randn(n, generator=g), "user_emb_rows": torch.randn(n, 3, generator=g),
               "item_emb": torch.randn(n, 3, generator=g)}
    outputs["retrieval_score"] = (outputs["user_emb_rows"] * outputs["item_emb"]).sum(-1)
    total, stats = recommendation_losses(outputs, batch, temperature=1.0)
    pos = batch.label > 0.5
    retrieval, _ = in_batch_softmax_loss(outputs["user_emb_rows"][pos], outputs["item_emb"][pos],
                                         batch.row_user_ids()[pos], batch.item_id[pos])
    assert total.item() == pytest.approx(ranking_bce_loss(outputs["logit"], batch.label).item() + retrieval.item(), rel=1e-6)
    assert stats["unique_users"].item() == 1

    batch.label.zero_()
    logit = outputs["logit"].clone().requires_grad_()
    total0, _ = recommendation_losses({**outputs, "logit": logit}, batch)
    total0.backward()
    assert torch.isfinite(total0) and torch.isfinite(logit.grad).all()
    assert total0.item() == pytest.approx(ranking_bce_loss(outputs["logit"], batch.label).item(), rel=1e-6)
