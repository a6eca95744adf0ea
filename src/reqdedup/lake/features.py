"""Incremental feature columns: side tables bucketed and sorted like the impressions.

A new feature never rewrites the impressions table (whose user-heavy columns dominate its
bytes). ``reqdedup features add NAME`` computes the feature from ``main`` of the
impressions and writes it to ``<namespace>.features_<name>``: the same partition spec
(``event_date``, ``bucket(N, user_id)``) and sort order (``user_id, request_id``), keyed by
the impression keys it needs. One Iceberg overwrite commit per call, scoped to the dates.

Readers join per bucket:

* Spark: :func:`join_features`, a storage-partitioned join (both sides report Iceberg's
  bucket partitioning, so the sort-merge join needs no shuffle ``Exchange``);
* pyiceberg: :func:`read_request_batches_with_features`, which reads one (date, bucket)
  partition of the impressions and the same partition of each side table, and merges them
  on the keys, keeping the impressions' row order.

Features read only days before the target date (no same-day leakage).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from reqdedup.config import Settings, get_settings
from reqdedup.contract import parse_date
from reqdedup.errors import InputError
from reqdedup.lake.tables import IMPRESSIONS

CTR_PRIOR_STRENGTH = 20.0  # pseudo-impressions of the global rate added to each item
WINDOW_DAYS = 7
SIDE_PROPERTIES = {"format-version": "2", "write.parquet.compression-codec": "zstd"}


@dataclass(frozen=True)
class Feature:
    name: str
    description: str
    keys: tuple[str, ...]  # join keys; always include event_date and user_id (the partition sources)
    columns: tuple[tuple[str, str], ...]  # (name, Spark SQL type) of the values
    compute: Callable  # (spark, impressions_df, start: date, end: date) -> DataFrame(keys + columns)
    window_days: int = WINDOW_DAYS

    @property
    def value_names(self) -> list[str]:
        return [c for c, _ in self.columns]


def _between(col, start: dt.date, end: dt.date):
    from pyspark.sql import functions as F

    return (F.col(col) >= F.lit(start)) & (F.col(col) <= F.lit(end))


def _target_days(spark, start: dt.date, end: dt.date):
    from pyspark.sql import functions as F

    return spark.sql(f"SELECT explode(sequence(DATE'{start}', DATE'{end}', interval 1 day)) AS event_date") \
        .select(F.col("event_date"))


def _item_ctr_7d(spark, imp, start: dt.date, end: dt.date):
    """Per impression row: the item's smoothed engagement rate over the 7 days before."""
    from pyspark.sql import functions as F

    lo = start - dt.timedelta(days=WINDOW_DAYS)
    daily = (imp.where(_between("event_date", lo, end - dt.timedelta(days=1)))
             .groupBy(F.col("event_date").alias("day"), "item_id")
             .agg(F.count(F.lit(1)).alias("n"), F.sum("label").alias("clicks")))
    days = _target_days(spark, start, end)
    in_window = (F.col("day") >= F.date_sub("event_date", WINDOW_DAYS)) & (F.col("day") < F.col("event_date"))
    windowed = days.join(daily, in_window, "inner")
    per_item = windowed.groupBy("event_date", "item_id").agg(F.sum("n").alias("n"), F.sum("clicks").alias("clicks"))
    prior = windowed.groupBy("event_date").agg((F.sum("clicks") / F.sum("n")).alias("prior"))
    rows = imp.where(_between("event_date", start, end)).select("event_date", "user_id", "request_id", "item_id")
    return (rows.join(per_item, ["event_date", "item_id"], "left")
            .join(F.broadcast(prior), ["event_date"], "left")
            .select(
                "event_date", "user_id", "request_id", "item_id",
                ((F.coalesce("clicks", F.lit(0)) + F.lit(CTR_PRIOR_STRENGTH) * F.col("prior"))
                 / (F.coalesce("n", F.lit(0)) + F.lit(CTR_PRIOR_STRENGTH))).cast("double").alias("item_ctr_7d"),
                F.coalesce("n", F.lit(0)).cast("bigint").alias("item_impressions_7d"),
            ))


