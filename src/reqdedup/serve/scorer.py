"""Request-level scoring with torch alone: encode each user once, score all its candidates.

A serving request carries the user block once (action history, dense features, segment,
country) and a list of candidates (item id, category, 4 dense features). `RequestScorer`
collates several requests into one `RequestBatch` (user block per request, item block per
candidate, `row_request` as the inverse index), runs the user tower once per request,
expands the user embedding to the candidates and runs the item tower and ranking head per
candidate: one forward per batch of requests. Per candidate it returns

- ``scores``: engagement probability, sigmoid of the ranking logit;
- ``retrieval_scores``: the two-tower dot product user_emb . item_emb.

A crossing ranker (`ModelConfig.ranking == "crossing"`) scores a batch of requests the same
way: one context pass over the histories (each crossing layer's K/V kept) and one crossing
pass in which every candidate attends to its own request's K/V. With
``context_cache_requests > 0`` (setting ``serve_context_cache_requests``) the per-request
context is also kept in a bounded LRU keyed by (user_id, history), so a user who comes back
with the same history skips the context pass; `context_cache_stats()` reports hits/misses.

`mode="per_candidate"` is the row-level baseline the benchmark compares against: the user
inputs are copied to every candidate and the user tower runs once per candidate
(`RecModel.forward(mode="per_row")`). Both modes compute the same function.

Input convention: history ids are RAW catalog ids ``0 .. items-1``, oldest first (the
scorer applies `RequestBatch`'s +1 shift and right padding; a history longer than the
model's ``seq_len`` keeps its most recent ``seq_len`` ids, as the training loader does).
Anything invalid raises `RequestError` (a ValueError) naming the request and the field,
before any compute: an out-of-range id would otherwise index an embedding table out of
bounds (a device-side assert on CUDA) and a NaN feature would give a silently wrong score.

This module imports torch and reqdedup.train only (no numpy/pandas/mlflow), so the serving
benchmark runs on a machine that has only Python + torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from reqdedup.train.batch import (
    HISTORY_ID_SHIFT,
    HISTORY_PAD,
    ITEM_DENSE_DIM,
    NUM_CATEGORIES,
    NUM_COUNTRIES,
    NUM_SEGMENTS,
    USER_DENSE_DIM,
    RequestBatch,
)
from reqdedup.train.crossing import ContextCache
from reqdedup.train.model import ModelConfig, RecModel
from reqdedup.train.model import load_model as _load_model

MODES = ("request_level", "per_candidate")
PRECISIONS = ("fp32", "bf16")
_MODEL_MODE = {"request_level": "dedup", "per_candidate": "per_row"}


class RequestError(ValueError):
    """A request the scorer refuses (names the request and the field)."""


@dataclass
class Request:
    """One serving request: the user block once, then the candidates.

    history        raw item ids (0 .. items-1), oldest first; may be empty
    user_dense     8 floats
    user_segment   int in 0..15
    user_country   int in 0..63
    item_id        [n] raw item ids, n >= 1
    item_category  [n] ints in 0..63
    item_dense     [n, 4] floats (or flat, 4 per candidate)
    request_id     echoed back, optional
    user_id        optional; with the history, the key of the context cache (crossing models)

    Each field may be a Python list, a tensor or a numpy array.
    """

    history: Any
    user_dense: Any
    user_segment: Any
    user_country: Any
    item_id: Any
    item_category: Any
    item_dense: Any
    request_id: Any = None
    user_id: Any = None

    @classmethod
    def from_mapping(cls, m: Mapping) -> "Request":
        """From a dict with the dataclass field names (or the pyfunc column names)."""
        aliases = {"history": "user_history", "item_id": "candidate_item_id",
                   "item_category": "candidate_item_category", "item_dense": "candidate_item_dense"}
        values = {}
        for name in ("history", "user_dense", "user_segment", "user_country", "item_id",
                     "item_category", "item_dense"):
            if name in m:
                values[name] = m[name]
            elif aliases.get(name) in m:
                values[name] = m[aliases[name]]
            else:
                raise RequestError(f"request is missing field {name!r}"
                                   + (f" (or {aliases[name]!r})" if name in aliases else ""))
        return cls(**values, request_id=m.get("request_id"), user_id=m.get("user_id"))


class RequestScores(NamedTuple):
    """Per-candidate outputs of one request, in candidate order (float32, on the CPU)."""

    scores: Tensor  # [n] engagement probability
    retrieval_scores: Tensor  # [n] user_emb . item_emb


# ---- validation --------------------------------------------------------------------------
def _where(index: int, request_id: Any) -> str:
    return f"request {index}" + (f" (request_id {request_id!r})" if request_id is not None else "")


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, Mapping):
        raise RequestError(f"{what} must be a list of numbers, got {type(value).__name__} {_short(value)}")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", None) == "O":  # numpy object array (nested lists)
        value = value.tolist()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise RequestError(f"{what} must be a list of numbers, got {_short(value)} ({e})") from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _int_vector(value: Any, what: str) -> Tensor:
    """1-D int64 tensor (value ranges are checked by `_check_values`)."""
    t = _as_tensor(value, what)
    if t.dim() != 1:
        raise RequestError(f"{what} must be a flat list of integers, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        if t.numel() == 0:  # an empty list parses as float; it has no wrong values
            return t.to(torch.int64)
        raise RequestError(f"{what} must hold integers, got {str(t.dtype).replace('torch.', '')} "
                           f"values such as {_short(t[:3].tolist())}")
    return t.to(torch.int64)


def _int_scalar(value: Any, what: str, low: int, high: int) -> int:
    """An integer in [low, high). Integral floats (3.0) pass: a pandas column holding a missing
    value turns every int of the column into a float; 1.5, NaN, bools and strings do not."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    elif hasattr(value, "item") and getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u", "f", "b"):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not isinstance(value, bool):
        if value != value:
            raise RequestError(f"{what} is missing (NaN)")
        if value.is_integer():
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{what} must be an integer, got {type(value).__name__} {_short(value)}")
    if not low <= value < high:
        raise RequestError(f"{what} is {value}, outside {low}..{high - 1}")
    return value


