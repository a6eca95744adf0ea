"""Airflow DAG `synthetic_request_logs`: a day of synthetic feed request logs lands daily.

For the demo and for trying the pipeline without real data: each run writes
``<landing>/date=D/part-*.parquet`` in raw-log order (rows of concurrent requests
interleaved), replacing that date's folder atomically, and updates the landing Asset.
"""

from __future__ import annotations

import os
import sys

from airflow.sdk import Param, dag, get_current_context, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))) if os.path.dirname(os.path.abspath(__file__)) not in sys.path else None
from reqdedup.contract import REQUEST_ID_STRIDE  # noqa: E402 (pure Python: the data contract)
from reqdedup_dag_common import (  # noqa: E402
    DATE_PATTERN,
    DEFAULT_ARGS,
    LANDING,
    START_DATE,
    fail_fast_on_input_error,
    log,
    run_date,
)

DOC_MD = """
# Synthetic request logs

Writes one day of synthetic request logs (one row per request x candidate, in raw-log
order) under the landing folder, as a logging service would deliver them. The same
`data_seed` gives the same simulated world (users, items, tastes) on every date, so days
chain into a consistent history. Rerunning a date replaces it (atomic folder swap).

Then run `request_dedup_pipeline` for the date (its `landing=existing` uses these logs).
"""


@dag(
    dag_id="synthetic_request_logs",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=DOC_MD,
    tags=["reqdedup", "demo"],
    params={
        "date": Param(None, type=["null", "string"], pattern=DATE_PATTERN, title="Date (YYYY-MM-DD)",
                      description="Empty: the run's logical date (ds)."),
        "users": Param(500, type="integer", minimum=1, maximum=10_000_000),
        "requests": Param(2000, type="integer", minimum=1, maximum=REQUEST_ID_STRIDE - 1),
        "candidates": Param(50, type="integer", minimum=2, maximum=10_000),
        "history": Param(256, type="integer", minimum=1, maximum=50_000),
        "items": Param(20000, type="integer", minimum=100, maximum=100_000_000),
        "data_seed": Param(0, type="integer", minimum=0),
    },
)
def synthetic_request_logs():
    @task(outlets=[LANDING])
    def generate() -> dict:
        """Generate the date's request logs into the landing folder."""
        context = get_current_context()
        p = context["params"]
        date = run_date(context)
        with fail_fast_on_input_error():
            from reqdedup.data.generator import GeneratorConfig, write_landing

            cfg = GeneratorConfig(users=p["users"], requests=p["requests"], candidates=p["candidates"],
                                  history=p["history"], items=p["items"], seed=p["data_seed"], date=date)
            result = write_landing(cfg)
        context["outlet_events"][LANDING].extra = {"date": date, "path": result["path"]}
        log.info("landed: %s", result)
        return result

    generate()


synthetic_request_logs()