def _user_requests_7d(spark, imp, start: dt.date, end: dt.date):
    """Per (date, user) active that date: the user's requests over the 7 days before."""
    from pyspark.sql import functions as F

    lo = start - dt.timedelta(days=WINDOW_DAYS)
    daily = (imp.where(_between("event_date", lo, end - dt.timedelta(days=1)))
             .groupBy(F.col("event_date").alias("day"), F.col("user_id").alias("u"))
             .agg(F.countDistinct("request_id").alias("requests")))
    users = imp.where(_between("event_date", start, end)).select("event_date", "user_id").distinct()
    in_window = ((F.col("u") == F.col("user_id")) & (F.col("day") >= F.date_sub("event_date", WINDOW_DAYS))
                 & (F.col("day") < F.col("event_date")))
    return (users.join(daily, in_window, "left")
            .groupBy("event_date", "user_id")
            .agg(F.coalesce(F.sum("requests"), F.lit(0)).cast("bigint").alias("user_requests_7d")))


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            name="item_ctr_7d",
            description="item's engagement rate over the 7 previous days, smoothed towards that window's "
                        f"global rate with {CTR_PRIOR_STRENGTH:g} pseudo-impressions (null: no history at all)",
            keys=("event_date", "user_id", "request_id", "item_id"),
            columns=(("item_ctr_7d", "DOUBLE"), ("item_impressions_7d", "BIGINT")),
            compute=_item_ctr_7d,
        ),
        Feature(
            name="user_requests_7d",
            description="user's request count over the 7 previous days (per user and date)",
            keys=("event_date", "user_id"),
            columns=(("user_requests_7d", "BIGINT"),),
            compute=_user_requests_7d,
        ),
    )
}

_KEY_TYPES = {"event_date": "DATE", "user_id": "BIGINT", "request_id": "BIGINT", "item_id": "INT"}


def get_feature(name: str) -> Feature:
    try:
        return FEATURES[name]
    except KeyError:
        raise InputError(f"unknown feature {name!r}: known features are {', '.join(sorted(FEATURES))}") from None


def resolve_feature_columns(columns: Sequence[str], settings: Settings | None = None) -> list[tuple[Feature, list[str]]]:
    """The side tables that hold these value columns: (feature, its columns in the given
    order), features in first-use order. InputError naming the column and the tables (with
    their columns) when a name is no feature's value column, or is given twice."""
    settings = settings or get_settings()
    owner = {c: f for f in FEATURES.values() for c in f.value_names}
    seen, out = set(), {}
    for col in columns:
        if not isinstance(col, str) or col not in owner:
            known = "; ".join(f"{settings.table(feature_table(f.name))}: {', '.join(f.value_names)}"
                              for f in FEATURES.values())
            raise InputError(f"feature column {col!r} is in no feature table (known tables and columns: {known})")
        if col in seen:
            raise InputError(f"feature column {col!r} (table {settings.table(feature_table(owner[col].name))}) "
                             "is named twice")
        seen.add(col)
        out.setdefault(owner[col].name, (owner[col], []))[1].append(col)
    return list(out.values())


def list_features() -> list[dict]:
    return [{"name": f.name, "description": f.description, "keys": list(f.keys), "columns": f.value_names,
             "table": feature_table(f.name)} for f in FEATURES.values()]


def feature_table(name: str) -> str:
    return f"features_{name}"


def parse_range(start, end=None) -> tuple[dt.date, dt.date]:
    def one(v, what):
        return parse_date(v, what)

    s = one(start, "--start/--date")
    e = one(end if end is not None else start, "--end")
    if e < s:
        raise InputError(f"date range is empty: --start {s} is after --end {e}")
    return s, e