def _float_tensor(value: Any, what: str) -> Tensor:
    """float32 tensor (finiteness is checked by `_check_values`)."""
    t = _as_tensor(value, what)
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.numel() == 0
                                                        or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                                       torch.int64, torch.uint8)):
        raise RequestError(f"{what} must hold numbers, got {str(t.dtype).replace('torch.', '')}")
    return t.to(torch.float32)


@dataclass
class _Checked:
    where: str
    history: Tensor
    user_dense: Tensor
    user_segment: int
    user_country: int
    item_id: Tensor
    item_category: Tensor
    item_dense: Tensor
    user_id: Any = None

    @property
    def num_candidates(self) -> int:
        return int(self.item_id.shape[0])


def _check_structure(request: Request | Mapping, index: int) -> _Checked:
    """Types, shapes and lengths of one request (no pass over its values)."""
    if isinstance(request, Mapping):
        try:
            request = Request.from_mapping(request)
        except RequestError as e:
            raise RequestError(f"{_where(index, request.get('request_id'))}: {e}") from None
    if not isinstance(request, Request):
        raise RequestError(f"request {index} must be a Request or a mapping, got {type(request).__name__}")
    where = _where(index, request.request_id)
    history = _int_vector(request.history, f"{where}: user_history")
    user_dense = _float_tensor(request.user_dense, f"{where}: user_dense")
    if tuple(user_dense.shape) != (USER_DENSE_DIM,):
        raise RequestError(f"{where}: user_dense must hold {USER_DENSE_DIM} floats, got shape {tuple(user_dense.shape)}")
    segment = _int_scalar(request.user_segment, f"{where}: user_segment", 0, NUM_SEGMENTS)
    country = _int_scalar(request.user_country, f"{where}: user_country", 0, NUM_COUNTRIES)
    item_id = _int_vector(request.item_id, f"{where}: candidate_item_id")
    n = int(item_id.shape[0])
    if n == 0:
        raise RequestError(f"{where}: no candidates (candidate_item_id is empty); a request needs at least one")
    category = _int_vector(request.item_category, f"{where}: candidate_item_category")
    if category.shape[0] != n:
        raise RequestError(f"{where}: {category.shape[0]} candidate_item_category values for {n} candidates "
                           "(candidate_item_id); the candidate lists must have the same length")
    dense = _float_tensor(request.item_dense, f"{where}: candidate_item_dense")
    if dense.dim() == 1 and dense.shape[0] == n * ITEM_DENSE_DIM:
        dense = dense.reshape(n, ITEM_DENSE_DIM)
    if tuple(dense.shape) != (n, ITEM_DENSE_DIM):
        raise RequestError(f"{where}: candidate_item_dense must be {n} candidates x {ITEM_DENSE_DIM} floats "
                           f"(nested, or {n * ITEM_DENSE_DIM} flat), got shape {tuple(dense.shape)}")
    return _Checked(where, history, user_dense, segment, country, item_id, category, dense, request.user_id)


