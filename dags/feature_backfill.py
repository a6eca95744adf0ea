"""Airflow DAG `feature_backfill`: recompute one feature for some user buckets (or users).

Manual only. Request-sorted, bucketed tables let a backfill rewrite just the buckets that
hold the affected users, in one atomic overwrite per feature side table; the impressions
table and its user-heavy columns are never rewritten.
"""

from __future__ import annotations

import os
import sys

from airflow.sdk import Param, dag, get_current_context, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))) if os.path.dirname(os.path.abspath(__file__)) not in sys.path else None
from reqdedup_dag_common import (  # noqa: E402
    DATE_PATTERN,
    DEFAULT_ARGS,
    FEATURES,
    START_DATE,
    check_date,
    fail_fast_on_input_error,
    log,
)

DOC_MD = """
# Feature backfill

Recomputes the feature `feature` for the dates `start`..`end` (inclusive), only in the
user buckets listed in `buckets`, or in the buckets that hold the users in `users`
(give one of the two). Each affected feature side table is replaced per bucket in one
atomic overwrite; other buckets and the impressions table stay untouched.

CLI equivalent: `reqdedup features backfill NAME --start S --end E --buckets 1,3`.
"""


@dag(
    dag_id="feature_backfill",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=DOC_MD,
    tags=["reqdedup", "backfill"],
    params={
        "feature": Param("", type="string", minLength=1, pattern=r"^[a-z][a-z0-9_]*$", title="Feature name",
                         description="A registered feature (`reqdedup features list`)."),
        "start": Param("2026-01-01", type="string", pattern=DATE_PATTERN, title="First date"),
        "end": Param("2026-01-01", type="string", pattern=DATE_PATTERN, title="Last date (inclusive)"),
        "buckets": Param([], type="array", items={"type": "integer", "minimum": 0}, uniqueItems=True,
                         title="User buckets", description="Bucket numbers to rewrite (or give users)."),
        "users": Param([], type="array", items={"type": "integer", "minimum": 0}, uniqueItems=True,
                       title="User ids", description="Users whose buckets are rewritten (or give buckets)."),
    },
)
def feature_backfill():
    @task(outlets=[FEATURES])
    def backfill() -> dict:
        """Recompute the feature in the affected buckets only."""
        from airflow.sdk.exceptions import AirflowFailException

        context = get_current_context()
        p = context["params"]
        start, end = check_date(p["start"], "param 'start'"), check_date(p["end"], "param 'end'")
        if start > end:
            raise AirflowFailException(f"param 'start' {start} is after 'end' {end}")
        if bool(p["buckets"]) == bool(p["users"]):
            raise AirflowFailException("give exactly one of the params 'buckets' and 'users'")
        with fail_fast_on_input_error():
            from reqdedup.lake.backfill import backfill_feature

            result = backfill_feature(p["feature"], start, end,
                                      buckets=p["buckets"] or None, users=p["users"] or None)
        context["outlet_events"][FEATURES].extra = {"feature": p["feature"], "start": start, "end": end}
        log.info("backfill: %s", result)
        return result

    backfill()


feature_backfill()