def create_side_table_sql(settings: Settings, feature: Feature) -> list[str]:
    cols = [f"{k} {_KEY_TYPES[k]} NOT NULL" for k in feature.keys] + [f"{c} {t}" for c, t in feature.columns]
    props = ", ".join(f"'{k}'='{v}'" for k, v in sorted(SIDE_PROPERTIES.items()))
    table = settings.spark_table(feature_table(feature.name))
    sort = ", ".join(k for k in ("user_id", "request_id", "item_id") if k in feature.keys)
    return [
        f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)}) USING iceberg "
        f"PARTITIONED BY (event_date, bucket({settings.buckets}, user_id)) TBLPROPERTIES ({props})",
        f"ALTER TABLE {table} WRITE ORDERED BY {sort}",
    ]


def impressions_df(spark, settings: Settings, start: dt.date, end: dt.date, window_days: int = WINDOW_DAYS):
    """main of the impressions over [start - window, end]; fails clearly if a target date is missing."""
    from reqdedup.lake.catalog import load_table

    load_table(IMPRESSIONS, settings)  # a clear error when nothing was ingested
    imp = spark.table(settings.spark_table(IMPRESSIONS))
    present = {r[0] for r in imp.where(_between("event_date", start, end)).select("event_date").distinct().collect()}
    wanted = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    missing = [str(d) for d in wanted if d not in present]
    if missing:
        raise InputError(f"no published impressions for {', '.join(missing)} in {settings.table(IMPRESSIONS)}: "
                         "run `reqdedup ingest` and `reqdedup validate` for them first")
    return imp.where(_between("event_date", start - dt.timedelta(days=window_days), end))


def partition_layout(table) -> list[tuple[str, str]]:
    """(source column, transform) of each partition field: comparable across tables."""
    schema = table.schema()
    return [(schema.find_column_name(f.source_id), str(f.transform)) for f in table.spec().fields]


def table_bytes(table, row_filter=None) -> tuple[int, int]:
    """(data files, bytes) of a pyiceberg table's current snapshot, optionally filtered."""
    if table.current_snapshot() is None:
        return 0, 0
    files = [t.file for t in (table.scan(row_filter=row_filter) if row_filter else table.scan()).plan_files()]
    return len(files), sum(f.file_size_in_bytes for f in files)


def add_feature(name: str, start, end=None, settings: Settings | None = None) -> dict:
    """Compute a feature for dates start..end into its side table (one overwrite commit)."""
    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.spark import get_spark

    feature = get_feature(name)
    settings = settings or get_settings()
    s, e = parse_range(start, end)
    spark = get_spark(settings)
    imp = impressions_df(spark, settings, s, e, feature.window_days)
    for stmt in create_side_table_sql(settings, feature):
        spark.sql(stmt)
    side = settings.spark_table(feature_table(name))
    started = time.perf_counter()
    values = feature.compute(spark, imp, s, e).select(*feature.keys, *feature.value_names)
    values.writeTo(side).overwrite(_between("event_date", s, e))
    seconds = time.perf_counter() - started
    side_table = load_table(feature_table(name), settings)
    snap = side_table.current_snapshot()
    summary = snap.summary
    written = int(summary.get("added-files-size", 0))
    imp_table = load_table(IMPRESSIONS, settings)
    date_filter = f"event_date >= '{s}' and event_date <= '{e}'"
    imp_files, imp_bytes = table_bytes(imp_table)
    imp_date_files, imp_date_bytes = table_bytes(imp_table, date_filter)
    rows = spark.table(side).where(_between("event_date", s, e)).count()
    return {
        "feature": name,
        "table": side,
        "start": str(s),
        "end": str(e),
        "rows": rows,
        "snapshot_id": snap.snapshot_id,
        "files_written": int(summary.get("added-data-files", 0)),
        "bytes_written": written,
        "impressions_snapshot_id": imp_table.current_snapshot().snapshot_id,
        "impressions_bytes_same_dates": imp_date_bytes,
        "impressions_bytes_whole_table": imp_bytes,
        "impressions_files_whole_table": imp_files,
        # Adding the column in place would rewrite at least these dates' impression files.
        "written_vs_rewriting_dates": round(written / imp_date_bytes, 4) if imp_date_bytes else None,
        "written_vs_whole_table": round(written / imp_bytes, 4) if imp_bytes else None,
        "seconds": round(seconds, 3),
    }


