"""Chaos (slow, in CI): every task of request_dedup_pipeline that runs a stage subprocess gets
that subprocess tree SIGKILLed mid-way on its first try, Airflow retries it, and the run
still ends in success with the same result as the session's unbroken run: the landed rows
on main, main at the snapshot data_quality audited, every feature table holding the date
once, one model version for the evaluation, and the aliases as the gate decided.

The kill is the DAG's test-only hook (dags/reqdedup_dag_common.py ``chaos_deadline``): the
session's server has ``REQDEDUP_CHAOS_KILL`` pointing at a JSON file this test writes,
naming the tasks, the seconds after each task's first stage starts (half of what that
task's stages took in the unbroken run, read from its log), and the run-id prefix, so no
other run is touched. ``check_params`` runs no subprocess and is not killed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time

import pytest

from airflow_server import DAG_ID, pipeline_conf, require_success, run_to_end

KILLED = ["land_request_logs", "sorting_ingest", "data_quality", "publish", "feature_columns",
          "train_and_evaluate", "register", "storage_report"]
STAGE_SECONDS = re.compile(r"stage `[^`]*` finished in ([0-9.]+) s")


def xcom(server, run_id: str, task_id: str):
    r = server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                   params={"deserialize": "true", "stringify": "false"})
    assert r.status_code == 200, r.text
    return r.json()["value"]


def try_number(server, run_id: str, task_id: str) -> int:
    return server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}").json()["try_number"]


def outcome(server, settings, run_id: str) -> dict:
    """What a successful run left, from its XComs and the lake and registry themselves."""
    import mlflow

    from reqdedup.lake.catalog import load_table

    landed, audited, published = (xcom(server, run_id, t) for t in ("land_request_logs", "data_quality", "publish"))
    features, evaluation, registered = (xcom(server, run_id, t) for t in
                                        ("feature_columns", "train_and_evaluate", "register"))
    date = landed["date"]
    impressions = load_table("impressions", settings)
    on_main = impressions.scan(row_filter=f"event_date = '{date}'").to_arrow()
    at_audit = impressions.scan(row_filter=f"event_date = '{date}'", snapshot_id=audited["snapshot_id"]).to_arrow()
    feature_rows = {}
    for f in features:
        side = load_table(f["table"].split(".")[-1], settings).scan(row_filter=f"event_date = '{date}'").to_arrow()
        keys = [c for c in side.column_names if c.endswith("_id")] + ["event_date"]
        distinct = side.group_by(keys).aggregate([]).num_rows
        feature_rows[f["feature"]] = {"rows": side.num_rows, "distinct_keys": distinct, "reported": f["rows"]}
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    versions = [mv for mv in client.search_model_versions(f"name = '{settings.registered_model}'")
                if mv.tags.get("reqdedup.evaluation_id") == evaluation["evaluation_id"]]
    mv = client.get_model_version(settings.registered_model, versions[0].version) if len(versions) == 1 else None
    return {"date": date, "landed_rows": landed["rows"], "main_rows": on_main.num_rows, "audited_rows": at_audit.num_rows,
            "main_snapshot": impressions.metadata.current_snapshot().snapshot_id,
            "audited_snapshot": audited["snapshot_id"], "published_snapshot": published.get("snapshot_id"),
            "features": feature_rows, "evaluation_status": evaluation["status"], "versions": len(versions),
            "gate": mv.tags.get("reqdedup.gate") if mv else None, "aliases": sorted(mv.aliases) if mv else None,
            "complete": mv.tags.get("reqdedup.register.complete") if mv else None,
            "registered_version": registered["version"], "version": mv.version if mv else None,
            # (publish and register answer a retry after their commit with an 'already' result)
            "keys": {t: sorted(v) for t, v in (("land_request_logs", landed), ("data_quality", audited),
                                               ("train_and_evaluate", evaluation))}}


def check(o: dict) -> None:
    """What every successful run must have left (the unbroken one and the chaos one)."""
    assert o["main_rows"] == o["audited_rows"] == o["landed_rows"] > 0, o
    assert o["published_snapshot"] == o["audited_snapshot"], o
    for name, f in o["features"].items():
        assert f["rows"] == f["distinct_keys"] == f["reported"] > 0, (name, o)
    assert o["evaluation_status"] == "succeeded" and o["versions"] == 1, o
    assert str(o["registered_version"]) == str(o["version"]), o
    assert "challenger" in o["aliases"] and o["gate"] in ("promoted", "refused") and o["complete"] == "true", o
    assert ("champion" in o["aliases"]) == (o["gate"] == "promoted"), o


@pytest.mark.slow
def test_sigkill_each_task_midway_retries_to_the_same_result(standalone, pipeline_run, settings):
    unbroken = outcome(standalone, settings, pipeline_run["run_id"])
    check(unbroken)
    # Mid-way: half of what each task's stages took in the unbroken run.
    kill_after = {}
    for task_id in KILLED:
        seconds = [float(s) for s in STAGE_SECONDS.findall(standalone.task_log(DAG_ID, pipeline_run["run_id"], task_id))]
        assert seconds, f"{task_id}: no stage timing in the unbroken run's log"
        kill_after[task_id] = round(sum(seconds) / 2, 2)
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    versions_before = len(client.search_model_versions(f"name = '{settings.registered_model}'"))
    spec = standalone.env["REQDEDUP_CHAOS_KILL"]
    chaos_date = (dt.date.fromisoformat(pipeline_run["date"]) + dt.timedelta(days=1)).isoformat()
    run_id = f"chaos__{chaos_date}"
    with open(spec, "w") as f:
        json.dump({"run_id_prefix": "chaos__", "kill_after_s": kill_after}, f)
    try:
        t0 = time.monotonic()
        run_id, run, states = run_to_end(standalone, pipeline_conf(standalone, chaos_date), run_id=run_id)
        seconds = time.monotonic() - t0
    finally:
        import os

        os.unlink(spec)
    require_success(standalone, run_id, run, states)
    assert all(s == "success" for s in states.values()), states
    # Each listed task was killed on its first try and succeeded on its second.
    for task_id in KILLED:
        first = standalone.task_log(DAG_ID, run_id, task_id, try_number=1)
        assert "chaos: SIGKILL" in first, f"{task_id} (kill after {kill_after[task_id]} s) was not killed:\n{first[-3000:]}"
        assert try_number(standalone, run_id, task_id) == 2, task_id
    assert try_number(standalone, run_id, "check_params") == 1

    chaos = outcome(standalone, settings, run_id)
    check(chaos)
    # One model version for the run: a killed register left no orphan version behind.
    assert len(client.search_model_versions(f"name = '{settings.registered_model}'")) == versions_before + 1
    assert chaos["main_snapshot"] == chaos["audited_snapshot"]  # nothing committed to main since the publish
    assert chaos["keys"] == unbroken["keys"]  # the same handoffs, field for field
    assert chaos["landed_rows"] == unbroken["landed_rows"] and chaos["features"].keys() == unbroken["features"].keys()
    print(f"chaos run {run_id}: {seconds:.0f} s (unbroken: {pipeline_run['seconds']:.0f} s); kills at {kill_after}")
