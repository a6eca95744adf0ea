"""Losses: in-batch softmax with user-level masking, and the ranking BCE.

In-batch negatives assume the other rows of a batch are unrelated to the anchor. In a
request-sorted batch many of them come from the anchor's own user, and some are items that
user also engaged with: false negatives that push the user away from what they like
(Pinterest saw the false-negative rate go from ~0% to ~30%). `mask_same_user` removes every
same-user column from the anchor's softmax denominator; `mask_same_item` removes duplicate
positives of the same item ("accidental hits", what TFRS already does). The diagonal (the
anchor's own positive) is never masked.

Stats are returned as detached 0-dim tensors, not floats, so a training loop does not pay a
device sync per step; call `float()` when logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reqdedup.train.batch import RequestBatch


def _at_least_fp32(t: Tensor) -> Tensor:
    """Upcast half/bfloat16 (autocast) to float32 for a stable softmax; keep float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _off_diagonal_same(ids: Tensor) -> Tensor:
    """[N, N] bool: j != i and ids[j] == ids[i]."""
    same = ids[:, None] == ids[None, :]
    return same & ~torch.eye(ids.shape[0], dtype=torch.bool, device=ids.device)


def in_batch_softmax_loss(
    user_emb: Tensor,
    item_emb: Tensor,
    user_ids: Tensor,
    item_ids: Tensor,
    *,
    temperature: float = 1.0,
    mask_same_user: bool = True,
    mask_same_item: bool = True,
    log_q: Tensor | None = None,
    extra_item_emb: Tensor | None = None,
    extra_item_ids: Tensor | None = None,
    extra_log_q: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Softmax over in-batch items; row i is the pair (user i, positive item i).

    ``extra_item_emb`` [M, D] (optional, mixed negative sampling): M more negative columns
    for every anchor, e.g. items drawn uniformly from the corpus; a column whose item is the
    anchor's own positive (``extra_item_ids``) is masked; ``extra_log_q`` is their logQ
    (subtracted like ``log_q``). The false-negative statistics stay those of the in-batch part.

    logits[i, j] = user_emb[i] . item_emb[j] / temperature - log_q[j]   (log_q optional)
    Masked entries (j != i, same user and/or same item as row i) are set to -inf, i.e.
    excluded from the denominator. loss = mean_i cross_entropy(logits[i], target i).

    log_q is the log sampling probability of each column's item (logQ correction for the
    popularity bias of in-batch negatives); it is subtracted from every column, the positive
    included, as in the standard sampled-softmax correction.

    stats: false_negative_rate = share of the N*(N-1) in-batch negatives that come from the
    anchor's own user (before masking); masked_fraction = share of them masked;
    unique_users = number of distinct users among the N rows.
    """
    n = user_emb.shape[0]
    if n == 0:
        raise ValueError("in_batch_softmax_loss needs at least one (user, positive item) row")
    if item_emb.shape[0] != n or user_ids.shape[0] != n or item_ids.shape[0] != n:
        raise ValueError("user_emb, item_emb, user_ids and item_ids must have the same number of rows")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    logits = _at_least_fp32(user_emb @ item_emb.T) / temperature
    if log_q is not None:
        logits = logits - log_q.to(logits.dtype)[None, :]

    same_user = _off_diagonal_same(user_ids)
    mask = torch.zeros_like(same_user)
    if mask_same_user:
        mask = mask | same_user
    if mask_same_item:
        mask = mask | _off_diagonal_same(item_ids)
    logits = logits.masked_fill(mask, float("-inf"))

    if extra_item_emb is not None:
        extra = _at_least_fp32(user_emb @ extra_item_emb.T) / temperature
        if extra_log_q is not None:  # a scalar or [M]
            extra = extra - torch.as_tensor(extra_log_q, dtype=extra.dtype, device=extra.device)
        if extra_item_ids is not None:
            extra = extra.masked_fill(item_ids[:, None] == extra_item_ids[None, :], float("-inf"))
        logits = torch.cat([logits, extra.to(logits.dtype)], dim=1)

    target = torch.arange(n, device=logits.device)
    loss = F.cross_entropy(logits, target)

    negatives = max(n * (n - 1), 1)
    sorted_users = user_ids.sort().values
    stats = {
        "false_negative_rate": (same_user.sum() / negatives).detach(),
        "masked_fraction": (mask.sum() / negatives).detach(),
        "unique_users": ((sorted_users[1:] != sorted_users[:-1]).sum() + 1).detach(),
    }
    return loss, stats


def ranking_bce_loss(logit: Tensor, label: Tensor) -> Tensor:
    """Mean binary cross entropy of the engagement logit against a 0/1 label."""
    logit = _at_least_fp32(logit)
    return F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype))


def positive_row_indices(batch: RequestBatch) -> Tensor:
    """Indices [P] of the engaged rows: the (user, positive item) pairs of the retrieval loss."""
    return torch.nonzero(batch.label > 0.5).squeeze(1)


def recommendation_losses(
    outputs: dict[str, Tensor],
    batch: RequestBatch,
    *,
    retrieval_weight: float = 1.0,
    temperature: float = 0.1,
    mask_same_user: bool = True,
    mask_same_item: bool = True,
    log_q: Tensor | None = None,
    positive_rows: Tensor | None = None,
    extra_item_emb: Tensor | None = None,
    extra_item_ids: Tensor | None = None,
    extra_log_q: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Ranking BCE over all rows + in-batch softmax over the engaged (label 1) rows.

    Only engaged rows are (user, positive item) pairs, so only they enter the retrieval
    loss; with fewer than one such row the retrieval term is zero. `log_q`, if given, is per
    candidate row [N] and is filtered like the rows. `positive_rows` (indices of the label-1
    rows) may be precomputed with the batch to spare the device sync of finding them here.
    Returns (total loss, stats).
    """
    bce = ranking_bce_loss(outputs["logit"], batch.label)
    positive = positive_rows if positive_rows is not None else positive_row_indices(batch)
    if positive.numel() == 0:
        retrieval = outputs["retrieval_score"].sum() * 0.0
        stats: dict[str, Tensor] = {}
    else:
        retrieval, stats = in_batch_softmax_loss(
            outputs["user_emb_rows"].index_select(0, positive),
            outputs["item_emb"].index_select(0, positive),
            batch.row_user_ids().index_select(0, positive),
            batch.item_id.index_select(0, positive),
            temperature=temperature, mask_same_user=mask_same_user, mask_same_item=mask_same_item,
            log_q=None if log_q is None else log_q.index_select(0, positive),
            extra_item_emb=extra_item_emb, extra_item_ids=extra_item_ids, extra_log_q=extra_log_q,
        )
    stats = {**stats, "ranking_bce": bce.detach(), "retrieval_loss": retrieval.detach()}
    return bce + retrieval_weight * retrieval, stats
