"""`reqdedup maintain`: storage clean-up of the lake's Iceberg tables.

Four steps, each idempotent and safe to retry, in the order the weekly ``lake_maintenance``
DAG runs them:

1. ``branches``: drop staging branches (``stage_YYYYMMDD``, write-audit-publish) whose last
   commit is older than N days: quarantined dates that nobody re-ingested or published.
   Until they go, ``expire_snapshots`` must keep their snapshots and files.
2. ``rewrite``: Iceberg's ``rewrite_data_files`` procedure with the ``sort`` strategy, which
   sorts by the table's own sort order (``user_id, request_id``): small files of a partition
   are compacted into files still sorted by request, so readers see the same order.
3. ``expire``: Iceberg's ``expire_snapshots`` procedure: snapshots older than N days go,
   keeping at least the last K of main, and every data/manifest file that no remaining
   snapshot references is deleted.
4. ``orphans``: Iceberg's ``remove_orphan_files`` procedure: files under the table location
   that no metadata references (failed writes) and older than N days (Iceberg refuses less
   than one day, so an in-flight write is never taken for an orphan); then the request-level
   projections (``reqdedup.lake.projection``) whose data file is gone.

``rewrite`` writes the request-level projection of each data file of ``impressions`` (training
reads them) and of any table whose files had them, where missing.

Steps 2 to 4 run through Spark SQL ``CALL <catalog>.system.<procedure>``; step 1 is a
catalog commit through pyiceberg, one per branch, each asserting the branch did not move.
"""

from __future__ import annotations

import datetime as dt
import time

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.lake.tables import IMPRESSIONS

STEPS = ("branches", "rewrite", "expire", "orphans")

DEFAULTS = {
    "branch_max_age_days": 14.0,
    "older_than_days": 7.0,
    "retain_last": 5,
    "orphan_older_than_days": 3.0,  # Iceberg's own default; the procedure refuses < 1 day
}

# Iceberg's remove_orphan_files refuses an interval under 24 hours (concurrent writes).
MIN_ORPHAN_AGE_DAYS = 1.0


def _check(value, name: str, minimum: float, integer: bool = False):
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise InputError(f"maintain: {name} = {value!r} is not a number") from None
    if integer and number != value:
        raise InputError(f"maintain: {name} = {value!r} is not an integer")
    if number < minimum:
        raise InputError(f"maintain: {name} = {value!r} must be >= {minimum}")
    return number


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _cutoff(days: float, now: dt.datetime | None = None) -> dt.datetime:
    return (now or _now()) - dt.timedelta(days=days)


def _timestamp_sql(moment: dt.datetime) -> str:
    """A Spark SQL TIMESTAMP literal in UTC (the session time zone is UTC: spark_conf)."""
    return "TIMESTAMP '" + moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "'"


def list_lake_tables(settings: Settings | None = None) -> list[str]:
    """Names of the tables in the settings' namespace (impressions, feature side tables, ...)."""
    from reqdedup.lake.catalog import get_catalog

    settings = settings or get_settings()
    catalog = get_catalog(settings)
    if (settings.namespace,) not in {tuple(n) for n in catalog.list_namespaces()}:
        return []
    return sorted(ident[-1] for ident in catalog.list_tables(settings.namespace))


def resolve_tables(tables: list[str] | None, settings: Settings) -> list[str]:
    """The given tables (each must exist), or every table of the namespace."""
    existing = list_lake_tables(settings)
    if not tables:
        return existing
    missing = [t for t in tables if t not in existing]
    if missing:
        raise InputError(f"maintain: no table {', '.join(settings.table(t) for t in missing)} in catalog "
                         f"{settings.catalog_location} (tables: {', '.join(existing) or 'none'})")
    return list(dict.fromkeys(tables))


