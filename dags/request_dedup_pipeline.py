"""Airflow DAG `request_dedup_pipeline`: request-level dedup, from landed logs to a trained model.

A thin file: params, schedule, Assets and wiring. The work lives in ``reqdedup`` (src/),
imported inside the task bodies, so parsing this file imports no Spark, torch or MLflow,
and reads no Variable or Connection.
"""

from __future__ import annotations

import datetime as dt
import os
import sys

from airflow.sdk import Param, dag, get_current_context, task

# The dags folder is on sys.path when Airflow parses a bundle; also when this file is imported alone.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))) if os.path.dirname(os.path.abspath(__file__)) not in sys.path else None
from reqdedup.contract import REQUEST_ID_STRIDE  # noqa: E402 (pure Python: the data contract)
from reqdedup_dag_common import (  # noqa: E402
    DATE_PATTERN,
    DEFAULT_ARGS,
    FEATURES,
    IMPRESSIONS,
    LANDING,
    MODEL,
    START_DATE,
    STORAGE_REPORT,
    check_date,
    fail_fast_on_input_error,
    log,
    repo_path,
    run_date,
    run_stage,
    window,
)

DOC_MD = """
# Request-level dedup pipeline

One feed request scores many candidates, and every candidate row repeats the same user
block (history, features). This pipeline keeps that block deduplicated at every stage:

| task | what it does | writes |
| --- | --- | --- |
| `check_params` | checks the trigger form's params, resolves the run's date | - |
| `land_request_logs` | synthesizes the date's request logs when missing (`landing` param) or checks that real ones landed | landing folder (Asset) |
| `sorting_ingest` | Spark sorts the date by (user_id, request_id) into the Iceberg `impressions` table, staged on branch `stage_YYYYMMDD` | staging branch |
| `data_quality` | Great Expectations suites on the staged snapshot; fails naming each failed expectation, else returns the audited snapshot id | - |
| `publish` | fast-forwards `main` to exactly the audited snapshot (refused if the staging branch moved past it; a retry is a no-op) | `impressions` (Asset) |
| `feature_columns` | adds the date to each feature side table (same bucketing and sort; user columns never rewritten) | feature tables (Asset) |
| `train_and_evaluate` | one torchrun launch trains the experiment matrix (IID baseline, request-sorted with and without the fixes, every seed) on the `train_days` days before the date, evaluates on the date (held out) | checkpoints, MLflow runs, `reports/evaluation/` |
| `register` | registers the request-sorted-with-fixes model in MLflow (alias `challenger`); alias `champion` only if the gate passes | registered model (Asset) |
| `storage_report` | the same rows IID-shuffled vs request-sorted, bytes per column (runs last) | `reports/storage_bench.json`, `.png` |

**Date**: the `date` param if given, else the run's logical date (`ds`). Training needs the
`train_days` earlier days on `main` (run the DAG for them first with `train` off).
**Bad input** fails the first task that sees it, without retries, with a message naming the
problem; a failed data-quality check stops the run before training, and the date stays
quarantined on its staging branch. The latest reports are on the **Dedup report** page
(Browse menu). Docs: `docs/airflow.md`.
"""

PARAMS = {
    "date": Param(
        None, type=["null", "string"], pattern=DATE_PATTERN, title="Date (YYYY-MM-DD)",
        description="The day to ingest and evaluate on. Empty: the run's logical date (ds).",
    ),
    "landing": Param(
        "synthesize_if_missing", type="string", enum=["synthesize_if_missing", "synthesize", "existing"],
        title="Landing data",
        description="synthesize_if_missing: generate synthetic logs unless the date already landed; "
                    "synthesize: always (re)generate; existing: use landed logs only (real data).",
    ),
    "users": Param(500, type="integer", minimum=1, maximum=10_000_000, title="Users (synthetic)"),
    "requests": Param(2000, type="integer", minimum=1, maximum=REQUEST_ID_STRIDE - 1, title="Requests per day (synthetic)"),
    "candidates": Param(50, type="integer", minimum=2, maximum=10_000, title="Candidates per request"),
    "history": Param(256, type="integer", minimum=1, maximum=50_000, title="Mean history length (item ids)"),
    "items": Param(20000, type="integer", minimum=100, maximum=100_000_000, title="Item catalog size"),
    "data_seed": Param(0, type="integer", minimum=0, title="Seed of the synthetic world"),
    "features": Param(
        ["item_ctr_7d", "user_requests_7d"], type="array",
        items={"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"}, uniqueItems=True, title="Feature columns",
        description="Features added for the date (`reqdedup features list`).",
    ),
    "train": Param(True, type="boolean", title="Train, evaluate and register",
                   description="Off: stop after the features (e.g. to fill the training days first)."),
    "experiment_config": Param(
        "configs/eval_demo.yaml", type="string", minLength=1, title="Experiment config (YAML)",
        description="The evaluation matrix (configs x seeds); relative to the repository root, or absolute. "
                    "Its dates, seeds and gate tolerance are set by this run.",
    ),
    "train_days": Param(
        1, type="integer", minimum=1, maximum=90, title="Training days",
        description="Train on this many days before the date; evaluate on the date.",
    ),
    "seeds": Param(
        None, type=["null", "array"], items={"type": "integer", "minimum": 0}, minItems=1, maxItems=8,
        uniqueItems=True, title="Training seeds",
        description="Every config of the matrix trains once per seed. Empty: the experiment config's seeds.",
    ),
    "gate_tolerance": Param(
        None, type=["null", "number"], minimum=0, maximum=1, title="Gate tolerance",
        description="Largest relative drop of the gate metrics vs the IID baseline that still promotes to "
                    "champion. Empty: the experiment config's.",
    ),
    "storage_report": Param(True, type="boolean", title="Storage report",
                            description="Measure IID vs request-sorted table bytes at this scale."),
}


