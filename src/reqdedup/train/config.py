"""Training run configuration: one YAML file, checked strictly before anything starts.

Unknown keys (a typo would otherwise be silently ignored) and impossible values raise
InputError naming the key. Sections: name, data, model, train, dist, output, mlflow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from reqdedup.errors import InputError
from reqdedup.train.model import ModelConfig

ORDERS = ("iid", "sorted", "block_shuffled")  # mirrors reqdedup.train.loader (numpy-free here)
USER_ENCODINGS = ("dedup", "per_row")


@dataclass
class DataConfig:
    train_start: str = "2026-01-01"
    train_end: str = "2026-01-01"
    buckets: list[int] | None = None
    order: str = "sorted"
    batch_rows: int = 1024


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


@dataclass
class DistConfig:
    nproc_per_node: int = 2
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


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
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise InputError(f"{source}: {key} = {value!r} is not a date YYYY-MM-DD") from None


def validate(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Refuse impossible values with a message naming the key."""
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise InputError(f"{source}: {key} {msg}")

    d, m, t, p = cfg.data, cfg.model, cfg.train, cfg.dist
    start, end = _date(d.train_start, "data.train_start", source), _date(d.train_end, "data.train_end", source)
    need(start <= end, "data.train_end", f"({end}) is before data.train_start ({start})")
    need(d.order in ORDERS, "data.order", f"must be one of {ORDERS}, got {d.order!r}")
    need(isinstance(d.batch_rows, int) and d.batch_rows >= 1, "data.batch_rows", f"must be an integer >= 1, got {d.batch_rows!r}")
    for key in ("items", "seq_len", "d_model", "n_layers", "n_heads", "ff_dim", "emb_dim"):
        value = getattr(m, key)
        need(isinstance(value, int) and value >= 1, f"model.{key}", f"must be an integer >= 1, got {value!r}")
    need(m.d_model % m.n_heads == 0, "model.n_heads", f"({m.n_heads}) must divide model.d_model ({m.d_model})")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout!r}")
    need(isinstance(t.epochs, int) and t.epochs >= 1, "train.epochs", f"must be an integer >= 1, got {t.epochs!r}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr!r}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay!r}")
    need(t.temperature > 0, "train.temperature", f"must be > 0, got {t.temperature!r}")
    need(t.user_encoding in USER_ENCODINGS, "train.user_encoding", f"must be one of {USER_ENCODINGS}, got {t.user_encoding!r}")
    need(t.mixed_precision in ("auto", "off"), "train.mixed_precision", f"must be 'auto' or 'off', got {t.mixed_precision!r}")
    need(isinstance(p.nproc_per_node, int) and p.nproc_per_node >= 1, "dist.nproc_per_node",
         f"must be an integer >= 1, got {p.nproc_per_node!r}")
    need(p.device in ("auto", "cpu", "cuda"), "dist.device", f"must be auto, cpu or cuda, got {p.device!r}")
    need(p.backend in ("auto", "gloo", "nccl"), "dist.backend", f"must be auto, gloo or nccl, got {p.backend!r}")
    if d.buckets is not None:
        need(all(isinstance(b, int) and b >= 0 for b in d.buckets), "data.buckets", "must be a list of bucket numbers >= 0")
    return cfg


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