# ---- 1. stale staging branches (pyiceberg) -------------------------------------------------
def drop_stale_branches(table: str, max_age_days: float, settings: Settings | None = None,
                        now: dt.datetime | None = None) -> dict:
    """Drop the table's staging branches whose head snapshot is older than ``max_age_days``."""
    from pyiceberg.exceptions import CommitFailedException

    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.ingest import is_staging_branch

    settings = settings or get_settings()
    max_age_days = _check(max_age_days, "branch_max_age_days", 0)
    cutoff_ms = int(_cutoff(max_age_days, now).timestamp() * 1000)
    ice = load_table(table, settings)
    dropped, kept = [], []
    for name, ref in sorted(ice.metadata.refs.items()):
        if not is_staging_branch(name) or ref.snapshot_ref_type != "branch":
            continue
        head = ice.metadata.snapshot_by_id(ref.snapshot_id)
        committed_ms = head.timestamp_ms if head is not None else 0
        entry = {"branch": name, "snapshot_id": ref.snapshot_id,
                 "committed_at": dt.datetime.fromtimestamp(committed_ms / 1000, dt.timezone.utc).isoformat()}
        if committed_ms >= cutoff_ms:
            kept.append(entry)
            continue
        try:
            # Asserts the branch is still at this snapshot: a concurrent re-ingest wins.
            ice.manage_snapshots().remove_branch(name).commit()
        except CommitFailedException as e:
            raise RuntimeError(f"dropping branch {name} of {settings.spark_table(table)} raced another commit ({e}); "
                               "retry") from e
        dropped.append(entry)
    return {"table": settings.spark_table(table), "max_age_days": max_age_days, "dropped": dropped, "kept": kept}


# ---- 2.-4. Iceberg's Spark procedures ----------------------------------------------------
def _call(spark, settings: Settings, procedure: str, table: str, **args) -> list[dict]:
    named = [f"table => '{settings.namespace}.{table}'"] + [f"{k} => {v}" for k, v in args.items()]
    sql = f"CALL {settings.catalog_name}.system.{procedure}({', '.join(named)})"
    return [r.asDict() for r in spark.sql(sql).collect()]


def _sort_columns(table: str, settings: Settings) -> list[str]:
    from reqdedup.lake.catalog import load_table

    ice = load_table(table, settings)
    schema = ice.schema()
    return [schema.find_column_name(f.source_id) for f in ice.sort_order().fields]


def rewrite_data_files(table: str, spark, settings: Settings | None = None, rewrite_all: bool = False,
                       min_input_files: int | None = None) -> dict:
    """Compact the table's data files with the sort strategy (the table's sort order).

    By default Iceberg picks the file groups worth rewriting (small or too large files,
    at least ``min-input-files`` per group); ``rewrite_all`` rewrites every file.
    A table without a declared sort order is refused: compacting it with ``sort`` would have
    no order to keep.
    """
    settings = settings or get_settings()
    order = _sort_columns(table, settings)
    if not order:
        raise InputError(f"maintain rewrite: {settings.spark_table(table)} declares no sort order "
                         "(ALTER TABLE ... WRITE ORDERED BY ...), so the sort strategy has none to apply")
    options = {}
    if rewrite_all:
        options["rewrite-all"] = "true"
    if min_input_files is not None:
        options["min-input-files"] = str(_check(min_input_files, "min_input_files", 1, integer=True))
    args = {"strategy": "'sort'"}
    if options:
        args["options"] = "map(" + ", ".join(f"'{k}', '{v}'" for k, v in options.items()) + ")"
    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.projection import projection_path, write_projections

    def main_files() -> list[str]:
        return [task.file.file_path for task in load_table(table, settings).scan().plan_files()]

    # The training table, and any table whose files carry request-level projections, keeps
    # them: the rewritten files get theirs (and files ingested before projections existed too).
    projected = table == IMPRESSIONS or any(projection_path(settings, f).exists() for f in main_files())
    started = time.perf_counter()
    row = _call(spark, settings, "rewrite_data_files", table, **args)[0]
    out = {"table": settings.spark_table(table), "strategy": "sort", "sort_order": order, "options": options,
           **{k: int(v) for k, v in row.items() if v is not None}, "seconds": round(time.perf_counter() - started, 3)}
    if projected:
        out["request_projections"] = write_projections(main_files(), settings)
    return out


