"""Turn a real interaction log into request logs with IMPRESSIONS_SCHEMA.

Input: CSV or Parquet with columns ``user_id``, ``item_id``, ``timestamp`` (unix seconds, or
ISO-8601 strings, or a Parquet timestamp), optional ``rating`` and optional ``category``
(or ``item_category``). Ids may be integers or strings, but one column must not mix both.

Mapping (see docs/data.md):

* **request** = one user session: consecutive interactions of a user less than
  ``session_gap_minutes`` apart. ``request_ts`` = the session's first interaction,
  ``event_date`` its UTC date; one landing folder per date.
* **history** = the user's interactions before the session start (all of them, whatever the
  rating), oldest first, the last ``history`` ids. Sessions with fewer than ``min_history``
  earlier interactions (default 1: cold-start sessions) are skipped as requests, but their
  interactions still count as history for later sessions.
* **candidates** = the session's distinct items (label 1; with ``min_rating``, items rated
  below it are label 0), the first ``candidates`` of them, plus negatives (label 0) sampled
  by popularity, without replacement, from items the user did not touch in the session and
  that were seen in the log up to that date, until the request has ``candidates`` rows.
  Positions are a random permutation (position carries no label information).
* **features** are point-in-time, never from the future: ``item_dense`` from interactions of
  earlier dates only (a daily snapshot), ``user_dense`` from the user's interactions before
  the session start.
* ids: raw user ids -> ``user_id`` (int64), raw item ids -> ``item_id`` (int32), through the
  persistent id maps of :mod:`reqdedup.data.idmap` (``<landing>/_mappings/``, by default under
  ``$REQDEDUP_HOME``): a raw id seen by an earlier import keeps its id, new raw ids get ids
  past the largest one, in sorted raw-id order (a first import: 0..U-1 and 0..I-1). The item
  catalog size written into the landing files' schema metadata is the item map's size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reqdedup.contract import EPOCH, ITEM_DENSE_DIM, NUM_CATEGORIES, NUM_COUNTRIES, NUM_SEGMENTS, REQUEST_ID_STRIDE
from reqdedup.contract import USER_DENSE_DIM
from reqdedup.data import idmap
from reqdedup.data.generator import landing_root
from reqdedup.data.idmap import MAPPINGS_DIR
from reqdedup.errors import InputError
from reqdedup.fsutil import replace_dir_atomically, temp_dir_for
from reqdedup.schema import landing_schema

REQUIRED = ("user_id", "item_id", "timestamp")
CATEGORY_COLUMNS = ("category", "item_category")
__all__ = ["MAPPINGS_DIR", "ImportConfig", "InteractionLogError", "import_interactions"]


class InteractionLogError(InputError):
    """The interaction log is missing, empty or malformed (message names the file)."""


@dataclass(frozen=True)
class ImportConfig:
    candidates: int = 50
    history: int = 256  # max history length
    session_gap_minutes: float = 30.0
    min_rating: float | None = None  # ratings >= min_rating are positives (None: every interaction)
    seed: int = 0
    min_history: int = 1  # skip sessions with fewer earlier interactions (0 keeps cold starts)
    rows_per_file: int = 1_000_000


# ---------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------
def _read_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise InteractionLogError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InteractionLogError(f"{path}: file is empty")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")) or path.is_dir():
            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            delimiter = "\t" if name.endswith((".tsv", ".tsv.gz", ".inter")) else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
            if name.endswith(".inter"):  # RecBole atomic file: headers are name:type
                table = table.rename_columns([c.split(":", 1)[0] for c in table.column_names])
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise InteractionLogError(f"{path}: cannot read as {'Parquet' if name.endswith(('.parquet', '.pq')) else 'CSV'}: {e}") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise InteractionLogError(f"{path}: missing required column(s) {missing}; found {table.column_names}")
    if table.num_rows == 0:
        raise InteractionLogError(f"{path}: file has no rows")
    keep = [c for c in (*REQUIRED, "rating", *CATEGORY_COLUMNS) if c in table.column_names]
    return table.select(keep).to_pandas()


def _bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _parse_ids(s: pd.Series, col: str, path: Path) -> np.ndarray:
    """Integer ids, or string ids; never a mix of numeric and non-numeric values."""
    if s.isna().any():
        raise InteractionLogError(f"{path}: column '{col}' has {int(s.isna().sum())} empty value(s) "
                                  f"(first at data row {_bad_row(s.isna().to_numpy())})")
    if pd.api.types.is_bool_dtype(s):
        raise InteractionLogError(f"{path}: column '{col}' is boolean, expected integer or string ids")
    if pd.api.types.is_integer_dtype(s):
        return s.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy()
        if not np.all(v == np.floor(v)):
            raise InteractionLogError(f"{path}: column '{col}' has non-integer numbers "
                                      f"(e.g. data row {_bad_row(v != np.floor(v))}: {v[v != np.floor(v)][0]!r})")
        return v.astype(np.int64)
    if pd.api.types.is_datetime64_any_dtype(s):
        raise InteractionLogError(f"{path}: column '{col}' is a timestamp, expected integer or string ids")
    txt = s.astype(str).str.strip()
    num = pd.to_numeric(txt, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.all():
        return txt.to_numpy(dtype=object)
    if bad.any():
        raise InteractionLogError(
            f"{path}: column '{col}' mixes numeric and non-numeric values "
            f"(e.g. data row {_bad_row(bad)}: {txt.iloc[_bad_row(bad) - 1]!r}); use one kind of id")
    v = num.to_numpy(dtype=np.float64)
    if not np.all(v == np.floor(v)):
        raise InteractionLogError(f"{path}: column '{col}' has non-integer numbers")
    return num.to_numpy().astype(np.int64)


def _parse_timestamp(s: pd.Series, path: Path) -> np.ndarray:
    """Unix seconds (float64) from numbers, ISO-8601 strings or timestamps."""
    col = "timestamp"
    if s.isna().any():
        raise InteractionLogError(f"{path}: column '{col}' has {int(s.isna().sum())} empty value(s) "
                                  f"(first at data row {_bad_row(s.isna().to_numpy())})")
    if pd.api.types.is_bool_dtype(s):
        raise InteractionLogError(f"{path}: column '{col}' is boolean, expected unix seconds or ISO-8601")
    if pd.api.types.is_numeric_dtype(s):
        return s.to_numpy(np.float64)
    if pd.api.types.is_datetime64_any_dtype(s):
        t = pd.to_datetime(s, utc=True)
        return (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    txt = s.astype(str).str.strip()
    num = pd.to_numeric(txt, errors="coerce")
    bad = num.isna().to_numpy()
    if not bad.any():
        return num.to_numpy(np.float64)
    if not bad.all():
        raise InteractionLogError(
            f"{path}: column '{col}' mixes unix-second numbers and other values "
            f"(e.g. data row {_bad_row(bad)}: {txt.iloc[_bad_row(bad) - 1]!r})")
    t = pd.to_datetime(txt, utc=True, errors="coerce", format="ISO8601")
    nat = t.isna().to_numpy()
    if nat.any():
        raise InteractionLogError(f"{path}: column '{col}' has a value that is neither unix seconds nor "
                                  f"ISO-8601 (data row {_bad_row(nat)}: {txt.iloc[_bad_row(nat) - 1]!r})")
    return (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()


def _parse_rating(s: pd.Series, path: Path) -> np.ndarray:
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(np.float64)
    num = s if pd.api.types.is_numeric_dtype(s) else pd.to_numeric(s.astype(str).str.strip(), errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        raise InteractionLogError(f"{path}: column 'rating' must be numeric "
                                  f"(data row {_bad_row(bad)}: {s.iloc[_bad_row(bad) - 1]!r})")
    return num.to_numpy(np.float64)


def _stable_hash(values, modulo: int, salt: str = "") -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        h = hashlib.blake2b(f"{salt}{v}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") % modulo
    return out


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def _sample_negatives(rng, cum: np.ndarray, pool: np.ndarray, need: np.ndarray,
                      excluded: list[np.ndarray]) -> list[np.ndarray]:
    """Per session, ``need[s]`` distinct popularity-weighted items from ``pool`` not in ``excluded[s]``."""
    S = len(need)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * S
    if S == 0 or len(pool) == 0:
        return out
    ex_keys = np.concatenate([np.full(len(e), s, np.int64) * (1 << 32) + e for s, e in enumerate(excluded)]) \
        if S else np.empty(0, np.int64)
    ex_keys.sort()
    todo = np.flatnonzero(need > 0)
    m = int(2 * need.max() + 8) if S else 0
    for _ in range(5):
        if len(todo) == 0:
            return out
        a = pool[np.minimum(np.searchsorted(cum, rng.random((len(todo), m)) * cum[-1], side="right"), len(pool) - 1)]
        order = np.argsort(a, axis=1, kind="stable")
        srt = np.take_along_axis(a, order, axis=1)
        first_sorted = np.ones_like(srt, dtype=bool)
        first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
        first = np.empty_like(first_sorted)
        np.put_along_axis(first, order, first_sorted, axis=1)
        keys = todo[:, None].astype(np.int64) * (1 << 32) + a
        pos = np.minimum(np.searchsorted(ex_keys, keys), max(len(ex_keys) - 1, 0))
        hit = (ex_keys[pos] == keys) if len(ex_keys) else np.zeros_like(first)
        valid = first & ~hit
        keep = valid & (np.cumsum(valid, axis=1) <= need[todo][:, None])
        ok = keep.sum(axis=1) == need[todo]
        for j in np.flatnonzero(ok):
            out[todo[j]] = a[j][keep[j]]
        todo = todo[~ok]
        m *= 2
    for s in todo:  # small pools: exact weighted draw from what is left
        mask = ~np.isin(pool, excluded[s])
        cand = pool[mask]
        if len(cand) == 0:
            continue
        w = np.diff(np.concatenate([[0.0], cum]))[mask]
        k = min(int(need[s]), len(cand), int((w > 0).sum()))
        out[s] = rng.choice(cand, size=k, replace=False, p=w / w.sum()) if k else np.empty(0, np.int64)
    return out


# ---------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------
def import_interactions(path, cfg: ImportConfig, out_dir=None) -> dict:
    """Import an interaction log as request logs under ``<landing>/date=D/`` (one per date)."""
    t0 = time.perf_counter()
    path = Path(path).expanduser().resolve()
    if cfg.candidates < 1 or cfg.history < 0 or cfg.session_gap_minutes <= 0:
        raise InteractionLogError("candidates must be >= 1, history >= 0, session_gap_minutes > 0")
    df = _read_frame(path)
    raw_user = _parse_ids(df["user_id"], "user_id", path)
    raw_item = _parse_ids(df["item_id"], "item_id", path)
    ts_all = _parse_timestamp(df["timestamp"], path)
    has_rating = "rating" in df.columns
    rating_all = _parse_rating(df["rating"], path) if has_rating else np.full(len(df), np.nan)
    if cfg.min_rating is not None and not has_rating:
        raise InteractionLogError(f"{path}: min_rating={cfg.min_rating} needs a 'rating' column")
    cat_col = next((c for c in CATEGORY_COLUMNS if c in df.columns), None)

    # Ids through the persistent maps: known raw ids keep theirs, new ones come after.
    users_log, u_inv = np.unique(raw_user, return_inverse=True)
    items_log, i_inv = np.unique(raw_item, return_inverse=True)
    if cat_col is None:
        log_category = _stable_hash(items_log, NUM_CATEGORIES)
    else:
        cat_raw = df[cat_col].to_numpy()
        first_row = np.zeros(len(items_log), dtype=np.int64)
        first_row[i_inv[::-1]] = np.arange(len(df))[::-1]
        cats = cat_raw[first_row]
        num = pd.to_numeric(pd.Series(cats), errors="coerce").to_numpy()
        direct = np.isfinite(num) & (num == np.floor(num)) & (num >= 0) & (num < NUM_CATEGORIES)
        log_category = np.where(direct, np.nan_to_num(num).astype(np.int64), _stable_hash(cats, NUM_CATEGORIES))
    out_root = landing_root(out_dir)
    map_root = out_root / MAPPINGS_DIR
    with idmap.locked(map_root):
        users_raw, item_table, mapping = _extend_maps(map_root, path, users_log, items_log, log_category)
        uid_all = _ids_of(map_root, "users", users_log, path)[u_inv]
        iid_all = _ids_of(map_root, "items", items_log, path)[i_inv]
    item_category = item_table.column("item_category").to_numpy()
    n_items = len(item_category)
    user_segment = _stable_hash(users_raw, NUM_SEGMENTS, "segment:")
    user_country = _stable_hash(users_raw, NUM_COUNTRIES, "country:")

    # Sort by (user, time, file order) and cut sessions.
    order = np.lexsort((np.arange(len(df)), ts_all, uid_all))
    u, it, ts, rt = uid_all[order], iid_all[order].astype(np.int64), ts_all[order], rating_all[order]
    n = len(u)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_sess = new_user | np.r_[True, np.diff(ts) >= cfg.session_gap_minutes * 60.0]
    s_start = np.flatnonzero(new_sess)
    s_end = np.r_[s_start[1:], n]
    user_first = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    s_user_first = user_first[s_start]
    s_prior = s_start - s_user_first
    s_rank = np.cumsum(new_sess) - 1  # session index per interaction
    s_is_first = new_user[s_start]
    s_rank_in_user = np.arange(len(s_start)) - np.maximum.accumulate(
        np.where(s_is_first, np.arange(len(s_start)), 0))
    keep_sess = s_prior >= cfg.min_history
    positive_all = (rt >= cfg.min_rating) if cfg.min_rating is not None else np.ones(n, bool)

    # Prefix sums for user features before the session start.
    rating_cs = np.r_[0.0, np.cumsum(np.nan_to_num(rt))]
    pos_cs = np.r_[0, np.cumsum(positive_all)]

    # Distinct items of each session, first occurrence order, label = any positive.
    pair_order = np.lexsort((np.arange(n), it, s_rank))
    ps, pi = s_rank[pair_order], it[pair_order]
    first_pair = np.r_[True, (ps[1:] != ps[:-1]) | (pi[1:] != pi[:-1])]
    grp = np.cumsum(first_pair) - 1
    d_idx = pair_order[first_pair]  # first occurrence (interaction index) of each (session, item)
    d_pos = np.zeros(first_pair.sum(), bool)
    np.logical_or.at(d_pos, grp, positive_all[pair_order])
    d_order = np.argsort(d_idx, kind="stable")  # back to time order within sessions
    d_idx, d_pos = d_idx[d_order], d_pos[d_order]
    d_sess = s_rank[d_idx]
    d_rank = np.arange(len(d_idx)) - np.searchsorted(d_sess, d_sess, side="left")
    d_keep = d_rank < cfg.candidates

    # Requests: kept sessions, by date.
    sess_ids = np.flatnonzero(keep_sess)
    start_ts = ts[s_start]
    day_all = np.floor(start_ts / 86400.0).astype(np.int64)
    inter_day = np.floor(ts / 86400.0).astype(np.int64)
    rng_base = cfg.seed

    # Item statistics over time (interactions in time order).
    t_order = np.argsort(ts, kind="stable")
    t_day = inter_day[t_order]
    t_item = it[t_order]
    t_rating = np.nan_to_num(rt[t_order])
    cnt_prior = np.zeros(n_items)
    rsum_prior = np.zeros(n_items)
    recent = np.zeros(n_items)
    first_day = np.full(n_items, np.iinfo(np.int64).max)
    p_add = p_rm = 0  # pointers: added to prior stats / removed from the 7-day window

    req_days = np.unique(day_all[sess_ids]) if len(sess_ids) else np.empty(0, np.int64)
    dates, paths, total_rows, total_pos = [], [], 0, 0
    users_out: set = set()
    for day in req_days:
        # prior stats: interactions of earlier days
        hi = np.searchsorted(t_day, day, side="left")
        if hi > p_add:
            sl = slice(p_add, hi)
            np.add.at(cnt_prior, t_item[sl], 1.0)
            np.add.at(rsum_prior, t_item[sl], t_rating[sl])
            np.add.at(recent, t_item[sl], 1.0)
            np.minimum.at(first_day, t_item[sl], t_day[sl])
            p_add = hi
        lo7 = np.searchsorted(t_day, day - 7, side="left")
        if lo7 > p_rm:
            np.add.at(recent, t_item[p_rm:lo7], -1.0)
            p_rm = lo7
        through = np.searchsorted(t_day, day, side="right")
        cnt_through = cnt_prior + np.bincount(t_item[hi:through], minlength=n_items)
        pool = np.flatnonzero(cnt_through > 0)
        cum = np.cumsum(cnt_through[pool])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_r = np.where(cnt_prior > 0, rsum_prior / np.maximum(cnt_prior, 1), 0.0)
        glob_mean = rsum_prior.sum() / cnt_prior.sum() if cnt_prior.sum() else 0.0
        item_dense_day = np.stack([
            np.log1p(cnt_prior),
            np.where(cnt_prior > 0, mean_r - glob_mean, 0.0) if has_rating else np.zeros(n_items),
            np.where(cnt_prior > 0, np.log1p(np.maximum(day - first_day, 0)), 0.0),
            np.log1p(np.maximum(recent, 0)),
        ], axis=1).astype(np.float32)

        ss = sess_ids[day_all[sess_ids] == day]
        ss = ss[np.lexsort((u[s_start[ss]], start_ts[ss]))]  # request-time order
        R = len(ss)
        if R >= REQUEST_ID_STRIDE:
            raise InteractionLogError(f"{path}: more than {REQUEST_ID_STRIDE} sessions on one day")
        rng = np.random.default_rng([rng_base, int(day) + 1_000_000])

        # Positives (and low-rated engaged items) of these sessions.
        sel = np.isin(d_sess, ss) & d_keep
        e_sess, e_idx, e_lab = d_sess[sel], d_idx[sel], d_pos[sel]
        local = np.searchsorted(np.sort(ss), e_sess)
        sorted_pos = np.argsort(ss)  # position of each session id in ss
        req_of_e = sorted_pos[local]
        n_eng = np.bincount(req_of_e, minlength=R)
        # all items the user touched in the session are excluded from negatives
        excluded = [np.unique(it[s_start[s]:s_end[s]]) for s in ss]
        need = np.maximum(cfg.candidates - n_eng, 0)
        negs = _sample_negatives(rng, cum, pool, need, excluded)
        n_neg = np.array([len(x) for x in negs], dtype=np.int64)
        neg_items = np.concatenate(negs) if R else np.empty(0, np.int64)
        neg_req = np.repeat(np.arange(R), n_neg)

        row_req = np.concatenate([req_of_e, neg_req])
        row_item = np.concatenate([it[e_idx], neg_items]).astype(np.int32)
        row_label = np.concatenate([e_lab, np.zeros(len(neg_items), bool)]).astype(np.int8)
        s_lo, s_hi = start_ts[ss], ts[s_end[ss] - 1]
        row_event = np.concatenate([ts[e_idx], s_lo[neg_req] + rng.random(len(neg_req)) * (s_hi - s_lo)[neg_req]])
        # random positions within each request
        shuffle_key = rng.random(len(row_req))
        o = np.lexsort((shuffle_key, row_req))
        first_r = np.searchsorted(row_req[o], np.arange(R))
        row_pos = np.empty(len(row_req), np.int32)
        row_pos[o] = np.arange(len(o)) - first_r[row_req[o]]

        # Request-level user block.
        st = s_start[ss]
        uf = s_user_first[ss]
        h_lo = np.maximum(uf, st - cfg.history)
        h_len = st - h_lo
        h_off = np.r_[0, np.cumsum(h_len)]
        h_vals = it[np.repeat(h_lo - h_off[:-1], h_len) + np.arange(h_off[-1])].astype(np.int32)
        history = pa.ListArray.from_arrays(pa.array(h_off, type=pa.int32()) if h_off[-1] < 2**31
                                           else pa.array(h_off), pa.array(h_vals, type=pa.int32()))
        if history.type != pa.list_(pa.int32()):
            history = history.cast(pa.list_(pa.int32()))
        prior = (st - uf).astype(np.float64)
        prev_end = ts[np.maximum(st - 1, 0)]
        hour = (start_ts[ss] % 86400.0) / 3600.0
        with np.errstate(invalid="ignore", divide="ignore"):
            ud = np.stack([
                np.log1p(prior),
                np.log1p(s_rank_in_user[ss]),
                np.log1p(np.where(prior > 0, (start_ts[ss] - ts[uf]) / 86400.0, 0.0)),
                np.log1p(np.where(prior > 0, (start_ts[ss] - prev_end) / 3600.0, 0.0)),
                np.where(prior > 0, (rating_cs[st] - rating_cs[uf]) / np.maximum(prior, 1), 0.0) if has_rating
                else np.zeros(R),
                np.where(prior > 0, (pos_cs[st] - pos_cs[uf]) / np.maximum(prior, 1), 0.0),
                np.sin(2 * np.pi * hour / 24.0),
                np.cos(2 * np.pi * hour / 24.0),
            ], axis=1).astype(np.float32)
        assert ud.shape[1] == USER_DENSE_DIM
        user_dense = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (R + 1) * USER_DENSE_DIM, USER_DENSE_DIM, dtype=np.int32)), pa.array(ud.ravel()))
        req_user = u[st].astype(np.int64)
        request_id = int(day) * REQUEST_ID_STRIDE + np.arange(R, dtype=np.int64)
        request_us = np.floor(start_ts[ss] * 1e6).astype(np.int64)

        # Rows in raw-log order: by event time, then request, then position.
        ro = np.lexsort((row_pos, row_req, row_event))
        rq, items = row_req[ro], row_item[ro]
        N = len(ro)
        take = pa.array(rq)
        item_dense = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (N + 1) * ITEM_DENSE_DIM, ITEM_DENSE_DIM, dtype=np.int32)),
            pa.array(item_dense_day[items].ravel()))
        table = pa.Table.from_arrays([
            pa.array(request_id[rq]),
            pa.array(req_user[rq]),
            pa.array(request_us[rq], type=pa.timestamp("us", tz="UTC")),
            pa.array(np.full(N, day, dtype=np.int32), type=pa.date32()),
            history.take(take),
            user_dense.take(take),
            pa.array(user_segment[req_user[rq]].astype(np.int32)),
            pa.array(user_country[req_user[rq]].astype(np.int32)),
            pa.array(items),
            pa.array(item_category[items].astype(np.int32)),
            item_dense,
            pa.array(row_pos[ro]),
            pa.array(row_label[ro]),
        ], schema=landing_schema(n_items))

        date = (EPOCH + dt.timedelta(days=int(day))).isoformat()
        target = out_root / f"date={date}"
        tmp = temp_dir_for(target)
        try:
            for i, a in enumerate(range(0, max(N, 1), cfg.rows_per_file)):
                pq.write_table(table.slice(a, cfg.rows_per_file), tmp / f"part-{i:05d}.parquet")
            replace_dir_atomically(tmp, target)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        dates.append(date)
        paths.append(str(target))
        total_rows += N
        total_pos += int(row_label.sum())
        users_out.update(np.unique(req_user).tolist())

    return {
        "source": str(path),
        "dates": dates,
        "paths": paths,
        "rows": int(total_rows),
        "requests": int(len(sess_ids)),
        "users": len(users_out),
        "items": int(n_items),  # the catalog size: the item map's size
        "items_in_log": int(len(items_log)),
        "users_in_map": int(len(users_raw)),
        "interactions": int(n),
        "sessions": int(len(s_start)),
        "skipped_sessions": int(len(s_start) - len(sess_ids)),
        "users_in_log": int(len(users_log)),
        "label_rate": round(total_pos / total_rows, 6) if total_rows else 0.0,
        "mappings": mapping,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _extend_maps(root: Path, source: Path, users_log: np.ndarray, items_log: np.ndarray,
                 log_category: np.ndarray) -> tuple[np.ndarray, pa.Table, dict]:
    """Extend the persisted maps with this log's new raw ids (the caller holds the lock).
    Returns (every raw user id, in user_id order; the item table in item_id order; paths)."""
    out = {}
    users = idmap.load(root, "users")
    ids, new = idmap.assign(users, users_log, "users", source)
    old_raw = users["raw_user_id"].to_numpy() if users is not None else users_log[:0]
    old_ids = users["user_id"].to_numpy(np.int64) if users is not None else np.empty(0, np.int64)
    raw_all = np.concatenate([old_raw, users_log[new]]) if users is not None else users_log
    ids_all = np.concatenate([old_ids, ids[new]])
    o = np.argsort(ids_all, kind="stable")
    if not np.array_equal(ids_all[o], np.arange(len(o))):
        raise InputError(f"{idmap.map_path(root, 'users')}: user ids are not 0..{len(o) - 1}: the map was edited")
    users_raw = np.asarray(raw_all, dtype=object if users_log.dtype == object else np.int64)[o]
    out["users"] = idmap.write(root, "users", pa.table({"raw_user_id": idmap.raw_array(users_raw),
                                                        "user_id": pa.array(np.arange(len(o), dtype=np.int64))}))

    items = idmap.load(root, "items")
    ids, new = idmap.assign(items, items_log, "items", source)
    if items is not None:
        raw_all = np.concatenate([items["raw_item_id"].to_numpy(), items_log[new]])
        ids_all = np.concatenate([items["item_id"].to_numpy(np.int64), ids[new]])
        # a known item keeps the category it was first imported with
        cat_all = np.concatenate([items["item_category"].to_numpy(np.int64), log_category[new]])
    else:
        raw_all, ids_all, cat_all = items_log, ids, log_category
    if len(ids_all) >= 2**31:
        raise InteractionLogError(f"{source}: too many items for int32 ids")
    o = np.argsort(ids_all, kind="stable")
    if not np.array_equal(ids_all[o], np.arange(len(o))):
        raise InputError(f"{idmap.map_path(root, 'items')}: item ids are not 0..{len(o) - 1}: the map was edited")
    item_table = pa.table({"raw_item_id": idmap.raw_array(np.asarray(raw_all, dtype=object if items_log.dtype == object
                                                                     else np.int64)[o]),
                           "item_id": pa.array(np.arange(len(o), dtype=np.int32)),
                           "item_category": pa.array(np.asarray(cat_all, dtype=np.int32)[o])})
    out["items"] = idmap.write(root, "items", item_table)
    return users_raw, item_table, out


def _ids_of(root: Path, kind: str, raw_unique: np.ndarray, source: Path) -> np.ndarray:
    """The (just persisted) ids of this log's raw ids."""
    ids, new = idmap.assign(idmap.load(root, kind), raw_unique, kind, source)
    assert not new.any(), f"{kind}: raw ids missing from the map just written"
    return ids
