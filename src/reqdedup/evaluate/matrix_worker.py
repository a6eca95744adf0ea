"""One torchrun process of the evaluation matrix (`reqdedup evaluate` launches it).

torchrun start-up and imports cost many seconds on a small CPU box, so the whole matrix runs
in one launch: the process group is created once, then for every (config, seed) run of the
plan this process calls `reqdedup.train.worker.train` (which leaves a group it did not create
alone) and evaluates the final model on the held-out split, sharded by request across ranks.
Rank 0 gathers the shards, writes ``<run_dir>/eval.json`` and logs the metrics to the run's
nested MLflow run.

Every run streams its training data through the request-level reader
(`reqdedup.train.reader`); the evaluation batches are built once per process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from reqdedup.evaluate import metrics as M
from reqdedup.train.worker import FINAL_MODEL, METRICS, MLFLOW_RUN_ID

EVAL_JSON = "eval.json"
# Test hook: make the run of this config fail (a failed evaluation must never register).
FAIL_CONFIG_ENV = "REQDEDUP_EVAL_FAIL_CONFIG"


# ---------------------------------------------------------------------------------------
# evaluation data
# ---------------------------------------------------------------------------------------
class EvalData:
    """This rank's share of the eval requests as RequestBatches, plus the candidate pool
    (every distinct item of the whole eval split, with its features)."""

    def __init__(self, spec: dict, settings, seq_len: int, rank: int, world: int,
                 feature_columns: list[str] | tuple = ()):
        import pyarrow as pa

        from reqdedup.train.loader import TRAIN_COLUMNS, arrow_to_request_batch, request_blocks

        read = dict(buckets=spec.get("buckets"), columns=list(TRAIN_COLUMNS), batch_rows=262144, settings=settings)
        if feature_columns:  # the model was trained with side-table columns: the eval rows carry them too
            from reqdedup.lake.features import read_request_batches_with_features, resolve_feature_columns

            tables = [feature.name for feature, _ in resolve_feature_columns(feature_columns, settings)]
            batches = read_request_batches_with_features(spec["start"], spec["end"], features=tables, **read)
        else:
            from reqdedup.lake.read import read_request_batches

            batches = read_request_batches(spec["start"], spec["end"], **read)
        table = pa.Table.from_batches(list(batches))
        item_ids = table.column("item_id").to_numpy().astype(np.int64)
        pool_ids, first = np.unique(item_ids, return_index=True)
        first_rows = table.take(pa.array(first))
        from reqdedup.train.loader import _fixed_list

        self.pool_ids = pool_ids
        self.pool_item = torch.from_numpy(pool_ids)
        self.pool_category = torch.from_numpy(first_rows.column("item_category").to_numpy().astype(np.int64))
        from reqdedup.train.batch import ITEM_DENSE_DIM

        self.pool_dense = _fixed_list(first_rows.column("item_dense"), ITEM_DENSE_DIM, "item_dense")

        starts, ends = request_blocks(table.column("request_id").to_numpy())
        blocks = np.arange(starts.size)
        if spec.get("max_requests") and spec["max_requests"] < blocks.size:
            rng = np.random.default_rng(0)
            blocks = np.sort(rng.choice(blocks, size=spec["max_requests"], replace=False))
        self.total_requests = int(blocks.size)
        mine = blocks[rank::world]
        self.batches = []
        # per batch: each request's position among the evaluation's requests (0..total-1),
        # the index the paired bootstrap resamples
        self.batch_request_index = []
        position = np.empty(starts.size, np.int64)
        position[blocks] = np.arange(blocks.size)
        step = int(spec.get("batch_requests", 256))
        for i in range(0, mine.size, step):
            chunk = mine[i:i + step]
            self.batch_request_index.append(position[chunk])
            idx = np.concatenate([np.arange(starts[b], ends[b]) for b in chunk])
            rows = table.take(pa.array(idx))
            batch = arrow_to_request_batch(rows, seq_len, check=False, feature_columns=feature_columns)
            self.batches.append(batch)
        self.rows = sum(b.num_rows for b in self.batches)


def pool_index(pool_ids: np.ndarray, item_ids: torch.Tensor) -> torch.Tensor:
    idx = np.searchsorted(pool_ids, item_ids.numpy())
    return torch.from_numpy(idx.astype(np.int64))


def ranks_torch(scores: torch.Tensor, target: torch.Tensor, exclude_rows: torch.Tensor | None = None,
                exclude_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Same rule as `metrics.retrieval_ranks` (pessimistic ties, filtered entries left out),
    in torch and with the exclusions given as (row, col) pairs instead of a dense mask."""
    rows = torch.arange(target.numel(), device=scores.device)
    true = scores[rows, target]
    beats = scores >= true[:, None]
    beats[rows, target] = False
    if exclude_rows is not None and exclude_rows.numel():
        beats[exclude_rows, exclude_cols] = False
    return 1 + beats.sum(dim=1)


