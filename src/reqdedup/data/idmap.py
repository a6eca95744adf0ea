"""The importer's persistent id maps: raw user/item ids -> ``user_id`` / ``item_id``.

One Parquet file per kind under ``<landing>/_mappings/`` (by default the landing folder of
``$REQDEDUP_HOME``): ``users.parquet`` (raw_user_id, user_id) and ``items.parquet``
(raw_item_id, item_id, item_category). Every import reads them first, so a raw id keeps the
id it got in an earlier import; raw ids not seen before get new ids after the largest one
(in sorted raw-id order). The maps are read, extended and replaced atomically under an
exclusive lock (``.lock``): two imports at once cannot hand one id to two raw ids, and a
retried import gives the same ids again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reqdedup.errors import InputError

MAPPINGS_DIR = "_mappings"
KINDS = {"users": ("raw_user_id", "user_id", pa.int64()), "items": ("raw_item_id", "item_id", pa.int32())}


@contextlib.contextmanager
def locked(root: Path):
    """Exclusive lock on the map folder for a read-extend-write of the maps."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def map_path(root: Path, kind: str) -> Path:
    return root / f"{kind}.parquet"


def load(root: Path, kind: str) -> pd.DataFrame | None:
    """The persisted map of one kind, None when there is none yet."""
    p = map_path(root, kind)
    if not p.exists():
        return None
    try:
        df = pq.read_table(p).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{p}: the id map is not readable Parquet ({e}); restore it from a backup: "
                         f"without it new imports would renumber ids") from None
    raw_col, id_col, _ = KINDS[kind]
    if raw_col not in df.columns or id_col not in df.columns:
        raise InputError(f"{p}: the id map lacks column {raw_col!r} or {id_col!r}")
    if df[id_col].duplicated().any() or df[raw_col].duplicated().any():
        raise InputError(f"{p}: the id map holds a duplicated raw id or id")
    return df


def assign(existing: pd.DataFrame | None, raw_unique: np.ndarray, kind: str, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ids for ``raw_unique`` (sorted, distinct raw ids of this import): the persisted id of a
    known raw id, new ids past the largest for the others. Returns (ids, is_new)."""
    raw_col, id_col, _ = KINDS[kind]
    if existing is None or len(existing) == 0:
        return np.arange(len(raw_unique), dtype=np.int64), np.ones(len(raw_unique), bool)
    known_strings = existing[raw_col].dtype == object
    new_strings = raw_unique.dtype == object
    if known_strings != new_strings:
        have, got = ("string", "integer") if known_strings else ("integer", "string")
        raise InputError(f"{source}: column {raw_col.removeprefix('raw_')!r} has {got} ids, but the id map "
                         f"{kind}.parquet holds {have} raw ids: one kind of raw id per map")
    index = pd.Index(existing[raw_col].to_numpy())
    pos = index.get_indexer(raw_unique)
    is_new = pos < 0
    ids = np.empty(len(raw_unique), dtype=np.int64)
    ids[~is_new] = existing[id_col].to_numpy(np.int64)[pos[~is_new]]
    start = int(existing[id_col].max()) + 1
    ids[is_new] = start + np.arange(int(is_new.sum()), dtype=np.int64)
    return ids, is_new


def write(root: Path, kind: str, table: pa.Table) -> str:
    """Replace the map of one kind atomically (write a temporary file, then rename)."""
    p = map_path(root, kind)
    tmp = root / f".{kind}.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, p)
    return str(p)


def raw_array(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int64)) if values.dtype != object else pa.array([str(x) for x in values], pa.string())
