"""Read path for training: Arrow record batches of whole requests, over pyiceberg.

Files are read partition by partition (date, user bucket), each partition's files in
sort-key order, and batches are cut only where ``request_id`` changes: a request's rows
never straddle two batches, even when the writer rolled a file mid-request.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from reqdedup.config import Settings, get_settings
from reqdedup.contract import SORT_KEYS, parse_date
from reqdedup.errors import InputError
from reqdedup.lake.catalog import load_table
from reqdedup.lake.tables import IMPRESSIONS


def _as_date(value) -> dt.date:
    return parse_date(value, "date")


def bucket_field_position(table) -> tuple[int, int]:
    """(position in the partition record, number of buckets) of the user_id bucket field."""
    schema = table.schema()
    for pos, field in enumerate(table.spec().fields):
        transform = str(field.transform)
        if schema.find_column_name(field.source_id) == "user_id" and transform.startswith("bucket"):
            return pos, int(transform[transform.index("[") + 1 : transform.index("]")])
    raise InputError(f"table {table.name()} is not partitioned by bucket(user_id)")


def plan_partitions(table, start, end, buckets: Sequence[int] | None = None, columns=None):
    """File scan tasks grouped by partition, in (date, bucket, first user_id) order."""
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThanOrEqual

    start, end = _as_date(start), _as_date(end)
    if end < start:
        raise InputError(f"date range is empty: {start} > {end}")
    bucket_pos, num_buckets = bucket_field_position(table)
    if buckets is not None:
        bad = [b for b in buckets if not 0 <= int(b) < num_buckets]
        if bad:
            raise InputError(f"buckets {bad} out of range: the table has buckets 0..{num_buckets - 1}")
        wanted = {int(b) for b in buckets}
    row_filter = And(GreaterThanOrEqual("event_date", start.isoformat()), LessThanOrEqual("event_date", end.isoformat()))
    scan = table.scan(row_filter=row_filter, selected_fields=tuple(columns) if columns else ("*",))
    groups: dict[tuple, list] = {}
    for task in scan.plan_files():
        part = task.file.partition
        if buckets is not None and part[bucket_pos] not in wanted:
            continue
        groups.setdefault(tuple(part), []).append(task)
    ordered = []
    user_field_id = table.schema().find_field("user_id").field_id
    for key in sorted(groups):
        tasks = sorted(groups[key], key=lambda t: (t.file.lower_bounds or {}).get(user_field_id, b""))
        ordered.append((key, tasks))
    return scan, ordered


def cut_at_request_boundaries(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Re-chunk a stream sorted by request into batches of about batch_rows whole requests.

    Each emitted batch ends where request_id changes; a single request larger than
    batch_rows is emitted whole.
    """
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= batch_rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            ids = table.column("request_id")
            # Last boundary at or before batch_rows: index where a new request starts.
            changes = pc.indices_nonzero(pc.not_equal(ids[1:], ids[:-1])).to_numpy() + 1
            cut_candidates = changes[changes <= batch_rows]
            if len(cut_candidates):
                cut = int(cut_candidates[-1])
            elif len(changes):
                cut = int(changes[0])  # one request larger than batch_rows: emit it whole
            else:
                break  # all pending rows are one request: wait for its end
            yield _one_batch(table.slice(0, cut))
            rest = table.slice(cut)
            pending = rest.to_batches()
            pending_rows = rest.num_rows
    if pending_rows:
        yield _one_batch(pa.Table.from_batches(pending))


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    return table.combine_chunks().to_batches()[0]


def _landing_stream(start, end, buckets, columns, settings: Settings) -> Iterator[pa.RecordBatch]:
    """The landed Parquet of each date, sorted by (user_id, request_id) in memory.

    For machines without the catalog (the GPU box has torch, numpy and pyarrow only): the
    same rows and request order within a date as the table, without its bucket partitions.
    """
    import pyarrow.parquet as pq

    if buckets is not None:
        raise InputError("bucket subsets need the Iceberg table (REQDEDUP_READ_SOURCE=iceberg)")
    day, last = _as_date(start), _as_date(end)
    if last < day:
        raise InputError(f"date range is empty: {day} > {last}")
    while day <= last:
        folder = settings.landing_path(day.isoformat())
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if files:
            # The sort keys are read even when the projection leaves them out, then dropped.
            wanted = list(columns) if columns else None
            read = None if wanted is None else list(dict.fromkeys([*wanted, *SORT_KEYS]))
            rows = pq.read_table(files, columns=read)
            rows = rows.sort_by([(k, "ascending") for k in SORT_KEYS])
            yield from (rows if wanted is None else rows.select(wanted)).to_batches()
        day += dt.timedelta(days=1)


def read_request_batches(
    start,
    end=None,
    *,
    buckets: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
    batch_rows: int = 8192,
    table_name: str = IMPRESSIONS,
    settings: Settings | None = None,
) -> Iterator[pa.RecordBatch]:
    """Arrow record batches for dates start..end (inclusive), optional bucket subset.

    ``columns`` projects the read; request_id is always included since batches are cut on it.
    Each batch holds whole requests sorted by (user_id, request_id) within a partition.
    """
    settings = settings or get_settings()
    if columns is not None and "request_id" not in columns:
        columns = ["request_id", *columns]
    if settings.read_source == "landing":
        yield from cut_at_request_boundaries(_landing_stream(start, end or start, buckets, columns, settings), batch_rows)
        return
    if settings.read_source != "iceberg":
        raise InputError(f"REQDEDUP_READ_SOURCE={settings.read_source!r}: choose iceberg or landing")
    from pyiceberg.io.pyarrow import ArrowScan

    table = load_table(table_name, settings)
    scan, partitions = plan_partitions(table, start, end or start, buckets, columns)
    projected = scan.projection()
    arrow_scan = ArrowScan(table.metadata, table.io, projected, scan.row_filter, scan.case_sensitive)

    def stream():
        for _, tasks in partitions:
            yield from arrow_scan.to_record_batches(tasks)

    # One stream over all partitions: a partition never shares a request with another
    # (one request -> one user -> one bucket and date), so boundaries hold across them.
    yield from cut_at_request_boundaries(stream(), batch_rows)
