"""Request-level deduplication of a row-level batch, with torch alone.

The RecD idea (Meta, MLSys 2023; Pinterest 2026): key every candidate row by its request,
keep one copy of the user block per unique request, run the user side once per request, and
expand results back to rows with the inverse index. `torch.unique(return_inverse=True)`
gives both halves: the unique keys and, per row, which unique key it carries.

Deduplicating assumes the user block really is identical on every row of a request. If the
input breaks that, silently keeping the first row would train on wrong features, so
`check_user_block_consistent` raises a ValueError naming the first offending request.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from reqdedup.train.batch import HISTORY_ID_SHIFT, HISTORY_PAD, RequestBatch


def request_inverse(request_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(unique request ids sorted ascending, inverse [N] into them) for row-level ids."""
    if request_ids.dim() != 1:
        raise ValueError(f"request_ids must be 1-D, got shape {tuple(request_ids.shape)}")
    unique_ids, inverse = torch.unique(request_ids, sorted=True, return_inverse=True)
    return unique_ids, inverse


def first_row_per_request(inverse: Tensor, num_requests: int) -> Tensor:
    """Index of the first row of each request [R]: the row whose user block we keep."""
    n = inverse.shape[0]
    first = torch.full((num_requests,), n, dtype=torch.int64, device=inverse.device)
    rows = torch.arange(n, dtype=torch.int64, device=inverse.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin", include_self=True)


def _rows_equal(a: Tensor, b: Tensor) -> Tensor:
    """Per-row equality [N] of two same-shape tensors; NaN equals NaN (a missing value
    repeated on every row is consistent, not a disagreement)."""
    same = a == b
    if a.is_floating_point():
        same = same | (torch.isnan(a) & torch.isnan(b))
    return same.reshape(a.shape[0], -1).all(dim=1)


def check_user_block_consistent(
    request_ids: Tensor,
    inverse: Tensor,
    user_columns: Mapping[str, Tensor],
    num_requests: int | None = None,
) -> Tensor:
    """Raise ValueError if rows of one request disagree on any user column.

    `user_columns` maps a column name to a row-level tensor [N, ...] (e.g. user_id,
    history [N, L], history_len, user_dense, user_segment, user_country). Every row is
    compared with the first row of its request; the error names the request id of the
    earliest disagreeing row and the column. Returns the first-row index per request [R],
    which is exactly what deduplication keeps.
    """
    if num_requests is None:
        num_requests = int(inverse.max().item()) + 1 if inverse.numel() else 0
    first = first_row_per_request(inverse, num_requests)
    keep_row_of_each_row = first.index_select(0, inverse)
    for name, column in user_columns.items():
        if column.shape[0] != inverse.shape[0]:
            raise ValueError(f"user column {name!r} has {column.shape[0]} rows, expected {inverse.shape[0]}")
        equal = _rows_equal(column, column.index_select(0, keep_row_of_each_row))
        if not bool(equal.all()):
            bad_row = int(torch.nonzero(~equal)[0, 0])
            raise ValueError(
                f"request_id {int(request_ids[bad_row])}: candidate rows disagree on user column "
                f"{name!r} (row {bad_row} differs from row {int(keep_row_of_each_row[bad_row])}); "
                "request-level dedup needs one user block per request"
            )
    return first


def expand_to_rows(per_request: Tensor, inverse: Tensor) -> Tensor:
    """Expand a per-request tensor [R, ...] to candidate rows [N, ...] by the inverse index."""
    return per_request.index_select(0, inverse)


def rows_to_request_batch(
    *,
    request_ids: Tensor,
    user_ids: Tensor,
    history: Tensor,
    history_len: Tensor,
    user_dense: Tensor,
    user_segment: Tensor,
    user_country: Tensor,
    item_id: Tensor,
    item_category: Tensor,
    item_dense: Tensor,
    label: Tensor,
    check: bool = True,
) -> RequestBatch:
    """Build a `RequestBatch` from row-level tensors, keeping one user block per request.

    `history` is row-level [N, L] in the `RequestBatch` convention (ids + 1, 0-padded; see
    `jagged_history_to_padded`). Requests are ordered by ascending request id. With `check`
    (the default) a request whose rows disagree on user data raises ValueError.
    """
    unique_ids, inverse = request_inverse(request_ids)
    user_columns = {
        "user_id": user_ids,
        "user_history": history,
        "user_history_len": history_len,
        "user_dense": user_dense,
        "user_segment": user_segment,
        "user_country": user_country,
    }
    if check:
        first = check_user_block_consistent(request_ids, inverse, user_columns, unique_ids.shape[0])
    else:
        first = first_row_per_request(inverse, unique_ids.shape[0])
    return RequestBatch(
        user_ids=user_ids.index_select(0, first).long(),
        history=history.index_select(0, first).long(),
        history_len=history_len.index_select(0, first).long(),
        user_dense=user_dense.index_select(0, first).float(),
        user_segment=user_segment.index_select(0, first).long(),
        user_country=user_country.index_select(0, first).long(),
        row_request=inverse.long(),
        item_id=item_id.long(),
        item_category=item_category.long(),
        item_dense=item_dense.float(),
        label=label.float(),
        request_ids=unique_ids.long(),
    )


def jagged_history_to_padded(values: Tensor, offsets: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """List column (flat `values`, `offsets` [B+1]) -> (history [B, seq_len], history_len [B]).

    Keeps the most recent `seq_len` ids of each list (the tail), shifts ids by +1 so 0 is
    padding, right-pads. This is how an Arrow list<int32> column becomes model input without
    numpy: pass `torch.from_dlpack`/`torch.as_tensor` of its values and offsets.
    """
    values = values.long()
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    history_len = lengths.clamp(max=seq_len)
    start = offsets[1:] - history_len  # tail: most recent tokens
    pos = torch.arange(seq_len, device=values.device)
    if values.numel() == 0:
        return torch.full((lengths.shape[0], seq_len), HISTORY_PAD, dtype=torch.int64, device=values.device), history_len
    valid = pos[None, :] < history_len[:, None]
    gather_at = (start[:, None] + pos[None, :]).clamp(max=values.shape[0] - 1)
    history = torch.where(valid, values[gather_at] + HISTORY_ID_SHIFT,
                          torch.full((), HISTORY_PAD, dtype=torch.int64, device=values.device))
    return history, history_len
