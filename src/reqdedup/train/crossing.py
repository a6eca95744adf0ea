"""Target-aware ranking by context/crossing dedup (DCAT-style), torch alone.

The function: each candidate is one extra token appended to its request's history, and
[history; candidate] runs through the user tower's transformer layers with one rule: history
tokens never attend to the candidate (so the history is the same for every candidate), the
candidate attends to the valid history and to itself. The candidate joins at layer
``n_layers - crossing_layers`` (before that the layers see the history alone); its output
state is what the ranking head reads.

Two ways to compute it, equal in value and gradient (tests/test_crossing.py):

- dedup (`context_pass` + `cross_candidates`): the history runs once per request and every
  crossing layer keeps its keys and values ``[R, H, L, dh]``; the candidates of a request,
  grouped into ``[R, C_max, d]``, then attend to their own request's cached K/V by a batched
  matmul over the request axis (block attention: the K/V are read in place, never copied
  per candidate) plus a self term for the candidate's own key.
- naive (`naive_per_candidate`): the history is copied to every candidate row and the
  sequence [history; candidate] of length L + 1 runs through the layers once per candidate,
  as a row-level ranker does.

The layers are `nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`; their
weights are read through the layer's public submodules (self_attn.in_proj_*, out_proj,
norm1/2, linear1/2) and the same pre-norm block is computed here, because the stock module
returns no keys/values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ContextCache:
    """What the crossing needs from one context pass over R requests.

    hidden      [R, L, d] last layer's history states (for the user embedding)
    keys/values per crossing layer, [R, H, L, dh]
    history_len [R]        valid tokens per request (keys at positions >= len are masked)
    """

    hidden: Tensor
    keys: list[Tensor]
    values: list[Tensor]
    history_len: Tensor

    def select(self, index: Tensor) -> "ContextCache":
        """The cache of a subset of requests (rows `index`), e.g. to rebuild a batch from an LRU."""
        return ContextCache(self.hidden.index_select(0, index), [k.index_select(0, index) for k in self.keys],
                            [v.index_select(0, index) for v in self.values], self.history_len.index_select(0, index))


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, d] -> [B, H, T, dh]."""
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, dh] -> [B, T, d]."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


def _qkv(layer: nn.TransformerEncoderLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-norm q, k, v of `x` [B, T, d] by the layer's own projection, each [B, H, T, dh]."""
    attn = layer.self_attn
    q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads)


def _finish(layer: nn.TransformerEncoderLayer, x: Tensor, attended: Tensor) -> Tensor:
    """Residual + out projection, then the pre-norm feed-forward block (as the stock layer)."""
    x = x + layer.dropout1(layer.self_attn.out_proj(_merge_heads(attended)))
    return x + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(x))))))


def _attn_dropout(layer: nn.TransformerEncoderLayer) -> float:
    return layer.self_attn.dropout if layer.training else 0.0


def _check_layers(layers) -> None:
    for layer in layers:
        if not (isinstance(layer, nn.TransformerEncoderLayer) and layer.norm_first
                and layer.self_attn.batch_first and layer.self_attn.in_proj_weight is not None):
            raise TypeError("crossing needs nn.TransformerEncoderLayer(norm_first=True, batch_first=True) layers")


