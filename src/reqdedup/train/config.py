"""Training run configuration: one YAML file, checked strictly before anything starts.

Unknown keys (a typo would otherwise be silently ignored) and impossible values raise
InputError naming the key. Sections: name, data, model, train, dist, output, mlflow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from reqdedup.contract import parse_date
from reqdedup.errors import InputError
from reqdedup.train.model import RANKINGS, ModelConfig

ORDERS = ("table", "request_shuffle", "iid")  # mirrors reqdedup.train.reader (numpy-free here)
# Old names still accepted: sorted is table; block_shuffled is request_shuffle, full shuffle.
LEGACY_ORDERS = {"sorted": "table", "block_shuffled": "request_shuffle"}
USER_ENCODINGS = ("dedup", "per_row")


@dataclass
class DataConfig:
    train_start: str = "2026-01-01"
    train_end: str = "2026-01-01"
    buckets: list[int] | None = None
    order: str = "request_shuffle"
    batch_rows: int = 1024
    # request_shuffle: whole requests shuffled in a buffer of this many (null: all of them)
    buffer_requests: int | None = 4096
    # iid: rows shuffled in a buffer of this many (null: all of them, a full shuffle)
    buffer_rows: int | None = None
    streams: int = 8  # file streams interleaved by the shuffled orders (and the most decode workers)
    workers: int = 1  # DataLoader decode processes per rank (0: decode in the training process)
    prefetch_batches: int = 4  # batches packed ahead of the step
    # value columns of feature side tables (`reqdedup features list`), joined per (date,
    # bucket) by the reader and fed to the ranking head as dense per-row inputs, in this order
    feature_columns: list[str] = field(default_factory=list)


@dataclass
class TrainSection:
    epochs: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    user_encoding: str = "dedup"
    sync_bn: bool = True
    mask_same_user: bool = True
    mask_same_item: bool = True
    temperature: float = 0.1
    retrieval_weight: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU; "off" disables
    # logQ correction of the in-batch softmax (streaming item frequency, Yi et al. 2019)
    logq: bool = False
    logq_alpha: float = 0.01
    # mixed negatives: this many items drawn uniformly from the items seen so far, added to
    # every anchor's softmax (Yang et al. 2020); 0 = in-batch negatives only
    mixed_negatives: int = 0


@dataclass
class DistConfig:
    nproc_per_node: int = 2
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    # Several nodes: each runs the same command with its own node_rank; torchrun's c10d
    # rendezvous at rdzv_endpoint ("host:port", hosted by node_rank 0) joins them. Global
    # ranks are assigned by the rendezvous; run_dir must be on storage every node sees.
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # required when nnodes > 1


@dataclass
class OutputConfig:
    run_dir: str | None = None  # default: <checkpoints_dir>/<name>


@dataclass
class MlflowConfig:
    enabled: bool = True
    experiment: str | None = None  # default: settings.mlflow_experiment
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    name: str = "train"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out

    def run_dir(self, settings) -> Path:
        return Path(self.output.run_dir) if self.output.run_dir else settings.checkpoints_dir / self.name

    def flat_params(self) -> dict:
        """Flat `section.key` params, as MLflow logs them."""
        flat = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for k, v in values.items():
                    flat[f"{section}.{k}"] = v
            else:
                flat[section] = values
        return flat


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainSection, "dist": DistConfig,
             "output": OutputConfig, "mlflow": MlflowConfig}


def _section(cls, values, where: str, source: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise InputError(f"{source}: section {where!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                         f"known keys of {where!r}: {', '.join(sorted(known))}")
    if cls is ModelConfig:
        return ModelConfig.from_dict(values)
    return cls(**values)


def _date(value, key: str, source: str) -> dt.date:
    return parse_date(value, f"{source}: {key} =")


def validate(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Refuse impossible values with a message naming the key."""
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise InputError(f"{source}: {key} {msg}")

    d, m, t, p = cfg.data, cfg.model, cfg.train, cfg.dist
    start, end = _date(d.train_start, "data.train_start", source), _date(d.train_end, "data.train_end", source)
    need(start <= end, "data.train_end", f"({end}) is before data.train_start ({start})")
    if d.order in LEGACY_ORDERS:  # old configs keep working
        d.order, d.buffer_requests = LEGACY_ORDERS[d.order], (None if d.order == "block_shuffled" else d.buffer_requests)
    need(d.order in ORDERS, "data.order", f"must be one of {ORDERS} (old names: sorted = table, block_shuffled = "
         f"request_shuffle with buffer_requests null), got {d.order!r}")
    for key in ("buffer_requests", "buffer_rows"):
        v = getattr(d, key)
        need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), f"data.{key}",
             f"must be an integer >= 1 or null (full shuffle), got {v!r}")
    for key, low in (("streams", 1), ("workers", 0), ("prefetch_batches", 1)):
        v = getattr(d, key)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"data.{key}", f"must be an integer >= {low}, got {v!r}")
    need(isinstance(d.batch_rows, int) and d.batch_rows >= 1, "data.batch_rows", f"must be an integer >= 1, got {d.batch_rows!r}")
    for key in ("items", "seq_len", "d_model", "n_layers", "n_heads", "ff_dim", "emb_dim"):
        value = getattr(m, key)
        need(isinstance(value, int) and value >= 1, f"model.{key}", f"must be an integer >= 1, got {value!r}")
    need(m.d_model % m.n_heads == 0, "model.n_heads", f"({m.n_heads}) must divide model.d_model ({m.d_model})")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout!r}")
    need(m.ranking in RANKINGS, "model.ranking", f"must be one of {RANKINGS}, got {m.ranking!r}")
    need(m.crossing_layers is None or (isinstance(m.crossing_layers, int) and not isinstance(m.crossing_layers, bool)
                                       and 1 <= m.crossing_layers <= m.n_layers),
         "model.crossing_layers", f"must be null (all layers) or an integer in 1..model.n_layers ({m.n_layers}), "
         f"got {m.crossing_layers!r}")
    for key in ("head_batch_norm", "user_batch_norm"):
        need(isinstance(getattr(m, key), bool), f"model.{key}", f"must be true or false, got {getattr(m, key)!r}")
    need(isinstance(t.epochs, int) and t.epochs >= 1, "train.epochs", f"must be an integer >= 1, got {t.epochs!r}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr!r}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay!r}")
    need(t.temperature > 0, "train.temperature", f"must be > 0, got {t.temperature!r}")
    need(t.user_encoding in USER_ENCODINGS, "train.user_encoding", f"must be one of {USER_ENCODINGS}, got {t.user_encoding!r}")
    need(isinstance(t.logq, bool), "train.logq", f"must be true or false, got {t.logq!r}")
    need(0 < t.logq_alpha <= 1, "train.logq_alpha", f"must be in (0, 1], got {t.logq_alpha!r}")
    need(isinstance(t.mixed_negatives, int) and not isinstance(t.mixed_negatives, bool) and t.mixed_negatives >= 0,
         "train.mixed_negatives", f"must be an integer >= 0, got {t.mixed_negatives!r}")
    need(t.mixed_precision in ("auto", "off"), "train.mixed_precision", f"must be 'auto' or 'off', got {t.mixed_precision!r}")
    need(isinstance(p.nproc_per_node, int) and p.nproc_per_node >= 1, "dist.nproc_per_node",
         f"must be an integer >= 1, got {p.nproc_per_node!r}")
    need(p.device in ("auto", "cpu", "cuda"), "dist.device", f"must be auto, cpu or cuda, got {p.device!r}")
    need(p.backend in ("auto", "gloo", "nccl"), "dist.backend", f"must be auto, gloo or nccl, got {p.backend!r}")
    need(isinstance(d.feature_columns, (list, tuple)), "data.feature_columns",
         f"must be a list of feature column names, got {d.feature_columns!r}")
    d.feature_columns = list(d.feature_columns)
    if d.feature_columns:
        from reqdedup.lake.features import resolve_feature_columns

        try:
            resolve_feature_columns(d.feature_columns)
        except InputError as e:
            raise InputError(f"{source}: data.feature_columns: {e}") from None
    need(m.feature_dim in (0, len(d.feature_columns)), "model.feature_dim",
         f"({m.feature_dim}) is set from data.feature_columns ({len(d.feature_columns)} names): leave it out")
    m.feature_dim = len(d.feature_columns)
    validate_dist(p, source)
    if d.buckets is not None:
        need(all(isinstance(b, int) and b >= 0 for b in d.buckets), "data.buckets", "must be a list of bucket numbers >= 0")
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_endpoint(value, source: str = "config", key: str = "dist.rdzv_endpoint") -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[addr]:port``) -> (host, port); InputError naming the key otherwise."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", str(value)) if isinstance(value, str) else None
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise InputError(f"{source}: {key} must be 'host:port' (port 1..65535), got {value!r}")
    return m.group(1).strip("[]"), int(m.group(2))