@dag(
    dag_id="request_dedup_pipeline",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    dagrun_timeout=dt.timedelta(hours=6),
    params=PARAMS,
    doc_md=DOC_MD,
    tags=["reqdedup"],
)
def request_dedup_pipeline():
    @task
    def check_params() -> dict:
        """Check the params beyond what the form's schema can (calendar date, files), and
        resolve the run's date. Fails at once, without retries, on bad input."""
        from airflow.sdk.exceptions import AirflowFailException

        context = get_current_context()
        p = context["params"]
        date = run_date(context)
        cfg = repo_path(p["experiment_config"])
        if p["train"] and not cfg.is_file():
            raise AirflowFailException(f"param 'experiment_config': {cfg} is not a file (see configs/)")
        train_dates = window(date, p["train_days"] + 1)[:-1]
        check_date(train_dates[0], "start of the training days")
        run = {"date": date, "train_start": train_dates[0], "train_end": train_dates[-1],
               "experiment_config": str(cfg)}
        log.info("run: %s", run)
        return run

    @task(outlets=[LANDING])
    def land_request_logs(run: dict) -> dict:
        """Synthesize the date's request logs (`reqdedup generate`), or check that real logs landed."""
        from airflow.sdk.exceptions import AirflowFailException

        context = get_current_context()
        p = context["params"]
        from reqdedup.config import get_settings

        folder = get_settings().landing_path(run["date"])
        present = folder.is_dir() and any(folder.glob("*.parquet"))
        if p["landing"] == "existing" or (p["landing"] == "synthesize_if_missing" and present):
            if not present:
                raise AirflowFailException(f"no landed logs for {run['date']} in {folder} (landing=existing)")
            result = {"date": run["date"], "path": str(folder), "generated": False}
        else:
            result = {**run_stage("generate", "--date", run["date"], "--users", p["users"], "--requests",
                                  p["requests"], "--candidates", p["candidates"], "--history", p["history"],
                                  "--items", p["items"], "--seed", p["data_seed"]), "generated": True}
        context["outlet_events"][LANDING].extra = {"date": result["date"], "path": result["path"]}
        log.info("landing: %s", result)
        return result

    @task
    def sorting_ingest(run: dict, landed: dict) -> dict:
        """Spark: sort the landed date by (user_id, request_id) into a staging branch of impressions."""
        from airflow.sdk.exceptions import AirflowFailException

        if landed.get("date") != run["date"]:
            raise AirflowFailException(f"land_request_logs returned date {landed.get('date')!r}, the run is "
                                       f"for {run['date']}")
        result = run_stage("ingest", "--date", landed["date"])
        log.info("ingest: %s", result)
        return result

    @task
    def data_quality(run: dict, staged: dict) -> dict:
        """Great Expectations on the snapshot sorting_ingest staged (`reqdedup validate
        --no-publish`). A failure names each failed expectation and stops the run before
        training; the date stays on its staging branch. Returns the audit, with the audited
        snapshot id."""
        from airflow.sdk.exceptions import AirflowFailException

        audit = run_stage("validate", "--date", staged["date"], "--no-publish")
        if audit.get("snapshot_id") != staged.get("snapshot_id"):
            raise AirflowFailException(
                f"the audited snapshot {audit.get('snapshot_id')} of {staged['date']} is not the one sorting_ingest "
                f"staged ({staged.get('snapshot_id')}): the staging branch moved; rerun the date")
        result = {k: v for k, v in audit.items() if k != "expectations"}
        log.info("data quality: %s", result)
        return result

    @task(outlets=[IMPRESSIONS])
    def publish(run: dict, audited: dict) -> dict:
        """Fast-forward main to exactly the snapshot data_quality audited (`reqdedup publish
        --snapshot-id`): refused if the staging branch moved past it; a retry after a
        successful publish is a no-op success."""
        from airflow.sdk.exceptions import AirflowFailException

        context = get_current_context()
        snapshot_id = audited.get("snapshot_id")
        if snapshot_id is None or not audited.get("success"):
            raise AirflowFailException(f"data_quality returned no passed audit with a snapshot id: {audited}")
        result = run_stage("publish", "--date", audited["date"], "--snapshot-id", snapshot_id)
        context["outlet_events"][IMPRESSIONS].extra = {"date": audited["date"], "snapshot_id": result.get("snapshot_id")}
        log.info("publish: %s", result)
        return result

    @task(outlets=[FEATURES])
    def feature_columns(run: dict, published: dict) -> list[dict]:
        """Add the published date to each feature's side table (impressions untouched)."""
        from airflow.sdk.exceptions import AirflowFailException

        context = get_current_context()
        if not published.get("published") or published.get("date") != run["date"]:
            raise AirflowFailException(f"data_quality did not publish {run['date']}: {published}")
        results = []
        with fail_fast_on_input_error():
            from reqdedup.lake.features import get_feature

            names = context["params"]["features"]
            for name in names:
                get_feature(name)  # an unknown name fails before any work
        for name in names:
            result = run_stage("features", "add", name, "--date", published["date"], name=name)
            log.info("feature %s: %s", name, result)
            results.append(result)
        context["outlet_events"][FEATURES].extra = {"date": published["date"], "features": names}
        return results

    @task(outlets=[STORAGE_REPORT], trigger_rule="none_failed")
    def storage_report(run: dict) -> dict:
        """Bytes of the same rows IID-shuffled vs request-sorted (JSON + PNG under reports)."""
        from airflow.sdk.exceptions import AirflowSkipException

        context = get_current_context()
        p = context["params"]
        if not p["storage_report"]:
            raise AirflowSkipException("storage_report param is off")
        from reqdedup.config import get_settings

        json_path = get_settings().reports_dir / "storage_bench.json"
        # Its own Spark session: three ingests into a benchmark namespace.
        result = run_stage("bench", "storage", "--requests", p["requests"], "--candidates",
                           p["candidates"], "--history", p["history"], "--users", p["users"],
                           "--seed", p["data_seed"], "--json", json_path)
        context["outlet_events"][STORAGE_REPORT].extra = {"json": str(json_path)}
        keys = ("rows", "bytes_iid", "bytes_sorted", "table_ratio", "user_columns_ratio", "item_columns_ratio")
        summary = {k: result.get(k) for k in keys} | {"json": str(json_path), "plot": result.get("plot")}
        log.info("storage: %s", summary)
        return summary

    @task
    def train_and_evaluate(run: dict, features: list[dict]) -> dict:
        """`reqdedup evaluate` as a subprocess (torchrun inside; spawn fails in a task):
        train the matrix on the training days, evaluate on the date, write the report."""
        import json

        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        p = get_current_context()["params"]
        if not p["train"]:
            raise AirflowSkipException("train param is off")
        # The feature columns this run added: each must cover the evaluation date.
        missing = [f.get("feature") for f in features
                   if not (str(f.get("start")) <= run["date"] <= str(f.get("end")))]
        if missing:
            raise AirflowFailException(f"feature_columns did not add {run['date']} for {missing}: {features}")
        overrides = {
            "data.train_start": json.dumps(run["train_start"]), "data.train_end": json.dumps(run["train_end"]),
            "data.eval_start": json.dumps(run["date"]), "data.eval_end": json.dumps(run["date"]),
        }
        if p["seeds"]:
            overrides["seeds"] = json.dumps(p["seeds"])
        if p["gate_tolerance"] is not None:
            overrides["gate.tolerance"] = json.dumps(p["gate_tolerance"])
        args = ["evaluate", "--config", run["experiment_config"]]
        for key, value in overrides.items():
            args += ["--set", f"{key}={value}"]
        result = run_stage(*args) | {"features": {f["feature"]: f.get("snapshot_id") for f in features}}
        log.info("evaluation: %s", result)
        return result

    @task(outlets=[MODEL])
    def register(run: dict, evaluation: dict) -> dict:
        """Register this run's evaluation (its summary and id, from train_and_evaluate):
        the request-sorted-with-fixes model (alias challenger); champion only through the
        gate (IID tolerance, and better than the current champion)."""
        context = get_current_context()
        p = context["params"]
        args = ["register", "--summary", evaluation["summary_path"], "--evaluation-id", evaluation["evaluation_id"]]
        if p["gate_tolerance"] is not None:
            args += ["--tolerance", str(p["gate_tolerance"])]
        result = run_stage(*args)
        context["outlet_events"][MODEL].extra = {k: result.get(k) for k in
                                                 ("registered_model", "version", "aliases", "evaluation_id")}
        log.info("registered: %s", result)
        return result

    run = check_params()
    landed = land_request_logs(run)
    staged = sorting_ingest(run, landed)
    audited = data_quality(run, staged)
    published = publish(run, audited)
    features = feature_columns(run, published)
    evaluation = train_and_evaluate(run, features)
    registered = register(run, evaluation)
    # Last, so its Spark commits never race the pipeline's (one SQLite catalog); it also
    # runs when training is switched off (register skipped), not after a failure.
    registered >> storage_report(run)


request_dedup_pipeline()
