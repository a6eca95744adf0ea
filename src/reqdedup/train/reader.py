"""Request-level reader: RequestBatches streamed from request-sorted Parquet file tasks.

The training unit is the request (Meta's ROO): a file of a request-sorted table holds each
request's rows contiguously, so one pass over a row group finds the request boundaries and
keeps the user block (history, dense features, segment, country) once per request. Per-row
copies of user columns exist only while one row group is decoded; what crosses processes
(DataLoader workers -> trainer) and goes to the device is the request-level form.

One reader over *file tasks* (:class:`FileUnit`), whatever their source:

- ``plan_iceberg``: the files of the Iceberg scan plan of ``main`` (date range, bucket
  subset), in (date, bucket, first user) order;
- ``plan_landing``: the landed Parquet of each date (raw-log order), sorted once per date
  into request-sorted files with the table's partitioning (a cache under the home folder),
  for hosts without a catalog (``REQDEDUP_READ_SOURCE=landing``);
- ``plan_files``: any folder of request-sorted Parquet files of the impressions schema.

A request the writer split across two files of one partition is stitched: the file where
it starts reads its tail from the next file, and the next file skips it.

Orders (each a function of (seed, epoch) and a new permutation every epoch):

- ``table``: the files in plan order, requests in file order (the same every epoch);
- ``request_shuffle``: the rank's files shuffled and dealt into ``streams`` interleaved
  streams; whole requests gathered in a buffer of ``buffer_requests`` requests, shuffled,
  packed into batches; ``buffer_requests`` None is a full shuffle of the rank's requests,
  1 is the table order;
- ``iid``: the same streams, rows shuffled in a buffer of ``buffer_rows`` rows (None: all);
  each batch keeps one user block per distinct request among its rows (few repeat).

Ranks read disjoint files (balanced by rows); every rank takes ``steps_per_epoch`` batches,
the minimum every rank can fill. Decoding runs in torch DataLoader workers; packing,
collation and pinning in a background thread, so both overlap the training step.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from reqdedup.contract import parse_date
from reqdedup.errors import InputError
from reqdedup.lake.projection import (  # noqa: F401 (history_row_hash, rows_per_decode_batch: the reader's API too)
    REQUEST_COLUMNS,
    REQUESTS_SUFFIX,
    USER_BLOCK,
    check_user_blocks,
    fixed_width,
    history_row_hash,
    local_path,
    open_parquet,
    projection_path,
    read_batches,
    request_projection,
    request_starts,
    rows_per_decode_batch,
)
from reqdedup.train.batch import HISTORY_ID_SHIFT, ITEM_DENSE_DIM, USER_DENSE_DIM, RequestBatch

ORDERS = ("table", "request_shuffle", "iid")
CANDIDATE_COLUMNS = ("item_id", "item_category", "item_dense", "label")
READ_COLUMNS = ("request_id", *USER_BLOCK, *CANDIDATE_COLUMNS)


# ---------------------------------------------------------------------------------------
# file tasks
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSource:
    """The files of one feature side table in the same (date, bucket) partition as a file
    task, sorted by the same keys: what the reader merges into that task's rows."""

    table: str  # the side table's name, for messages
    keys: tuple[str, ...]  # join keys inside the partition (event_date is the partition's)
    columns: tuple[str, ...]  # value columns taken from it
    paths: tuple[str, ...]  # its data files of this partition


@dataclass(frozen=True)
class FileUnit:
    """One Parquet data file of a request-sorted table, and what it owns.

    ``skip_head``: rows at the start that belong to a request begun in the previous file of
    the partition; ``tail_rows``: rows at the start of ``tail_path`` that finish this file's
    last request. ``rows`` is what the file owns after that stitching.
    """

    path: str
    partition: tuple
    rows: int
    skip_head: int = 0
    tail_path: str | None = None
    tail_rows: int = 0
    # One row per request with the user block (the request-level projection), when written:
    # the reader then reads only candidate columns from ``path``.
    requests_path: str | None = None
    # Feature side tables of the same partition, joined into every row (data.feature_columns).
    features: tuple[FeatureSource, ...] = ()


def _request_ids_of_group(pf: pq.ParquetFile, group: int) -> np.ndarray:
    return pf.read_row_group(group, columns=["request_id"]).column(0).to_numpy()


def _leading_run(path: str, request_id: int) -> int:
    """Rows at the start of ``path`` whose request_id is ``request_id``."""
    pf, run = open_parquet(path), 0
    for g in range(pf.num_row_groups):
        ids = _request_ids_of_group(pf, g)
        differs = np.flatnonzero(ids != request_id)
        if differs.size:
            return run + int(differs[0])
        run += ids.size
    return run


def _last_request_id(path: str) -> int | None:
    pf = open_parquet(path)
    for g in reversed(range(pf.num_row_groups)):
        ids = _request_ids_of_group(pf, g)
        if ids.size:
            return int(ids[-1])
    return None


def _first_request_id(path: str) -> int | None:
    pf = open_parquet(path)
    for g in range(pf.num_row_groups):
        ids = _request_ids_of_group(pf, g)
        if ids.size:
            return int(ids[0])
    return None


def stitch_partition(paths: Sequence[str], partition: tuple, rows: Sequence[int]) -> list[FileUnit]:
    """FileUnits of one partition's files (in sort order), a request split across two
    consecutive files owned by the file where it starts."""
    units = [FileUnit(path=p, partition=partition, rows=int(n)) for p, n in zip(paths, rows)]
    for i in range(len(units) - 1):
        last, first = _last_request_id(units[i].path), _first_request_id(units[i + 1].path)
        if last is None or last != first:
            continue
        run = _leading_run(units[i + 1].path, last)
        units[i] = replace(units[i], tail_path=units[i + 1].path, tail_rows=run, rows=units[i].rows + run)
        units[i + 1] = replace(units[i + 1], skip_head=run, rows=units[i + 1].rows - run)
    return [u for u in units if u.rows > 0 or u.tail_rows > 0]


def _as_date(value) -> dt.date:
    return parse_date(value, "date")


def _date_range(start, end) -> tuple[dt.date, dt.date]:
    start, end = _as_date(start), _as_date(end if end is not None else start)
    if end < start:
        raise InputError(f"date range is empty: {start} > {end}")
    return start, end


def _check_copy_on_write(tasks) -> None:
    for task in tasks:
        if task.delete_files:
            raise InputError(f"{task.file.file_path}: has row-level delete files; the reader reads "
                             "copy-on-write tables only (rewrite the partition first)")


def _partition_text(key: tuple) -> str:
    date, bucket = key[0], key[1] if len(key) > 1 else None
    if isinstance(date, int):
        date = dt.date(1970, 1, 1) + dt.timedelta(days=date)
    return f"event_date {date}, bucket {bucket}"


