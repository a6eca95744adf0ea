"""N devices simulated on one: what N data-parallel processes compute, in one process.

A global step of DDP over N ranks: every rank gets its own batch of whole requests, runs the
forward with BatchNorm statistics over ITS rows (plain BN) or over all ranks' rows
(SyncBatchNorm), computes its loss over its rows only (the in-batch softmax sees only the
rank's own negatives), and the gradients are averaged over ranks. `device_losses` does the
same with the global batch in one process:

* ``split_requests`` deals the global batch's requests into N contiguous device batches
  (what the N ranks would each have read);
* ``sync_bn=False``: one forward per device batch, so each BatchNorm normalizes with that
  device's statistics; only device 0's forward updates the running statistics (the
  checkpoint is rank 0's, whose buffers saw only its own batches);
* ``sync_bn=True``: one forward over the whole global batch (BatchNorm statistics over all
  rows = SyncBN), the outputs then split per device for the losses;
* loss = mean over devices of each device's `recommendation_losses`; its gradient is DDP's
  averaged gradient.

tests/test_simdev.py checks the gradients and buffers against 2 real gloo ranks (DDP, with
and without `convert_sync_batchnorm`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from reqdedup.train.batch import RequestBatch
from reqdedup.train.losses import recommendation_losses


# per-candidate-row fields a batch may carry besides the core ones (e.g. feature side tables)
_OPTIONAL_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(RequestBatch) if f.name == "dense_features")


def _optional_rows(batch: RequestBatch, rows: Tensor) -> dict:
    return {f: getattr(batch, f)[rows] for f in _OPTIONAL_ROW_FIELDS if getattr(batch, f, None) is not None}


def split_requests(batch: RequestBatch, n: int) -> list[RequestBatch]:
    """The batch's requests in N contiguous, near-equal groups (by request count), each with
    its candidate rows in order. Needs at least N requests."""
    r = batch.num_requests
    if n < 1 or r < n:
        raise ValueError(f"cannot split {r} requests over {n} devices")
    bounds = [(r * d) // n for d in range(n + 1)]
    # rows of a batch are grouped by request in row order for request-level batches, but
    # not necessarily (iid batches): select rows by their request's group.
    group_of_request = torch.zeros(r, dtype=torch.long, device=batch.row_request.device)
    for d in range(1, n):
        group_of_request[bounds[d]:] += 1
    row_group = group_of_request[batch.row_request]
    out = []
    for d in range(n):
        rows = torch.nonzero(row_group == d).squeeze(1)
        lo, hi = bounds[d], bounds[d + 1]
        out.append(RequestBatch(
            user_ids=batch.user_ids[lo:hi], history=batch.history[lo:hi], history_len=batch.history_len[lo:hi],
            user_dense=batch.user_dense[lo:hi], user_segment=batch.user_segment[lo:hi],
            user_country=batch.user_country[lo:hi], row_request=batch.row_request[rows] - lo,
            item_id=batch.item_id[rows], item_category=batch.item_category[rows], item_dense=batch.item_dense[rows],
            label=batch.label[rows], request_ids=None if batch.request_ids is None else batch.request_ids[lo:hi],
            **_optional_rows(batch, rows)))
    return out


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module):
    """BatchNorm layers normalize with batch statistics but leave their running buffers alone
    (momentum 0 for the forward: the buffers are updated to their own value; the batch
    counter is put back)."""
    saved = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)


def _split_outputs(out: dict[str, Tensor], parts: list[RequestBatch]) -> list[dict[str, Tensor]]:
    """Per-row outputs of one forward over the concatenation of ``parts`` -> per part."""
    sizes = [p.num_rows for p in parts]
    keys = [k for k in ("logit", "user_emb_rows", "item_emb", "retrieval_score") if k in out]
    split = {k: torch.split(out[k], sizes) for k in keys}
    return [{k: split[k][d] for k in keys} for d in range(len(parts))]


def concat_batches(parts: list[RequestBatch]) -> RequestBatch:
    """Device batches back into one (requests and rows in device order)."""
    offsets, acc = [], 0
    for p in parts:
        offsets.append(acc)
        acc += p.num_requests
    cat = torch.cat
    return RequestBatch(
        user_ids=cat([p.user_ids for p in parts]), history=cat([p.history for p in parts]),
        history_len=cat([p.history_len for p in parts]), user_dense=cat([p.user_dense for p in parts]),
        user_segment=cat([p.user_segment for p in parts]), user_country=cat([p.user_country for p in parts]),
        row_request=cat([p.row_request + o for p, o in zip(parts, offsets)]),
        item_id=cat([p.item_id for p in parts]), item_category=cat([p.item_category for p in parts]),
        item_dense=cat([p.item_dense for p in parts]), label=cat([p.label for p in parts]),
        request_ids=None if any(p.request_ids is None for p in parts) else cat([p.request_ids for p in parts]),
        **{f: cat([getattr(p, f) for p in parts]) for f in _OPTIONAL_ROW_FIELDS
           if all(getattr(p, f, None) is not None for p in parts)})


def device_losses(model: nn.Module, batch: RequestBatch, n_devices: int, *, sync_bn: bool, mode: str = "dedup",
                  loss_fn=None, **loss_kwargs) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """(mean over the N simulated devices of each device's loss, per-device loss stats).
    ``loss_fn(outputs, device_batch)`` -> (loss, stats) defaults to `recommendation_losses`
    with ``loss_kwargs``."""
    if loss_fn is None:
        def loss_fn(outputs, b):
            return recommendation_losses(outputs, b, **loss_kwargs)
    parts = split_requests(batch, n_devices) if n_devices > 1 else [batch]
    if sync_bn or n_devices == 1:
        whole = concat_batches(parts) if n_devices > 1 else batch
        outs = _split_outputs(model(whole, mode=mode), parts) if n_devices > 1 else [model(whole, mode=mode)]
    else:
        outs = []
        for d, p in enumerate(parts):
            with (frozen_running_stats(model) if d > 0 else contextlib.nullcontext()):
                outs.append(model(p, mode=mode))
    losses, stats = [], []
    for out, p in zip(outs, parts):
        loss, st = loss_fn(out, p)
        losses.append(loss)
        stats.append(st)
    return torch.stack(losses).mean(), stats
