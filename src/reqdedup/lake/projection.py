"""The request-level projection: one row per request (the user block and its candidate
count) of request-sorted Parquet, and the per-row checks that make it trustworthy.

numpy and pyarrow only (no torch, Spark or pyiceberg), so Spark's ingest writes it and the
training reader (`reqdedup.train.reader`) reads it, on the GPU host too:

- ``request_projection``: rows of whole requests -> one row per request, after checking
  that every row of a request carries the same user block (a 64-bit hash per row of the
  history, compared within the request: O(rows));
- ``write_file_projection`` / ``write_projections``: the projection of an Iceberg data file
  of the request-sorted table, written at ingest beside the table (``projection_path``);
- ``remove_stale_projections``: the projections whose data file is gone (maintenance).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reqdedup.contract import USER_DENSE_DIM
from reqdedup.errors import InputError

USER_BLOCK = ("user_id", "user_history", "user_dense", "user_segment", "user_country")
REQUESTS_SUFFIX = ".requests.parquet"
REQUEST_COLUMNS = ("request_id", *USER_BLOCK, "num_candidates")


def local_path(uri: str) -> str:
    """A local path from a file URI (Spark writes ``file:/x``, pyiceberg ``file:///x``)."""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path)
    return uri


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


# Uncompressed bytes of the read columns per decoded batch: a decode worker holds a few of
# these, so rows per batch shrink as rows widen (a per-row history of 1,000 ids: ~8k rows).
DECODE_BATCH_BYTES = 32 << 20


def rows_per_decode_batch(pf: pq.ParquetFile, columns: Sequence[str], most: int) -> int:
    """At most ``most`` rows, and about DECODE_BATCH_BYTES of the columns read (from the
    first row group's uncompressed column sizes)."""
    md = pf.metadata
    if md.num_row_groups == 0:
        return most
    group = md.row_group(0)
    wanted = set(columns)
    size = sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
               if group.column(i).path_in_schema.split(".")[0] in wanted)
    per_row = size / max(group.num_rows, 1)
    return int(max(256, min(most, DECODE_BATCH_BYTES // max(per_row, 1.0))))


def read_batches(path: str, columns: Sequence[str], batch_rows: int):
    pf = open_parquet(path)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)} (has {', '.join(pf.schema_arrow.names)})")
    try:
        rows = rows_per_decode_batch(pf, columns, batch_rows)
        for rb in pf.iter_batches(batch_size=rows, columns=list(columns)):
            yield pa.Table.from_batches([rb])
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: corrupt Parquet data ({type(e).__name__}: {e})") from None


def fixed_width(values: pa.Array, width: int, column: str, path: str) -> np.ndarray:
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False)
    if flat.size != len(values) * width:
        raise InputError(f"{path}: column {column!r} must hold lists of exactly {width} values")
    return flat.astype(np.float32, copy=True).reshape(len(values), width)


_HASH_WEIGHTS = np.random.default_rng(20260415).integers(1, 2**63 - 1, size=1 << 16, dtype=np.int64).astype(np.uint64) | np.uint64(1)


