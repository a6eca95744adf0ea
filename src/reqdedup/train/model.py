"""Two-tower retrieval + ranking model with request-level dedup in the forward pass.

The user tower (a transformer over the action history) is the expensive part and its input
is the same for every candidate of a request. `RecModel.forward(batch, mode="dedup")` runs it
once per request and expands the user embedding to candidate rows by `row_request`;
`mode="per_row"` first copies the user inputs to every row and runs the tower per row, the
way a row-level pipeline does. Both modes compute the same function (tested), so any
throughput difference is the dedup saving alone.

BatchNorm sits in the ranking head, over candidate rows (``head_batch_norm``), and optionally
DLRM-style over the user dense features and the user tower's output (``user_batch_norm``);
`reqdedup.train.syncbn` converts them to a synchronized BN for request-sorted training, and
`reqdedup.train.simdev` simulates N devices' per-device statistics on one.

`ranking="crossing"` makes the ranker target-aware: every candidate also crosses the user's
history through the user tower's layers (`reqdedup.train.crossing`); "dedup" then runs the
history once per request and lets each candidate attend to its request's cached K/V,
"per_row" runs [history; candidate] once per candidate. The ranking head reads the crossed
candidate state next to the two-tower features; retrieval stays user_emb . item_emb.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from reqdedup.train import crossing
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
RANKINGS = ("two_tower", "crossing")


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
    # ranking head: "two_tower" (MLP over user/item embeddings) or "crossing" (target-aware:
    # each candidate also attends to the history in the last `crossing_layers` layers; None = all)
    ranking: str = "two_tower"
    crossing_layers: int | None = None
    # dense per-row inputs of the ranking head from feature side tables (RequestBatch.dense_features);
    # set from the training config's data.feature_columns
    feature_dim: int = 0
    # BatchNorm placement. head_batch_norm: inside the ranking head's MLP, over candidate rows
    # (the original model). user_batch_norm: DLRM-style, over the user-side dense features
    # (the tower's input) and over the user tower's output embedding, where user features
    # dominate the batch statistics (what SyncBN addresses in request-sorted training).
    head_batch_norm: bool = True
    user_batch_norm: bool = False

    def first_crossing_layer(self) -> int:
        return self.n_layers - (self.n_layers if self.crossing_layers is None else self.crossing_layers)

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
        if cfg.user_batch_norm:  # DLRM-style: over the user dense input and the tower's output
            self.dense_bn = nn.BatchNorm1d(USER_DENSE_DIM)
            self.output_bn = nn.BatchNorm1d(cfg.emb_dim)

    def embed(self, history: Tensor) -> Tensor:
        """Token + position embeddings of the history [B, L, d_model] (the encoder's input)."""
        seq_len = history.shape[1]
        if seq_len > self.cfg.seq_len:
            raise ValueError(f"history has {seq_len} positions, model was built for seq_len={self.cfg.seq_len}")
        return self.history_item_emb(history) + self.position_emb(torch.arange(seq_len, device=history.device))[None]

    def forward(self, history: Tensor, history_len: Tensor, user_dense: Tensor,
                user_segment: Tensor, user_country: Tensor) -> Tensor:
        positions = torch.arange(history.shape[1], device=history.device)
        # An empty history would mask every key and make attention NaN: let it attend to
        # position 0 (a pad token); pooling below still ignores it, so it pools to zeros.
        attend = positions[None, :] < history_len.clamp(min=1)[:, None]
        x = self.encoder(self.embed(history), src_key_padding_mask=~attend)
        return self.summarize(x, history_len, user_dense, user_segment, user_country)

    def summarize(self, x: Tensor, history_len: Tensor, user_dense: Tensor,
                  user_segment: Tensor, user_country: Tensor) -> Tensor:
        """Encoder output [B, L, d_model] + user features -> user embedding [B, emb_dim]."""
        x = self.final_norm(x)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < history_len[:, None]  # [B, L]
        weights = valid.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.cfg.user_batch_norm:
            user_dense = self.dense_bn(user_dense.to(pooled.dtype))
        features = torch.cat(
            [pooled, user_dense.to(pooled.dtype), self.segment_emb(user_segment).to(pooled.dtype),
             self.country_emb(user_country).to(pooled.dtype)], dim=-1)
        out = self.mlp(features)
        return self.output_bn(out) if self.cfg.user_batch_norm else out


class ItemTower(nn.Module):
    """Item id + category embeddings + item dense features -> item embedding [N, emb_dim]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.item_emb = nn.Embedding(cfg.items, cfg.d_model)
        self.category_emb = nn.Embedding(NUM_CATEGORIES, cfg.small_emb_dim)
        self.mlp = mlp(cfg.d_model + cfg.small_emb_dim + ITEM_DENSE_DIM, cfg.item_mlp, cfg.emb_dim)

    def features(self, item_id: Tensor, item_category: Tensor, item_dense: Tensor) -> Tensor:
        """[id embedding, category embedding, dense] per candidate (also the crossing's input)."""
        a = self.item_emb(item_id)
        return torch.cat([a, self.category_emb(item_category), item_dense.to(a.dtype)], dim=-1)

    def forward(self, item_id: Tensor, item_category: Tensor, item_dense: Tensor) -> Tensor:
        return self.mlp(self.features(item_id, item_category, item_dense))


class RankingHead(nn.Module):
    """MLP with BatchNorm1d over [user, item, user * item] -> engagement logit [N]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        crossed = cfg.d_model if cfg.ranking == "crossing" else 0  # + the crossed candidate state
        self.feature_dim = cfg.feature_dim  # + the side tables' dense features of each row
        self.mlp = mlp(3 * cfg.emb_dim + crossed + cfg.feature_dim, cfg.head_mlp, 1, batch_norm=cfg.head_batch_norm)

    def forward(self, user_emb_rows: Tensor, item_emb: Tensor, crossed: Tensor | None = None,
                dense_features: Tensor | None = None) -> Tensor:
        parts = [user_emb_rows, item_emb, user_emb_rows * item_emb] + ([] if crossed is None else [crossed])
        if self.feature_dim:
            if dense_features is None or dense_features.shape != (user_emb_rows.shape[0], self.feature_dim):
                got = None if dense_features is None else tuple(dense_features.shape)
                raise ValueError(f"the model takes {self.feature_dim} dense features per row "
                                 f"(model.feature_dim), the batch has {got}")
            # signed log1p: counts and rates on one scale, no statistics to keep
            x = dense_features.to(user_emb_rows.dtype)
            parts.append(torch.sign(x) * torch.log1p(x.abs()))
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)


class RecModel(nn.Module):
    """User tower + item tower + ranking head; `mode` picks dedup or the per-row baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg)
        self.item_tower = ItemTower(cfg)
        self.ranking_head = RankingHead(cfg)
        if cfg.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {cfg.ranking!r}")
        if cfg.ranking == "crossing":
            feature_dim = cfg.d_model + cfg.small_emb_dim + ITEM_DENSE_DIM
            self.candidate_token = crossing.CandidateToken(feature_dim, cfg.d_model)

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

    def context(self, history: Tensor, history_len: Tensor) -> crossing.ContextCache:
        """Crossing models: the history [R, L] once per request, each crossing layer's K/V kept."""
        return crossing.context_pass(self.user_tower.encoder.layers, self.user_tower.embed(history),
                                     history_len, self.cfg.first_crossing_layer())

    def score_candidates(self, batch: RequestBatch, mode: str = "dedup",
                         context: crossing.ContextCache | None = None) -> dict[str, Tensor]:
        """Ranking logit [N] of every candidate row, with the user embedding per request [R]
        ("user_emb", dedup only) and per row, and the item embedding [N]. A crossing model in
        dedup mode may be given the batch's `context` (e.g. from a serving cache)."""
        if self.cfg.ranking == "crossing":
            return self._score_crossing(batch, mode, context)
        if mode == "dedup":
            user_emb = self.encode_users(batch)
            user_emb_rows = expand_to_rows(user_emb, batch.row_request)
        elif mode == "per_row":
            user_emb, user_emb_rows = None, self.encode_users_per_row(batch)
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        item_emb = self.item_tower(batch.item_id, batch.item_category, batch.item_dense).to(user_emb_rows.dtype)
        out = {"logit": self.ranking_head(user_emb_rows, item_emb, dense_features=batch.dense_features),
               "user_emb_rows": user_emb_rows, "item_emb": item_emb}
        return out if user_emb is None else {**out, "user_emb": user_emb}

    def _score_crossing(self, batch: RequestBatch, mode: str, context) -> dict[str, Tensor]:
        tower, layers, first = self.user_tower, self.user_tower.encoder.layers, self.cfg.first_crossing_layer()
        features = self.item_tower.features(batch.item_id, batch.item_category, batch.item_dense)
        tokens = self.candidate_token(features)
        user_inputs = (batch.history_len, batch.user_dense, batch.user_segment, batch.user_country)
        if mode == "dedup":
            context = self.context(batch.history, batch.history_len) if context is None else context
            crossed = crossing.cross_candidates(layers, tokens, batch.row_request, context, first)
            user_emb = tower.summarize(context.hidden, *user_inputs)
            user_emb_rows = expand_to_rows(user_emb, batch.row_request)
        elif mode == "per_row":
            idx = batch.row_request
            hidden, crossed = crossing.naive_per_candidate(
                layers, tower.embed(expand_to_rows(batch.history, idx)), expand_to_rows(batch.history_len, idx),
                tokens, first)
            user_emb = None
            user_emb_rows = tower.summarize(hidden, *(expand_to_rows(t, idx) for t in user_inputs))
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        item_emb = self.item_tower.mlp(features).to(user_emb_rows.dtype)
        crossed = self.candidate_token.final_norm(crossed).to(user_emb_rows.dtype)
        out = {"logit": self.ranking_head(user_emb_rows, item_emb, crossed, batch.dense_features),
               "user_emb_rows": user_emb_rows,
               "item_emb": item_emb}
        return out if user_emb is None else {**out, "user_emb": user_emb}

    def forward(self, batch: RequestBatch, mode: str = "dedup") -> dict[str, Tensor]:
        out = self.score_candidates(batch, mode)
        return {**out, "retrieval_score": (out["user_emb_rows"] * out["item_emb"]).sum(dim=-1)}


# ---- checkpoints ---------------------------------------------------------------------------
def load_checkpoint(path, map_location: str | torch.device = "cpu") -> dict:
    """The one reader of reqdedup checkpoints (the worker's ``checkpoint.pt`` and ``model.pt``):
    ``torch.load(weights_only=True)``, so a checkpoint file can hold tensors and plain
    containers only, never code to run. ValueError naming the file when it is not one."""
    import pickle
    from collections.abc import Mapping

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable reqdedup checkpoint (weights-only load): {first}") from None
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise ValueError(f"{path} is not a reqdedup model checkpoint (needs a 'model' state dict)")
    return dict(ckpt)


def load_model(path, map_location: str | torch.device = "cpu") -> RecModel:
    """A `RecModel` in eval mode from a checkpoint {"model": state_dict, "model_config": dict, ...}."""
    ckpt = load_checkpoint(path, map_location)
    if "model_config" not in ckpt:
        raise ValueError(f"{path} is not a reqdedup model checkpoint (needs 'model' and 'model_config')")
    model = RecModel(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
