"""`reqdedup validate --date D`: audit a staged date, then publish it (write-audit-publish).

``reqdedup ingest`` commits a date to the Iceberg branch ``stage_YYYYMMDD``; training reads
``main``. This runner validates the branch's snapshot with the Great Expectations suites of
:mod:`reqdedup.quality.suites` (library calls, ephemeral context, Spark DataFrames and small
aggregates, never the whole date in one pandas frame), writes Data Docs HTML and a JSON
report under ``settings.reports_dir``, and:

* on success, fast-forwards ``main`` to exactly the snapshot it validated and drops the
  branch (:func:`reqdedup.lake.ingest.publish_date`);
* on failure, raises :class:`ValidationFailed` naming each failed expectation with sample
  keys; the date stays quarantined on its branch (main never sees it) for inspection.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.lake.tables import IMPRESSIONS
from reqdedup.quality.suites import (
    DEFAULT_LABEL_RATE_BOUNDS,
    INDEX_COLUMNS,
    SUITES,
    SuiteParams,
    files_frame,
    requests_frame,
    schema_frame,
)

SAMPLE_KEYS = 5
DOCS_SITE = "reqdedup"


class ValidationFailed(InputError):
    """A staged date failed its expectations; ``summary`` holds the JSON-able results."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def label_rate_bounds(settings: Settings, low: float | None = None, high: float | None = None) -> tuple[float, float]:
    """CLI arguments, else ``settings.extra['label_rate_bounds']``, else the defaults."""
    default = tuple(settings.extra.get("label_rate_bounds", DEFAULT_LABEL_RATE_BOUNDS))
    low = default[0] if low is None else float(low)
    high = default[1] if high is None else float(high)
    if not 0.0 <= low <= high <= 1.0:
        raise InputError(f"label rate bounds [{low}, {high}] are not 0 <= min <= max <= 1 "
                         "(--label-rate-min/--label-rate-max)")
    return low, high


def landed_rows(settings: Settings, date: str) -> int | None:
    """Rows in the date's landing files (Parquet footers only), None if the folder is gone."""
    import pyarrow.parquet as pq

    from reqdedup.lake.ingest import landing_files

    try:
        files = landing_files(settings, date)
    except InputError:
        return None
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def landed_items(settings: Settings, date: str) -> int | None:
    """The item catalog size of the date's landing files (their schema metadata; the
    smallest when they differ), None if the folder is gone or the files carry none."""
    import pyarrow.parquet as pq

    from reqdedup.contract import items_from_metadata
    from reqdedup.lake.ingest import landing_files

    try:
        files = landing_files(settings, date)
        sizes = [items_from_metadata(pq.read_schema(p).metadata) for p in files]
    except InputError:
        return None
    return None if not sizes or None in sizes else min(sizes)


def _context(docs_dir: Path):
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    sites = {
        DOCS_SITE: {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    }
    # Only our site: the ephemeral context's default site would write to a temp folder.
    ctx.variables.data_docs_sites = sites
    return ctx


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))


def _summarize(suite: str, result) -> dict:
    cfg = result.expectation_config
    meta = cfg.meta or {}
    res = result.result or {}
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    item = {
        "suite": suite,
        "check": meta.get("check", cfg.type),
        "expectation": cfg.type,
        "kwargs": _jsonable(kwargs),
        "success": bool(result.success),
        "observed_value": _jsonable(res.get("observed_value")),
        "unexpected_count": res.get("unexpected_count"),
        "sample_keys": _jsonable(res.get("partial_unexpected_index_list") or []),
        "hint": meta.get("hint", ""),
    }
    if not item["sample_keys"] and res.get("partial_unexpected_list"):
        item["sample_keys"] = _jsonable(res["partial_unexpected_list"])
    if result.exception_info and result.exception_info.get("raised_exception"):
        item["error"] = str(result.exception_info.get("exception_message"))
    return item


def _row_count_diff(spark, settings: Settings, date: str, rows_df, limit: int = SAMPLE_KEYS) -> dict:
    """Sample keys present on one side only (landing vs staged), computed only on failure."""
    from reqdedup.lake.ingest import landing_files

    try:
        files = landing_files(settings, date)
    except InputError as e:
        return {"landing": str(e)}
    keys = ["request_id", "item_id"]
    landed = spark.read.parquet(*[str(p) for p in files]).select(*keys)
    staged = rows_df.select(*keys)
    return {
        "missing_from_table": [r.asDict() for r in landed.exceptAll(staged).limit(limit).collect()],
        "not_in_landing": [r.asDict() for r in staged.exceptAll(landed).limit(limit).collect()],
    }


def _local_opener(table):
    def open_path(path: str):
        return table.io.new_input(path).open()

    return open_path


def format_report(summary: dict) -> str:
    failed = [e for e in summary["expectations"] if not e["success"]]
    head = (f"validation of {summary['table']} {summary['date']} (branch {summary['branch']}, "
            f"snapshot {summary['snapshot_id']}) failed {len(failed)} of {len(summary['expectations'])} expectations:")
    lines = [head]
    for e in failed:
        column = e["kwargs"].get("column") or e["kwargs"].get("column_list") or ""
        what = f"{e['suite']}: {e['expectation']}" + (f" on {column}" if column else "")
        obs = e["observed_value"]
        count = e["unexpected_count"]
        detail = []
        if count is not None:
            detail.append(f"{count} unexpected")
        if obs is not None:
            detail.append(f"observed {obs}")
        if e.get("error"):
            detail.append(f"error {e['error']}")
        lines.append(f"  - {e['check']} [{what}]: {', '.join(detail) or 'failed'}")
        if e["sample_keys"]:
            lines.append(f"      sample keys: {json.dumps(e['sample_keys'], default=str)}")
        if e["hint"]:
            lines.append(f"      what to do: {e['hint']}")
    lines.append(f"{summary['date']} stays quarantined on branch {summary['branch']} of {summary['table']}; "
                 f"main (what training reads) does not have it. Data Docs: {summary['data_docs']}")
    return "\n".join(lines)


