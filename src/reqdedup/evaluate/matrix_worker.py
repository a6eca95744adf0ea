"""One torchrun process of the evaluation matrix (`reqdedup evaluate` launches it).

torchrun start-up and imports cost many seconds on a small CPU box, so the whole matrix runs
in one launch: the process group is created once, then for every (config, seed) run of the
plan this process calls `reqdedup.train.worker.train` (which leaves a group it did not create
alone) and evaluates the final model on the held-out split, sharded by request across ranks.
Rank 0 gathers the shards, writes ``<run_dir>/eval.json`` and logs the metrics to the run's
nested MLflow run.

The lake is read once per process: the training loader of every run goes through a cache
keyed by (dates, buckets), and the evaluation batches are built once.
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
# one read of the lake per process
# ---------------------------------------------------------------------------------------
def install_loader_cache() -> None:
    """Memoize `RequestLoader.from_lake`'s Arrow read: every run of the matrix trains on the
    same rows (only order/seed differ), so read them once per process."""
    import pyarrow as pa

    from reqdedup.train import loader as loader_mod

    cls = loader_mod.RequestLoader
    if getattr(cls, "_reqdedup_eval_cache", None) is not None:
        return
    cache: dict = {}

    def from_lake(klass, start, end, *, buckets=None, settings=None, **kwargs):
        key = (str(start), str(end), None if buckets is None else tuple(buckets))
        if key not in cache:
            from reqdedup.lake.read import read_request_batches

            batches = list(read_request_batches(start, end, buckets=buckets, columns=list(loader_mod.TRAIN_COLUMNS),
                                                batch_rows=65536, settings=settings))
            if not batches:
                from reqdedup.errors import InputError

                raise InputError(f"no rows in the impressions table for {start}..{end}")
            cache[key] = pa.Table.from_batches(batches)
        return klass(cache[key], **kwargs)

    cls._reqdedup_eval_cache = cache
    cls.from_lake = classmethod(from_lake)


# ---------------------------------------------------------------------------------------
# evaluation data
# ---------------------------------------------------------------------------------------
class EvalData:
    """This rank's share of the eval requests as RequestBatches, plus the candidate pool
    (every distinct item of the whole eval split, with its features)."""

    def __init__(self, spec: dict, settings, seq_len: int, rank: int, world: int):
        import pyarrow as pa

        from reqdedup.lake.read import read_request_batches
        from reqdedup.train.loader import TRAIN_COLUMNS, arrow_to_request_batch, request_blocks

        table = pa.Table.from_batches(list(read_request_batches(
            spec["start"], spec["end"], buckets=spec.get("buckets"), columns=list(TRAIN_COLUMNS),
            batch_rows=262144, settings=settings)))
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
        step = int(spec.get("batch_requests", 256))
        for i in range(0, mine.size, step):
            chunk = mine[i:i + step]
            idx = np.concatenate([np.arange(starts[b], ends[b]) for b in chunk])
            rows = table.take(pa.array(idx))
            batch = arrow_to_request_batch(rows, seq_len, check=False)
            self.batches.append(batch)
        self.rows = sum(b.num_rows for b in self.batches)


def pool_index(pool_ids: np.ndarray, item_ids: torch.Tensor) -> torch.Tensor:
    idx = np.searchsorted(pool_ids, item_ids.numpy())
    return torch.from_numpy(idx.astype(np.int64))


def ranks_torch(scores: torch.Tensor, target: torch.Tensor, exclude_rows: torch.Tensor | None = None,
                exclude_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Same rule as `metrics.retrieval_ranks` (pessimistic ties, filtered entries left out),
    in torch and with the exclusions given as (row, col) pairs instead of a dense mask."""
    rows = torch.arange(target.numel())
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
    from reqdedup.train.dedup import expand_to_rows

    model.eval()
    pool_emb = model.item_tower(data.pool_item, data.pool_category, data.pool_dense)
    logits, labels, ranks = [], [], []
    for batch in data.batches:
        user = model.encode_users(batch)
        user_rows = expand_to_rows(user, batch.row_request)
        item = model.item_tower(batch.item_id, batch.item_category, batch.item_dense)
        logits.append(model.ranking_head(user_rows, item).float())
        labels.append(batch.label)
        pos = torch.nonzero(batch.label > 0.5).squeeze(1)
        if pos.numel() == 0:
            continue
        req = batch.row_request[pos]
        target = pool_index(data.pool_ids, batch.item_id[pos])
        scores = user[req] @ pool_emb.T  # [P, M]
        # other engaged items of the same request: (query p, pool column of positive q), q != p
        same = (req[:, None] == req[None, :]) & ~torch.eye(pos.numel(), dtype=torch.bool)
        qi, qj = torch.nonzero(same, as_tuple=True)
        ranks.append(ranks_torch(scores, target, qi, target[qj]))
    return {"logits": torch.cat(logits).numpy(), "labels": torch.cat(labels).numpy(),
            "ranks": torch.cat(ranks).numpy() if ranks else np.zeros(0, np.int64)}


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


def load_model(run_dir: Path):
    from reqdedup.train.model import ModelConfig, RecModel

    saved = torch.load(run_dir / FINAL_MODEL, map_location="cpu", weights_only=False)
    model = RecModel(ModelConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"])
    return model.eval()


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
    install_loader_cache()
    client = None  # MLflow client on rank 0, unless the evaluation runs with mlflow.enabled false
    if rank == 0 and plan.get("parent_run_id"):
        from mlflow import MlflowClient

        from reqdedup.registry.tracking import init_tracking

        init_tracking(settings, plan.get("experiment"))
        client = MlflowClient(settings.mlflow_tracking_uri)

    spec = plan["eval"]
    t0 = time.perf_counter()
    data = EvalData(spec, settings, cfgs[0].model.seq_len, rank, world)
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
            train_metrics = train(cfg, settings)
            if rank == 0:  # train() on rank 0 wrote it; every rank reads the same file
                pass
        if world > 1:
            dist.barrier()
        train_metrics = json.loads((run_dir / METRICS).read_text())
        train_wall = time.perf_counter() - t_train

        eval_key = hashlib.sha256(json.dumps([plan["eval_set_id"], spec, _file_digest(run_dir / FINAL_MODEL)],
                                             sort_keys=True).encode()).hexdigest()[:16]
        cached = None
        if plan.get("reuse", True) and (run_dir / EVAL_JSON).exists():
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
