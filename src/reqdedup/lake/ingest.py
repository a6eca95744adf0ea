"""sorting-ingest: landing/date=D (raw-log order) -> Iceberg impressions, request-sorted.

Checks every landing file before Spark touches the table (a bad file leaves the table at
its previous snapshot), then replaces the date with one Iceberg overwrite commit filtered on
``event_date = D``: a rerun of the same date yields the same rows, never duplicates.

Write-audit-publish: the overwrite is committed to a staging branch ``stage_YYYYMMDD``
created from ``main``; training reads ``main`` only. ``reqdedup validate`` audits the
branch and publishes it by fast-forwarding ``main`` to exactly the audited
snapshot (one atomic catalog commit, see :func:`publish_date`); a date that fails validation
stays quarantined on its branch.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from reqdedup import contract
from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.lake.tables import IMPRESSIONS, create_impressions_sql
from reqdedup.schema import IMPRESSIONS_SCHEMA

KEY_COLUMNS_NOT_NULL = ("request_id", "user_id", "item_id", "event_date")
NOT_NULL_COLUMNS = tuple(f.name for f in IMPRESSIONS_SCHEMA if not f.nullable)
VALUE_CHECK_BATCH_ROWS = 65536


def parse_date(date: str) -> dt.date:
    return contract.parse_date(date, "--date")


def landing_files(settings: Settings, date: str) -> list[Path]:
    folder = settings.landing_path(date)
    if not folder.is_dir():
        raise InputError(f"no landing folder for {date}: {folder} does not exist (run `reqdedup generate --date {date}`)")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))
    if not files:
        raise InputError(f"no Parquet files in {folder}")
    return files


def file_items(path: Path, items: int | None = None) -> int:
    """The item catalog size that bounds item ids and history ids of one landing file: the
    explicit ``items`` (ingest --items), else the file's schema metadata ``reqdedup.items``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if items is not None:
        if int(items) < 1:
            raise InputError(f"--items {items}: the item catalog size must be >= 1")
        return int(items)
    try:
        found = contract.items_from_metadata(pq.read_schema(path).metadata)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    if found is None:
        raise InputError(f"{path}: no item catalog size (schema metadata {contract.ITEMS_METADATA_KEY.decode()!r}): "
                         f"item_id and user_history cannot be range-checked; pass `reqdedup ingest --items N` "
                         f"(the producer's catalog size) or write the files with reqdedup.schema.landing_schema(N)")
    return found


def _first_rows(mask, offset: int, limit: int = 3) -> list[int]:
    import numpy as np

    return [int(i) + offset for i in np.flatnonzero(mask)[:limit]]