def _range_fields(items: int) -> tuple[tuple[str, str, int], ...]:
    return (("history", "user_history", items), ("item_id", "candidate_item_id", items),
            ("item_category", "candidate_item_category", NUM_CATEGORIES))


def _check_values_one(c: _Checked, items: int) -> None:
    for attr, name, high in _range_fields(items):
        t = getattr(c, attr)
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= high:
                raise RequestError(f"{c.where}: {name} holds {lo if lo < 0 else hi}, outside 0..{high - 1}")
    for attr, name in (("user_dense", "user_dense"), ("item_dense", "candidate_item_dense")):
        if not bool(torch.isfinite(getattr(c, attr)).all()):
            raise RequestError(f"{c.where}: {name} holds a NaN or infinite value")


def _check_values(checked: Sequence[_Checked], items: int) -> None:
    """Id ranges and finite features over all requests at once (a few reductions per call,
    not per request); on a violation, find and name the first offending request."""
    ok = True
    for attr, _, high in _range_fields(items):
        t = torch.cat([getattr(c, attr) for c in checked])
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
            ok = False
            break
    if ok:
        dense = torch.cat([torch.cat([c.user_dense for c in checked]),
                           torch.cat([c.item_dense.reshape(-1) for c in checked])])
        ok = bool(torch.isfinite(dense).all())
    if not ok:
        for c in checked:
            _check_values_one(c, items)


def check_request(request: Request | Mapping, index: int, items: int) -> _Checked:
    """Validate one request against a catalog of `items` items; RequestError if anything is off."""
    c = _check_structure(request, index)
    _check_values_one(c, items)
    return c


# ---- collation ---------------------------------------------------------------------------
def collate(checked: Sequence[_Checked], seq_len: int) -> RequestBatch:
    """Stack checked requests into one `RequestBatch` on the CPU (user block once per request).

    Histories keep their most recent `seq_len` ids, are shifted by +1 and right-padded to the
    longest history of the batch (at least 1 position): padding is masked in attention and
    pooling, so the padded width does not change a request's scores.
    """
    r = len(checked)
    tails = [c.history[-seq_len:] for c in checked]
    lengths = [int(t.shape[0]) for t in tails]
    width = max(1, max(lengths))
    # pad with -1, then shift by +1: ids become id + 1 and padding becomes 0 (HISTORY_PAD).
    tails.append(torch.empty(width, dtype=torch.int64))  # forces the padded width to >= 1
    history = torch.nn.utils.rnn.pad_sequence(tails, batch_first=True, padding_value=HISTORY_PAD - HISTORY_ID_SHIFT)
    history = history[:r] + HISTORY_ID_SHIFT
    counts = torch.tensor([c.num_candidates for c in checked], dtype=torch.int64)
    rows = int(counts.sum())
    return RequestBatch(
        user_ids=torch.arange(r, dtype=torch.int64),
        history=history,
        history_len=torch.tensor(lengths, dtype=torch.int64),
        user_dense=torch.stack([c.user_dense for c in checked]),
        user_segment=torch.tensor([c.user_segment for c in checked], dtype=torch.int64),
        user_country=torch.tensor([c.user_country for c in checked], dtype=torch.int64),
        row_request=torch.arange(r, dtype=torch.int64).repeat_interleave(counts),
        item_id=torch.cat([c.item_id for c in checked]),
        item_category=torch.cat([c.item_category for c in checked]),
        item_dense=torch.cat([c.item_dense for c in checked]),
        label=torch.zeros(rows),
    )


