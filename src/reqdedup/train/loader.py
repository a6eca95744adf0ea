"""Loader: batches of whole requests from the lake, sharded across ranks, in three orders.

- ``iid``: rows shuffled across requests, as a row-level log would train (a batch holds
  rows of many users, so in-batch negatives are almost never the anchor's own user);
- ``sorted``: request-sorted, the table's own order (few users per batch);
- ``block_shuffled``: the order of request blocks shuffled each epoch, rows of a request
  kept together (request-level dedup still applies; users mix more than ``sorted``).

Batches are cut on request boundaries for ``sorted``/``block_shuffled``; for ``iid`` a
request's rows land in different batches (that is the point of IID). Global batch ``i``
goes to rank ``i % world_size``; the tail that cannot give every rank a batch is dropped so
all ranks take the same number of steps (collectives in DDP and SyncBatchNorm need that).
This module needs numpy and pyarrow besides torch; the torch-only core is in batch.py/dedup.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from reqdedup.errors import InputError
from reqdedup.train.batch import RequestBatch
from reqdedup.train.dedup import jagged_history_to_padded, rows_to_request_batch

ORDERS = ("iid", "sorted", "block_shuffled")
TRAIN_COLUMNS = (
    "request_id", "user_id", "user_history", "user_dense", "user_segment", "user_country",
    "item_id", "item_category", "item_dense", "label",
)


def _fixed_list(column: pa.ChunkedArray | pa.Array, width: int, name: str) -> torch.Tensor:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if values.size != len(arr) * width:
        raise InputError(f"column {name!r} must hold lists of exactly {width} values")
    return torch.from_numpy(values.reshape(len(arr), width))


def _int(column, dtype=np.int64) -> torch.Tensor:
    return torch.from_numpy(column.to_numpy().astype(dtype))  # a writable copy


def dense_feature_tensor(rows: pa.Table, feature_columns: Sequence[str], where: str = "rows") -> torch.Tensor:
    """[N, F] float32 of feature value columns of ``rows`` (e.g. from
    ``reqdedup.lake.features.read_request_batches_with_features``): nulls 0, as the training
    reader; a missing column or a non-finite value is an InputError."""
    out = []
    for c in feature_columns:
        if c not in rows.column_names:
            raise InputError(f"{where}: no feature column {c!r} (read it with the feature side tables)")
        v = pc.fill_null(rows.column(c), 0).to_numpy().astype(np.float64)
        if not np.isfinite(v).all():
            raise InputError(f"{where}: feature column {c!r} holds a non-finite value")
        out.append(v)
    return torch.from_numpy(np.stack(out, axis=1).astype(np.float32) if out else np.zeros((rows.num_rows, 0), np.float32))


def arrow_to_request_batch(rows: pa.Table, seq_len: int, check: bool = True,
                           feature_columns: Sequence[str] = ()) -> RequestBatch:
    """Row-level Arrow rows of the impressions schema -> a deduplicated RequestBatch.

    With ``check`` a request whose rows disagree on user data raises ValueError (the
    training core's check), never a silent pick of one row. With ``feature_columns`` (columns
    of ``rows``) the batch's ``dense_features`` holds them, row for row.
    """
    from reqdedup.train.batch import ITEM_DENSE_DIM, USER_DENSE_DIM

    hist = rows.column("user_history").combine_chunks()
    values = torch.from_numpy(hist.flatten().to_numpy().astype(np.int64))
    offsets = torch.from_numpy(hist.offsets.to_numpy().astype(np.int64) - int(hist.offsets[0].as_py()))
    history, history_len = jagged_history_to_padded(values, offsets, seq_len)
    batch = rows_to_request_batch(
        request_ids=_int(rows.column("request_id")),
        user_ids=_int(rows.column("user_id")),
        history=history,
        history_len=history_len,
        user_dense=_fixed_list(rows.column("user_dense"), USER_DENSE_DIM, "user_dense"),
        user_segment=_int(rows.column("user_segment")),
        user_country=_int(rows.column("user_country")),
        item_id=_int(rows.column("item_id")),
        item_category=_int(rows.column("item_category")),
        item_dense=_fixed_list(rows.column("item_dense"), ITEM_DENSE_DIM, "item_dense"),
        label=torch.from_numpy(rows.column("label").to_numpy().astype(np.float32)),
        check=check,
    )
    if feature_columns:
        from dataclasses import replace

        batch = replace(batch, dense_features=dense_feature_tensor(rows, feature_columns))
    return batch


def request_blocks(request_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) row offsets of each run of equal request ids in a request-sorted column."""
    if request_ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, request_ids[1:] != request_ids[:-1]])
    ends = np.r_[starts[1:], request_ids.size]
    return starts, ends


