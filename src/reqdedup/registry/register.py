"""`reqdedup register`: the `sorted_fixed` model of the latest evaluation into the MLflow
Model Registry, alias `challenger`, and `champion` only through the gate.

Steps (each a refusal point; a refusal registers and promotes nothing):

1. read ``<reports>/evaluation/summary.json``: missing, or an evaluation whose status is not
   ``succeeded`` (a failed run, missing results, NaN metrics) -> InputError;
2. reach the MLflow store (InputError naming the URI when it cannot be reached);
3. complete or resume: a version of ``settings.registered_model`` tagged with this
   evaluation's id (``reqdedup.evaluation_id``, set in the same call that creates the
   version) and ``reqdedup.register.complete`` -> nothing new, its version and aliases are
   returned (registering the same evaluation twice is a no-op). A version without the
   ``complete`` tag, or a ``register`` run of this evaluation (run tags
   ``reqdedup.stage=register`` + ``reqdedup.evaluation_id``) with no version yet, is a
   crashed earlier attempt: it is resumed in that run, and only its missing steps are done.
   A failed lookup is raised (ServiceUnavailableError for an outage), never read as "none
   found": that would register a duplicate;
4. in the ``register`` run (nested under the evaluation's parent run), log the request-level
   pyfunc (`reqdedup.serve.pyfunc.log_request_model`: signature + input example) from the
   checkpoint of `sorted_fixed` **seed 0** (the first seed of the matrix when 0 is absent:
   one fixed, documented pick, not the best seed, so the registered model's numbers are
   not selected on the eval set), register a new version with the evaluation-id tag, then
   tag it with the eval-set id and metrics, set alias ``challenger``;
5. gate (`reqdedup.evaluate.gate.decide`): IID tolerance + beats the current champion on the
   same eval set -> alias ``champion``; otherwise the reason is a run tag, a version tag and
   the artifact ``gate.txt``, and the champion stays. Aliases only, never stages. The
   decision is the run's artifact ``gate.json`` before it is applied, so a resumed attempt
   applies the same decision instead of comparing the model with itself;
6. the version tag ``reqdedup.register.complete=true``, last.

An outage of the MLflow store at any step is a ServiceUnavailableError (CLI exit 75: the
Airflow task is retried and resumes here); a misconfigured store is an InputError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.evaluate.gate import BASELINE, CANDIDATE, GateDecision, decide

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_EVALUATION = "reqdedup.evaluation_id"
TAG_EVAL_SET = "reqdedup.eval_set_id"
TAG_METRICS = "reqdedup.metrics"
TAG_STAGE = "reqdedup.stage"
TAG_COMPLETE = "reqdedup.register.complete"
TAG_GATE = "reqdedup.gate"
TAG_PREVIOUS_CHAMPION = "reqdedup.previous_champion"
GATE_JSON = "gate.json"


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


def _versions(client, name: str) -> list:
    """Every version of the registered model ([] when it does not exist yet). Errors are raised."""
    return list(client.search_model_versions(f"name = '{name}'"))


def _register_runs(client, experiment_id: str, evaluation_id: str) -> list:
    """The `register` runs of this evaluation, oldest first. Errors are raised."""
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.`{TAG_STAGE}` = 'register' and "
                                            f"tags.`{TAG_EVALUATION}` = '{evaluation_id}'",
                              order_by=["attributes.start_time ASC"])
    return list(runs)


def find_registration(client, name: str, experiment_id: str, evaluation_id: str):
    """(version, register run id) of an earlier attempt to register this evaluation, each
    None when absent. The version is the one tagged with the evaluation id, else one created
    from a register run of this evaluation (a crash before its tag). Lookup errors are raised."""
    versions = _versions(client, name)
    tagged = [mv for mv in versions if mv.tags.get(TAG_EVALUATION) == evaluation_id]
    runs = _register_runs(client, experiment_id, evaluation_id)
    run_ids = [r.info.run_id for r in runs]
    if not tagged:
        tagged = [mv for mv in versions if mv.run_id and mv.run_id in run_ids]
    mv = min(tagged, key=lambda v: int(v.version)) if tagged else None
    run_id = (mv.run_id if mv is not None and mv.run_id else None) or (run_ids[0] if run_ids else None)
    return mv, run_id


def is_complete(mv) -> bool:
    """A finished registration: the ``complete`` tag, or a version registered before that tag
    existed (its gate tag without the previous-champion tag this code sets just before it):
    re-applying such an old decision could move today's aliases back to it."""
    tags = mv.tags or {}
    return tags.get(TAG_COMPLETE) == "true" or (TAG_GATE in tags and TAG_PREVIOUS_CHAMPION not in tags)