def feature_sources(feature_columns: Sequence[str], table, start: dt.date, end: dt.date,
                    buckets: Sequence[int] | None, partitions: Sequence[tuple], settings) -> dict[tuple, tuple]:
    """partition key -> the FeatureSources of every side table holding ``feature_columns``, for
    the impressions' partitions: the side table's files of the same (date, bucket). InputError
    naming the table and the column when a table or column is missing, or when a side table
    has no files for a partition the impressions have (the feature was not added for it)."""
    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.features import feature_table, partition_layout, resolve_feature_columns
    from reqdedup.lake.read import plan_partitions

    per_key: dict[tuple, list[FeatureSource]] = {tuple(k): [] for k, _ in partitions}
    for feature, columns in resolve_feature_columns(feature_columns, settings):
        name = settings.table(feature_table(feature.name))
        try:
            side = load_table(feature_table(feature.name), settings)
        except InputError:
            raise InputError(f"data.feature_columns names {', '.join(columns)}, but table {name} does not exist: "
                             f"run `reqdedup features add {feature.name} --start {start} --end {end}` first") from None
        have = {f.name for f in side.schema().fields}
        for col in [*feature.keys, *columns]:
            if col not in have:
                raise InputError(f"table {name} has no column {col!r} (it has {', '.join(sorted(have))}): "
                                 f"recompute it with `reqdedup features add {feature.name}`")
        if partition_layout(side) != partition_layout(table):
            raise InputError(f"table {name} is not partitioned like {table.name()}: "
                             f"{partition_layout(side)} vs {partition_layout(table)}")
        if side.current_snapshot() is None:
            side_parts = {}
        else:
            _, planned = plan_partitions(side, start, end, buckets, [*feature.keys, *columns])
            side_parts = {tuple(k): tasks for k, tasks in planned}
        keys = tuple(k for k in feature.keys if k != "event_date")
        for key in per_key:
            tasks = side_parts.get(key)
            if not tasks:
                raise InputError(f"table {name} has no rows for {_partition_text(key)}, which the impressions "
                                 f"have: run `reqdedup features add {feature.name} --start {start} --end {end}`")
            _check_copy_on_write(tasks)
            per_key[key].append(FeatureSource(table=name, keys=keys, columns=tuple(columns),
                                              paths=tuple(local_path(t.file.file_path) for t in tasks)))
    return {k: tuple(v) for k, v in per_key.items()}


def plan_iceberg(start, end=None, *, buckets: Sequence[int] | None = None, settings=None,
                 table_name: str | None = None, feature_columns: Sequence[str] = ()) -> list[FileUnit]:
    """File tasks of the Iceberg scan plan of ``main`` for dates start..end and a bucket subset;
    with ``feature_columns``, each task also carries the side tables' files of its partition."""
    from reqdedup.config import get_settings
    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.read import plan_partitions
    from reqdedup.lake.tables import IMPRESSIONS

    settings = settings or get_settings()
    start, end = _date_range(start, end)
    table = load_table(table_name or IMPRESSIONS, settings)
    _, partitions = plan_partitions(table, start, end, buckets)
    sources = (feature_sources(feature_columns, table, start, end, buckets, partitions, settings)
               if feature_columns else {})
    units = []
    for key, tasks in partitions:
        _check_copy_on_write(tasks)
        part = stitch_partition([local_path(t.file.file_path) for t in tasks], tuple(key),
                                [t.file.record_count for t in tasks])
        part = [replace(u, requests_path=str(pp)) if (pp := projection_path(settings, u.path)).exists() else u
                for u in part]
        if feature_columns:
            part = [replace(u, features=sources[tuple(key)]) for u in part]
        units += part
    return units


def plan_files(paths: Sequence[str | Path]) -> list[FileUnit]:
    """File tasks of request-sorted Parquet files given by the user (a folder's files, in name
    order, form one partition: consecutive files may share a request)."""
    files = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise InputError(f"{p} does not exist")
        files += sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise InputError(f"no Parquet files in {', '.join(map(str, paths))}")
    rows = [open_parquet(str(f)).metadata.num_rows for f in files]
    return stitch_partition([str(f) for f in files], ("files",), rows)


# -- landing: sorted once per date into the table's partitioning -------------------------
_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def iceberg_bucket(values: np.ndarray, num_buckets: int) -> np.ndarray:
    """Iceberg's bucket transform of int64 values (murmur3_x86_32 of the 8 little-endian
    bytes, seed 0; (hash & INT_MAX) % N), in numpy: the GPU host has no pyiceberg."""
    v = np.ascontiguousarray(values, dtype="<i8").view(np.uint32).reshape(-1, 2)
    with np.errstate(over="ignore"):
        h = np.zeros(v.shape[0], np.uint32)
        for k in (v[:, 0].copy(), v[:, 1].copy()):
            k = _rotl(k * _C1, 15) * _C2
            h = _rotl(h ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)
        h ^= np.uint32(8)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return ((h & np.uint32(0x7FFFFFFF)) % np.uint32(num_buckets)).astype(np.int64)


