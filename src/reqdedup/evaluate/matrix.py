"""The experiment matrix: one YAML config -> every (config, seed) training run, evaluated on
later, held-out requests, in ONE torchrun launch (`reqdedup evaluate --config FILE`).

Config file (every key checked; an unknown key, config name or an empty evaluation split
raises InputError naming it)::

    name: demo
    data:   {train_start, train_end, eval_start, eval_end, buckets: null, batch_rows}
    model:  {...}                      # reqdedup.train.model.ModelConfig, the same for all runs
    train:  {epochs, lr, weight_decay, temperature, retrieval_weight}   # the same for all runs
    dist:   {nproc_per_node: 2, device: cpu, backend: auto}
    seeds:  [0, 1, 2]
    configs: [iid, sorted_naive, sorted_syncbn, sorted_masked, sorted_fixed]
    eval:   {k: 50, max_requests: null, batch_requests: 256}
    gate:   {tolerance: 0.005, metrics: [auc, recall]}
    mlflow: {experiment: null, enabled: true}
    reuse_checkpoints: true

The five configs differ ONLY in data order, user encoding and the two fixes (``CONFIGS``);
data, steps (epochs x batches) and model size are shared. Every run of one evaluation
lives under ``<checkpoints>/evaluation/<evaluation_id>/<config>-seed<k>/``; the evaluation
id is a content hash of the resolved training configs, the eval spec and fingerprints of the
train and eval data, so a rerun of the same evaluation finds its own runs. With
``reuse_checkpoints`` (default) a run whose final model.pt exists is not retrained (CPU
training is deterministic for a seed, so retraining would give the same weights); a run
killed mid-way resumes from its last epoch checkpoint; ``--retrain`` wipes them first.
A rerun reuses the same MLflow parent run and replaces the report. With
``mlflow.enabled: false`` nothing is logged to MLflow (for a GPU host without the tracking
store or the mlflow package): the report and summary are written as usual, and `register`
refuses such an evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.contract import BASELINE_CONFIG, CANDIDATE_CONFIG
from reqdedup.errors import InputError

# What each config changes; everything else is shared by the whole matrix.
CONFIGS: dict[str, dict] = {
    # today's row-level practice: rows shuffled, user tower run per row, plain BN,
    # in-batch negatives filtered by item id only ("accidental hits", as TFRS does)
    BASELINE_CONFIG: {"order": "iid", "user_encoding": "per_row", "sync_bn": False, "mask_same_user": False},
    # request-level + dedup, no fix ("request_level": the matrix's data.sorted_order)
    "sorted_naive": {"order": "request_level", "user_encoding": "dedup", "sync_bn": False, "mask_same_user": False},
    "sorted_syncbn": {"order": "request_level", "user_encoding": "dedup", "sync_bn": True, "mask_same_user": False},
    "sorted_masked": {"order": "request_level", "user_encoding": "dedup", "sync_bn": False, "mask_same_user": True},
    CANDIDATE_CONFIG: {"order": "request_level", "user_encoding": "dedup", "sync_bn": True, "mask_same_user": True},
}
BASELINE = BASELINE_CONFIG
CANDIDATE = CANDIDATE_CONFIG
PROCESS_TRAIN_KEYS = ("epochs", "lr", "weight_decay", "temperature", "retrieval_weight", "mixed_precision", "logq",
                      "logq_alpha", "mixed_negatives")


@dataclass
class MatrixData:
    train_start: str = ""
    train_end: str = ""
    eval_start: str = ""
    eval_end: str = ""
    buckets: list[int] | None = None
    batch_rows: int = 1024
    # order of the request-level configs: "request_shuffle" (whole requests shuffled in a
    # buffer of buffer_requests, null: all) or "table" (the table's order, every epoch the
    # same); the old names sorted / block_shuffled still work; see docs/evaluation.md
    sorted_order: str = "request_shuffle"
    buffer_requests: int | None = 4096
    buffer_rows: int | None = None  # the iid baseline's row buffer (null: a full shuffle)
    streams: int = 8
    workers: int = 1
    # side-table value columns every config trains and is evaluated with (docs/quality-and-features.md)
    feature_columns: list[str] = field(default_factory=list)


@dataclass
class EvalSpec:
    k: int = 50
    max_requests: int | None = None  # deterministic subset of eval requests (None: all)
    batch_requests: int = 256
    bootstrap: int = 200  # paired request-bootstrap replicates of the intervals vs iid
    curve_every_steps: int | None = None  # learning-curve points: every N steps (null: epoch ends)
    level: float = 0.95  # interval level


@dataclass
class GateSpec:
    tolerance: float = 0.005  # relative, on every gate metric
    metrics: list[str] = field(default_factory=lambda: ["auc", "recall"])


@dataclass
class MatrixConfig:
    name: str
    data: MatrixData
    model: dict
    train: dict
    dist: dict
    seeds: list[int]
    configs: list[str]
    eval: EvalSpec
    gate: GateSpec
    mlflow_experiment: str | None = None
    reuse_checkpoints: bool = True
    source: str = "config"
    mlflow_enabled: bool = True

    def gate_metrics(self) -> list[str]:
        return [resolve_metric(m, self.eval.k) for m in self.gate.metrics]

    def to_dict(self) -> dict:
        return {"name": self.name, "data": dataclasses.asdict(self.data), "model": self.model, "train": self.train,
                "dist": self.dist, "seeds": self.seeds, "configs": self.configs,
                "eval": dataclasses.asdict(self.eval), "gate": dataclasses.asdict(self.gate),
                "mlflow": {"experiment": self.mlflow_experiment, "enabled": self.mlflow_enabled},
                "reuse_checkpoints": self.reuse_checkpoints}


def resolve_metric(name: str, k: int) -> str:
    """'recall' / 'ndcg' -> 'recall@K' / 'ndcg@K' for the configured K; others unchanged."""
    return f"{name}@{k}" if name in ("recall", "ndcg") else name


GATE_METRICS = ("auc", "log_loss", "recall", "ndcg")
_TOP = {"name", "data", "model", "train", "dist", "seeds", "configs", "eval", "gate", "mlflow", "reuse_checkpoints"}


def _mapping(raw, key: str, source: str, known: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: {key!r} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; "
                         f"known keys of {key!r}: {', '.join(sorted(known))}")
    return dict(raw)


def parse_matrix(raw: dict, source: str = "config") -> MatrixConfig:
    """Strictly check a matrix config mapping; InputError names the offending key."""
    from reqdedup.train.config import _date
    if not isinstance(raw, dict):
        raise InputError(f"{source}: an evaluation config must be a mapping")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP))}")
    fields_of = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    data = MatrixData(**_mapping(raw.get("data"), "data", source, fields_of(MatrixData)))
    for key in ("train_start", "train_end", "eval_start", "eval_end"):
        if not getattr(data, key):
            raise InputError(f"{source}: data.{key} is required")
    ts, te = _date(data.train_start, "data.train_start", source), _date(data.train_end, "data.train_end", source)
    es, ee = _date(data.eval_start, "data.eval_start", source), _date(data.eval_end, "data.eval_end", source)
    if ts > te:
        raise InputError(f"{source}: data.train_end ({te}) is before data.train_start ({ts})")
    if es > ee:
        raise InputError(f"{source}: data.eval_end ({ee}) is before data.eval_start ({es})")
    if es <= te:
        raise InputError(f"{source}: the evaluation split must be LATER than the training data: "
                         f"data.eval_start ({es}) <= data.train_end ({te})")
    data.train_start, data.train_end, data.eval_start, data.eval_end = map(str, (ts, te, es, ee))
    if data.sorted_order not in ("table", "request_shuffle", "sorted", "block_shuffled"):
        raise InputError(f"{source}: data.sorted_order must be 'request_shuffle' or 'table' (old names: sorted = "
                         f"table, block_shuffled = request_shuffle with buffer_requests null), got {data.sorted_order!r}")
    if not isinstance(data.batch_rows, int) or data.batch_rows < 1:
        raise InputError(f"{source}: data.batch_rows must be an integer >= 1, got {data.batch_rows!r}")

    from reqdedup.train.config import TrainSection

    train_known = set(PROCESS_TRAIN_KEYS)
    train = _mapping(raw.get("train"), "train", source, train_known)
    for k in ("seed", "order", "user_encoding", "sync_bn", "mask_same_user"):
        if k in (raw.get("train") or {}):
            raise InputError(f"{source}: train.{k} is set per config/seed by the matrix, not in the file")
    assert train_known <= {f.name for f in dataclasses.fields(TrainSection)}
    from reqdedup.train.config import DistConfig

    dist = _mapping(raw.get("dist"), "dist", source, {f.name for f in dataclasses.fields(DistConfig)})
    model = _mapping(raw.get("model"), "model", source, _model_keys())

    seeds = raw.get("seeds", [0, 1, 2])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise InputError(f"{source}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    configs = raw.get("configs", list(CONFIGS))
    if not isinstance(configs, list) or not configs:
        raise InputError(f"{source}: configs must be a non-empty list of config names ({', '.join(CONFIGS)})")
    for c in configs:
        if c not in CONFIGS:
            raise InputError(f"{source}: unknown config {c!r} in configs; known: {', '.join(CONFIGS)}")
    if len(set(configs)) != len(configs):
        raise InputError(f"{source}: configs lists a name twice: {configs}")
    if BASELINE not in configs:
        raise InputError(f"{source}: configs must include the baseline {BASELINE!r}")

    ev = EvalSpec(**_mapping(raw.get("eval"), "eval", source, fields_of(EvalSpec)))
    if not isinstance(ev.k, int) or ev.k < 1:
        raise InputError(f"{source}: eval.k must be an integer >= 1, got {ev.k!r}")
    if ev.max_requests is not None and (not isinstance(ev.max_requests, int) or ev.max_requests < 1):
        raise InputError(f"{source}: eval.max_requests must be null or an integer >= 1, got {ev.max_requests!r}")
    if not isinstance(ev.batch_requests, int) or ev.batch_requests < 1:
        raise InputError(f"{source}: eval.batch_requests must be an integer >= 1, got {ev.batch_requests!r}")
    if ev.curve_every_steps is not None and (not isinstance(ev.curve_every_steps, int) or ev.curve_every_steps < 1):
        raise InputError(f"{source}: eval.curve_every_steps must be null or an integer >= 1, got {ev.curve_every_steps!r}")
    if not isinstance(ev.bootstrap, int) or isinstance(ev.bootstrap, bool) or ev.bootstrap < 2:
        raise InputError(f"{source}: eval.bootstrap must be an integer >= 2, got {ev.bootstrap!r}")
    if isinstance(ev.level, bool) or not isinstance(ev.level, (int, float)) or not 0 < ev.level < 1:
        raise InputError(f"{source}: eval.level must be in (0, 1), e.g. 0.95, got {ev.level!r}")
    gate = GateSpec(**_mapping(raw.get("gate"), "gate", source, fields_of(GateSpec)))
    check_tolerance(gate.tolerance, f"{source}: gate.tolerance")
    if not isinstance(gate.metrics, list) or not gate.metrics or any(m not in GATE_METRICS for m in gate.metrics):
        raise InputError(f"{source}: gate.metrics must be a non-empty list of {', '.join(GATE_METRICS)}, got {gate.metrics!r}")
    ml = _mapping(raw.get("mlflow"), "mlflow", source, {"experiment", "enabled"})
    if not isinstance(ml.get("enabled", True), bool):
        raise InputError(f"{source}: mlflow.enabled must be true or false, got {ml['enabled']!r}")
    reuse = raw.get("reuse_checkpoints", True)
    if not isinstance(reuse, bool):
        raise InputError(f"{source}: reuse_checkpoints must be true or false, got {reuse!r}")
    name = str(raw.get("name", "evaluation"))
    if not name or "/" in name:
        raise InputError(f"{source}: name must be a non-empty string without '/', got {name!r}")
    cfg = MatrixConfig(name=name, data=data, model=model, train=train, dist=dist, seeds=list(seeds), configs=list(configs),
                       eval=ev, gate=gate, mlflow_experiment=ml.get("experiment"), reuse_checkpoints=reuse, source=source,
                       mlflow_enabled=ml.get("enabled", True))
    # Every run's TrainConfig is built (and so checked) now, before anything starts.
    for c in cfg.configs:
        train_config(cfg, c, cfg.seeds[0], run_dir="/unused")
    return cfg


def check_tolerance(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"{what} must be a relative tolerance in [0, 1), e.g. 0.005 for 0.5%, got {value!r}")
    return float(value)


def _model_keys() -> set[str]:
    from reqdedup.train.model import ModelConfig

    return {f.name for f in dataclasses.fields(ModelConfig)}


def train_config(cfg: MatrixConfig, config: str, seed: int, run_dir: str | Path, parent_run_id: str | None = None,
                 evaluation_id: str | None = None):
    """The strict TrainConfig of one (config, seed) run of the matrix."""
    from reqdedup.train.config import config_from_dict

    if config not in CONFIGS:
        raise InputError(f"unknown config {config!r}; known: {', '.join(CONFIGS)}")
    spec = CONFIGS[config]
    raw = {
        "name": f"{cfg.name}.{config}.seed{seed}",
        "data": {"train_start": cfg.data.train_start, "train_end": cfg.data.train_end, "buckets": cfg.data.buckets,
                 "order": spec["order"] if spec["order"] == "iid" else cfg.data.sorted_order,
                 "batch_rows": cfg.data.batch_rows, "buffer_requests": cfg.data.buffer_requests,
                 "buffer_rows": cfg.data.buffer_rows, "streams": cfg.data.streams, "workers": cfg.data.workers,
                 "feature_columns": list(cfg.data.feature_columns)},
        "model": copy.deepcopy(cfg.model),
        "train": {**cfg.train, "seed": seed, "user_encoding": spec["user_encoding"], "sync_bn": spec["sync_bn"],
                  "mask_same_user": spec["mask_same_user"], "mask_same_item": True},
        "dist": dict(cfg.dist),
        "output": {"run_dir": str(run_dir)},
        "mlflow": {"enabled": cfg.mlflow_enabled, "experiment": cfg.mlflow_experiment, "parent_run_id": parent_run_id,
                   "tags": {"reqdedup.stage": "evaluation_run", "reqdedup.config": config, "reqdedup.seed": str(seed),
                            **({"reqdedup.evaluation_id": evaluation_id} if evaluation_id else {})}},
    }
    return config_from_dict(raw, f"{cfg.source} [{config}, seed {seed}]")


def load_matrix(path: str | Path, overrides: list[str] | None = None) -> MatrixConfig:
    """Read a matrix YAML; ``overrides`` are ``section.key=value`` strings (value parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"evaluation config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: an evaluation config must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return parse_matrix(raw, str(path))


# ---------------------------------------------------------------------------------------
# data fingerprints
# ---------------------------------------------------------------------------------------
def data_fingerprint(start: str, end: str, buckets, settings: Settings, what: str) -> dict:
    """Rows, requests, positives and a content hash of (request_id, item_id, label) of a date
    range of the lake, read in the read path's deterministic order. Empty -> InputError."""
    import numpy as np

    from reqdedup.lake.read import read_request_batches

    h = hashlib.sha256(f"{start}|{end}|{buckets}".encode())
    rows = positives = 0
    requests = set()
    try:
        batches = read_request_batches(start, end, buckets=buckets, columns=["request_id", "item_id", "label"],
                                       batch_rows=262144, settings=settings)
        for b in batches:
            rid = b.column("request_id").to_numpy()
            lab = b.column("label").to_numpy()
            h.update(rid.tobytes())
            h.update(b.column("item_id").to_numpy().tobytes())
            h.update(lab.tobytes())
            rows += b.num_rows
            positives += int((lab > 0).sum())
            requests.update(np.unique(rid).tolist())
    except InputError:
        raise
    except Exception as e:  # no table yet, catalog missing...
        raise InputError(f"cannot read the {what} split {start}..{end} from the lake: {type(e).__name__}: {e}") from None
    where = f"{start}..{end}" + ("" if buckets is None else f" (buckets {list(buckets)})")
    if rows == 0:
        raise InputError(f"the {what} split {where} is empty: no rows in the impressions table "
                         f"(generate and ingest those dates first)")
    if positives == 0:
        raise InputError(f"the {what} split {where} has no engaged rows (label 1): nothing to evaluate")
    return {"start": start, "end": end, "buckets": buckets, "rows": rows, "requests": len(requests),
            "positives": positives, "id": h.hexdigest()[:16]}


def evaluation_id(cfg: MatrixConfig, train_fp: dict, eval_fp: dict) -> str:
    """Content hash: same training configs, seeds, eval spec and data -> same id."""
    runs = {f"{c}/{s}": _comparable(train_config(cfg, c, s, run_dir="-")) for c in cfg.configs for s in cfg.seeds}
    payload = {"runs": runs, "eval": dataclasses.asdict(cfg.eval), "train_data": train_fp["id"],
               "eval_data": eval_fp["id"]}
    return "ev-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _comparable(tc) -> dict:
    d = tc.to_dict()
    d.pop("output", None)
    d.pop("mlflow", None)
    d.pop("name", None)
    # Where the ranks run is not what they compute: only the world size enters the id, as
    # nproc_per_node of one node (so a one-node config keeps the id it had before the
    # multi-node keys existed, and 2 nodes x 1 process is the evaluation of 1 node x 2).
    dist = d.get("dist") or {}
    dist.pop("node_rank", None)
    dist.pop("rdzv_endpoint", None)
    dist["nproc_per_node"] = dist.get("nproc_per_node", 1) * dist.pop("nnodes", 1)
    return d


def run_dir_of(settings: Settings, eval_id: str, config: str, seed: int) -> Path:
    return settings.checkpoints_dir / "evaluation" / eval_id / f"{config}-seed{seed}"


# ---------------------------------------------------------------------------------------
# MLflow parent run
# ---------------------------------------------------------------------------------------
def _parent_run(client, exp_id: str, cfg: MatrixConfig, eval_id: str, tags: dict) -> str:
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`reqdedup.evaluation_id` = '{eval_id}' and tags.`reqdedup.stage` = 'evaluation'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=f"evaluation {cfg.name}", tags=tags)
    return run.info.run_id