def validate_date(date: str, settings: Settings | None = None, *, table: str = IMPRESSIONS,
                  label_rate_min: float | None = None, label_rate_max: float | None = None,
                  publish: bool = True, items: int | None = None) -> dict:
    """Validate the staged snapshot of ``date``; publish it to main if every expectation holds.
    ``items``: the item catalog size (default: the landing files' schema metadata).

    Returns a JSON-able summary; raises :class:`ValidationFailed` (an InputError) otherwise.
    """
    from pyspark.sql import functions as F

    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.ingest import parse_date, publish_date, staged_files, staging_branch
    from reqdedup.lake.spark import get_spark

    settings = settings or get_settings()
    day = parse_date(date)
    low, high = label_rate_bounds(settings, label_rate_min, label_rate_max)
    branch = staging_branch(date)
    ice = load_table(table, settings)
    ref = ice.refs().get(branch)
    if ref is None:
        raise InputError(f"nothing staged for {date} in {settings.table(table)} (no branch {branch}): "
                         f"run `reqdedup ingest --date {date}` first")
    snapshot_id = int(ref.snapshot_id)
    started = time.perf_counter()
    params = SuiteParams(date=date, rows_landed=landed_rows(settings, date), label_rate_min=low, label_rate_max=high,
                         items=items if items is not None else landed_items(settings, date))

    spark = get_spark(settings)
    full = settings.spark_table(table)
    # The exact audited snapshot: publishing checks the branch still points at it.
    # localCheckpoint (memory and disk), not persist(): a cached plan over an Iceberg table
    # of this JDBC/SQLite catalog leaves a read lock behind and the publish commit fails
    # with SQLITE_BUSY; a checkpoint cuts the plan from the table.
    rows = (spark.read.option("snapshot-id", snapshot_id).table(full)
            .where(F.col("event_date") == F.lit(day)).localCheckpoint(eager=True))
    requests = requests_frame(rows).localCheckpoint(eager=True)
    opener = _local_opener(ice)
    paths = [f.file_path for f in staged_files(settings, table, snapshot_id, date)]
    batches = {
        "schema": ("pandas", schema_frame(rows.schema)),
        "rows": ("spark", rows),
        "requests": ("spark", requests),
        "files": ("pandas", files_frame(paths, opener)),
    }

    docs_dir = settings.reports_dir / "data_docs"
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    ctx = _context(docs_dir)
    # persist=False: the batches are checkpointed already, and no cached plan may outlive the run.
    sources = {"spark": ctx.data_sources.add_spark("spark", persist=False),
               "pandas": ctx.data_sources.add_pandas("pandas")}
    expectations = []
    tag = f"{table}_{date}"
    try:
        for name, (kind, frame) in batches.items():
            bd = sources[kind].add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}"))
            for exp in SUITES[name](params):
                suite.add_expectation(exp)
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{tag}_{name}", data=bd, suite=suite))
            result = vd.run(batch_parameters={"dataframe": frame}, result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": INDEX_COLUMNS[name],
                "partial_unexpected_count": SAMPLE_KEYS,
            })
            expectations += [_summarize(name, r) for r in result.results]
        for e in expectations:
            if e["check"] == "row_count_matches_landing" and not e["success"]:
                e["sample_keys"] = _jsonable(_row_count_diff(spark, settings, date, batches["rows"][1]))
                e["observed_value"] = {"table": e["observed_value"], "landed": params.rows_landed}
        ctx.build_data_docs(site_names=[DOCS_SITE])
    finally:
        # Checkpointed blocks are freed with the DataFrames; nothing is left cached.
        del rows, requests

    success = all(e["success"] for e in expectations)
    summary = {
        "date": date,
        "table": full,
        "branch": branch,
        "snapshot_id": snapshot_id,
        "rows_landed": params.rows_landed,
        "data_files": len(paths),
        "label_rate_bounds": [low, high],
        "success": success,
        "failed": [e["check"] for e in expectations if not e["success"]],
        "expectations": expectations,
        "data_docs": (docs_dir / "index.html").as_uri(),
        "seconds": round(time.perf_counter() - started, 3),
        "published": False,
    }
    report_dir = settings.reports_dir / "validation"
    report_dir.mkdir(parents=True, exist_ok=True)
    report_path = report_dir / f"{table}_{date}.json"
    summary["report"] = str(report_path)
    if not success:
        report_path.write_text(json.dumps(summary, indent=2, default=str))
        raise ValidationFailed(format_report(summary), summary)
    if publish:
        # Exactly the audited snapshot; refused if the branch moved while it was validated.
        summary["published"] = publish_date(date, settings, table, snapshot_id=snapshot_id)["published"]
    report_path.write_text(json.dumps(summary, indent=2, default=str))
    return summary
