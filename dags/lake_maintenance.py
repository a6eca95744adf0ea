"""Airflow DAG `lake_maintenance`: weekly storage clean-up of the lake's Iceberg tables.

A thin file: params, schedule and wiring. Each task is one `reqdedup maintain STEP`
subprocess (Iceberg's Spark procedures; see ``reqdedup.lake.maintain``), idempotent and
safe to retry.
"""

from __future__ import annotations

import datetime as dt
import os
import sys

from airflow.sdk import Param, dag, get_current_context, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))) if os.path.dirname(os.path.abspath(__file__)) not in sys.path else None
from reqdedup_dag_common import (  # noqa: E402
    DEFAULT_ARGS,
    START_DATE,
    log,
    run_stage,
)

DOC_MD = """
# Lake maintenance

Weekly (Sundays 12:00 UTC, away from the daily pipeline), in this order (each task is `reqdedup maintain STEP`, on every table of the lake's
namespace unless `tables` names some):

| task | what it does |
| --- | --- |
| `drop_stale_branches` | drops staging branches `stage_YYYYMMDD` whose last commit is older than `branch_max_age_days` (dates quarantined by a failed validation and never re-ingested) |
| `rewrite_data_files` | Iceberg `rewrite_data_files`, strategy `sort` (the table's sort order, `user_id, request_id`): compacts small files, rows stay request-sorted |
| `expire_snapshots` | Iceberg `expire_snapshots` older than `expire_older_than_days`, keeping the last `retain_last`: deletes the files only expired snapshots referenced |
| `remove_orphan_files` | Iceberg `remove_orphan_files` older than `orphan_older_than_days` (>= 1: never a file an in-flight write is making) |

CLI equivalent: `reqdedup maintain all --branch-max-age-days 14 --older-than-days 7 --retain-last 5`.
Docs: `docs/data.md` (Maintenance).
"""

PARAMS = {
    "tables": Param([], type="array", items={"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"}, uniqueItems=True,
                    title="Tables", description="Tables of the lake namespace; empty: every table."),
    "branch_max_age_days": Param(14, type="number", minimum=0, maximum=3650, title="Staging branch max age (days)",
                                 description="Staging branches whose last commit is older are dropped."),
    "expire_older_than_days": Param(7, type="number", minimum=0, maximum=3650, title="Expire snapshots older than (days)"),
    "retain_last": Param(5, type="integer", minimum=1, maximum=10_000, title="Snapshots always kept"),
    "orphan_older_than_days": Param(3, type="number", minimum=1, maximum=3650, title="Orphan files older than (days)",
                                    description="At least 1: Iceberg refuses less (a write in flight)."),
    "rewrite": Param(True, type="boolean", title="Rewrite data files (sort strategy)"),
    "rewrite_all": Param(False, type="boolean", title="Rewrite every file",
                         description="Off: Iceberg picks the file groups worth compacting."),
}


def _maintain(step: str, *args) -> dict:
    """`reqdedup maintain STEP` with the run's tables, as a subprocess (its own Spark JVM)."""
    p = get_current_context()["params"]
    tables = [a for t in p["tables"] for a in ("--table", t)]
    result = run_stage("maintain", step, *tables, *map(str, args))
    log.info("maintain %s: %s", step, result)
    return result


@dag(
    dag_id="lake_maintenance",
    # Weekly, Sundays at 12:00 UTC: away from the daily pipeline's midnight runs, since a
    # rewrite committed between a date's ingest and its publish moves main, and the publish
    # then refuses (main moved since staging) until the date is ingested again.
    schedule="0 12 * * 0",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    dagrun_timeout=dt.timedelta(hours=6),
    params=PARAMS,
    doc_md=DOC_MD,
    tags=["reqdedup", "maintenance"],
)
def lake_maintenance():
    @task
    def drop_stale_branches() -> dict:
        """Drop staging branches older than `branch_max_age_days`."""
        p = get_current_context()["params"]
        return _maintain("branches", "--branch-max-age-days", p["branch_max_age_days"])

    @task
    def rewrite_data_files() -> dict:
        """Sort-strategy compaction (the table's sort order)."""
        from airflow.sdk.exceptions import AirflowSkipException

        p = get_current_context()["params"]
        if not p["rewrite"]:
            raise AirflowSkipException("rewrite param is off")
        return _maintain("rewrite", *(["--rewrite-all"] if p["rewrite_all"] else []))

    @task(trigger_rule="none_failed")
    def expire_snapshots() -> dict:
        """Expire old snapshots; their unreferenced files are deleted."""
        p = get_current_context()["params"]
        return _maintain("expire", "--older-than-days", p["expire_older_than_days"],
                         "--retain-last", p["retain_last"])

    @task
    def remove_orphan_files() -> dict:
        """Delete unreferenced files older than `orphan_older_than_days`."""
        p = get_current_context()["params"]
        return _maintain("orphans", "--orphan-older-than-days", p["orphan_older_than_days"])

    drop_stale_branches() >> rewrite_data_files() >> expire_snapshots() >> remove_orphan_files()


lake_maintenance()