# ---- readers -----------------------------------------------------------------------------
def join_features(spark, names: Sequence[str], start, end=None, settings: Settings | None = None,
                  columns: Sequence[str] | None = None):
    """Impressions (main) left-joined with feature side tables, per bucket, without a shuffle.

    Both sides report Iceberg's (event_date, bucket(user_id)) partitioning and the join keys
    contain the partition source columns, so Spark plans a storage-partitioned sort-merge
    join (the ``merge`` hint keeps tiny tables from being broadcast instead).
    """
    settings = settings or get_settings()
    s, e = parse_range(start, end)
    df = spark.table(settings.spark_table(IMPRESSIONS)).where(_between("event_date", s, e))
    if columns is not None:
        keep = list(dict.fromkeys(["event_date", "user_id", "request_id", "item_id", *columns]))
        df = df.select(*keep)
    for name in names:
        feature = get_feature(name)
        side = spark.table(settings.spark_table(feature_table(name))).where(_between("event_date", s, e))
        df = df.hint("merge").join(side, list(feature.keys), "left")
    return df


def read_request_batches_with_features(
    start,
    end=None,
    *,
    features: Sequence[str],
    buckets: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
    batch_rows: int = 8192,
    settings: Settings | None = None,
) -> Iterator:
    """The training read path plus feature columns, merged one (date, bucket) at a time.

    Same order and request boundaries as :func:`reqdedup.lake.read.read_request_batches`;
    rows without a feature value get nulls.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyiceberg.io.pyarrow import ArrowScan

    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.read import cut_at_request_boundaries, plan_partitions

    settings = settings or get_settings()
    specs = [get_feature(n) for n in features]
    s, e = parse_range(start, end)
    imp = load_table(IMPRESSIONS, settings)
    if columns is not None:
        needed = {k for f in specs for k in f.keys} | {"request_id"}
        columns = list(dict.fromkeys([*sorted(needed), *columns]))
    scan, partitions = plan_partitions(imp, s, e, buckets, columns)
    imp_scan = ArrowScan(imp.metadata, imp.io, scan.projection(), scan.row_filter, scan.case_sensitive)
    sides = []
    for f in specs:
        table = load_table(feature_table(f.name), settings)
        if partition_layout(table) != partition_layout(imp):
            raise InputError(f"{table.name()} is not partitioned like {imp.name()}: "
                             f"{partition_layout(table)} vs {partition_layout(imp)}")
        side_scan, side_parts = plan_partitions(table, s, e, buckets, [*f.keys, *f.value_names])
        reader = ArrowScan(table.metadata, table.io, side_scan.projection(), side_scan.row_filter,
                           side_scan.case_sensitive)
        sides.append((f, reader, side_scan.projection().as_arrow(), dict(side_parts)))

    def merged() -> Iterator[pa.RecordBatch]:
        for key, tasks in partitions:
            left = imp_scan.to_table(tasks)
            if left.num_rows == 0:
                continue
            for f, reader, side_schema, side_parts in sides:
                right = reader.to_table(side_parts[key]) if key in side_parts else side_schema.empty_table()
                keys = list(f.keys)
                probe = left.select(keys).append_column("__row", pa.array(range(left.num_rows), pa.int64()))
                joined = probe.join(right.select([*keys, *f.value_names]), keys, join_type="left outer")
                if joined.num_rows != left.num_rows:
                    raise InputError(f"{feature_table(f.name)} has duplicate keys in partition {key}: "
                                     "recompute it with `reqdedup features add`")
                joined = joined.take(pc.sort_indices(joined.column("__row")))
                for c in f.value_names:
                    left = left.append_column(joined.schema.field(c), joined.column(c))
            yield from left.to_batches()

    yield from cut_at_request_boundaries(merged(), batch_rows)
