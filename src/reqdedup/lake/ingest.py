"""sorting-ingest: landing/date=D (raw-log order) -> Iceberg impressions, request-sorted.

Checks every landing file before Spark touches the table (a bad file leaves the table at
its previous snapshot), then replaces the date with one Iceberg overwrite commit filtered on
``event_date = D``: a rerun of the same date yields the same rows, never duplicates.

Write-audit-publish: the overwrite is committed to a staging branch ``stage_YYYYMMDD``
created from ``main``; training reads ``main`` only. ``reqdedup validate`` audits the
branch and publishes it by fast-forwarding ``main`` (Iceberg's own procedure, atomic);
a date that fails validation stays quarantined on its branch.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.lake.tables import IMPRESSIONS, create_impressions_sql
from reqdedup.schema import IMPRESSIONS_SCHEMA

KEY_COLUMNS_NOT_NULL = ("request_id", "user_id", "item_id", "event_date")


def parse_date(date: str) -> dt.date:
    try:
        return dt.date.fromisoformat(date)
    except ValueError:
        raise InputError(f"--date {date!r} is not a date of the form YYYY-MM-DD") from None


def landing_files(settings: Settings, date: str) -> list[Path]:
    folder = settings.landing_path(date)
    if not folder.is_dir():
        raise InputError(f"no landing folder for {date}: {folder} does not exist (run `reqdedup generate --date {date}`)")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))
    if not files:
        raise InputError(f"no Parquet files in {folder}")
    return files


def check_landing_file(path: Path, date: dt.date) -> int:
    """Check one landing file's footer, schema, keys and date; return its row count."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    problems = []
    for field in IMPRESSIONS_SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not schema.field(idx).type.equals(field.type):
            problems.append(f"column {field.name!r} has type {schema.field(idx).type}, expected {field.type}")
    if problems:
        raise InputError(f"{path}: schema check failed: " + "; ".join(problems))
    rows = pf.metadata.num_rows
    if rows == 0:
        return 0
    try:
        keys = pf.read(columns=list(KEY_COLUMNS_NOT_NULL))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: corrupt Parquet data ({e})") from None
    nulls = {c: keys.column(c).null_count for c in KEY_COLUMNS_NOT_NULL if keys.column(c).null_count}
    if nulls:
        raise InputError(f"{path}: null keys: " + ", ".join(f"{n} null {c}" for c, n in nulls.items()))
    dates = pc.unique(keys.column("event_date")).to_pylist()
    if dates != [date]:
        raise InputError(f"{path}: event_date values {sorted(set(map(str, dates)))} do not match the landing date {date}")
    return rows


def staging_branch(date: str) -> str:
    return "stage_" + parse_date(date).strftime("%Y%m%d")


def ingest_date(date: str, settings: Settings | None = None, table: str = IMPRESSIONS,
                properties: dict | None = None, sorted_table: bool = True, publish: bool = False) -> dict:
    """Sort one landed date into a staging branch of the impressions table.

    With ``publish`` the branch is published at once (no audit: benchmarks, trusted data).
    ``properties``/``sorted_table`` create a variant table (the storage benchmark's raw-log
    baseline and property sweep); the defaults are the production table.
    """
    settings = settings or get_settings()
    day = parse_date(date)
    files = landing_files(settings, date)
    rows_landed = sum(check_landing_file(p, day) for p in files)
    if rows_landed == 0:
        raise InputError(f"{settings.landing_path(date)}: the landing files hold no rows")
    bytes_landed = sum(p.stat().st_size for p in files)

    from pyspark.sql import functions as F

    from reqdedup.lake.spark import get_spark

    spark = get_spark(settings, app_name=f"reqdedup-ingest-{date}")
    for stmt in create_impressions_sql(settings, table, properties, sorted_table):
        spark.sql(stmt)
    full_name = settings.spark_table(table)
    branch = staging_branch(date)
    # A rerun restarts the branch from main, so staging is idempotent too.
    spark.sql(f"ALTER TABLE {full_name} CREATE OR REPLACE BRANCH {branch}")
    started = time.perf_counter()
    landed = spark.read.parquet(*[str(p) for p in files])
    columns = [f.name for f in IMPRESSIONS_SCHEMA]
    # Iceberg's writer asks Spark for the table's distribution and sort order
    # (range by event_date, bucket(user_id), user_id, request_id): the sort happens there.
    (
        landed.select(*columns)
        .writeTo(f"{full_name}.branch_{branch}")
        .option("check-nullability", "false")  # nulls in keys were refused above, per file
        .overwrite(F.col("event_date") == F.lit(day))
    )
    seconds = time.perf_counter() - started
    staged_snapshot = spark.sql(
        f"SELECT snapshot_id FROM {full_name}.refs WHERE name = '{branch}'"
    ).collect()[0]["snapshot_id"]
    staged = spark.read.option("branch", branch).table(full_name).where(F.col("event_date") == F.lit(day))
    rows_in_table = staged.count()
    if rows_in_table != rows_landed:
        raise RuntimeError(f"ingest of {date} wrote {rows_in_table} rows, {rows_landed} landed")
    files_written = staged_files(settings, table, int(staged_snapshot), date)
    summary = {
        "date": date,
        "table": full_name,
        "branch": branch,
        "landing_files": len(files),
        "rows": rows_landed,
        "bytes_landed": bytes_landed,
        "data_files": len(files_written),
        "bytes_in_table": sum(f.file_size_in_bytes for f in files_written),
        "snapshot_id": int(staged_snapshot),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_landed / seconds, 1),
        "landed_mb_per_s": round(bytes_landed / 1e6 / seconds, 2),
        "published": False,
    }
    if publish:
        summary["published"] = publish_date(date, settings, table)["published"]
    return summary


def staged_files(settings: Settings, table: str, snapshot_id: int, date: str) -> list:
    """Data files of one date in a snapshot (pyiceberg: no Spark job needed)."""
    from reqdedup.lake.catalog import load_table

    scan = load_table(table, settings).scan(row_filter=f"event_date = '{date}'", snapshot_id=snapshot_id)
    return [task.file for task in scan.plan_files()]


def publish_date(date: str, settings: Settings | None = None, table: str = IMPRESSIONS) -> dict:
    """Make a staged date visible on main (fast-forward), then drop its staging branch.

    Idempotent: publishing a date whose branch is already gone is a no-op if main holds the
    date. Fails clearly if main moved since the date was staged (stage it again).
    """
    settings = settings or get_settings()
    from reqdedup.lake.spark import get_spark

    spark = get_spark(settings)
    full_name = settings.spark_table(table)
    branch = staging_branch(date)
    refs = {r["name"]: r["snapshot_id"] for r in spark.sql(f"SELECT name, snapshot_id FROM {full_name}.refs").collect()}
    if branch not in refs:
        if spark.table(full_name).where(f"event_date = DATE'{date}'").limit(1).count():
            return {"date": date, "branch": branch, "published": True, "already": True}
        raise InputError(f"nothing staged for {date} in {full_name}: run `reqdedup ingest --date {date}` first")
    try:
        spark.sql(f"CALL {settings.catalog_name}.system.fast_forward('{settings.namespace}.{table}', 'main', '{branch}')")
    except Exception as e:  # Iceberg refuses when main is not an ancestor of the branch
        raise InputError(f"cannot publish {date}: main moved since it was staged ({e}); run ingest again") from None
    spark.sql(f"ALTER TABLE {full_name} DROP BRANCH IF EXISTS {branch}")
    return {"date": date, "branch": branch, "published": True, "snapshot_id": int(refs[branch])}
