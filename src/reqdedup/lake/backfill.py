"""Bucket backfills: recompute a feature for some user buckets only.

``reqdedup features backfill NAME --buckets 1,3`` (or ``--users 17,42``, mapped to buckets
with Iceberg's own bucket transform) recomputes the feature for the affected
``(event_date, bucket)`` partitions and replaces exactly those partitions in one atomic
dynamic-overwrite commit (``overwritePartitions`` of a DataFrame holding only rows with
``event_date`` in range and ``reqdedup.system.bucket(N, user_id) IN (...)``; Spark 3.5 cannot
push the bucket function into an ``overwrite(condition)``). A chosen partition that the
recompute leaves empty would keep its old files: the summary lists such ``stale_partitions``.
Files of every other bucket stay as they are (same paths in the new snapshot): the
backfill rewrites ~k/N of the table instead of all of it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError
from reqdedup.lake.features import (
    _between,
    feature_table,
    get_feature,
    impressions_df,
    parse_range,
)


def buckets_of_users(users: Sequence[int], num_buckets: int) -> dict[int, int]:
    """user_id -> bucket, by Iceberg's bucket transform (murmur3 of the long, mod N)."""
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import LongType

    bucket = BucketTransform(num_buckets).transform(LongType())
    return {int(u): int(bucket(int(u))) for u in users}


def resolve_buckets(num_buckets: int, buckets: Sequence[int] | None = None,
                    users: Sequence[int] | None = None) -> tuple[list[int], dict[int, int]]:
    if not buckets and not users:
        raise InputError("give --buckets (e.g. 1,3) or --users (e.g. 17,42) to backfill")
    bad = [b for b in (buckets or []) if not 0 <= int(b) < num_buckets]
    if bad:
        raise InputError(f"--buckets {bad} out of range: the table has buckets 0..{num_buckets - 1}")
    bad_users = [u for u in (users or []) if int(u) < 0]
    if bad_users:
        raise InputError(f"--users {bad_users}: user ids are >= 0")
    user_buckets = buckets_of_users(users or [], num_buckets)
    return sorted({int(b) for b in (buckets or [])} | set(user_buckets.values())), user_buckets


def _files(table) -> dict[str, tuple]:
    """path -> (partition tuple, bytes) of the current snapshot."""
    if table.current_snapshot() is None:
        return {}
    return {t.file.file_path: (tuple(t.file.partition), t.file.file_size_in_bytes) for t in table.scan().plan_files()}


def backfill_feature(name: str, start, end=None, *, buckets: Sequence[int] | None = None,
                     users: Sequence[int] | None = None, settings: Settings | None = None) -> dict:
    """Recompute feature ``name`` for dates start..end in the given buckets, one commit."""
    from pyspark.sql import functions as F

    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.read import bucket_field_position
    from reqdedup.lake.spark import get_spark

    feature = get_feature(name)
    settings = settings or get_settings()
    s, e = parse_range(start, end)
    try:
        side_table = load_table(feature_table(name), settings)
    except InputError:
        raise InputError(f"feature {name!r} was never added: run `reqdedup features add {name} "
                         f"--start {s} --end {e}` first") from None
    bucket_pos, num_buckets = bucket_field_position(side_table)
    chosen, user_buckets = resolve_buckets(num_buckets, buckets, users)

    spark = get_spark(settings)
    side = settings.spark_table(feature_table(name))
    bucket_fn = f"{settings.catalog_name}.system.bucket({num_buckets}, user_id)"
    in_buckets = F.expr(f"{bucket_fn} IN ({', '.join(map(str, chosen))})")
    before = _files(side_table)
    started = time.perf_counter()
    imp = impressions_df(spark, settings, s, e, feature.window_days)
    values = (feature.compute(spark, imp, s, e).select(*feature.keys, *feature.value_names)
              .where(in_buckets & _between("event_date", s, e)))
    # One atomic commit replacing exactly the (date, bucket) partitions present in `values`
    # (dynamic partition overwrite). Spark 3.5 cannot translate the bucket function into an
    # overwrite filter ("cannot translate expression to source filter"), so the DataFrame,
    # already restricted to the chosen buckets and dates, scopes the overwrite.
    values.writeTo(side).overwritePartitions()
    seconds = time.perf_counter() - started
    side_table = load_table(feature_table(name), settings)
    after = _files(side_table)
    removed = {p: v for p, v in before.items() if p not in after}
    added = {p: v for p, v in after.items() if p not in before}
    kept = set(before) & set(after)
    date_pos = 1 - bucket_pos
    days = {(s.toordinal() - 719163) + i for i in range((e - s).days + 1)}  # days since epoch

    def affected(part):
        return part[bucket_pos] in chosen and part[date_pos] in days

    new_parts = {part for part, _ in added.values()}
    stale = sorted({part for part, _ in before.values() if affected(part) and part not in new_parts})
    untouched_outside = all(p in after for p, (part, _) in before.items() if not affected(part))
    total_bytes = sum(b for _, b in before.values())
    summary = side_table.current_snapshot().summary
    return {
        "feature": name,
        "table": side,
        "start": str(s),
        "end": str(e),
        "buckets": chosen,
        "user_buckets": {str(u): b for u, b in user_buckets.items()},
        "snapshot_id": side_table.current_snapshot().snapshot_id,
        "operation": str(summary.operation.value if hasattr(summary.operation, "value") else summary.operation),
        "files_before": len(before),
        "files_rewritten": len(removed),
        "files_added": len(added),
        "files_untouched": len(kept),
        "bytes_table_before": total_bytes,
        "bytes_rewritten": sum(b for _, b in removed.values()),
        "bytes_added": sum(b for _, b in added.values()),
        "rewritten_vs_table": round(sum(b for _, b in removed.values()) / total_bytes, 4) if total_bytes else None,
        "other_buckets_untouched": untouched_outside,
        "stale_partitions": [list(p) for p in stale],
        "rewritten_files_outside_buckets": sorted(p for p, (part, _) in removed.items() if not affected(part)),
        "seconds": round(seconds, 3),
    }