def history_row_hash(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's list [n] (position-weighted sum of the ids, plus the
    length): O(values), no row is compared with another element by element."""
    lengths = np.diff(offsets)
    n = lengths.size
    out = lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    if values.size == 0:
        return out
    base = offsets[:-1] - offsets[0]
    pos = np.arange(values.size, dtype=np.int64) - np.repeat(base, lengths)
    weights = _HASH_WEIGHTS[pos % _HASH_WEIGHTS.size] + (pos // _HASH_WEIGHTS.size).astype(np.uint64)
    with np.errstate(over="ignore"):
        contrib = (values.astype(np.int64).astype(np.uint64) + np.uint64(1)) * weights
    nonempty = np.flatnonzero(lengths > 0)
    sums = np.add.reduceat(contrib, base[nonempty]) if nonempty.size else np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        out[nonempty] += sums
    return out if out.size == n else out[:n]


def request_starts(rows: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(request ids per row, first row of each request, rows per request) of contiguous requests."""
    ids = rows.column("request_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else np.zeros(0, np.int64)
    return ids, starts, np.diff(np.r_[starts, ids.size])


def check_user_blocks(rows: pa.Table, starts: np.ndarray, counts: np.ndarray, path: str) -> None:
    """InputError naming the request and file if a request's rows disagree on the user block:
    a 64-bit hash per row of the history plus the small user columns, compared with the
    request's first row (O(rows); no history is compared element by element)."""
    ids = rows.column("request_id").to_numpy()
    hist = rows.column("user_history").combine_chunks()
    offsets = hist.offsets.to_numpy().astype(np.int64)
    values = pc.list_flatten(hist).to_numpy(zero_copy_only=False)
    user_id = rows.column("user_id").to_numpy()
    segment = rows.column("user_segment").to_numpy()
    country = rows.column("user_country").to_numpy()
    dense = fixed_width(rows.column("user_dense").combine_chunks(), USER_DENSE_DIM, "user_dense", path)
    first_of_row = np.repeat(starts, counts)
    hashes = history_row_hash(values, offsets)
    dense_bits = dense.view(np.uint32)
    same = ((hashes == hashes[first_of_row]) & (user_id == user_id[first_of_row])
            & (segment == segment[first_of_row]) & (country == country[first_of_row])
            & (dense_bits == dense_bits[first_of_row]).all(axis=1))
    if not same.all():
        bad = int(np.flatnonzero(~same)[0])
        raise InputError(f"{path}: request_id {int(ids[bad])}: candidate rows disagree on the user block "
                         f"(row {bad} differs from row {int(first_of_row[bad])}); request-level dedup "
                         "needs one user block per request")


def request_projection(rows: pa.Table, where: str) -> pa.Table:
    """One row per request (user block + its number of candidate rows) of request-sorted
    rows; InputError if a request's rows disagree on the user block."""
    ids, starts, counts = request_starts(rows)
    if ids.size == 0:
        return rows.select(REQUEST_COLUMNS[:-1]).append_column("num_candidates", pa.array([], pa.int32()))
    firsts = ids[starts]
    if np.unique(firsts).size != starts.size:
        uniq, count = np.unique(firsts, return_counts=True)
        raise InputError(f"{where}: request_id {int(uniq[count > 1][0])} reappears after another request: "
                         "not request-sorted")
    check_user_blocks(rows, starts, counts, where)  # on every row: the reader trusts the projection
    return rows.select(list(REQUEST_COLUMNS[:-1])).take(pa.array(starts)).append_column(
        "num_candidates", pa.array(counts.astype(np.int32)))


# -- Iceberg: the request-level projection of each data file ------------------------------
# One file of one row per request (the user block + its candidate count) beside each data
# file of the request-sorted table, written at ingest: the reader then reads the candidate
# columns from the data file and the user block once per request from the projection (Meta's
# ROO: the request is the training unit). A sidecar per data file, not a second Iceberg
# table: Iceberg commits one table at a time, so a second table could disagree with main
# after a crash between two publishes; an Iceberg data file is immutable and its path never
# reused, so a projection named by its data file's path always describes exactly its rows.
PROJECTIONS_DIR = "_request_projections"


def projection_path(settings, data_path: str) -> Path:
    """Where the projection of one data file lives: under the warehouse (every executor and
    reader sees it) but outside every table's location (Iceberg's remove_orphan_files would
    take it for an orphan of the table)."""
    digest = hashlib.sha256(local_path(data_path).encode()).hexdigest()[:40]
    return settings.warehouse_dir / PROJECTIONS_DIR / digest[:2] / f"{digest}{REQUESTS_SUFFIX}"


def write_file_projection(data_path: str, out: Path) -> dict:
    """Write the request-level projection of one request-sorted data file, streamed batch by
    batch (a request's rows may straddle two batches), atomically (temp file, then rename).

    Every row's user block is checked against its request's (the reader trusts the projection
    and skips that check), and a request id that reappears after another request raises: the
    file is not request-sorted. A request that continues in the partition's next file (the
    writer split it) is projected with the rows this file holds; the reader reads such file
    pairs row by row, so those counts are never used."""
    data_path = local_path(data_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    seen: set[int] = set()
    pending: pa.Table | None = None
    requests = rows = 0
    writer = None

    def write(part: pa.Table) -> None:
        nonlocal writer, requests
        proj = request_projection(part, data_path)
        ids = proj.column("request_id").to_pylist()
        again = seen.intersection(ids)
        if again:
            raise InputError(f"{data_path}: request_id {min(again)} reappears after another request: the file is "
                             "not request-sorted")
        seen.update(ids)
        if writer is None:
            writer = open_writer(proj.schema)
        writer.write_table(proj)
        requests += proj.num_rows

    def open_writer(schema: pa.Schema) -> pq.ParquetWriter:
        # the data file it projects, for remove_stale_projections
        return pq.ParquetWriter(tmp, schema.with_metadata({b"reqdedup.projection_of": data_path.encode()}),
                                compression="zstd")

    try:
        for table in read_batches(data_path, ("request_id", *USER_BLOCK), 65536):
            rows += table.num_rows
            if table.num_rows == 0:
                continue
            if pending is not None:
                table = pa.concat_tables([pending, table])
            last_start = int(request_starts(table)[1][-1])
            complete, pending = table.slice(0, last_start), table.slice(last_start)
            if complete.num_rows:
                write(complete)
        if pending is not None and pending.num_rows:
            write(pending)
        if writer is None:  # a file without rows: an empty projection
            writer = open_writer(request_projection(open_parquet(data_path).schema_arrow.empty_table().select(
                ["request_id", *USER_BLOCK]), data_path).schema)
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {"data_file": data_path, "projection": str(out), "rows": rows, "requests": requests}


def write_projections(data_paths: Sequence[str], settings=None) -> dict:
    """The request-level projection of each data file that has none yet (idempotent: a
    retried ingest or maintenance run writes only what is missing)."""
    from reqdedup.config import get_settings

    settings = settings or get_settings()
    t0 = time.perf_counter()
    written = existing = 0
    for path in data_paths:
        out = projection_path(settings, path)
        if out.exists():
            existing += 1
            continue
        write_file_projection(path, out)
        written += 1
    return {"written": written, "existing": existing, "seconds": round(time.perf_counter() - t0, 3)}


def remove_stale_projections(settings=None, dry_run: bool = False) -> dict:
    """Delete the projections whose data file is gone (expired snapshots' files, deleted by
    Iceberg's expire_snapshots or remove_orphan_files); a projection with an unreadable
    footer (a crash cannot leave one: writes are renamed into place) is deleted too.
    ``dry_run``: count them, delete nothing."""
    from reqdedup.config import get_settings

    settings = settings or get_settings()
    root = settings.warehouse_dir / PROJECTIONS_DIR
    removed = kept = 0
    for f in sorted(root.glob(f"*/*{REQUESTS_SUFFIX}")) if root.is_dir() else []:
        try:
            source = (pq.read_schema(f).metadata or {}).get(b"reqdedup.projection_of", b"").decode()
        except (OSError, pa.ArrowException):
            source = ""
        if source and Path(source).exists():
            kept += 1
        else:
            if not dry_run:
                f.unlink(missing_ok=True)
            removed += 1
    return {"removed": removed, "kept": kept, "dry_run": dry_run}