def history_masks(history_len: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(valid [R, L]: real tokens, attend [R, L]: what a history query attends to).

    An empty history would mask every key of a history query: it attends to position 0 (a
    pad token) instead, the user tower's convention. Candidates attend to `valid` only.
    """
    positions = torch.arange(width, device=history_len.device)
    return positions[None, :] < history_len[:, None], positions[None, :] < history_len.clamp(min=1)[:, None]


def context_pass(layers, x: Tensor, history_len: Tensor, first_cross: int) -> ContextCache:
    """Run the history `x` [R, L, d] (embedded) through `layers` once per request, keeping the
    K/V of every layer from `first_cross` on."""
    _check_layers(layers)
    _, attend = history_masks(history_len, x.shape[1])
    mask = attend[:, None, None, :]  # [R, 1, 1, L] True = attend
    keys, values = [], []
    for i, layer in enumerate(layers):
        q, k, v = _qkv(layer, x)
        if i >= first_cross:
            keys.append(k)
            values.append(v)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=_attn_dropout(layer))
        x = _finish(layer, x, attended)
    return ContextCache(x, keys, values, history_len)


def candidate_slots(row_request: Tensor, num_requests: int) -> tuple[Tensor, int]:
    """(slot [N]: position of each row among its request's rows, C_max). Rows need not be
    contiguous: the slot is the row's rank among the rows of its request, in row order."""
    n = row_request.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=row_request.device), 0
    order = torch.sort(row_request, stable=True).indices
    counts = torch.bincount(row_request, minlength=num_requests)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(row_request)
    slot[order] = torch.arange(n, device=row_request.device) - starts.index_select(0, row_request.index_select(0, order))
    # one host sync: the padded width is a shape
    return slot, int(counts.max())


def cross_candidates(layers, tokens: Tensor, row_request: Tensor, cache: ContextCache, first_cross: int) -> Tensor:
    """Crossing for every candidate row: `tokens` [N, d] -> final candidate states [N, d].

    Candidates are grouped per request into [R, C_max, d]; at each crossing layer a candidate's
    query meets its request's cached keys ([R, H, C, dh] x [R, H, dh, L], batched over the
    request) and its own key, one softmax over the L + 1 scores.
    """
    r = cache.hidden.shape[0]
    slot, c_max = candidate_slots(row_request, r)
    d = tokens.shape[-1]
    # the residual stream in the context's dtype (fp32 under autocast), as in the naive path
    grouped = tokens.new_zeros(r, c_max, d, dtype=cache.hidden.dtype)
    grouped[row_request, slot] = tokens.to(grouped.dtype)
    valid, _ = history_masks(cache.history_len, cache.hidden.shape[1])
    key_mask = valid[:, None, None, :]  # [R, 1, 1, L]
    x = grouped
    for j, layer in enumerate(layers[first_cross:]):
        q, k_self, v_self = _qkv(layer, x)  # [R, H, C, dh]
        k_hist, v_hist = cache.keys[j], cache.values[j]
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores_hist = torch.matmul(q, k_hist.transpose(-1, -2)) * scale  # [R, H, C, L]
        scores_hist = scores_hist.masked_fill(~key_mask, float("-inf"))
        score_self = (q * k_self).sum(dim=-1, keepdim=True) * scale  # [R, H, C, 1]
        probs = torch.softmax(torch.cat([scores_hist, score_self], dim=-1).float(), dim=-1).to(q.dtype)
        probs = F.dropout(probs, _attn_dropout(layer), training=layer.training)
        attended = torch.matmul(probs[..., :-1], v_hist) + probs[..., -1:] * v_self
        x = _finish(layer, x, attended)
    return x[row_request, slot]


def naive_per_candidate(layers, x_rows: Tensor, history_len_rows: Tensor, tokens: Tensor,
                        first_cross: int) -> tuple[Tensor, Tensor]:
    """The baseline: one [history; candidate] sequence per candidate row.

    `x_rows` [N, L, d] is the embedded history copied to every row, `tokens` [N, d] the
    candidate tokens. Returns (history states [N, L, d], candidate states [N, d]).
    """
    _check_layers(layers)
    n, width, _ = x_rows.shape
    valid, attend = history_masks(history_len_rows, width)
    hist_mask = attend[:, None, None, :]
    # rows 0..L-1 (history queries): history keys by `attend`, never the candidate;
    # row L (the candidate): valid history keys and itself.
    joint = torch.zeros(n, width + 1, width + 1, dtype=torch.bool, device=x_rows.device)
    joint[:, :width, :width] = attend[:, None, :]
    joint[:, width, :width] = valid
    joint[:, width, width] = True
    joint = joint[:, None]
    x = x_rows
    for i, layer in enumerate(layers):
        if i == first_cross:
            x = torch.cat([x, tokens[:, None, :].to(x.dtype)], dim=1)
        q, k, v = _qkv(layer, x)
        mask = joint if i >= first_cross else hist_mask
        x = _finish(layer, x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=_attn_dropout(layer)))
    return x[:, :width], x[:, width]


class CandidateToken(nn.Module):
    """Candidate features (the item tower's id/category embeddings + dense) -> a d_model token,
    plus a learned 'candidate' type vector, and a final LayerNorm for the crossed state."""

    def __init__(self, feature_dim: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, d_model)
        self.type_emb = nn.Parameter(torch.zeros(d_model))
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, item_features: Tensor) -> Tensor:
        return self.proj(item_features) + self.type_emb