def expire_snapshots(table: str, spark, older_than_days: float, retain_last: int,
                     settings: Settings | None = None, now: dt.datetime | None = None) -> dict:
    """Expire snapshots older than ``older_than_days``, keeping at least ``retain_last``; the
    files only expired snapshots referenced are deleted. Branch heads (staging) are kept."""
    settings = settings or get_settings()
    older_than_days = _check(older_than_days, "older_than_days", 0)
    retain_last = _check(retain_last, "retain_last", 1, integer=True)
    cutoff = _cutoff(older_than_days, now)
    from reqdedup.lake.catalog import load_table

    before = {s.snapshot_id for s in load_table(table, settings).metadata.snapshots}
    row = _call(spark, settings, "expire_snapshots", table, older_than=_timestamp_sql(cutoff),
                retain_last=str(retain_last))[0]
    after = {s.snapshot_id for s in load_table(table, settings).metadata.snapshots}
    return {"table": settings.spark_table(table), "older_than": cutoff.isoformat(), "retain_last": retain_last,
            "expired_snapshot_ids": sorted(before - after), "snapshots_left": len(after),
            **{k: int(v) for k, v in row.items() if v is not None}}


def remove_orphan_files(table: str, spark, older_than_days: float, settings: Settings | None = None,
                        now: dt.datetime | None = None, dry_run: bool = False) -> dict:
    """Delete files under the table location that no metadata references, older than
    ``older_than_days`` (at least one day: Iceberg's guard against in-flight writes)."""
    settings = settings or get_settings()
    older_than_days = _check(older_than_days, "orphan_older_than_days", MIN_ORPHAN_AGE_DAYS)
    cutoff = _cutoff(older_than_days, now)
    rows = _call(spark, settings, "remove_orphan_files", table, older_than=_timestamp_sql(cutoff),
                 dry_run="true" if dry_run else "false")
    files = sorted(r["orphan_file_location"] for r in rows)
    return {"table": settings.spark_table(table), "older_than": cutoff.isoformat(), "dry_run": dry_run,
            "orphan_files": files, "orphan_files_count": len(files)}


def maintain(steps: list[str] | tuple[str, ...] = STEPS, tables: list[str] | None = None,
             settings: Settings | None = None, *, branch_max_age_days: float = DEFAULTS["branch_max_age_days"],
             older_than_days: float = DEFAULTS["older_than_days"], retain_last: int = DEFAULTS["retain_last"],
             orphan_older_than_days: float = DEFAULTS["orphan_older_than_days"], rewrite_all: bool = False,
             dry_run: bool = False) -> dict:
    """Run the given steps (in STEPS order) on the given tables (default: every table of the
    namespace). All parameters are checked before any table is touched."""
    settings = settings or get_settings()
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise InputError(f"maintain: unknown step(s) {unknown or steps}; steps are {', '.join(STEPS)}")
    _check(branch_max_age_days, "branch_max_age_days", 0)
    _check(older_than_days, "older_than_days", 0)
    _check(retain_last, "retain_last", 1, integer=True)
    _check(orphan_older_than_days, "orphan_older_than_days", MIN_ORPHAN_AGE_DAYS)
    names = resolve_tables(tables, settings)
    now = _now()
    ordered = [s for s in STEPS if s in steps]
    result: dict = {"steps": ordered, "tables": names, "at": now.isoformat()}
    spark = None
    if set(ordered) - {"branches"} and names:
        from reqdedup.lake.spark import get_spark

        spark = get_spark(settings, app_name="reqdedup-maintain")
    for step in ordered:
        out = []
        for table in names:
            if step == "branches":
                out.append(drop_stale_branches(table, branch_max_age_days, settings, now=now))
            elif step == "rewrite":
                if not _sort_columns(table, settings):
                    out.append({"table": settings.spark_table(table), "skipped": "no sort order declared"})
                    continue
                out.append(rewrite_data_files(table, spark, settings, rewrite_all=rewrite_all))
            elif step == "expire":
                out.append(expire_snapshots(table, spark, older_than_days, retain_last, settings, now=now))
            else:
                out.append(remove_orphan_files(table, spark, orphan_older_than_days, settings, now=now,
                                               dry_run=dry_run))
        if step == "orphans":  # after Iceberg deleted files: the request-level projections of files now gone
            from reqdedup.lake.projection import remove_stale_projections

            result["request_projections"] = remove_stale_projections(settings, dry_run=dry_run)
        result[step] = out
    return result