@torch.no_grad()
def evaluate_shard(model, data: EvalData) -> dict:
    """Logits and labels of this rank's eval rows; ranks of its engaged (request, item) pairs
    among the pool by user_emb . item_emb (the request's other engaged items filtered out)."""
    model.eval()
    pool_emb = model.item_tower(data.pool_item, data.pool_category, data.pool_dense)
    logits, labels, ranks, row_req, rank_req = [], [], [], [], []
    index = getattr(data, "batch_request_index", None)
    for b, batch in enumerate(data.batches):
        scored = model.score_candidates(batch, mode="dedup")  # two-tower or crossing ranker
        M.check_finite(scored["logit"].float(), "evaluation logits")
        user = scored["user_emb"]
        logits.append(scored["logit"].float())
        labels.append(batch.label)
        where = index[b] if index is not None else np.arange(batch.num_requests)
        row_req.append(where[batch.row_request.numpy()])
        pos = torch.nonzero(batch.label > 0.5).squeeze(1)
        if pos.numel() == 0:
            continue
        req = batch.row_request[pos]
        rank_req.append(where[req.numpy()])
        target = pool_index(data.pool_ids, batch.item_id[pos])
        scores = user[req] @ pool_emb.T  # [P, M]
        M.check_finite(scores, "evaluation retrieval scores (user . item)")
        # other engaged items of the same request: (query p, pool column of positive q), q != p
        same = (req[:, None] == req[None, :]) & ~torch.eye(pos.numel(), dtype=torch.bool)
        qi, qj = torch.nonzero(same, as_tuple=True)
        ranks.append(ranks_torch(scores, target, qi, target[qj]))
    return {"logits": torch.cat(logits).numpy(), "labels": torch.cat(labels).numpy(),
            "ranks": torch.cat(ranks).numpy() if ranks else np.zeros(0, np.int64),
            "row_request": np.concatenate(row_req) if row_req else np.zeros(0, np.int64),
            "rank_request": np.concatenate(rank_req) if rank_req else np.zeros(0, np.int64)}



EVAL_ARRAYS = M.EVAL_ARRAYS


def combine(parts: list[dict], k: int) -> dict:
    logits = np.concatenate([p["logits"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    ranks = np.concatenate([p["ranks"] for p in parts])
    out = {"auc": M.roc_auc(labels, logits), "log_loss": M.log_loss(labels, logits),
           "eval_rows": int(labels.size), "eval_positives": int(ranks.size)}
    out[f"recall@{k}"] = M.recall_at_k(ranks, k) if ranks.size else float("nan")
    out[f"ndcg@{k}"] = M.ndcg_at_k(ranks, k) if ranks.size else float("nan")
    out["mean_rank"] = float(ranks.mean()) if ranks.size else float("nan")
    return out


CURVE_JSON = "curve.json"


class LearningCurve:
    """Progress hook of `train`: the eval metrics at points of training, against training rows
    seen and training seconds. Every rank scores its shard; rank 0 combines, appends to
    ``curve.json`` and logs MLflow step metrics (step = rows seen): ``curve.auc``,
    ``curve.recall_at_K``, ... and ``curve.train_seconds``. Diagnostic only: nothing is
    selected on it (the eval split is the test set)."""

    def __init__(self, data: EvalData, k: int, path: Path, client, run_id: str | None, rank: int, world: int):
        self.data, self.k, self.path, self.client, self.run_id = data, k, path, client, run_id
        self.rank, self.world = rank, world
        self.points: list[dict] = []
        if rank == 0 and path.exists():  # a resumed run keeps its earlier points
            self.points = json.loads(path.read_text())

    def __call__(self, model, rows_seen: int, train_seconds: float, epoch: int) -> None:
        device = next(model.parameters()).device
        was = model.training
        cpu = model if device.type == "cpu" else copy_to_cpu(model)
        part = evaluate_shard(cpu, self.data)
        model.train(was)
        parts = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(parts, part)
        else:
            parts = [part]
        if self.rank != 0:
            return
        m = combine(parts, self.k)
        point = {"rows": int(rows_seen), "train_seconds": float(train_seconds), "epoch": int(epoch),
                 **{key: m[key] for key in ("auc", "log_loss", f"recall@{self.k}", f"ndcg@{self.k}")}}
        self.points = [p for p in self.points if p["rows"] < point["rows"]] + [point]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.points, indent=1))
        os.replace(tmp, self.path)
        if self.client is not None and self.run_id:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(f"curve.{key.replace('@', '_at_')}", float(v), now, int(rows_seen))
                for key, v in point.items() if key not in ("rows", "epoch") and v == v])