def _landing_fingerprint(files: list[Path], num_buckets: int) -> str:
    h = hashlib.sha256(str(num_buckets).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _row_group_rows(table: pa.Table, target_bytes: int = 64 << 20) -> int:
    per_row = max(1, table.nbytes // max(table.num_rows, 1))
    return int(max(1024, target_bytes // per_row))


def sorted_landing_date(settings, date: str) -> Path | None:
    """The landed files of one date sorted by (bucket(user_id), user_id, request_id) into one
    file per bucket, cached under ``<home>/landing_sorted/date=D/<fingerprint>`` (rebuilt when
    the landed files change; a lock keeps ranks on one host from building it twice)."""
    from reqdedup.fsutil import replace_dir_atomically, temp_dir_for

    folder = settings.landing_path(date)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    target = settings.home / "landing_sorted" / f"date={date}" / _landing_fingerprint(files, settings.buckets)
    if (target / "_SUCCESS").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "_SUCCESS").exists():
            return target
        try:
            rows = pq.read_table(files)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{folder}: cannot read the landed Parquet ({type(e).__name__}: {e})") from None
        bucket = iceberg_bucket(rows.column("user_id").to_numpy(), settings.buckets)
        rows = rows.append_column("__bucket", pa.array(bucket))
        rows = rows.sort_by([("__bucket", "ascending"), ("user_id", "ascending"), ("request_id", "ascending")])
        bucket = rows.column("__bucket").to_numpy()
        rows = rows.drop_columns(["__bucket"])
        tmp = temp_dir_for(target)
        group_rows = _row_group_rows(rows)
        edges = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1], True])
        for a, b in zip(edges[:-1], edges[1:]):
            part = rows.slice(int(a), int(b - a))
            name = f"bucket={int(bucket[a]):05d}"
            pq.write_table(part, tmp / f"{name}.parquet", row_group_size=group_rows)
            pq.write_table(request_projection(part, str(folder)), tmp / f"{name}{REQUESTS_SUFFIX}",
                           row_group_size=max(1024, group_rows // 8))
        (tmp / "_SUCCESS").write_text(json.dumps({"files": [f.name for f in files], "rows": rows.num_rows}))
        del rows
        replace_dir_atomically(tmp, target)
    return target


def plan_landing(start, end=None, *, buckets: Sequence[int] | None = None, settings=None) -> list[FileUnit]:
    """File tasks over the landed Parquet of dates start..end, request-sorted per date."""
    from reqdedup.config import get_settings

    settings = settings or get_settings()
    start, end = _date_range(start, end)
    if buckets is not None:
        bad = [b for b in buckets if not 0 <= int(b) < settings.buckets]
        if bad:
            raise InputError(f"buckets {bad} out of range: there are buckets 0..{settings.buckets - 1}")
    units, day = [], start
    while day <= end:
        folder = sorted_landing_date(settings, day.isoformat())
        if folder is not None:
            for f in sorted(p for p in folder.glob("bucket=*.parquet") if not p.name.endswith(REQUESTS_SUFFIX)):
                b = int(f.stem.split("=")[1])
                projection = f.with_name(f.stem + REQUESTS_SUFFIX)
                if buckets is None or b in buckets:
                    units.append(FileUnit(path=str(f), partition=(day.isoformat(), b),
                                          rows=open_parquet(str(f)).metadata.num_rows,
                                          requests_path=str(projection) if projection.exists() else None))
        day += dt.timedelta(days=1)
    return units


def plan(start, end=None, *, buckets: Sequence[int] | None = None, settings=None,
         feature_columns: Sequence[str] = ()) -> list[FileUnit]:
    """File tasks of dates start..end from the settings' read source (iceberg or landing),
    with the feature side tables' files of each partition when ``feature_columns`` are named."""
    from reqdedup.config import get_settings

    settings = settings or get_settings()
    if settings.read_source == "landing":
        if feature_columns:
            raise InputError(f"data.feature_columns ({', '.join(feature_columns)}) are read from the Iceberg "
                             "feature tables: they need REQDEDUP_READ_SOURCE=iceberg, not landing")
        units = plan_landing(start, end, buckets=buckets, settings=settings)
    elif settings.read_source == "iceberg":
        units = plan_iceberg(start, end, buckets=buckets, settings=settings, feature_columns=feature_columns)
    else:
        raise InputError(f"REQDEDUP_READ_SOURCE={settings.read_source!r}: choose iceberg or landing")
    if not units:
        where = "" if buckets is None else f" in buckets {list(buckets)}"
        raise InputError(f"no rows for {start}..{end or start}{where} (read source {settings.read_source}): "
                         "nothing to train on; generate and ingest those dates first")
    return units


def max_item_id(units: Sequence[FileUnit]) -> int:
    """The largest candidate or history item id in the files, from the Parquet column
    statistics (read from the data only where a row group has none)."""
    biggest = -1
    for unit in units:
        pf = open_parquet(unit.path)
        meta = pf.metadata
        leaves = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
        wanted = [i for path, i in leaves.items() if path == "item_id" or path.startswith("user_history.")]
        for g in range(meta.num_row_groups):
            for i in wanted:
                st = meta.row_group(g).column(i).statistics
                if st is not None and st.has_min_max:
                    biggest = max(biggest, int(st.max))
                else:
                    col = pf.read_row_group(g, columns=[meta.schema.column(i).path.split(".")[0]]).column(0)
                    if pa.types.is_list(col.type):
                        col = pc.list_flatten(col)
                    top = pc.max(col).as_py()
                    biggest = max(biggest, -1 if top is None else int(top))
    return biggest


# ---------------------------------------------------------------------------------------
# decoding: one row group -> request-level chunk
# ---------------------------------------------------------------------------------------
@dataclass
class RequestChunk:
    """Whole requests in request-level form: user block [R], candidate block [N] with
    ``cand_count`` [R] rows per request (in order)."""

    request_id: torch.Tensor
    user_id: torch.Tensor
    history: torch.Tensor  # [R, seq_len] ids + 1, right-padded (RequestBatch convention)
    history_len: torch.Tensor
    user_dense: torch.Tensor
    user_segment: torch.Tensor
    user_country: torch.Tensor
    cand_count: torch.Tensor
    item_id: torch.Tensor
    item_category: torch.Tensor
    item_dense: torch.Tensor
    label: torch.Tensor
    features: torch.Tensor  # [N, F] float32 side-table values per row (F = 0 without feature columns)

    @property
    def num_requests(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.item_id.shape[0])


_REQUEST_FIELDS = ("request_id", "user_id", "history", "history_len", "user_dense", "user_segment",
                   "user_country", "cand_count")
_ROW_FIELDS = ("item_id", "item_category", "item_dense", "label", "features")


def concat_chunks(chunks: Sequence[RequestChunk]) -> RequestChunk:
    if len(chunks) == 1:
        return chunks[0]
    return RequestChunk(**{f.name: torch.cat([getattr(c, f.name) for c in chunks]) for f in fields(RequestChunk)})


def _pad_tail(values: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists (values, offsets [R+1]) -> (history [R, seq_len] with ids + 1, 0-padded, the most
    recent seq_len ids kept; history_len [R])."""
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, seq_len)
    start = offsets[1:] - keep
    pos = np.arange(seq_len)
    valid = pos[None, :] < keep[:, None]
    history = np.zeros((lengths.size, seq_len), np.int64)
    if values.size:
        at = np.minimum(start[:, None] + pos[None, :], values.size - 1)
        history[valid] = values[at[valid]].astype(np.int64) + HISTORY_ID_SHIFT
    return history, keep.astype(np.int64)


def rows_to_chunk(rows: pa.Table, seq_len: int, path: str, check: bool = True) -> RequestChunk:
    """Rows of whole, contiguous requests -> request-level chunk. With ``check``, a request
    whose rows disagree on the user block raises InputError naming the request and file."""
    ids, starts, counts = request_starts(rows)
    if check:  # per-row user columns live only here, for one row group
        check_user_blocks(rows, starts, counts, path)
    requests = rows.select(list(USER_BLOCK)).take(pa.array(starts))
    return _chunk(ids[starts], requests, counts, rows, seq_len, path)


def _chunk(request_ids: np.ndarray, requests: pa.Table, counts: np.ndarray, cand_rows: pa.Table, seq_len: int,
           path: str) -> RequestChunk:
    """A RequestChunk from one row per request (the user block) and the candidate rows."""
    hist = requests.column("user_history").combine_chunks()
    offsets = hist.offsets.to_numpy().astype(np.int64)
    values = pc.list_flatten(hist).to_numpy(zero_copy_only=False)
    history, history_len = _pad_tail(values, offsets - offsets[0], seq_len)
    dense = fixed_width(requests.column("user_dense").combine_chunks(), USER_DENSE_DIM, "user_dense", path)
    item_dense = fixed_width(cand_rows.column("item_dense").combine_chunks(), ITEM_DENSE_DIM, "item_dense", path)
    t = torch.from_numpy
    col = lambda table, name, dtype: t(table.column(name).to_numpy().astype(dtype))  # noqa: E731
    return RequestChunk(
        request_id=t(np.asarray(request_ids, np.int64).copy()), user_id=col(requests, "user_id", np.int64),
        history=t(history), history_len=t(history_len), user_dense=t(dense),
        user_segment=col(requests, "user_segment", np.int64), user_country=col(requests, "user_country", np.int64),
        cand_count=t(np.asarray(counts, np.int64).copy()),
        item_id=col(cand_rows, "item_id", np.int64), item_category=col(cand_rows, "item_category", np.int64),
        item_dense=t(item_dense), label=col(cand_rows, "label", np.float32),
        features=torch.zeros((cand_rows.num_rows, 0), dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------
# feature columns: a per-partition merge of side tables sorted by the same keys
# ---------------------------------------------------------------------------------------
def _user_range(path: str) -> tuple[int, int]:
    """(min, max) user_id of a file, from its Parquet statistics (the data where none)."""
    pf = open_parquet(path)
    meta = pf.metadata
    i = pf.schema_arrow.get_field_index("user_id")
    lo, hi = None, None
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(i).statistics if i >= 0 else None
        if st is not None and st.has_min_max:
            a, b = int(st.min), int(st.max)
        else:
            ids = pf.read_row_group(g, columns=["user_id"]).column(0).to_numpy()
            if ids.size == 0:
                continue
            a, b = int(ids.min()), int(ids.max())
        lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    if lo is None:
        return 0, -1
    return lo, hi


def _runs(keys: Sequence[np.ndarray]) -> np.ndarray:
    """Start offsets of the runs of equal key tuples."""
    n = keys[0].size
    if n == 0:
        return np.zeros(0, np.int64)
    change = np.zeros(n, bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _lex_sorted(keys: Sequence[np.ndarray]) -> bool:
    """Whether the rows are in lexicographic non-decreasing order of the key tuples."""
    if keys[0].size < 2:
        return True
    ordered, ties = np.ones(keys[0].size - 1, bool), np.ones(keys[0].size - 1, bool)
    for k in keys:
        ordered &= ~ties | (k[1:] >= k[:-1])
        ties &= k[1:] == k[:-1]
    return bool(ordered.all())


def match_sorted_keys(side: Sequence[np.ndarray], probe: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For each probe row, the side row with the same key tuple (-1: none), and a mask of
    side rows whose key another side row repeats. ``side`` is sorted by its keys.

    Merge: when the last key fits 31 bits (item_id), the runs of equal prefixes (user,
    request: one per request, few) of both sides are ranked together, each row becomes
    rank << 32 | last, already sorted on the side, and one binary search per probe row finds
    its side row. Otherwise one sort of both sides' keys together (side rows first on ties)."""
    s, p = side[0].size, probe[0].size
    if len(side) == 1 or all(k.size == 0 or (int(k.min()) >= 0 and int(k.max()) < 2**31) for k in (side[-1], probe[-1])):
        if len(side) == 1:
            side_key, probe_key = side[0].astype(np.int64), probe[0].astype(np.int64)
        else:
            runs_s, runs_p = _runs(side[:-1]), _runs(probe[:-1])
            heads = [np.concatenate([a[runs_s], b[runs_p]]).astype(np.int64) for a, b in zip(side[:-1], probe[:-1])]
            order = np.lexsort(tuple(reversed(heads)))
            new = np.ones(order.size, bool)
            if order.size > 1:
                new[1:] = np.any(np.stack([h[order][1:] != h[order][:-1] for h in heads]), axis=0)
            rank = np.empty(order.size, np.int64)
            rank[order] = np.cumsum(new) - 1
            lengths_s = np.diff(np.r_[runs_s, s])
            lengths_p = np.diff(np.r_[runs_p, p])
            side_key = (np.repeat(rank[:runs_s.size], lengths_s) << 32) | side[-1].astype(np.int64)
            probe_key = (np.repeat(rank[runs_s.size:], lengths_p) << 32) | probe[-1].astype(np.int64)
        repeated = np.zeros(s, bool)
        if s > 1:
            same = side_key[1:] == side_key[:-1]
            repeated[1:] |= same
            repeated[:-1] |= same
        if s == 0:
            return np.full(p, -1, np.int64), repeated
        pos = np.searchsorted(side_key, probe_key)
        hit = side_key[np.minimum(pos, s - 1)] == probe_key
        return np.where(hit, pos, -1).astype(np.int64), repeated
    return _match_by_sorting(side, probe)


def _match_by_sorting(side: Sequence[np.ndarray], probe: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    s, p = side[0].size, probe[0].size
    keys = [np.concatenate([a.astype(np.int64), b.astype(np.int64)]) for a, b in zip(side, probe)]
    origin = np.r_[np.zeros(s, np.int8), np.ones(p, np.int8)]
    order = np.lexsort((origin, *reversed(keys)))
    ordered = [k[order] for k in keys]
    new = np.ones(s + p, bool)
    if s + p > 1:
        new[1:] = np.any(np.stack([k[1:] != k[:-1] for k in ordered]), axis=0)
    group = np.cumsum(new) - 1
    is_side = order < s
    first = np.flatnonzero(new)
    group_side = np.where(is_side[first], order[first], -1)
    side_groups = np.bincount(group[is_side], minlength=first.size)
    repeated = np.zeros(s, bool)
    repeated[order[is_side]] = side_groups[group[is_side]] > 1
    out = np.empty(p, np.int64)
    out[order[~is_side] - s] = group_side[group[~is_side]]
    return out, repeated


@dataclass
class _SideRows:
    source: FeatureSource
    keys: list[np.ndarray]  # sorted lexicographically, keys[0] is user_id
    values: dict[str, np.ndarray]


def _load_side(source: FeatureSource, lo: int, hi: int, where: str) -> _SideRows:
    """The side table's rows of users lo..hi in this partition, sorted by its keys, with
    null values as 0 (a feature with no history) and non-finite values refused."""
    if source.keys[0] != "user_id":
        raise InputError(f"{source.table}: join keys {source.keys} must start with user_id (its sort order)")
    try:
        table = pq.read_table(list(source.paths), columns=[*source.keys, *source.columns],
                              filters=[("user_id", ">=", lo), ("user_id", "<=", hi)], partitioning=None)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{source.table}: cannot read its files of {where} ({type(e).__name__}: {e})") from None
    keys = [table.column(k).to_numpy() for k in source.keys]
    if not _lex_sorted(keys):  # files of the partition overlap: sort this partition's rows once
        perm = np.lexsort(tuple(reversed(keys)))
        table, keys = table.take(pa.array(perm)), [k[perm] for k in keys]
    values = {}
    for c in source.columns:
        v = pc.fill_null(table.column(c), 0).to_numpy().astype(np.float64)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"{source.table}: column {c!r} holds {v[i]} (not finite) for "
                             f"{dict(zip(source.keys, (int(k[i]) for k in keys)))} in {where}")
        values[c] = v
    return _SideRows(source, keys, values)


class FeatureJoin:
    """Joins one file task's rows with its partition's side tables, chunk by chunk.

    The chunks of a task come in (user_id, request_id) order and each side table is sorted
    by (user_id[, request_id, item_id]): a chunk's users are one contiguous slice of the side
    rows (two binary searches), matched on the full key inside that slice
    (:func:`match_sorted_keys`). No shuffle, no global sort; each side row is read once per
    file task."""

    def __init__(self, unit: FileUnit, columns: Sequence[str]):
        offered = [c for src in unit.features for c in src.columns]
        if sorted(offered) != sorted(columns):
            raise InputError(f"{unit.path}: planned with feature columns {offered}, read with {list(columns)}: "
                             "plan with the same data.feature_columns")
        self.unit, self.columns = unit, list(columns)
        self.where = f"{_partition_text(unit.partition)} ({unit.path})"
        lo, hi = _user_range(unit.path)
        self.sides = [_load_side(src, lo, hi, self.where) for src in unit.features]

    def attach(self, chunk: RequestChunk) -> RequestChunk:
        counts = chunk.cand_count.numpy()
        probe = {"user_id": np.repeat(chunk.user_id.numpy(), counts),
                 "request_id": np.repeat(chunk.request_id.numpy(), counts),
                 "item_id": chunk.item_id.numpy()}
        users = probe["user_id"]
        found: dict[str, np.ndarray] = {}
        for side in self.sides:
            a = int(np.searchsorted(side.keys[0], users.min(), "left"))
            b = int(np.searchsorted(side.keys[0], users.max(), "right"))
            idx, repeated = match_sorted_keys([k[a:b] for k in side.keys], [probe[k] for k in side.source.keys])
            if repeated.any():
                i = a + int(np.flatnonzero(repeated)[0])
                raise InputError(f"{side.source.table}: key {dict(zip(side.source.keys, (int(k[i]) for k in side.keys)))} "
                                 f"appears twice in {self.where}: recompute it with `reqdedup features add`")
            if (idx < 0).any():
                r = int(np.flatnonzero(idx < 0)[0])
                raise InputError(f"{side.source.table}: no row for {dict((k, int(probe[k][r])) for k in side.source.keys)} "
                                 f"in {self.where}: the impressions changed after the feature was computed; "
                                 "recompute it (`reqdedup features add` or `features backfill` of that bucket)")
            for c in side.source.columns:
                found[c] = side.values[c][a + idx]
        features = np.stack([found[c] for c in self.columns], axis=1).astype(np.float32)
        return replace(chunk, features=torch.from_numpy(features))


def decode_unit(unit: FileUnit, seq_len: int, *, check: bool = True, batch_rows: int = 65536,
                use_projection: bool = True, feature_columns: Sequence[str] = ()) -> Iterator[RequestChunk]:
    """Request-level chunks of one file task, in file order, whole requests only.

    InputError if a request id reappears after another request in the file (the file is not
    request-sorted) or its rows disagree on the user block. With a request-level projection
    (``unit.requests_path``; checked when it was written) the user columns are read from it,
    once per request, instead of from every candidate row. With ``feature_columns`` (the
    unit planned with them) each chunk's ``features`` holds the side tables' values."""
    if unit.features or feature_columns:
        join = FeatureJoin(unit, feature_columns)
        for chunk in _decode_unit(unit, seq_len, check=check, batch_rows=batch_rows, use_projection=use_projection):
            yield join.attach(chunk)
        return
    yield from _decode_unit(unit, seq_len, check=check, batch_rows=batch_rows, use_projection=use_projection)


def _decode_unit(unit: FileUnit, seq_len: int, *, check: bool, batch_rows: int,
                 use_projection: bool) -> Iterator[RequestChunk]:
    if use_projection and unit.requests_path and not (unit.skip_head or unit.tail_path):
        seen: set[int] = set()
        for chunk in _decode_projected(unit, seq_len, batch_rows):
            _check_new_requests(chunk, seen, unit.path)
            yield chunk
        return
    seen = set()
    pending: pa.Table | None = None  # rows of the last, maybe unfinished request
    skip = unit.skip_head

    def batches():
        yield from read_batches(unit.path, READ_COLUMNS, batch_rows)
        if unit.tail_path and unit.tail_rows:
            tail = pq.ParquetFile(unit.tail_path).iter_batches(batch_size=max(unit.tail_rows, 1),
                                                               columns=list(READ_COLUMNS))
            yield pa.Table.from_batches([next(tail)]).slice(0, unit.tail_rows)

    for table in batches():
        if skip:
            cut = min(skip, table.num_rows)
            table, skip = table.slice(cut), skip - cut
        if table.num_rows == 0:
            continue
        if pending is not None:
            table = pa.concat_tables([pending, table])
        ids = table.column("request_id").to_numpy()
        last_start = int(np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])[-1])
        complete, pending = table.slice(0, last_start), table.slice(last_start)
        if complete.num_rows:
            yield _checked_chunk(complete, seen, seq_len, unit.path, check)
    if pending is not None and pending.num_rows:
        yield _checked_chunk(pending, seen, seq_len, unit.path, check)


def _decode_projected(unit: FileUnit, seq_len: int, batch_rows: int) -> Iterator[RequestChunk]:
    """Chunks of a unit with a request-level projection: candidate columns from the wide
    file, the user block once per request from the projection, matched in order."""
    requests = read_batches(unit.requests_path, REQUEST_COLUMNS, max(1, batch_rows // 8))
    held: pa.Table | None = None
    pending: pa.Table | None = None

    def take(n: int) -> pa.Table:
        nonlocal held
        while held is None or held.num_rows < n:
            more = next(requests, None)
            if more is None:
                raise InputError(f"{unit.requests_path}: fewer requests than {unit.path} holds")
            held = more if held is None else pa.concat_tables([held, more])
        out, held = held.slice(0, n), held.slice(n)
        return out

    def emit(rows: pa.Table) -> RequestChunk:
        ids = rows.column("request_id").to_numpy()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        counts = np.diff(np.r_[starts, ids.size])
        req = take(starts.size)
        if not (np.array_equal(req.column("request_id").to_numpy(), ids[starts])
                and np.array_equal(req.column("num_candidates").to_numpy(), counts)):
            raise InputError(f"{unit.requests_path}: does not match {unit.path} (request ids or candidate counts "
                             "differ): rebuild the request-level projection")
        return _chunk(ids[starts], req, counts, rows, seq_len, unit.path)

    for table in read_batches(unit.path, ("request_id", *CANDIDATE_COLUMNS), batch_rows):
        if pending is not None:
            table = pa.concat_tables([pending, table])
        ids = table.column("request_id").to_numpy()
        last_start = int(np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])[-1])
        complete, pending = table.slice(0, last_start), table.slice(last_start)
        if complete.num_rows:
            yield emit(complete)
    if pending is not None and pending.num_rows:
        yield emit(pending)


def _checked_chunk(rows: pa.Table, seen: set, seq_len: int, path: str, check: bool) -> RequestChunk:
    chunk = rows_to_chunk(rows, seq_len, path, check)
    _check_new_requests(chunk, seen, path)
    return chunk


def _check_new_requests(chunk: RequestChunk, seen: set, path: str) -> None:
    ids = chunk.request_id.tolist()
    again = seen.intersection(ids)
    if again or len(set(ids)) != len(ids):
        rid = min(again) if again else next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: request_id {rid} reappears after another request: the file is not "
                         "request-sorted (sort by user_id, request_id before reading)")
    seen.update(ids)