def torchrun_command(plan_path: Path, nproc: int, dist: dict | None = None, rdzv_id: str = "reqdedup") -> list[str]:
    from reqdedup.train.launch import torchrun_args

    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(dist or {}, nproc, rdzv_id),
            "-m", "reqdedup.evaluate.matrix_worker", "--plan", str(plan_path)]


def _join_as_other_node(cfg: MatrixConfig, settings: Settings, extra_env: dict | None, plan_wait_s: float) -> dict:
    """dist.node_rank > 0: run this node's torchrun processes on the plan node 0 wrote (the
    MLflow parent run, the report and the summary are node 0's)."""
    from reqdedup.train.launch import rdzv_id_of

    train_fp = data_fingerprint(cfg.data.train_start, cfg.data.train_end, cfg.data.buckets, settings, "training")
    eval_fp = data_fingerprint(cfg.data.eval_start, cfg.data.eval_end, cfg.data.buckets, settings, "evaluation")
    eval_id = evaluation_id(cfg, train_fp, eval_fp)
    plan_path = settings.checkpoints_dir / "evaluation" / eval_id / "plan.json"
    deadline = time.monotonic() + plan_wait_s
    while not plan_path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"evaluation {cfg.name} ({eval_id}), node {cfg.dist['node_rank']}: node 0 wrote no "
                               f"{plan_path} within {plan_wait_s:.0f} s (is checkpoints_dir shared by the nodes?)")
        time.sleep(0.5)
    nproc = int(cfg.dist.get("nproc_per_node", 2))
    env = {**os.environ, **settings.as_env(), **(extra_env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.run(torchrun_command(plan_path, nproc, cfg.dist, rdzv_id_of("evaluate", eval_id)), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation {cfg.name} ({eval_id}), node {cfg.dist['node_rank']}: torchrun exited with "
                           f"{proc.returncode} (the log is above)")
    return {"evaluation_id": eval_id, "node_rank": cfg.dist["node_rank"], "nnodes": cfg.dist["nnodes"],
            "status": "joined"}


def report_dir_default(settings: Settings) -> Path:
    return settings.reports_dir / "evaluation"


def run_evaluation(config: str | Path | MatrixConfig, settings: Settings | None = None, *, overrides=None,
                   retrain: bool = False, report_dir: str | Path | None = None, extra_env: dict | None = None,
                   plan_wait_s: float = 900.0) -> dict:
    """Train and evaluate the whole matrix (one torchrun launch), write the report, log it to
    MLflow; returns the summary. A failure leaves a summary with status 'failed' (so
    `register` refuses it) and raises. With ``dist.nnodes > 1`` every node calls this with its
    own ``dist.node_rank``: node 0 does all of the above, the others wait (``plan_wait_s``) for
    node 0's plan in the shared checkpoints folder and join its torchrun rendezvous."""
    from reqdedup.evaluate import report as report_mod
    from reqdedup.registry.tracking import init_tracking
    from reqdedup.train.launch import rdzv_id_of

    settings = settings or get_settings()
    cfg = config if isinstance(config, MatrixConfig) else load_matrix(config, overrides)
    if int(cfg.dist.get("node_rank", 0)) > 0:
        return _join_as_other_node(cfg, settings, extra_env, plan_wait_s)
    out_dir = Path(report_dir) if report_dir else report_dir_default(settings)
    t0 = time.perf_counter()

    # Check what can be checked before anything starts: the MLflow store, then both splits.
    exp_id = init_tracking(settings, cfg.mlflow_experiment) if cfg.mlflow_enabled else None
    train_fp = data_fingerprint(cfg.data.train_start, cfg.data.train_end, cfg.data.buckets, settings, "training")
    eval_fp = data_fingerprint(cfg.data.eval_start, cfg.data.eval_end, cfg.data.buckets, settings, "evaluation")
    eval_id = evaluation_id(cfg, train_fp, eval_fp)
    eval_set_id = "es-" + eval_fp["id"] + f"-k{cfg.eval.k}" + (f"-n{cfg.eval.max_requests}" if cfg.eval.max_requests else "")

    client = parent_id = None
    if cfg.mlflow_enabled:
        from mlflow import MlflowClient

        client = MlflowClient(settings.mlflow_tracking_uri)
        parent_tags = {"reqdedup.stage": "evaluation", "reqdedup.evaluation_id": eval_id,
                       "reqdedup.eval_set_id": eval_set_id, "reqdedup.evaluation_name": cfg.name}
        parent_id = _parent_run(client, exp_id, cfg, eval_id, parent_tags)
    base = settings.checkpoints_dir / "evaluation" / eval_id
    runs = []
    for c in cfg.configs:
        for s in cfg.seeds:
            rd = run_dir_of(settings, eval_id, c, s)
            if retrain and rd.exists():
                shutil.rmtree(rd)
            tc = train_config(cfg, c, s, rd, parent_run_id=parent_id, evaluation_id=eval_id)
            runs.append({"config": c, "seed": s, "run_dir": str(rd), "train_config": tc.to_dict()})
    plan = {"evaluation_id": eval_id, "eval_set_id": eval_set_id, "name": cfg.name, "parent_run_id": parent_id,
            "experiment_id": exp_id, "experiment": cfg.mlflow_experiment, "reuse": cfg.reuse_checkpoints and not retrain,
            "eval": {**dataclasses.asdict(cfg.eval), "start": cfg.data.eval_start, "end": cfg.data.eval_end,
                     "buckets": cfg.data.buckets},
            "runs": runs}
    base.mkdir(parents=True, exist_ok=True)
    plan_path = base / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    if client is not None:
        client.log_dict(parent_id, cfg.to_dict(), "evaluation_config.json")
        for k, v in {"evaluation_id": eval_id, "eval_set_id": eval_set_id, "configs": ",".join(cfg.configs),
                     "seeds": ",".join(map(str, cfg.seeds)), "train_rows": train_fp["rows"], "eval_rows": eval_fp["rows"],
                     "eval_requests": eval_fp["requests"], "batch_rows": cfg.data.batch_rows,
                     "epochs": cfg.train.get("epochs", "default"), "k": cfg.eval.k}.items():
            try:
                client.log_param(parent_id, k, v)
            except Exception:  # a rerun logs the same params again; MLflow refuses a changed value
                pass

    nproc = int(cfg.dist.get("nproc_per_node", 2))
    env = {**os.environ, **settings.as_env(), **(extra_env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"[evaluate] {cfg.name}: {len(runs)} runs ({len(cfg.configs)} configs x {len(cfg.seeds)} seeds), "
          f"evaluation {eval_id}, " + (f"MLflow parent run {parent_id}" if client else "MLflow off (report files only)"),
          flush=True)
    t_launch = time.perf_counter()
    proc = subprocess.run(torchrun_command(plan_path, nproc, cfg.dist, rdzv_id_of("evaluate", eval_id)), env=env)
    launch_seconds = time.perf_counter() - t_launch
    base_summary = {"evaluation_id": eval_id, "eval_set_id": eval_set_id, "name": cfg.name, "parent_run_id": parent_id,
                    "experiment_id": exp_id, "tracking_uri": settings.mlflow_tracking_uri, "config": cfg.to_dict(),
                    "config_source": cfg.source, "train_data": train_fp, "eval_data": eval_fp,
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    results, missing = [], []
    for r in runs:
        path = Path(r["run_dir"]) / "eval.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:
            missing.append(f"{r['config']}/seed{r['seed']}")
    if proc.returncode != 0 or missing:
        why = (f"torchrun exited with {proc.returncode}" if proc.returncode != 0 else "") + \
              (f"; runs without results: {', '.join(missing)}" if missing else "")
        summary = {**base_summary, "status": "failed", "error": why.strip("; "), "runs": results}
        report_mod.write_failed(summary, out_dir)
        if client is not None:
            client.set_tag(parent_id, "reqdedup.status", "failed")
            client.set_tag(parent_id, "reqdedup.error", summary["error"][:5000])
            client.set_terminated(parent_id, status="FAILED")
        raise RuntimeError(f"evaluation {cfg.name} ({eval_id}) failed: {summary['error']} (the log is above); "
                           f"nothing can be registered from it")
    summary = {**base_summary, "status": "succeeded", "runs": results, "pool_items": results[0].get("pool_items"),
               "aggregate": report_mod.add_intervals(report_mod.aggregate(results, cfg.configs), results,
                                                     n_boot=cfg.eval.bootstrap, level=cfg.eval.level), "gate": {
                   "tolerance": cfg.gate.tolerance, "metrics": cfg.gate_metrics()},
               "timing": {"torchrun_seconds": round(launch_seconds, 1),
                          "total_seconds": round(time.perf_counter() - t0, 1)}}
    paths = report_mod.write_report(summary, out_dir)
    if client is not None:
        for p in paths:
            client.log_artifact(parent_id, str(p), artifact_path="report" if p.suffix != ".png" else "report/plots")
        for c, metrics in summary["aggregate"]["configs"].items():
            for m, st in metrics.items():
                if st.get("mean") is not None and st["mean"] == st["mean"]:
                    client.log_metric(parent_id, f"{c}.{m.replace('@', '_at_')}.mean", st["mean"])
        client.set_tag(parent_id, "reqdedup.status", "succeeded")
        client.set_tag(parent_id, "reqdedup.report_dir", str(out_dir))
        client.set_terminated(parent_id, status="FINISHED")
    print(f"[evaluate] {cfg.name}: done in {summary['timing']['total_seconds']} s; report {out_dir / report_mod.TABLE}",
          flush=True)
    return summary