def copy_to_cpu(model):
    import copy

    return copy.deepcopy(model).to("cpu")


def load_model(run_dir: Path):
    """The run's final model (`reqdedup.train.model.load_model`: weights-only load)."""
    from reqdedup.train.model import load_model as load_checkpoint_model

    return load_checkpoint_model(run_dir / FINAL_MODEL, map_location="cpu")


# ---------------------------------------------------------------------------------------
# MLflow (rank 0)
# ---------------------------------------------------------------------------------------
def ensure_nested_run(client, plan: dict, run: dict, cfg) -> str:
    """The (config, seed) run nested under the evaluation's parent run: reused when the run
    folder names one that exists under this parent, created otherwise. Its id is written to
    ``run_dir/mlflow_run_id`` so `train` resumes (logs into) it."""
    run_dir = Path(run["run_dir"])
    id_file = run_dir / MLFLOW_RUN_ID
    if id_file.exists():
        try:
            found = client.get_run(id_file.read_text().strip())
            if found.data.tags.get("mlflow.parentRunId") == plan["parent_run_id"]:
                return found.info.run_id
        except Exception:  # the store was reset: a new nested run below
            pass
    tags = {"mlflow.parentRunId": plan["parent_run_id"], **cfg.mlflow.tags}
    created = client.create_run(plan["experiment_id"], run_name=f"{run['config']} seed {run['seed']}", tags=tags)
    rid = created.info.run_id
    for key, value in cfg.flat_params().items():
        client.log_param(rid, key, json.dumps(value) if isinstance(value, (list, dict)) else value)
    id_file.write_text(rid)
    return rid