def validate_dist(p, source: str = "config") -> None:
    """The multi-node keys of a dist section (a DistConfig, or the evaluation's mapping)."""
    get = (lambda k, d=None: p.get(k, d)) if isinstance(p, dict) else (lambda k, d=None: getattr(p, k, d))
    nnodes, node_rank, endpoint = get("nnodes", 1), get("node_rank", 0), get("rdzv_endpoint")
    if not (_is_int(nnodes) and nnodes >= 1):
        raise InputError(f"{source}: dist.nnodes must be an integer >= 1, got {nnodes!r}")
    if not (_is_int(node_rank) and 0 <= node_rank < nnodes):
        raise InputError(f"{source}: dist.node_rank must be an integer in 0..dist.nnodes-1 ({nnodes - 1}), got {node_rank!r}")
    if nnodes > 1 and endpoint is None:
        raise InputError(f"{source}: dist.rdzv_endpoint ('host:port' of node 0) is required when dist.nnodes > 1")
    if endpoint is not None:
        parse_endpoint(endpoint, source)


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise InputError(f"{source}: a training config must be a mapping of sections")
    known = {"name", *_SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        cfg = TrainConfig(name=str(raw.get("name", "train")),
                          **{k: _section(cls, raw.get(k), k, source) for k, cls in _SECTIONS.items()})
    except TypeError as e:  # e.g. a wrong value shape inside a section
        raise InputError(f"{source}: {e}") from None
    return validate(cfg, source)


def load_config(path: str | Path) -> TrainConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"training config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(raw, str(path))


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
