"""`RequestBatch`: a training batch stored the request-level way, with torch alone.

A request-log batch has one row per (request, candidate). Its user block (history, dense
features, segment, country) is identical on every row of a request, so we keep it once per
request (`R` rows) and keep only the item block per candidate (`N` rows); `row_request`
maps each candidate row to its request. This is the in-memory form of request-level
deduplication: the user tower reads the `R`-row block, and anything per candidate is
expanded with `row_request` (see `reqdedup.train.dedup.expand_to_rows`).

History convention: item ids in `history` are shifted by +1 (`HISTORY_ID_SHIFT`) so that 0
(`HISTORY_PAD`) is padding; histories are right-padded, valid tokens sit at positions
`0 .. history_len - 1` in chronological order. Candidate `item_id` values are NOT shifted:
they are the raw catalog ids `0 .. items - 1`.

This module must import with torch alone (the GPU machine has no numpy/pyarrow), so the
dimensions below mirror `reqdedup.schema` instead of importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

# The data contract (pure Python, no pyarrow): dimensions and vocabulary sizes.
from reqdedup.contract import ITEM_DENSE_DIM, NUM_CATEGORIES, NUM_COUNTRIES, NUM_SEGMENTS, USER_DENSE_DIM  # noqa: E402,F401

HISTORY_PAD = 0
HISTORY_ID_SHIFT = 1


@dataclass
class RequestBatch:
    """Request-level user block (`R` rows) plus row-level item block (`N` rows).

    user_ids      [R] int64   user of each request
    history       [R, L] int64 item ids + 1, right-padded with 0
    history_len   [R] int64   number of valid history tokens
    user_dense    [R, 8] float
    user_segment  [R] int64
    user_country  [R] int64
    row_request   [N] int64   inverse index: candidate row -> request (0..R-1)
    item_id       [N] int64   raw item id (not shifted)
    item_category [N] int64
    item_dense    [N, 4] float
    label         [N] float   1.0 engaged, 0.0 not
    request_ids   [R] int64   request id of each request (None where the source has none)
    dense_features [N, F] float  feature side-table values per row (data.feature_columns order;
                              None when the config names none)
    """

    user_ids: Tensor
    history: Tensor
    history_len: Tensor
    user_dense: Tensor
    user_segment: Tensor
    user_country: Tensor
    row_request: Tensor
    item_id: Tensor
    item_category: Tensor
    item_dense: Tensor
    label: Tensor
    request_ids: Tensor | None = None
    dense_features: Tensor | None = None

    @property
    def num_requests(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.row_request.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.history.shape[1])

    @property
    def device(self) -> torch.device:
        return self.row_request.device

    def unique_users(self) -> Tensor:
        """Distinct user ids in the batch (a request-sorted batch holds few of them)."""
        return torch.unique(self.user_ids)

    def row_user_ids(self) -> Tensor:
        """User id of every candidate row [N]: what user-level negative masking needs."""
        return self.user_ids.index_select(0, self.row_request)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "RequestBatch":
        """Move every tensor to `device`; with `dtype`, also cast the float tensors."""
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                continue
            if dtype is not None and t.is_floating_point():
                moved[f.name] = t.to(device=device, dtype=dtype, non_blocking=True)
            else:
                moved[f.name] = t.to(device=device, non_blocking=True)
        return replace(self, **moved)


def synthetic_batch(
    requests: int,
    candidates: int,
    seq_len: int,
    items: int,
    generator: torch.Generator | int | None = 0,
    device: torch.device | str = "cpu",
    *,
    users: int | None = None,
    positive_rate: float = 0.1,
    min_history: int | None = None,
) -> RequestBatch:
    """A random request-sorted batch: `requests` requests x `candidates` rows each.

    Requests are grouped by user (consecutive requests share a user when `users < requests`),
    as in a request-sorted table, so the user-level masking and false-negative statistics have
    something to measure. History lengths are uniform in [min_history, seq_len] (default
    seq_len // 2, at least 1). Data is drawn on the CPU from `generator` (a seed or a
    torch.Generator) so a seed gives the same batch on every device, then moved to `device`.
    """
    if requests < 1 or candidates < 1 or seq_len < 1 or items < 1:
        raise ValueError("requests, candidates, seq_len and items must all be >= 1")
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(int(generator or 0))
    users = requests if users is None else max(1, min(users, requests))
    lo = max(1, seq_len // 2) if min_history is None else max(0, min(min_history, seq_len))

    # Request r belongs to user block r * users // requests: sorted, contiguous users.
    user_ids = (torch.arange(requests) * users // requests).to(torch.int64) * 7919 + 17
    history_len = torch.randint(lo, seq_len + 1, (requests,), generator=gen)
    history = torch.randint(0, items, (requests, seq_len), generator=gen) + HISTORY_ID_SHIFT
    history = history.masked_fill(torch.arange(seq_len)[None, :] >= history_len[:, None], HISTORY_PAD)
    n = requests * candidates
    batch = RequestBatch(
        user_ids=user_ids,
        history=history,
        history_len=history_len,
        user_dense=torch.randn(requests, USER_DENSE_DIM, generator=gen),
        user_segment=torch.randint(0, NUM_SEGMENTS, (requests,), generator=gen),
        user_country=torch.randint(0, NUM_COUNTRIES, (requests,), generator=gen),
        row_request=torch.arange(requests).repeat_interleave(candidates),
        item_id=torch.randint(0, items, (n,), generator=gen),
        item_category=torch.randint(0, NUM_CATEGORIES, (n,), generator=gen),
        item_dense=torch.randn(n, ITEM_DENSE_DIM, generator=gen),
        label=(torch.rand(n, generator=gen) < positive_rate).float(),
    )
    return batch.to(device)