def _complete(run_dir: Path, epochs: int) -> dict | None:
    try:
        m = json.loads((run_dir / METRICS).read_text())
    except (OSError, ValueError):
        return None
    if (run_dir / FINAL_MODEL).exists() and len(m.get("history", [])) == epochs:
        return m
    return None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="evaluation matrix worker (use `reqdedup evaluate`)")
    parser.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())

    from reqdedup.config import get_settings
    from reqdedup.train.config import config_from_dict
    from reqdedup.train.worker import resolve_device, train

    settings = get_settings()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cfgs = [config_from_dict(r["train_config"], f"plan {r['config']}/seed{r['seed']}") for r in plan["runs"]]
    device = resolve_device(cfgs[0], local_rank)
    if world > 1 and not dist.is_initialized():
        backend = cfgs[0].dist.backend
        dist.init_process_group(backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo"))
    client = None  # MLflow client on rank 0, unless the evaluation runs with mlflow.enabled false
    if rank == 0 and plan.get("parent_run_id"):
        from mlflow import MlflowClient

        from reqdedup.registry.tracking import init_tracking

        init_tracking(settings, plan.get("experiment"))
        client = MlflowClient(settings.mlflow_tracking_uri)

    spec = plan["eval"]
    t0 = time.perf_counter()
    data = EvalData(spec, settings, cfgs[0].model.seq_len, rank, world, feature_columns=cfgs[0].data.feature_columns)
    if rank == 0:
        print(f"[evaluate] eval split {spec['start']}..{spec['end']}: {data.total_requests} requests, "
              f"{data.pool_ids.size} pool items, read in {time.perf_counter() - t0:.1f} s", flush=True)
    fail_config = os.environ.get(FAIL_CONFIG_ENV)
    for run, cfg in zip(plan["runs"], cfgs):
        run_dir = Path(run["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = ensure_nested_run(client, plan, run, cfg) if client is not None else None
        if world > 1:
            dist.barrier()
        if fail_config and fail_config == run["config"]:
            raise RuntimeError(f"{FAIL_CONFIG_ENV}={fail_config}: failing this run on purpose (test hook)")
        done = _complete(run_dir, cfg.train.epochs) if plan.get("reuse", True) else None
        t_train = time.perf_counter()
        if done is not None:
            train_metrics = done
            if rank == 0:
                print(f"[evaluate] {run['config']} seed {run['seed']}: reusing the trained model in {run_dir}", flush=True)
        else:
            curve_hook = LearningCurve(data, spec["k"], run_dir / CURVE_JSON, client, run_id, rank, world)
            train_metrics = train(cfg, settings, progress=curve_hook, progress_every_steps=spec.get("curve_every_steps"))
        if world > 1:
            dist.barrier()
        train_metrics = json.loads((run_dir / METRICS).read_text())
        train_wall = time.perf_counter() - t_train

        eval_key = hashlib.sha256(json.dumps([plan["eval_set_id"], spec, _file_digest(run_dir / FINAL_MODEL)],
                                             sort_keys=True).encode()).hexdigest()[:16]
        cached = None
        if plan.get("reuse", True) and (run_dir / EVAL_JSON).exists() and (run_dir / EVAL_ARRAYS).exists():
            prev = json.loads((run_dir / EVAL_JSON).read_text())
            if prev.get("eval_key") == eval_key:
                cached = prev
        t_eval = time.perf_counter()
        if cached is None:
            model = load_model(run_dir)
            part = evaluate_shard(model, data)
            parts = [None] * world
            if world > 1:
                dist.all_gather_object(parts, part)
            else:
                parts = [part]
        if rank == 0:
            if cached is None:
                M.save_eval_arrays(parts, data.total_requests, run_dir / EVAL_ARRAYS)
                eval_metrics = combine(parts, spec["k"])
                eval_metrics["eval_seconds"] = time.perf_counter() - t_eval
                figures = M.training_figures(train_metrics)
                result = {"config": run["config"], "seed": run["seed"], "run_dir": str(run_dir),
                          "model_path": str(run_dir / FINAL_MODEL), "mlflow_run_id": run_id,
                          "evaluation_id": plan["evaluation_id"], "eval_set_id": plan["eval_set_id"],
                          "eval_key": eval_key, "pool_items": int(data.pool_ids.size), "metrics": {**eval_metrics, **figures},
                          "train_wall_seconds": train_wall}
            else:
                result = {**cached, "mlflow_run_id": run_id}
            if (run_dir / CURVE_JSON).exists():
                result["curve"] = json.loads((run_dir / CURVE_JSON).read_text())
            tmp = run_dir / (EVAL_JSON + ".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, run_dir / EVAL_JSON)
            logged = {k.replace("@", "_at_"): v for k, v in result["metrics"].items()
                      if isinstance(v, (int, float)) and v == v}
            if client is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(f"eval.{k}", float(v), now, 0) for k, v in logged.items()])
                client.set_tag(run_id, "reqdedup.eval_set_id", plan["eval_set_id"])
                client.set_terminated(run_id, status="FINISHED")
            m, k = result["metrics"], spec["k"]
            print(f"[evaluate] {run['config']} seed {run['seed']}: auc {m['auc']:.4f} logloss {m['log_loss']:.4f} "
                  f"recall@{k} {m['recall@%d' % k]:.4f} fnr {m['false_negative_rate']:.3f} "
                  f"users/batch {m['unique_users_per_batch']:.1f} {m['train_rows_per_s']:.0f} rows/s "
                  f"(eval {time.perf_counter() - t_eval:.1f} s)", flush=True)
        if world > 1:
            dist.barrier()
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