# ---- context cache (crossing models) -----------------------------------------------------
class ContextLRU:
    """Bounded LRU of one request's context (history states + each crossing layer's K/V, on
    the scoring device), keyed by (user_id, history). The K/V are a function of the history
    alone; an entry also keeps the history it was computed from and a hit must match it
    exactly, so a hash collision can never serve another history's K/V."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"context cache capacity (serve_context_cache_requests) must be an integer >= 0, "
                             f"got {capacity!r}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict = OrderedDict()

    @staticmethod
    def key(user_id: Any, history: Tensor) -> tuple:
        return (None if user_id is None else str(user_id), int(history.shape[0]), hash(tuple(history.tolist())))

    def get(self, key: tuple, history: Tensor):
        entry = self._entries.get(key)
        if entry is not None and torch.equal(entry[0], history):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def put(self, key: tuple, history: Tensor, context: dict) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = (history, context)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {"capacity": self.capacity, "size": len(self._entries), "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0}


def _one_request_context(ctx: ContextCache, r: int) -> dict:
    """Request r of a batch context, cut to its own width (>= 1 position)."""
    w = max(1, int(ctx.history_len[r]))
    # clones: a view would keep the whole batch's tensors alive in the cache
    return {"hidden": ctx.hidden[r, :w].clone(), "keys": [k[r, :, :w].clone() for k in ctx.keys],
            "values": [v[r, :, :w].clone() for v in ctx.values]}


def _stack_contexts(parts: list[dict], history_len: Tensor, width: int) -> ContextCache:
    """Per-request contexts -> one batch ContextCache padded to `width` (padding is masked)."""
    def stack(tensors: list[Tensor], axis: int) -> Tensor:
        shape = list(tensors[0].shape)
        shape[axis] = width
        out = tensors[0].new_zeros([len(tensors), *shape])
        for i, t in enumerate(tensors):
            out[i].narrow(axis, 0, t.shape[axis]).copy_(t)
        return out

    layers = len(parts[0]["keys"])
    return ContextCache(stack([p["hidden"] for p in parts], 0),
                        [stack([p["keys"][j] for p in parts], 1) for j in range(layers)],
                        [stack([p["values"][j] for p in parts], 1) for j in range(layers)], history_len)


# ---- the scorer --------------------------------------------------------------------------
class RequestScorer:
    """Scores requests with a `RecModel`: user tower once per request, candidates against it.

    ``RequestScorer(model, device)``; keyword options:

    - ``precision``: "fp32", or "bf16" for bf16 autocast on CUDA (on CPU it stays fp32);
    - ``max_batch_requests`` / ``max_batch_rows``: a call with more requests is split into
      forwards of at most this many requests and candidate rows (a single request larger
      than ``max_batch_rows`` runs alone);
    - ``mode``: default mode of `score` ("request_level" or "per_candidate");
    - ``context_cache_requests``: crossing models, request level: keep the context of up to
      this many (user_id, history) keys in an LRU (0, the default, keeps none).

    The model is moved to `device` and put in eval mode (BatchNorm uses its running stats,
    dropout is off); scoring runs under `torch.inference_mode`.
    """

    def __init__(self, model: RecModel, device: torch.device | str = "cpu", *, precision: str = "fp32",
                 max_batch_requests: int = 256, max_batch_rows: int = 262_144, mode: str = "request_level",
                 context_cache_requests: int = 0):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch_requests < 1 or max_batch_rows < 1:
            raise ValueError("max_batch_requests and max_batch_rows must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        _disable_mha_fastpath(self.model)
        self.cfg: ModelConfig = model.cfg
        self.precision = precision
        self.autocast = self.device.type == "cuda" and precision == "bf16"
        self.max_batch_requests = max_batch_requests
        self.max_batch_rows = max_batch_rows
        self.mode = mode
        self.context_cache = ContextLRU(context_cache_requests)

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str = "cpu", **kwargs) -> "RequestScorer":
        """A scorer for a trained checkpoint (`model.pt` of `reqdedup train`)."""
        return cls(load_model(path), device, **kwargs)

    @property
    def effective_precision(self) -> str:
        return "bf16" if self.autocast else "fp32"

    def check(self, requests: Sequence[Request | Mapping]) -> list[_Checked]:
        """Validate every request (RequestError on the first bad one) without scoring."""
        if isinstance(requests, (Request, Mapping)) or not isinstance(requests, Sequence):
            raise RequestError("requests must be a list of requests")
        if len(requests) == 0:
            raise RequestError("no requests to score")
        checked = [_check_structure(r, i) for i, r in enumerate(requests)]
        _check_values(checked, self.cfg.items)
        return checked

    def chunks(self, checked: Sequence[_Checked]) -> list[list[_Checked]]:
        """Split requests into forwards of <= max_batch_requests requests and <= max_batch_rows rows."""
        out: list[list[_Checked]] = []
        cur: list[_Checked] = []
        rows = 0
        for c in checked:
            if cur and (len(cur) >= self.max_batch_requests or rows + c.num_candidates > self.max_batch_rows):
                out.append(cur)
                cur, rows = [], 0
            cur.append(c)
            rows += c.num_candidates
        if cur:
            out.append(cur)
        return out

    def context_cache_stats(self) -> dict:
        """Hits, misses, size and capacity of the context LRU (crossing models)."""
        return self.context_cache.stats()

    def _cached_context(self, group: Sequence[_Checked], batch: RequestBatch) -> ContextCache:
        """The batch's context, from the LRU where a (user_id, history) was seen, the misses
        computed in one context pass and stored."""
        parts: list[dict | None] = []
        keys = []
        for c in group:
            tail = c.history[-self.cfg.seq_len:]
            key = ContextLRU.key(c.user_id, tail)
            keys.append((key, tail))
            parts.append(self.context_cache.get(key, tail))
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            idx = torch.tensor(missing, device=batch.device)
            computed = self.model.context(batch.history.index_select(0, idx), batch.history_len.index_select(0, idx))
            for j, i in enumerate(missing):
                parts[i] = _one_request_context(computed, j)
                self.context_cache.put(*keys[i], parts[i])
        return _stack_contexts(parts, batch.history_len, batch.seq_len)

    def forward_batch(self, batch: RequestBatch, mode: str | None = None,
                      group: Sequence[_Checked] | None = None) -> tuple[Tensor, Tensor]:
        """(engagement probability [N], retrieval score [N]) float32 on the batch's device.

        A crossing model at request level runs one context pass and one crossing pass; with a
        context cache and the batch's checked requests (`group`) the context comes from it."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with torch.inference_mode(), ctx:
            if (group is not None and self.context_cache.capacity > 0 and mode == "request_level"
                    and self.cfg.ranking == "crossing"):
                out = self.model.score_candidates(batch, "dedup", context=self._cached_context(group, batch))
                out["retrieval_score"] = (out["user_emb_rows"] * out["item_emb"]).sum(dim=-1)
            else:
                out = self.model(batch, mode=_MODEL_MODE[mode])
        return torch.sigmoid(out["logit"].float()), out["retrieval_score"].float()

    def score(self, requests: Sequence[Request | Mapping], mode: str | None = None) -> list[RequestScores]:
        """Score every candidate of every request; one `RequestScores` per request, in order."""
        checked = self.check(requests)
        results: list[RequestScores] = []
        for group in self.chunks(checked):
            batch = collate(group, self.cfg.seq_len).to(self.device)
            probs, retrieval = self.forward_batch(batch, mode, group)
            both = torch.stack([probs, retrieval]).cpu()  # one device->host copy (and sync)
            counts = [c.num_candidates for c in group]
            for p, s in zip(both[0].split(counts), both[1].split(counts)):
                results.append(RequestScores(p, s))
        return results


def _no_op_pre_hook(module, args):
    return None


def _disable_mha_fastpath(model: torch.nn.Module) -> None:
    """Keep eval on the attention code that training runs (SDPA), off the native fast path.

    In eval mode `nn.TransformerEncoderLayer` switches to `torch._transformer_encoder_layer_fwd`,
    whose CUDA masked softmax indexes with 32 bits: once sequences x heads x T x T passes 2^31
    it reads out of bounds. Seen on the H200: the per-candidate mode on 600 sequences x 4 heads
    x 969^2 padded positions died with "CUDA error: an illegal memory access" (and a CUDA error
    poisons the whole process, so a server would stop serving). A forward pre-hook on a layer
    rules the fast path out for that layer alone (one of its documented conditions), with no
    process-wide flag (`torch.backends.mha.set_fastpath_enabled`) to race on.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoderLayer) and not getattr(module, "_reqdedup_no_fastpath", False):
            module.register_forward_pre_hook(_no_op_pre_hook)
            module._reqdedup_no_fastpath = True


def load_model(path: str, map_location: str | torch.device = "cpu") -> RecModel:
    """A `RecModel` from a checkpoint: `reqdedup.train.model.load_model` (weights-only load)."""
    return _load_model(path, map_location)