def check_values(path: Path, date: dt.date, items: int) -> None:
    """The values of one landing file, one batch at a time (pyarrow, bounded memory): no null
    in any non-nullable column (nor inside its lists), finite dense features, categorical ids
    inside their vocabularies, item ids and history ids inside the catalog [0, items).
    InputError naming the file, the date, each failed column and check, and the first rows."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    problems: dict[tuple[str, str], list] = {}  # (column, check) -> [count, first rows]

    def note(column: str, check: str, mask, offset: int, rows_of=None):
        n = int(np.count_nonzero(mask))
        if not n:
            return
        rows = _first_rows(mask, 0)
        rows = [int(rows_of[r]) + offset for r in rows] if rows_of is not None else [r + offset for r in rows]
        entry = problems.setdefault((column, check), [0, []])
        entry[0] += n
        entry[1] = (entry[1] + rows)[:3]

    bounds = {**{c: (0, n) for c, n in contract.VOCABULARIES.items()}, **{c: (0, items) for c in contract.ITEM_ID_COLUMNS}}
    offset = 0
    for batch in pf.iter_batches(batch_size=VALUE_CHECK_BATCH_ROWS, columns=list(NOT_NULL_COLUMNS)):
        for name in NOT_NULL_COLUMNS:
            col = batch.column(name)
            if col.null_count:
                note(name, "not null", col.is_null().to_numpy(zero_copy_only=False), offset)
            is_list = hasattr(col.type, "value_type")
            values = pc.list_flatten(col) if is_list else col
            parents = pc.list_parent_indices(col).to_numpy() if is_list else None
            if is_list and values.null_count:
                note(name, "no null inside the list", values.is_null().to_numpy(zero_copy_only=False), offset, parents)
            if name in contract.DENSE_COLUMNS:
                finite = pc.fill_null(pc.is_finite(values), True).to_numpy(zero_copy_only=False)
                note(name, "finite (no NaN or inf)", ~finite, offset, parents)
            if name in bounds:
                low, high = bounds[name]
                v = values.to_numpy(zero_copy_only=False) if not values.null_count else \
                    pc.fill_null(values, low).to_numpy(zero_copy_only=False)
                what = f"in [{low}, {high})" + (" (the item catalog size)" if name in contract.ITEM_ID_COLUMNS else
                                                " (the vocabulary, reqdedup.contract)")
                note(name, what, (v < low) | (v >= high), offset, parents)
        offset += batch.num_rows
    if problems:
        lines = [f"column {c!r}: check {check}: {n} value(s) fail, first at row(s) {rows}"
                 for (c, check), (n, rows) in problems.items()]
        raise InputError(f"{path} (date {date}): value checks failed:\n  " + "\n  ".join(lines))


def check_landing_file(path: Path, date: dt.date, items: int | None = None) -> int:
    """Check one landing file's footer, schema, keys, date and values (`check_values`, with
    the catalog size of `file_items`); return its row count."""
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
    try:
        check_values(path, date, file_items(path, items))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: corrupt Parquet data ({e})") from None
    return rows


STAGING_PREFIX = "stage_"


def staging_branch(date: str) -> str:
    return STAGING_PREFIX + parse_date(date).strftime("%Y%m%d")


def is_staging_branch(name: str) -> bool:
    """Whether a ref name is a staging branch of :func:`staging_branch` (``stage_YYYYMMDD``)."""
    rest = name[len(STAGING_PREFIX):]
    return name.startswith(STAGING_PREFIX) and len(rest) == 8 and rest.isdigit()


def restart_branch(spark, full_name: str, branch: str) -> None:
    """(Re)start the staging branch from main, so staging is idempotent too.

    Iceberg's ``CREATE OR REPLACE BRANCH`` replaces a branch with main's snapshot, and fails
    when main has none ("main has no snapshot": a new table whose first date was staged but
    not yet published, e.g. an Airflow retry of the first ingest, or a re-ingest after a
    failed validation). Then main is empty and the branch is dropped and created again,
    which starts it from the empty table as the first run did.
    """
    refs = {r["name"] for r in spark.sql(f"SELECT name FROM {full_name}.refs").collect()}
    if "main" in refs:
        spark.sql(f"ALTER TABLE {full_name} CREATE OR REPLACE BRANCH {branch}")
    else:
        spark.sql(f"ALTER TABLE {full_name} DROP BRANCH IF EXISTS {branch}")
        spark.sql(f"ALTER TABLE {full_name} CREATE BRANCH {branch}")


def ingest_date(date: str, settings: Settings | None = None, table: str = IMPRESSIONS,
                properties: dict | None = None, sorted_table: bool = True, publish: bool = False,
                items: int | None = None, projections: bool | None = None) -> dict:
    """Sort one landed date into a staging branch of the impressions table.

    With ``publish`` the branch is published at once (no audit: benchmarks, trusted data).
    ``properties``/``sorted_table`` create a variant table (the storage benchmark's raw-log
    baseline and property sweep); the defaults are the production table. ``items`` bounds
    item ids and history ids (default: each landing file's schema metadata). ``projections``
    (default: for the request-sorted impressions table) writes the request-level projection
    of each new data file (``reqdedup.lake.projection``), which training reads.
    """
    settings = settings or get_settings()
    day = parse_date(date)
    files = landing_files(settings, date)
    rows_landed = sum(check_landing_file(p, day, items) for p in files)
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
    restart_branch(spark, full_name, branch)
    started = time.perf_counter()
    landed = spark.read.parquet(*[str(p) for p in files])
    columns = [f.name for f in IMPRESSIONS_SCHEMA]
    # Iceberg's writer asks Spark for the table's distribution and sort order
    # (range by event_date, bucket(user_id), user_id, request_id): the sort happens there.
    (
        landed.select(*columns)
        .writeTo(f"{full_name}.branch_{branch}")
        # Spark reads Parquet columns as nullable, which Iceberg's nullability check refuses for
        # a required column even without a null: every non-nullable column (and the values in
        # its lists) was checked for nulls above, per file, by check_values.
        .option("check-nullability", "false")
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
    if projections is None:
        projections = sorted_table and table == IMPRESSIONS
    projected = None
    if projections:
        # The request-level projection of each new data file (one row per request), which the
        # training reader reads instead of decoding every candidate row's user block.
        from reqdedup.lake.projection import write_projections

        projected = write_projections([f.file_path for f in files_written], settings)
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
        "request_projections": projected,
    }
    if publish:
        summary["published"] = publish_date(date, settings, table, snapshot_id=int(staged_snapshot))["published"]
    return summary


def staged_files(settings: Settings, table: str, snapshot_id: int, date: str) -> list:
    """Data files of one date in a snapshot (pyiceberg: no Spark job needed)."""
    from reqdedup.lake.catalog import load_table

    scan = load_table(table, settings).scan(row_filter=f"event_date = '{date}'", snapshot_id=snapshot_id)
    return [task.file for task in scan.plan_files()]


def _main_lineage(metadata) -> list[int]:
    """Snapshot ids of main's current snapshot and all its ancestors (newest first)."""
    from pyiceberg.table.snapshots import ancestors_of

    current = metadata.current_snapshot()
    return [] if current is None else [s.snapshot_id for s in ancestors_of(current, metadata)]


def _is_ancestor_of(metadata, ancestor_id: int | None, snapshot_id: int) -> bool:
    """Whether ``ancestor_id`` (None: the empty table) is ``snapshot_id`` or one of its ancestors."""
    from pyiceberg.table.snapshots import ancestors_of

    if ancestor_id is None:
        return True
    snap = metadata.snapshot_by_id(snapshot_id)
    return snap is not None and any(s.snapshot_id == ancestor_id for s in ancestors_of(snap, metadata))


def publish_date(date: str, settings: Settings | None = None, table: str = IMPRESSIONS,
                 snapshot_id: int | None = None) -> dict:
    """Make a staged date visible on main: fast-forward main to the staged snapshot and drop
    the staging branch, in one atomic catalog commit (pyiceberg ``manage_snapshots``).

    ``snapshot_id`` is the snapshot that was audited (``validate --no-publish`` reports it):
    main moves to exactly it, and the publish is refused if the staging branch moved past it
    (a re-ingest after the audit). Without it, main moves to the branch's current snapshot.

    Idempotent: if the snapshot is already main's (or an ancestor of main's) snapshot, the
    result says ``already`` and nothing is committed. Refused if main moved since the date
    was staged (not an ancestor of the snapshot any more: stage and validate it again).
    """
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.table.refs import SnapshotRefType
    from pyiceberg.table.update import AssertRefSnapshotId, RemoveSnapshotRefUpdate, SetSnapshotRefUpdate

    from reqdedup.lake.catalog import load_table

    settings = settings or get_settings()
    branch = staging_branch(date)
    ice = load_table(table, settings)
    meta = ice.metadata
    name = settings.spark_table(table)
    staged = meta.refs.get(branch)
    staged_id = None if staged is None else int(staged.snapshot_id)
    main_id = None if meta.current_snapshot() is None else int(meta.current_snapshot().snapshot_id)
    base = {"date": date, "table": name, "branch": branch}
    if snapshot_id is not None:
        snapshot_id = int(snapshot_id)
        if snapshot_id in _main_lineage(meta):
            return {**base, "published": True, "already": True, "status": "already published",
                    "snapshot_id": snapshot_id, "main_snapshot_id": main_id}
        if staged_id is None:
            raise InputError(f"cannot publish {date} at snapshot {snapshot_id}: it is not on main of {name} and "
                             f"nothing is staged (no branch {branch}); run `reqdedup ingest --date {date}` "
                             "and validate again")
        if staged_id != snapshot_id:
            raise InputError(f"cannot publish {date} at snapshot {snapshot_id}: branch {branch} of {name} moved "
                             f"past the audited snapshot (now at {staged_id}); validate the date again")
    elif staged_id is None:
        if main_id is not None and ice.scan(row_filter=f"event_date = '{date}'", selected_fields=("event_date",),
                                            limit=1).to_arrow().num_rows:
            return {**base, "published": True, "already": True, "status": "already published",
                    "snapshot_id": main_id, "main_snapshot_id": main_id}
        raise InputError(f"nothing staged for {date} in {name}: run `reqdedup ingest --date {date}` first")
    else:
        snapshot_id = staged_id
    if not _is_ancestor_of(meta, main_id, snapshot_id):
        raise InputError(f"cannot publish {date}: main of {name} moved since it was staged (main at {main_id} "
                         f"is not an ancestor of snapshot {snapshot_id}); run ingest and validate again")
    # One catalog commit with two requirements: main still where it was read, the branch
    # still at the audited snapshot; a concurrent writer makes it fail, never half-apply.
    # (catalog.commit_table, not manage_snapshots(): a transaction keeps one requirement per
    # type, so it would drop the branch's AssertRefSnapshotId next to main's.)
    requirements = (AssertRefSnapshotId(ref="main", snapshot_id=main_id),
                    AssertRefSnapshotId(ref=branch, snapshot_id=snapshot_id))
    updates = (SetSnapshotRefUpdate(ref_name="main", type=SnapshotRefType.BRANCH, snapshot_id=snapshot_id),
               RemoveSnapshotRefUpdate(ref_name=branch))
    try:
        ice.catalog.commit_table(ice, requirements, updates)
    except CommitFailedException as e:  # another writer moved main or the branch: a retry re-checks
        raise RuntimeError(f"publish of {date} at snapshot {snapshot_id} lost a race with another commit to "
                           f"{name} ({e}); retry") from e
    return {**base, "published": True, "already": False, "status": "published", "snapshot_id": snapshot_id,
            "main_snapshot_id": snapshot_id, "previous_main_snapshot_id": main_id}