def pack_blocks(starts: np.ndarray, ends: np.ndarray, batch_rows: int) -> list[np.ndarray]:
    """Greedy batches of whole blocks (in the given block order) of about batch_rows rows."""
    batches, current, size = [], [], 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        n = e - s
        if current and size + n > batch_rows:
            batches.append(np.concatenate(current))
            current, size = [], 0
        current.append(np.arange(s, e))
        size += n
    if current:
        batches.append(np.concatenate(current))
    return batches


def global_batch_indices(request_ids: np.ndarray, order: str, batch_rows: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of every global batch of one epoch, for one of the three orders."""
    if order not in ORDERS:
        raise InputError(f"unknown order {order!r}: choose one of {', '.join(ORDERS)}")
    rng = np.random.default_rng([seed, epoch])
    if order == "iid":
        perm = rng.permutation(request_ids.size)
        return [perm[i:i + batch_rows] for i in range(0, perm.size, batch_rows)]
    starts, ends = request_blocks(request_ids)
    if order == "block_shuffled":
        shuffle = rng.permutation(starts.size)
        starts, ends = starts[shuffle], ends[shuffle]
    return pack_blocks(starts, ends, batch_rows)


@dataclass
class BatchStats:
    rows: int
    requests: int
    unique_users: int


class RequestLoader:
    """Per-rank batches over a request-sorted Arrow table (what the lake's read path yields)."""

    def __init__(self, rows: pa.Table, *, order: str, batch_rows: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, check: bool = True):
        if batch_rows < 1:
            raise InputError(f"batch_rows must be >= 1, got {batch_rows}")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} outside world of size {world_size}")
        if order not in ORDERS:
            raise InputError(f"unknown order {order!r}: choose one of {', '.join(ORDERS)}")
        self.rows = rows
        self.order, self.batch_rows, self.seq_len = order, batch_rows, seq_len
        self.seed, self.rank, self.world_size, self.check = seed, rank, world_size, check
        self._request_ids = rows.column("request_id").to_numpy()
        if self.steps_per_epoch() == 0:
            raise InputError(
                f"empty shard: rank {rank} of {world_size} gets no batch "
                f"({rows.num_rows} rows, batch_rows={batch_rows}); use more data or fewer processes"
            )

    @classmethod
    def from_lake(cls, start, end, *, buckets: Sequence[int] | None = None, settings=None, **kwargs) -> "RequestLoader":
        from reqdedup.lake.read import read_request_batches

        batches = list(read_request_batches(start, end, buckets=buckets, columns=list(TRAIN_COLUMNS),
                                            batch_rows=65536, settings=settings))
        if not batches:
            raise InputError(f"no rows in the impressions table for {start}..{end}"
                             f"{'' if buckets is None else f' in buckets {list(buckets)}'}")
        return cls(pa.Table.from_batches(batches), **kwargs)

    def _rank_batches(self, epoch: int) -> list[np.ndarray]:
        batches = global_batch_indices(self._request_ids, self.order, self.batch_rows, self.seed, epoch)
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank:usable:self.world_size]

    def steps_per_epoch(self) -> int:
        return len(self._rank_batches(0))

    def epoch(self, epoch: int) -> Iterator[RequestBatch]:
        for idx in self._rank_batches(epoch):
            yield arrow_to_request_batch(self.rows.take(pa.array(idx)), self.seq_len, self.check)

    def batch_stats(self, epoch: int = 0) -> list[BatchStats]:
        """Rows, requests and unique users of each of this rank's batches (cheap: ids only)."""
        users = self.rows.column("user_id").to_numpy()
        out = []
        for idx in self._rank_batches(epoch):
            out.append(BatchStats(rows=len(idx), requests=len(np.unique(self._request_ids[idx])),
                                  unique_users=len(np.unique(users[idx]))))
        return out