def _aliases(client, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def _already(client, name: str, mv, eid: str) -> dict:
    champ = _champion(client, name)
    return {"status": "already_registered", "registered_model": name, "version": str(mv.version),
            "evaluation_id": eid, "aliases": _aliases(client, name, str(mv.version)),
            "champion_version": champ["version"] if champ else None,
            "message": f"evaluation {eid} is already registered as version {mv.version}: nothing done"}


def register(settings: Settings | None = None, *, summary_path: str | Path | None = None,
             tolerance: float | None = None, evaluation_id: str | None = None) -> dict:
    """Register the evaluation's `sorted_fixed` model (see the module doc). Returns a dict with
    status ('registered' | 'already_registered'), resumed, version, promoted, aliases, decision.

    ``evaluation_id``: the evaluation the caller means (the pipeline's evaluate task returns
    it); a summary of another evaluation is refused (InputError) before anything is done."""
    from reqdedup.evaluate.matrix import check_tolerance, report_dir_default
    from reqdedup.evaluate.report import SUMMARY, read_summary
    from reqdedup.registry.tracking import init_tracking, transient_as_unavailable

    settings = settings or get_settings()
    path = Path(summary_path) if summary_path else report_dir_default(settings) / SUMMARY
    summary = read_summary(path)
    if evaluation_id is not None and summary.get("evaluation_id") != evaluation_id:
        raise InputError(f"{path} is the summary of evaluation {summary.get('evaluation_id')!r}, not of "
                         f"{evaluation_id!r} (--evaluation-id): not registering another evaluation's model")
    _check_summary(summary, str(path))
    tol = check_tolerance(summary.get("gate", {}).get("tolerance", 0.005) if tolerance is None else tolerance,
                          "--tolerance")
    metrics = list(summary.get("gate", {}).get("metrics") or ["auc", f"recall@{summary['config']['eval']['k']}"])
    eid, esid = summary["evaluation_id"], summary["eval_set_id"]
    run = pick_run(summary)
    checkpoint = Path(run["model_path"])
    if not checkpoint.is_file():
        raise InputError(f"the {CANDIDATE} seed {run['seed']} checkpoint {checkpoint} is gone: rerun `reqdedup evaluate`")

    exp_id = init_tracking(settings, summary["config"].get("mlflow", {}).get("experiment"))
    with transient_as_unavailable(settings.mlflow_tracking_uri, f"registering evaluation {eid}"):
        return _register(settings, summary, run, checkpoint, exp_id, tol, metrics)


def _register(settings: Settings, summary: dict, run: dict, checkpoint: Path, exp_id: str, tol: float,
              metrics: list[str]) -> dict:
    import mlflow
    from mlflow import MlflowClient

    eid, esid = summary["evaluation_id"], summary["eval_set_id"]
    client = MlflowClient(settings.mlflow_tracking_uri)
    name = settings.registered_model
    mv, run_id = find_registration(client, name, exp_id, eid)
    if mv is not None and is_complete(mv):
        return _already(client, name, mv, eid)
    resumed = mv is not None or run_id is not None

    if mv is None:
        try:
            from reqdedup.serve.pyfunc import log_request_model
        except ImportError as e:
            raise InputError(f"the request-level pyfunc (reqdedup.serve.pyfunc.log_request_model) is not available: "
                             f"{e}") from None

    model_metrics = {m: run["metrics"].get(m) for m in run["metrics"]}
    gate_metrics = {m: model_metrics.get(m) for m in metrics}
    all_metrics = {m: v for m, v in model_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if run_id is None:
        started = mlflow.start_run(run_name=f"register {CANDIDATE} seed {run['seed']}",
                                   parent_run_id=summary["parent_run_id"],
                                   tags={TAG_STAGE: "register", TAG_EVALUATION: eid, TAG_EVAL_SET: esid})
    else:
        started = mlflow.start_run(run_id=run_id)
    with started as reg_run:
        run_id = reg_run.info.run_id
        if not client.get_run(run_id).data.params:  # a crash right after the run started logged none
            mlflow.log_params({"config": CANDIDATE, "seed": run["seed"], "checkpoint": str(checkpoint),
                               "tolerance": tol, "gate_metrics": ",".join(metrics),
                               "training_run_id": run.get("mlflow_run_id")})
            mlflow.log_metrics({f"model.{_tag_safe(k)}": v for k, v in all_metrics.items()})
        if mv is None:
            info = log_request_model(str(checkpoint), name="model")
            # The evaluation id is set in the same call that creates the version: no version
            # of this evaluation ever exists without it.
            mv = mlflow.register_model(info.model_uri, name, tags={TAG_EVALUATION: eid})
            model_uri = info.model_uri
        else:
            model_uri = mv.source
        version = str(mv.version)
        current = client.get_model_version(name, version)
        if current.tags.get(TAG_EVALUATION) != eid:
            client.set_model_version_tag(name, version, TAG_EVALUATION, eid)
        tags = {TAG_EVAL_SET: esid, TAG_METRICS: json.dumps(gate_metrics | all_metrics, sort_keys=True),
                "reqdedup.config": CANDIDATE, "reqdedup.seed": str(run["seed"]), "reqdedup.checkpoint": str(checkpoint),
                "reqdedup.evaluation_run_id": str(summary["parent_run_id"]), "reqdedup.register_run_id": run_id,
                "reqdedup.gate.tolerance": str(tol),
                **{f"reqdedup.{_tag_safe(m)}": f"{v:.6f}" for m, v in gate_metrics.items()},
                **{f"reqdedup.iid_mean.{_tag_safe(m)}": f"{summary['aggregate']['configs'][BASELINE][m]['mean']:.6f}"
                   for m in metrics}}
        for k, v in tags.items():
            if current.tags.get(k) != v:
                client.set_model_version_tag(name, version, k, v)
        if CHALLENGER not in current.aliases:
            client.set_registered_model_alias(name, CHALLENGER, version)

        if TAG_GATE in current.tags:  # decided (and the decision logged) by the attempt that crashed
            decision = GateDecision(**mlflow.artifacts.load_dict(f"runs:/{run_id}/{GATE_JSON}"))
            previous = current.tags.get(TAG_PREVIOUS_CHAMPION) or None
        else:
            champion = _champion(client, name)
            if champion is not None and champion["version"] == version:
                raise InputError(f"version {version} of {name} is already the champion but holds no gate "
                                 f"decision ({TAG_GATE}): set by hand? not re-deciding it")
            decision = decide(summary, tolerance=tol, metrics=metrics, model_metrics=model_metrics, champion=champion)
            previous = champion["version"] if champion else None
            mlflow.log_text(decision.text(), "gate.txt")
            mlflow.log_dict(decision.to_dict(), GATE_JSON)
            outcome = "promoted" if decision.promote else "refused"
            mlflow.set_tags({TAG_GATE: outcome, "reqdedup.registered_version": version})
            if not decision.promote:
                reason = "; ".join(decision.reasons)
                mlflow.set_tag("reqdedup.gate.reason", reason[:5000])
                client.set_model_version_tag(name, version, "reqdedup.gate.reason", reason[:5000])
            client.set_model_version_tag(name, version, TAG_PREVIOUS_CHAMPION, previous or "")
            client.set_model_version_tag(name, version, TAG_GATE, outcome)  # the decision is final from here
        if decision.promote and CHAMPION not in client.get_model_version(name, version).aliases:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, TAG_COMPLETE, "true")
    champ_after = _champion(client, name)
    return {"status": "registered", "resumed": resumed, "registered_model": name, "version": version,
            "evaluation_id": eid, "eval_set_id": esid, "seed": run["seed"], "checkpoint": str(checkpoint),
            "model_uri": model_uri, "promoted": decision.promote, "aliases": _aliases(client, name, version),
            "champion_version": champ_after["version"] if champ_after else None,
            "previous_champion": previous, "decision": decision.to_dict(), "register_run_id": run_id}
