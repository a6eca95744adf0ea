"""Two-tower retrieval + ranking model with request-level dedup in the forward pass.

The user tower (a transformer over the action history) is the expensive part and its input
is the same for every candidate of a request. `RecModel.forward(batch, mode="dedup")` runs it
once per request and expands the user embedding to candidate rows by `row_request`;
`mode="per_row"` first copies the user inputs to every row and runs the tower per row, the
way a row-level pipeline does. Both modes compute the same function (tested), so any
throughput difference is the dedup saving alone.

BatchNorm sits only in the ranking head, over candidate rows; `reqdedup.train.syncbn`
converts it to a synchronized BN for request-sorted training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from reqdedup.train.batch import (
    HISTORY_PAD,
    ITEM_DENSE_DIM,
    NUM_CATEGORIES,
    NUM_COUNTRIES,
    NUM_SEGMENTS,
    USER_DENSE_DIM,
    RequestBatch,
)
from reqdedup.train.dedup import expand_to_rows

MODES = ("dedup", "per_row")


@dataclass
class ModelConfig:
    """Model dimensions. `items` is the catalog size (history ids are items + 1 with 0 = pad)."""

    items: int = 10_000
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ff_dim: int = 128
    emb_dim: int = 32
    dropout: float = 0.0
    user_mlp: tuple[int, ...] = (64,)
    item_mlp: tuple[int, ...] = (64,)
    head_mlp: tuple[int, ...] = (64, 32)
    small_emb_dim: int = 8  # segment / country / category embeddings

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        for key in ("user_mlp", "item_mlp", "head_mlp"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, *, batch_norm: bool = False) -> nn.Sequential:
    """Linear [-> BatchNorm1d] -> ReLU per hidden size, then a final Linear to `out_dim`."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class UserTower(nn.Module):
    """History transformer + user features -> user embedding [B, emb_dim]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.history_item_emb = nn.Embedding(cfg.items + 1, cfg.d_model, padding_idx=HISTORY_PAD)
        self.position_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, dim_feedforward=cfg.ff_dim, dropout=cfg.dropout,
            batch_first=True, norm_first=True,
        )
        # Nested tensors are an inference-only fast path; off so train and eval run the same code.
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.segment_emb = nn.Embedding(NUM_SEGMENTS, cfg.small_emb_dim)
        self.country_emb = nn.Embedding(NUM_COUNTRIES, cfg.small_emb_dim)
        in_dim = cfg.d_model + USER_DENSE_DIM + 2 * cfg.small_emb_dim
        self.mlp = mlp(in_dim, cfg.user_mlp, cfg.emb_dim)

    def forward(self, history: Tensor, history_len: Tensor, user_dense: Tensor,
                user_segment: Tensor, user_country: Tensor) -> Tensor:
        seq_len = history.shape[1]
        if seq_len > self.cfg.seq_len:
            raise ValueError(f"history has {seq_len} positions, model was built for seq_len={self.cfg.seq_len}")
        positions = torch.arange(seq_len, device=history.device)
        valid = positions[None, :] < history_len[:, None]  # [B, L]
        # An empty history would mask every key and make attention NaN: let it attend to
        # position 0 (a pad token); pooling below still ignores it, so it pools to zeros.
        attend = positions[None, :] < history_len.clamp(min=1)[:, None]
        x = self.history_item_emb(history) + self.position_emb(positions)[None]
        x = self.encoder(x, src_key_padding_mask=~attend)
        x = self.final_norm(x)
        weights = valid.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        features = torch.cat(
            [pooled, user_dense.to(pooled.dtype), self.segment_emb(user_segment).to(pooled.dtype),
             self.country_emb(user_country).to(pooled.dtype)], dim=-1)
        return self.mlp(features)


class ItemTower(nn.Module):
    """Item id + category embeddings + item dense features -> item embedding [N, emb_dim]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.item_emb = nn.Embedding(cfg.items, cfg.d_model)
        self.category_emb = nn.Embedding(NUM_CATEGORIES, cfg.small_emb_dim)
        self.mlp = mlp(cfg.d_model + cfg.small_emb_dim + ITEM_DENSE_DIM, cfg.item_mlp, cfg.emb_dim)

    def forward(self, item_id: Tensor, item_category: Tensor, item_dense: Tensor) -> Tensor:
        a = self.item_emb(item_id)
        features = torch.cat([a, self.category_emb(item_category), item_dense.to(a.dtype)], dim=-1)
        return self.mlp(features)


class RankingHead(nn.Module):
    """MLP with BatchNorm1d over [user, item, user * item] -> engagement logit [N]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = mlp(3 * cfg.emb_dim, cfg.head_mlp, 1, batch_norm=True)

    def forward(self, user_emb_rows: Tensor, item_emb: Tensor) -> Tensor:
        return self.mlp(torch.cat([user_emb_rows, item_emb, user_emb_rows * item_emb], dim=-1)).squeeze(-1)


class RecModel(nn.Module):
    """User tower + item tower + ranking head; `mode` picks dedup or the per-row baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg)
        self.item_tower = ItemTower(cfg)
        self.ranking_head = RankingHead(cfg)

    def encode_users(self, batch: RequestBatch) -> Tensor:
        """User embedding once per request [R, emb_dim] (what serving caches per request)."""
        return self.user_tower(batch.history, batch.history_len, batch.user_dense,
                               batch.user_segment, batch.user_country)

    def encode_users_per_row(self, batch: RequestBatch) -> Tensor:
        """Baseline: copy the user inputs to every candidate row, run the tower N times."""
        idx = batch.row_request
        return self.user_tower(
            expand_to_rows(batch.history, idx), expand_to_rows(batch.history_len, idx),
            expand_to_rows(batch.user_dense, idx), expand_to_rows(batch.user_segment, idx),
            expand_to_rows(batch.user_country, idx))

    def forward(self, batch: RequestBatch, mode: str = "dedup") -> dict[str, Tensor]:
        if mode == "dedup":
            user_emb_rows = expand_to_rows(self.encode_users(batch), batch.row_request)
        elif mode == "per_row":
            user_emb_rows = self.encode_users_per_row(batch)
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        item_emb = self.item_tower(batch.item_id, batch.item_category, batch.item_dense)
        item_emb = item_emb.to(user_emb_rows.dtype)
        return {
            "logit": self.ranking_head(user_emb_rows, item_emb),
            "user_emb_rows": user_emb_rows,
            "item_emb": item_emb,
            "retrieval_score": (user_emb_rows * item_emb).sum(dim=-1),
        }
