"""`reqdedup register`: the `sorted_fixed` model of the latest evaluation into the MLflow
Model Registry, alias `challenger`, and `champion` only through the gate.

Steps (each a refusal point; a refusal registers and promotes nothing):

1. read ``<reports>/evaluation/summary.json``: missing, or an evaluation whose status is not
   ``succeeded`` (a failed run, missing results, NaN metrics) -> InputError;
2. reach the MLflow store (InputError naming the URI when it cannot be reached);
3. idempotence: a version of ``settings.registered_model`` whose tag
   ``reqdedup.evaluation_id`` is this evaluation's id already exists -> nothing new, its
   version and aliases are returned (registering the same evaluation twice is a no-op);
4. in a ``register`` run nested under the evaluation's parent run, log the request-level
   pyfunc (`reqdedup.serve.pyfunc.log_request_model`: signature + input example) from the
   checkpoint of `sorted_fixed` **seed 0** (the first seed of the matrix when 0 is absent:
   one fixed, documented pick, not the best seed, so the registered model's numbers are
   not selected on the eval set), register a new version, tag it with the evaluation id,
   eval-set id and metrics, set alias ``challenger``;
5. gate (`reqdedup.evaluate.gate.decide`): IID tolerance + beats the current champion on the
   same eval set -> alias ``champion``; otherwise the reason is a run tag, a version tag and
   the artifact ``gate.txt``, and the champion stays. Aliases only, never stages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.evaluate.gate import BASELINE, CANDIDATE, decide

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_EVALUATION = "reqdedup.evaluation_id"
TAG_EVAL_SET = "reqdedup.eval_set_id"
TAG_METRICS = "reqdedup.metrics"


def _check_summary(summary: dict, where: str) -> None:
    status = summary.get("status")
    eid = summary.get("evaluation_id", "?")
    if status != "succeeded":
        raise InputError(f"evaluation {eid} in {where} has status {status!r}"
                         f"{': ' + summary['error'] if summary.get('error') else ''}; "
                         f"a failed evaluation never registers or promotes anything")
    if (summary.get("config") or {}).get("mlflow", {}).get("enabled", True) is False:
        raise InputError(f"evaluation {eid} in {where} ran with mlflow.enabled false: it has no MLflow runs to "
                         f"register from; rerun `reqdedup evaluate` with MLflow on")
    runs = summary.get("runs") or []
    configs = {r.get("config") for r in runs}
    for need in (BASELINE, CANDIDATE):
        if need not in configs:
            raise InputError(f"evaluation {eid} has no {need!r} runs: cannot gate {CANDIDATE} against {BASELINE}")
    want = len(summary["config"]["configs"]) * len(summary["config"]["seeds"])
    if len(runs) != want:
        raise InputError(f"evaluation {eid} has {len(runs)} run results, expected {want}: not registering")
    for r in runs:
        for m in summary.get("gate", {}).get("metrics", []):
            v = r["metrics"].get(m)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"evaluation {eid}: run {r['config']}/seed{r['seed']} has no finite {m} ({v})")


def pick_run(summary: dict) -> dict:
    """The `sorted_fixed` run whose checkpoint is registered: seed 0, else the first seed."""
    runs = [r for r in summary["runs"] if r["config"] == CANDIDATE]
    by_seed = {r["seed"]: r for r in runs}
    seed = 0 if 0 in by_seed else summary["config"]["seeds"][0]
    return by_seed[seed]


def _tag_safe(metric: str) -> str:
    return metric.replace("@", "_at_")


def _champion(client, name: str) -> dict | None:
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except Exception as e:  # no alias (or no model yet)
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower() \
                or "does not exist" in str(e).lower():
            return None
        raise
    try:
        metrics = json.loads(mv.tags.get(TAG_METRICS, "{}"))
    except ValueError:
        metrics = {}
    return {"version": str(mv.version), "eval_set_id": mv.tags.get(TAG_EVAL_SET), "metrics": metrics,
            "evaluation_id": mv.tags.get(TAG_EVALUATION)}


def _existing_version(client, name: str, evaluation_id: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:
        return None
    for mv in versions:
        if mv.tags.get(TAG_EVALUATION) == evaluation_id:
            return mv
    return None


def _aliases(client, name: str, version: str) -> list[str]:
    try:
        return sorted(client.get_model_version(name, version).aliases)
    except Exception:
        return []


def register(settings: Settings | None = None, *, summary_path: str | Path | None = None,
             tolerance: float | None = None) -> dict:
    """Register the evaluation's `sorted_fixed` model (see the module doc). Returns a dict with
    status ('registered' | 'already_registered'), version, promoted, aliases, decision."""
    from reqdedup.evaluate.matrix import check_tolerance, report_dir_default
    from reqdedup.evaluate.report import SUMMARY, read_summary
    from reqdedup.registry.tracking import init_tracking

    settings = settings or get_settings()
    path = Path(summary_path) if summary_path else report_dir_default(settings) / SUMMARY
    summary = read_summary(path)
    _check_summary(summary, str(path))
    tol = check_tolerance(summary.get("gate", {}).get("tolerance", 0.005) if tolerance is None else tolerance,
                          "--tolerance")
    metrics = list(summary.get("gate", {}).get("metrics") or ["auc", f"recall@{summary['config']['eval']['k']}"])
    eid, esid = summary["evaluation_id"], summary["eval_set_id"]
    run = pick_run(summary)
    checkpoint = Path(run["model_path"])
    if not checkpoint.is_file():
        raise InputError(f"the {CANDIDATE} seed {run['seed']} checkpoint {checkpoint} is gone: rerun `reqdedup evaluate`")

    init_tracking(settings, summary["config"].get("mlflow", {}).get("experiment"))
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    name = settings.registered_model
    existing = _existing_version(client, name, eid)
    if existing is not None:
        champ = _champion(client, name)
        return {"status": "already_registered", "registered_model": name, "version": str(existing.version),
                "evaluation_id": eid, "aliases": _aliases(client, name, str(existing.version)),
                "champion_version": champ["version"] if champ else None,
                "message": f"evaluation {eid} is already registered as version {existing.version}: nothing done"}

    try:
        from reqdedup.serve.pyfunc import log_request_model
    except ImportError as e:
        raise InputError(f"the request-level pyfunc (reqdedup.serve.pyfunc.log_request_model) is not available: {e}") \
            from None

    champion = _champion(client, name)
    model_metrics = {m: run["metrics"].get(m) for m in run["metrics"]}
    decision = decide(summary, tolerance=tol, metrics=metrics, model_metrics=model_metrics, champion=champion)
    gate_metrics = {m: model_metrics.get(m) for m in metrics}
    all_metrics = {m: v for m, v in model_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    with mlflow.start_run(run_name=f"register {CANDIDATE} seed {run['seed']}", parent_run_id=summary["parent_run_id"],
                          tags={"reqdedup.stage": "register", TAG_EVALUATION: eid, TAG_EVAL_SET: esid}) as reg_run:
        mlflow.log_params({"config": CANDIDATE, "seed": run["seed"], "checkpoint": str(checkpoint),
                           "tolerance": tol, "gate_metrics": ",".join(metrics), "training_run_id": run.get("mlflow_run_id")})
        mlflow.log_metrics({f"model.{_tag_safe(k)}": v for k, v in all_metrics.items()})
        info = log_request_model(str(checkpoint), name="model", registered_model_name=name)
        version = str(info.registered_model_version)
        # The evaluation id first: a rerun after a crash from here on finds this version.
        client.set_model_version_tag(name, version, TAG_EVALUATION, eid)
        tags = {TAG_EVAL_SET: esid, TAG_METRICS: json.dumps(gate_metrics | all_metrics, sort_keys=True),
                "reqdedup.config": CANDIDATE, "reqdedup.seed": str(run["seed"]), "reqdedup.checkpoint": str(checkpoint),
                "reqdedup.evaluation_run_id": summary["parent_run_id"], "reqdedup.register_run_id": reg_run.info.run_id,
                "reqdedup.gate.tolerance": str(tol),
                **{f"reqdedup.{_tag_safe(m)}": f"{v:.6f}" for m, v in gate_metrics.items()},
                **{f"reqdedup.iid_mean.{_tag_safe(m)}": f"{summary['aggregate']['configs'][BASELINE][m]['mean']:.6f}"
                   for m in metrics}}
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        client.set_registered_model_alias(name, CHALLENGER, version)
        text = decision.text()
        mlflow.log_text(text, "gate.txt")
        mlflow.log_dict(decision.to_dict(), "gate.json")
        outcome = "promoted" if decision.promote else "refused"
        mlflow.set_tags({"reqdedup.gate": outcome, "reqdedup.registered_version": version})
        client.set_model_version_tag(name, version, "reqdedup.gate", outcome)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version)
        else:
            reason = "; ".join(decision.reasons)
            mlflow.set_tag("reqdedup.gate.reason", reason[:5000])
            client.set_model_version_tag(name, version, "reqdedup.gate.reason", reason[:5000])
    champ_after = _champion(client, name)
    return {"status": "registered", "registered_model": name, "version": version, "evaluation_id": eid,
            "eval_set_id": esid, "seed": run["seed"], "checkpoint": str(checkpoint), "model_uri": info.model_uri,
            "promoted": decision.promote, "aliases": _aliases(client, name, version),
            "champion_version": champ_after["version"] if champ_after else None,
            "previous_champion": champion["version"] if champion else None,
            "decision": decision.to_dict(), "register_run_id": reg_run.info.run_id}
