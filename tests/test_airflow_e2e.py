"""`airflow standalone` on 127.0.0.1: trigger the pipeline through REST API v2 with params,
wait for success; a trigger with invalid params is refused by the params schema; a bad
landing date fails data_quality and nothing downstream runs.

The server, the prepared lake and the unbroken run are the session's (tests/conftest.py,
tests/airflow_server.py), shared with tests/test_browser.py and tests/test_chaos.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_server import DAG_ID, E2E_DATE, TINY, pipeline_conf, run_to_end

@pytest.mark.slow
def test_trigger_with_params_through_rest_api_v2(standalone, pipeline_run, settings):
    run_id, seconds = pipeline_run["run_id"], pipeline_run["seconds"]
    states = standalone.task_states(DAG_ID, run_id)
    assert all(s in ("success", "skipped") for s in states.values()), states
    run = standalone.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
    assert run["conf"]["date"] == E2E_DATE and run["conf"]["users"] == 30
    # The run worked on the date from its params, and the check task says so in its log.
    assert E2E_DATE in standalone.task_log(DAG_ID, run_id, "check_params")
    assert states["register"] == "success" and states["train_and_evaluate"] == "success", states
    # What the run left: the date on main, the storage report, this evaluation registered.
    from reqdedup.lake.catalog import load_table

    rows = load_table("impressions", settings).scan(row_filter=f"event_date = '{E2E_DATE}'").to_arrow()
    assert rows.num_rows > 0  # published to main after the data-quality gate
    assert (settings.reports_dir / "storage_bench.json").is_file()
    assert (settings.reports_dir / "evaluation" / "summary.json").is_file()
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    assert client.get_model_version_by_alias(settings.registered_model, "challenger").version
    print(f"standalone healthy in {standalone.started_in:.0f} s; run {run_id}: {seconds:.0f} s")


@pytest.mark.slow
def test_trigger_with_invalid_params_is_refused(standalone):
    standalone.wait_for_dag(DAG_ID)
    r = standalone.trigger(DAG_ID, {"date": "01/03/2026"})
    assert r.status_code == 400, r.text
    assert "date" in r.text and "does not match" in r.text
    r = standalone.trigger(DAG_ID, {"users": -5})
    assert r.status_code == 400 and "users" in r.text, r.text


@pytest.mark.slow
def test_report_page_is_served_to_logged_in_users_only(standalone):
    import httpx

    assert httpx.get(f"{standalone.url}/reqdedup-reports/", timeout=30).status_code == 401
    r = httpx.get(f"{standalone.url}/reqdedup-reports/", timeout=30,
                  headers={"Authorization": f"Bearer {standalone.login()}"})
    assert r.status_code == 200 and "reqdedup: latest reports" in r.text
    r = httpx.get(f"{standalone.url}/reqdedup-reports/files/%2e%2e/%2e%2e/etc/passwd", timeout=30,
                  headers={"Authorization": f"Bearer {standalone.token}"})
    assert r.status_code == 404
    plugins = standalone.api("GET", "/plugins").json()["plugins"]
    views = [v for p in plugins for v in p["external_views"]]
    assert any(v.get("url_route") == "reqdedup-report" for v in views), plugins


@pytest.mark.slow
def test_failed_data_quality_stops_the_run_before_training(standalone, settings):
    """Landed logs that pass the landing checks but break an expectation (labels not 0/1):
    data_quality fails without retries, its log naming the expectation; nothing downstream runs,
    and the date never reaches main."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from airflow_server import cli_stage

    bad_day = "2026-02-05"
    landed = cli_stage(standalone.env, "generate", "--date", bad_day, *[f"--{k}={v}" for k, v in TINY.items()],
                       "--seed", "4")
    for f in Path(landed["path"]).glob("*.parquet"):
        t = pq.read_table(f)
        i = t.schema.get_field_index("label")
        labels = pc.add(t.column(i), pa.scalar(2, t.schema.field(i).type))  # 2 and 3: not 0/1
        pq.write_table(t.set_column(i, t.schema.field(i), labels), f)

    conf = pipeline_conf(standalone, bad_day, landing="existing", storage_report=False)
    run_id, run, states = run_to_end(standalone, conf)
    assert run["state"] == "failed", states
    assert states["sorting_ingest"] == "success", states
    assert states["data_quality"] == "failed", states
    for downstream in ("publish", "feature_columns", "train_and_evaluate", "register", "storage_report"):
        assert states[downstream] == "upstream_failed", states
    tis = standalone.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/data_quality").json()
    assert tis["try_number"] == 1, tis  # bad input: no retries
    log = standalone.task_log(DAG_ID, run_id, "data_quality")
    assert "label_binary" in log and "quarantined" in log, log[-6000:]
    from reqdedup.lake.catalog import load_table

    rows = load_table("impressions", settings).scan(row_filter=f"event_date = '{bad_day}'").to_arrow()
    assert rows.num_rows == 0  # quarantined on its staging branch