# ---------------------------------------------------------------------------------------
# sharding, streams, orders
# ---------------------------------------------------------------------------------------
def shard_units(units: Sequence[FileUnit], world_size: int) -> list[list[FileUnit]]:
    """Disjoint file sets per rank, balanced by rows (largest first to the lightest rank)."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(units)), key=lambda i: (-units[i].rows, i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shards[r].append(i)
        load[r] += units[i].rows
    return [[units[i] for i in sorted(s)] for s in shards]


@dataclass(frozen=True)
class ReaderSpec:
    """What the reader does; every field is a training-config key (data.*)."""

    order: str = "request_shuffle"
    batch_rows: int = 1024
    seq_len: int = 64
    seed: int = 0
    buffer_requests: int | None = 4096  # request_shuffle; None: full shuffle
    buffer_rows: int | None = None  # iid; None: full shuffle
    streams: int = 8  # file streams interleaved (shuffled orders); also the most decode workers
    workers: int = 1  # DataLoader decode processes per rank (0: in the training process)
    prefetch_batches: int = 4
    check: bool = True
    use_projection: bool = True  # read the user block from the request-level projection where written
    feature_columns: tuple[str, ...] = ()  # side-table columns joined per partition (plan with the same)

    def validate(self) -> "ReaderSpec":
        if not isinstance(self.feature_columns, tuple) or not all(isinstance(c, str) for c in self.feature_columns):
            raise InputError(f"feature_columns must be a tuple of column names, got {self.feature_columns!r}")
        if self.order not in ORDERS:
            raise InputError(f"unknown order {self.order!r}: choose one of {', '.join(ORDERS)}")
        for key in ("batch_rows", "seq_len", "streams", "prefetch_batches"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise InputError(f"workers must be an integer >= 0, got {self.workers!r}")
        for key in ("buffer_requests", "buffer_rows"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InputError(f"{key} must be an integer >= 1 or null (full shuffle), got {v!r}")
        return self


def epoch_rng(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def epoch_streams(units: Sequence[FileUnit], spec: ReaderSpec, epoch: int, rank: int) -> list[list[FileUnit]]:
    """This rank's files dealt into streams: plan order in one stream for ``table``, shuffled
    (per seed, epoch) and dealt round-robin into ``spec.streams`` streams otherwise."""
    units = list(units)
    if spec.order == "table" or (spec.order == "request_shuffle" and spec.buffer_requests == 1):
        return [units]
    perm = epoch_rng(spec.seed, epoch, rank).permutation(len(units))
    n = max(1, min(spec.streams, len(units)))
    return [[units[i] for i in perm[s::n]] for s in range(n)]


class _StreamDataset(torch.utils.data.IterableDataset):
    """Yields (stream, chunk) and (stream, None) at a stream's end; worker w decodes the
    streams s with s % W == w, round-robin over them."""

    def __init__(self, streams: list[list[FileUnit]], spec: ReaderSpec):
        self.streams, self.spec = streams, spec

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = [s for s in range(len(self.streams)) if s % nw == w]
        gens = {s: self._stream(s) for s in mine}
        while gens:
            for s in list(gens):
                try:
                    chunk = next(gens[s])
                except StopIteration:
                    del gens[s]
                    yield s, None
                    continue
                yield s, (pack_chunk(chunk) if info is not None else chunk)

    def _stream(self, s: int):
        for unit in self.streams[s]:
            yield from decode_unit(unit, self.spec.seq_len, check=self.spec.check,
                                   use_projection=self.spec.use_projection,
                                   feature_columns=self.spec.feature_columns)
            # Arrow's allocator keeps a file's freed pages for the next one: hand them back, so a
            # worker's memory does not creep up with the files (dates) it reads.
            pa.default_memory_pool().release_unused()


def _import_pandas_before_fork() -> None:
    """pyarrow imports pandas (when installed) at its first array conversion: 0.5-2.5 s, paid
    by every decode worker of every epoch when the parent never converted one. Imported once
    here, the forked workers share it."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass


_ALIGN = 64  # byte offset of every field in a packed chunk (any dtype's view is aligned)


@dataclass(frozen=True)
class PackedChunk:
    """A RequestChunk as ONE uint8 tensor in shared memory plus its layout (name, dtype,
    shape, byte offset, bytes) of each field."""

    buffer: torch.Tensor
    layout: tuple


def pack_chunk(chunk: RequestChunk) -> PackedChunk:
    """What a DataLoader worker hands the trainer: one file descriptor per chunk instead of
    one per field (each costs the receiver a socket round trip, ~1 ms: with 13 fields that,
    not decoding, bounded the reader)."""
    layout, offset = [], 0
    for f in fields(RequestChunk):
        t = getattr(chunk, f.name)
        nbytes = t.numel() * t.element_size()
        layout.append((f.name, t.dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    buffer = torch.empty(max(offset, 1), dtype=torch.uint8).share_memory_()
    for name, _dtype, _shape, at, nbytes in layout:
        buffer[at:at + nbytes].copy_(getattr(chunk, name).contiguous().reshape(-1).view(torch.uint8))
    return PackedChunk(buffer, tuple(layout))


def unpack_chunk(packed: PackedChunk) -> RequestChunk:
    """The RequestChunk of :func:`pack_chunk`: views into its one buffer, no copy."""
    return RequestChunk(**{name: packed.buffer[at:at + nbytes].view(dtype).view(shape)
                           for name, dtype, shape, at, nbytes in packed.layout})


def _decode_worker_init(_worker_id: int) -> None:
    # Each decode worker is one stream's decoder: Arrow's default pool (one thread per
    # core in every worker) only oversubscribes the host's cores.
    pa.set_cpu_count(1)


def _round_robin(tagged: Iterator, n_streams: int) -> Iterator[RequestChunk]:
    """The chunks in the logical order (round-robin over live streams), whatever order the
    DataLoader's workers delivered them in: the order does not depend on the worker count."""
    pending = {s: deque() for s in range(n_streams)}
    live = list(range(n_streams))
    i = 0
    while live:
        s = live[i % len(live)]
        while not pending[s]:
            t, chunk = next(tagged)
            pending[t].append(unpack_chunk(chunk) if isinstance(chunk, PackedChunk) else chunk)
        chunk = pending[s].popleft()
        if chunk is None:
            live.remove(s)
            if live:
                i %= len(live)
            continue
        yield chunk
        i += 1


def pack_requests(cand_count: np.ndarray, batch_rows: int) -> list[np.ndarray]:
    """Greedy batches of whole requests (in the given order) of at most batch_rows rows."""
    if cand_count.size and int(cand_count.max()) > batch_rows:
        raise InputError(f"a request has {int(cand_count.max())} candidate rows, more than data.batch_rows "
                         f"= {batch_rows}: raise batch_rows (a batch holds whole requests)")
    ends = np.cumsum(cand_count)
    batches, start, base = [], 0, 0
    while start < cand_count.size:
        stop = int(np.searchsorted(ends, base + batch_rows, side="right"))
        batches.append(np.arange(start, stop))
        base, start = int(ends[stop - 1]), stop
    return batches


def request_rows(cand_count: np.ndarray, req: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For requests ``req`` of a chunk: each candidate row's request (0..len(req)-1) and its
    row in the chunk. Index work in numpy: per-batch torch ops on tiny tensors cost more
    than the gathers themselves."""
    cand_start = np.cumsum(cand_count) - cand_count
    counts = cand_count[req]
    row_request = np.repeat(np.arange(req.size), counts)
    within = np.arange(row_request.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return row_request, np.repeat(cand_start[req], counts) + within


def requests_to_batch(chunk: RequestChunk, req) -> RequestBatch:
    """The requests ``req`` of a chunk (in that order) as a RequestBatch."""
    req = np.asarray(req, dtype=np.int64)
    row_request, rows = request_rows(chunk.cand_count.numpy(), req)
    return _batch(chunk, req, row_request, rows)


def rows_to_batch(chunk: RequestChunk, rows: np.ndarray, row_req: np.ndarray) -> RequestBatch:
    """Candidate rows ``rows`` of a chunk (requests ``row_req[rows]``): one user block per
    distinct request among them, in ascending request id order."""
    req_of = row_req[rows]
    _, first, inverse = np.unique(chunk.request_id.numpy()[req_of], return_index=True, return_inverse=True)
    return _batch(chunk, req_of[first], inverse.reshape(-1), rows)


def _batch(chunk: RequestChunk, req: np.ndarray, row_request: np.ndarray, rows: np.ndarray) -> RequestBatch:
    r, n = torch.from_numpy(np.ascontiguousarray(req, np.int64)), torch.from_numpy(np.ascontiguousarray(rows, np.int64))
    take = torch.index_select
    return RequestBatch(
        user_ids=take(chunk.user_id, 0, r), history=take(chunk.history, 0, r), history_len=take(chunk.history_len, 0, r),
        user_dense=take(chunk.user_dense, 0, r), user_segment=take(chunk.user_segment, 0, r),
        user_country=take(chunk.user_country, 0, r), row_request=torch.from_numpy(np.asarray(row_request, np.int64)),
        item_id=take(chunk.item_id, 0, n), item_category=take(chunk.item_category, 0, n),
        item_dense=take(chunk.item_dense, 0, n), label=take(chunk.label, 0, n), request_ids=take(chunk.request_id, 0, r),
        dense_features=take(chunk.features, 0, n) if chunk.features.shape[1] else None)


class RequestWindow:
    """The requests held for shuffling, as references into the chunks they were decoded in.

    Nothing is copied until a batch is gathered (:meth:`gather`: one copy per field, straight
    from each chunk into the batch); the requests left over after a drain stay references
    (:meth:`keep`). Requests are indexed in arrival order, the same positions as the
    concatenation of the chunks would have."""

    def __init__(self):
        self.chunks: list[RequestChunk] = []
        self.num_requests = 0
        # per held request: its chunk, its index in that chunk, its candidate rows (lists of
        # arrays until read, so adding a chunk costs O(its requests) however full the window)
        self._columns: list[list[np.ndarray]] = [[], [], []]

    def add(self, chunk: RequestChunk) -> None:
        n = chunk.num_requests
        for column, values in zip(self._columns, (np.full(n, len(self.chunks), np.int64),
                                                  np.arange(n, dtype=np.int64), chunk.cand_count.numpy())):
            column.append(values)
        self.chunks.append(chunk)
        self.num_requests += n

    def _column(self, i: int) -> np.ndarray:
        column = self._columns[i]
        if len(column) != 1:
            column[:] = [np.concatenate(column) if column else np.zeros(0, np.int64)]
        return column[0]

    @property
    def chunk_of(self) -> np.ndarray:
        return self._column(0)

    @property
    def local(self) -> np.ndarray:
        return self._column(1)

    @property
    def cand_count(self) -> np.ndarray:
        return self._column(2)

    def keep(self, held: np.ndarray) -> None:
        """Hold only requests ``held`` (in that order); chunks no longer referenced are freed."""
        used, chunk_of = np.unique(self.chunk_of[held], return_inverse=True)
        local, cand_count = self.local[held], self.cand_count[held]
        self.chunks = [self.chunks[int(k)] for k in used]
        self._columns = [[chunk_of.reshape(-1).astype(np.int64)], [local], [cand_count]]
        self.num_requests = int(held.size)

    def gather(self, req: np.ndarray, pin_memory: bool = False) -> RequestBatch:
        """The held requests ``req`` as one RequestBatch, grouped by source chunk (in chunk
        order; ``req``'s order within each chunk): each chunk's part is one contiguous slice
        of the batch, filled by index_select with ``out=``, into pinned memory when asked."""
        req = np.asarray(req, np.int64)
        group = np.argsort(self.chunk_of[req], kind="stable")
        chunk_of, local = self.chunk_of[req][group], self.local[req][group]
        runs = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]]) if req.size else np.zeros(0, np.int64)
        ends = np.r_[runs[1:], req.size].astype(np.int64)
        parts = []  # (chunk, its requests, its candidate rows, request offset, row offset)
        row_request, n_rows = [], 0
        for a, b in zip(runs, ends):
            chunk = self.chunks[int(chunk_of[a])]
            rr, rows = request_rows(chunk.cand_count.numpy(), local[a:b])
            parts.append((chunk, torch.from_numpy(local[a:b]), torch.from_numpy(rows), int(a), n_rows))
            row_request.append(rr + a)
            n_rows += rows.size
        first = self.chunks[0]

        def fill(name: str, per_row: bool) -> torch.Tensor:
            like = getattr(first, name)
            out = torch.empty((n_rows if per_row else req.size, *like.shape[1:]), dtype=like.dtype,
                              pin_memory=pin_memory)
            for chunk, reqs, rows, r0, n0 in parts:
                index = rows if per_row else reqs
                torch.index_select(getattr(chunk, name), 0, index, out=out[n0 if per_row else r0:][:index.numel()])
            return out

        rr = np.concatenate(row_request) if row_request else np.zeros(0, np.int64)
        features = fill("features", True)
        return RequestBatch(
            user_ids=fill("user_id", False), history=fill("history", False), history_len=fill("history_len", False),
            user_dense=fill("user_dense", False), user_segment=fill("user_segment", False),
            user_country=fill("user_country", False),
            row_request=torch.from_numpy(rr).pin_memory() if pin_memory else torch.from_numpy(rr),
            item_id=fill("item_id", True), item_category=fill("item_category", True),
            item_dense=fill("item_dense", True), label=fill("label", True), request_ids=fill("request_id", False),
            dense_features=features if features.shape[1] else None)


def batches_in_order(chunks: Iterator[RequestChunk], spec: ReaderSpec, epoch: int, rank: int,
                     pin_memory: bool = False) -> Iterator[RequestBatch]:
    """RequestBatches of one epoch from the ordered chunk stream, in ``spec.order`` (in
    pinned memory with ``pin_memory``)."""
    rng = epoch_rng(spec.seed, epoch, 1000 + rank)
    if spec.order == "iid":
        for batch in _iid_batches(chunks, spec, rng):
            yield pin(batch) if pin_memory else batch
        return
    limit = 1 if spec.order == "table" else spec.buffer_requests
    window = RequestWindow()
    for chunk in chunks:
        window.add(chunk)
        if limit is not None and window.num_requests >= limit:
            yield from _drain_requests(window, spec, rng, final=False, pin_memory=pin_memory)
    if window.num_requests:
        yield from _drain_requests(window, spec, rng, final=True, pin_memory=pin_memory)


def _drain_requests(window: RequestWindow, spec: ReaderSpec, rng, final: bool, pin_memory: bool):
    """Batches of the window's requests in the order's permutation; all but the last
    (unfilled) batch unless ``final``, whose requests stay in the window for the next drain."""
    order = (np.arange(window.num_requests) if spec.order == "table" or spec.buffer_requests == 1
             else rng.permutation(window.num_requests))
    batches = pack_requests(window.cand_count[order], spec.batch_rows)
    keep = batches if final else batches[:-1]
    for b in keep:
        yield window.gather(order[b], pin_memory)
    window.keep(np.zeros(0, np.int64) if final or not batches else order[batches[-1]])


def _iid_batches(chunks: Iterator[RequestChunk], spec: ReaderSpec, rng) -> Iterator[RequestBatch]:
    window: list[RequestChunk] = []
    held = 0
    carry: tuple[RequestChunk, torch.Tensor] | None = None  # leftover rows of the last window
    for chunk in chunks:
        window.append(chunk)
        held += chunk.num_rows
        if spec.buffer_rows is not None and held >= spec.buffer_rows:
            carry = yield from _drain_rows(window, carry, spec, rng, final=False)
            window, held = [], 0
    yield from _drain_rows(window, carry, spec, rng, final=True)


def _drain_rows(window: list[RequestChunk], carry, spec: ReaderSpec, rng, final: bool):
    parts = list(window)
    if carry is not None:
        parts.insert(0, carry)
    if not parts:
        return None
    merged = concat_chunks(parts)
    row_req = np.repeat(np.arange(merged.num_requests), merged.cand_count.numpy())
    perm = rng.permutation(merged.num_rows)
    full = merged.num_rows - merged.num_rows % spec.batch_rows
    for a in range(0, full, spec.batch_rows):
        yield rows_to_batch(merged, perm[a:a + spec.batch_rows], row_req)
    rest = perm[full:]
    if rest.size == 0:
        return None
    if final:
        yield rows_to_batch(merged, rest, row_req)
        return None
    # Leftover rows (grouped by request in the merged chunk) with their requests' user blocks.
    rest = np.sort(rest)
    req, counts = np.unique(row_req[rest], return_counts=True)
    r, n = torch.from_numpy(req), torch.from_numpy(rest)
    return RequestChunk(**{f: getattr(merged, f)[r] for f in _REQUEST_FIELDS if f != "cand_count"},
                        cand_count=torch.from_numpy(counts.astype(np.int64)),
                        **{f: getattr(merged, f)[n] for f in _ROW_FIELDS})


# ---------------------------------------------------------------------------------------
# the per-rank loader
# ---------------------------------------------------------------------------------------
def pin(batch: RequestBatch) -> RequestBatch:
    return replace(batch, **{f.name: getattr(batch, f.name).pin_memory() for f in fields(batch)
                             if getattr(batch, f.name) is not None})


@dataclass
class LoaderTimes:
    """Where an epoch's time went, on the consumer's side."""

    wait_seconds: float = 0.0  # blocked waiting for the next batch
    batches: int = 0


class RequestReader:
    """Per-rank request-level batches over file tasks; ``epoch(e)`` yields exactly
    ``steps_per_epoch()`` RequestBatches, decoded in DataLoader workers and packed in a
    background thread (pinned when ``pin_memory``)."""

    def __init__(self, units: Sequence[FileUnit], spec: ReaderSpec, *, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        spec.validate()
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} outside world of size {world_size}")
        if not units:
            raise InputError("no file tasks to read")
        self.spec, self.rank, self.world_size, self.pin_memory = spec, rank, world_size, pin_memory
        self.shards = shard_units(units, world_size)
        self.units = self.shards[rank]
        self.rows = sum(u.rows for u in self.units)
        # A batch holds at most batch_rows rows, so a rank of n rows fills >= n / batch_rows.
        self._steps = min(sum(u.rows for u in s) for s in self.shards) // spec.batch_rows
        if self._steps == 0:
            raise InputError(f"empty shard: a rank of {world_size} gets fewer than data.batch_rows = {spec.batch_rows} "
                             f"rows ({min(sum(u.rows for u in s) for s in self.shards)} rows in {len(units)} files); "
                             "use more data, fewer processes or a smaller batch_rows")
        self.times = LoaderTimes()
        self._pending: dict[int, tuple] = {}  # epochs started ahead: (queue, stop, thread)
        self._then: dict[int, int] = {}  # epoch -> the epoch to start when it has produced its last batch

    @classmethod
    def from_settings(cls, start, end, spec: ReaderSpec, *, buckets=None, settings=None, **kwargs) -> "RequestReader":
        return cls(plan(start, end, buckets=buckets, settings=settings), spec, **kwargs)

    def steps_per_epoch(self) -> int:
        return self._steps

    def chunks(self, epoch: int) -> Iterator[RequestChunk]:
        """This rank's request chunks of one epoch, in the logical stream order."""
        streams = epoch_streams(self.units, self.spec, epoch, self.rank)
        dataset = _StreamDataset(streams, self.spec)
        if self.spec.workers == 0:
            return _round_robin(iter(dataset), len(streams))
        _import_pandas_before_fork()
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(self.spec.workers, len(streams)),
                                             prefetch_factor=2, multiprocessing_context="fork",
                                             worker_init_fn=_decode_worker_init)
        return _round_robin(iter(loader), len(streams))

    def batches(self, epoch: int) -> Iterator[RequestBatch]:
        """Every batch this rank's data gives in one epoch (no step limit, no prefetch), in
        pinned memory when the reader pins."""
        return batches_in_order(self.chunks(epoch), self.spec, epoch, self.rank, pin_memory=self.pin_memory)

    def epoch(self, epoch: int, next_epoch: int | None = None) -> Iterator[RequestBatch]:
        """The epoch's first ``steps_per_epoch()`` batches, packed ahead in a thread.

        With ``next_epoch``, that epoch's pipeline (fresh decode workers, a filled shuffle
        buffer) starts as soon as this one has produced its last batch, so its start-up
        overlaps this epoch's last steps instead of stalling the first step of the next."""
        self.times = LoaderTimes()
        out, stop, thread = self._pending.pop(epoch, None) or self._start(epoch)
        if next_epoch is not None:
            self._then[epoch] = next_epoch
        try:
            while True:
                t0 = time.perf_counter()
                item = out.get()
                self.times.wait_seconds += time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.times.batches += 1
                yield item
        finally:
            self._then.pop(epoch, None)
            _stop(out, stop, thread)

    def close(self) -> None:
        """Stop any epoch started ahead and not consumed (its decode workers exit)."""
        for out, stop, thread in self._pending.values():
            _stop(out, stop, thread)
        self._pending.clear()

    def _start(self, epoch: int) -> tuple:
        out: queue.Queue = queue.Queue(maxsize=self.spec.prefetch_batches)
        stop = threading.Event()
        steps = self._steps

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            it = self.batches(epoch)
            try:
                for _ in range(steps):
                    batch = next(it, None)
                    if batch is None:
                        raise RuntimeError(f"rank {self.rank} ran out of batches before step {steps}")
                    if not put(batch):
                        return
                it.close()  # the rest of the epoch is not read: its decode workers exit now
                nxt = self._then.pop(epoch, None)
                if nxt is not None and not stop.is_set():
                    self._pending[nxt] = self._start(nxt)
                put(None)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)
            finally:
                it.close()

        thread = threading.Thread(target=produce, name=f"reqdedup-reader-r{self.rank}-e{epoch}", daemon=True)
        thread.start()
        return out, stop, thread


def _stop(out: queue.Queue, stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    while thread.is_alive():
        try:
            out.get_nowait()
        except queue.Empty:
            thread.join(timeout=0.05)
