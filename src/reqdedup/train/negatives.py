"""Negatives beyond the in-batch ones, for the retrieval softmax (issue 12, item 4).

* **logQ correction** (Yi et al., RecSys 2019, "Sampling-bias-corrected neural modeling for
  large corpus item recommendations"): in-batch negatives are the batch's positives, so
  popular items are sampled as negatives far more often than rare ones; subtracting
  ``log q(item)`` from every in-batch logit corrects the sampled softmax. ``q`` is estimated
  streaming, as in the paper: per item, ``A`` = the step it was last seen and ``B`` = a
  moving average of the gap between its sightings; ``q = 1 / B`` (the probability that the
  item appears in a step's batch). Item ids index the tables directly (no hashing collisions:
  the catalog size is known).
* **Mixed negatives** (Yang et al., WWW 2020, "Mixed negative sampling for learning two-tower
  neural networks in recommendations"): add M items drawn uniformly from the corpus to every
  anchor's softmax, embedded by the item tower in the same step, to restore the negative
  diversity a batch of few users lacks. The corpus here = every item seen in training so
  far, with the features it was seen with (``UniformItemPool``); their logQ is
  ``log(M / corpus size)``, on the same "expected occurrences per step" scale as the
  streaming estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StreamingFrequency:
    """Yi et al.'s streaming frequency estimate, on the device, one slot per item id."""

    def __init__(self, items: int, alpha: float = 0.01, device="cpu"):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.last = torch.full((items,), -1.0, dtype=torch.float64, device=device)  # A
        self.gap = torch.zeros(items, dtype=torch.float64, device=device)  # B
        self.step = 0

    def update(self, item_ids: Tensor) -> None:
        """Record one training step's positive items (the in-batch candidates)."""
        ids = torch.unique(item_ids)
        t = float(self.step)
        seen = self.last[ids] >= 0
        gap_now = t - self.last[ids]
        # first sighting: start B at the steps elapsed so far (+1), a prior of "rare"
        new_gap = torch.where(seen, (1 - self.alpha) * self.gap[ids] + self.alpha * gap_now,
                              torch.full_like(gap_now, t + 1.0))
        self.gap[ids] = new_gap
        self.last[ids] = t
        self.step += 1

    def log_q(self, item_ids: Tensor) -> Tensor:
        """log of the estimated probability that each item appears in a step ([N], float32);
        an item never seen gets the rarest estimate (log 1 / (steps + 1))."""
        gap = self.gap[item_ids]
        gap = torch.where(gap > 0, gap, torch.full_like(gap, float(self.step + 1)))
        return (-torch.log(gap.clamp(min=1.0))).float()


class UniformItemPool:
    """Every item seen in training so far with its features; ``sample(m)`` draws m of them
    uniformly (with replacement) for mixed negative sampling."""

    def __init__(self, items: int, dense_dim: int, device="cpu"):
        self.seen = torch.zeros(items, dtype=torch.bool, device=device)
        self.category = torch.zeros(items, dtype=torch.long, device=device)
        self.dense = torch.zeros(items, dense_dim, dtype=torch.float32, device=device)
        self._ids: Tensor | None = None

    def add(self, item_id: Tensor, item_category: Tensor, item_dense: Tensor) -> None:
        self.seen[item_id] = True
        self.category[item_id] = item_category
        self.dense[item_id] = item_dense.to(self.dense.dtype)
        self._ids = None

    @property
    def size(self) -> int:
        return int(self.seen.sum())

    def sample(self, m: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
        """(ids [m], category [m], dense [m, D], log q): uniform over the pool."""
        if self._ids is None:
            self._ids = torch.nonzero(self.seen).squeeze(1)
        n = self._ids.numel()
        if n == 0:
            raise ValueError("the item pool is empty: add a batch's items first")
        pick = torch.randint(0, n, (m,), generator=generator, device="cpu").to(self._ids.device)
        ids = self._ids[pick]
        return ids, self.category[ids], self.dense[ids], float(torch.log(torch.tensor(m / n)))
