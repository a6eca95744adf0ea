"""Synthetic request logs: one row per (request, candidate), in raw-log order.

The generator simulates a small recommendation world and one day of its feed traffic:

* **World** (seeded by ``seed`` alone, so it is the same on every date): item latent vectors
  grouped in 64 clusters (``item_category`` = cluster), Zipf item popularity, a quality score;
  users with 1-3 preferred clusters, a latent taste, a Zipf activity weight, a country, and a
  base action history (item ids from their preferred clusters, length 0.5x-2x ``history``).
* **Day** (seeded by ``(seed, date)``): requests are drawn from users by activity weight, so
  a few heavy users issue many requests and most active users one or two. Each request gets
  ``candidates`` distinct items (a retrieval-like mix of affinity and popularity sources),
  ranked into positions 0..K-1, and labels
  ``p = sigmoid(a * affinity + b * quality - pos_bias * log1p(position) + c + noise)``,
  where affinity is the cosine between the mean latent of the request's history items and
  the candidate's latent. The intercept ``c`` is calibrated once per world and config (not
  per date) so the label rate is about ``label_rate``.
* **Raw-log order**: each row is logged at ``request_ts + delay`` (impressions are logged as
  the user scrolls), and rows are sorted by that event time, so rows of concurrent requests
  interleave, as a logging service emits them.

A user's history is identical on every row of a request, and drifts during the day: the
k-th request of a user's day sees ``history_drift * k`` newer items appended (oldest dropped).

``generate_table`` builds request-level arrays once and expands them to rows with Arrow
``take``; ``write_landing`` writes ``<landing>/date=D/part-NNNNN.parquet`` atomically.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reqdedup.errors import InputError
from reqdedup.fsutil import replace_dir_atomically, temp_dir_for
from reqdedup.contract import EPOCH, ITEM_DENSE_DIM, REQUEST_ID_STRIDE, USER_DENSE_DIM
from reqdedup.contract import NUM_CATEGORIES as N_CATEGORIES
from reqdedup.contract import NUM_COUNTRIES as N_COUNTRIES
from reqdedup.contract import NUM_SEGMENTS as N_SEGMENTS
from reqdedup.contract import parse_date
from reqdedup.schema import landing_schema


@dataclass(frozen=True)
class GeneratorConfig:
    users: int = 500
    requests: int = 2000
    candidates: int = 50
    history: int = 256  # mean history length (item ids)
    items: int = 20000  # catalog size
    seed: int = 0
    date: str = "2026-01-01"
    # --- knobs ----------------------------------------------------------------------
    latent_dim: int = 16
    activity_zipf: float = 1.0  # exponent of user activity weights (rank ** -s)
    item_zipf: float = 0.9  # exponent of item popularity
    history_min_ratio: float = 0.5  # per-user history length in [min, max] x history
    history_max_ratio: float = 2.0
    history_cap: int | None = None  # hard cap on history length (default 2 x history)
    history_pref: float = 0.85  # share of history items from the user's preferred clusters
    history_drift: int = 2  # newer items appended per earlier request of the user's day
    affinity_share: float = 0.5  # share of candidates from the user's clusters (rest: popular)
    label_rate: float = 0.08  # target mean label
    affinity_weight: float = 4.0  # a
    quality_weight: float = 0.6  # b
    position_bias: float = 0.3  # weight of -log1p(position)
    label_noise: float = 0.5  # std of the logit noise
    log_spread: float = 50.0  # mean logging delay of a row, in mean request inter-arrivals
    rows_per_file: int = 1_000_000
    progress: bool | None = None  # tqdm bar; None: only for big runs

    def validate(self) -> None:
        if self.users < 1 or self.requests < 1 or self.candidates < 1 or self.items < 1:
            raise InputError("users, requests, candidates and items must be >= 1")
        if self.candidates > self.items:
            raise InputError(f"candidates ({self.candidates}) > items ({self.items}): cannot be distinct")
        if self.requests >= REQUEST_ID_STRIDE:
            raise InputError(f"requests per day must be < {REQUEST_ID_STRIDE}")
        if self.history < 0:
            raise InputError("history must be >= 0")
        if not 0.0 < self.label_rate < 1.0:
            raise InputError("label_rate must be in (0, 1)")
        if self.rows_per_file < 1:
            raise InputError("rows_per_file must be >= 1")
        _parse_date(self.date)

    @property
    def max_history(self) -> int:
        cap = self.history_cap if self.history_cap is not None else 2 * self.history
        return max(int(cap), 0)


def _parse_date(date: str) -> dt.date:
    return parse_date(date, "date")


# ---------------------------------------------------------------------------------------
# World: the same for every date of one seed
# ---------------------------------------------------------------------------------------
@dataclass
class World:
    item_latent: np.ndarray  # (items, d) float32, unit norm
    item_cluster: np.ndarray  # (items,) int32
    item_pop: np.ndarray  # (items,) float64, sums to 1
    item_quality: np.ndarray  # (items,) float32
    item_dense: np.ndarray  # (items, ITEM_DENSE_DIM) float32
    # items sorted by cluster, for "popular item of cluster c" draws
    by_cluster: np.ndarray  # (items,) item ids sorted by cluster
    cluster_cum: np.ndarray  # (items,) cumulative popularity in by_cluster order
    cluster_lo: np.ndarray  # (C,) start of each cluster's cumulative mass
    cluster_mass: np.ndarray  # (C,) popularity mass of each cluster
    global_cum: np.ndarray  # (items,) cumulative popularity
    user_clusters: np.ndarray  # (users, 3) preferred clusters
    user_cluster_w: np.ndarray  # (users, 3) weights, rows sum to 1
    user_activity: np.ndarray  # (users,) float64, sums to 1
    user_country: np.ndarray  # (users,) int32
    user_segment: np.ndarray  # (users,) int32
    user_static: np.ndarray  # (users, 6) float32: the static part of user_dense
    hist_values: np.ndarray  # base histories, concatenated, int32
    hist_offsets: np.ndarray  # (users+1,) int64


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights rank ** -s over a random permutation of n things (sum 1)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** (-s)
    w /= w.sum()
    out = np.empty(n)
    out[rng.permutation(n)] = w
    return out


def _draw_cum(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices of draws from a cumulative distribution (u in [0, cum[-1]))."""
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


def _draw_from_clusters(w: World, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One popularity-weighted item from each given cluster (vectorized)."""
    u = w.cluster_lo[clusters] + rng.random(clusters.shape) * w.cluster_mass[clusters]
    return w.by_cluster[_draw_cum(w.cluster_cum, u)]


def _draw_popular(w: World, shape, rng: np.random.Generator) -> np.ndarray:
    return _draw_cum(w.global_cum, rng.random(shape) * w.global_cum[-1]).astype(np.int32)


def _draw_user_items(w: World, users: np.ndarray, pref: float, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of ``users``: from a preferred cluster with prob ``pref``, else popular."""
    n = len(users)
    k = (rng.random(n)[:, None] > np.cumsum(w.user_cluster_w[users], axis=1)).sum(axis=1)
    k = np.minimum(k, w.user_clusters.shape[1] - 1)
    clusters = w.user_clusters[users, k]
    out = _draw_from_clusters(w, clusters, rng).astype(np.int32)
    other = rng.random(n) >= pref
    if other.any():
        out[other] = _draw_popular(w, int(other.sum()), rng)
    return out


_WORLD_CACHE: dict = {}


def build_world(cfg: GeneratorConfig) -> World:
    """The world of one seed: items, users and base histories (independent of the date)."""
    key = (cfg.seed, cfg.users, cfg.items, cfg.history, cfg.latent_dim, cfg.activity_zipf,
           cfg.item_zipf, cfg.history_min_ratio, cfg.history_max_ratio, cfg.max_history,
           cfg.history_pref)
    if key in _WORLD_CACHE:
        return _WORLD_CACHE[key]
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    d, n_items, n_users = cfg.latent_dim, cfg.items, cfg.users

    centers = rng.standard_normal((N_CATEGORIES, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    cluster_sizes = rng.dirichlet(np.full(N_CATEGORIES, 2.0))
    item_cluster = rng.choice(N_CATEGORIES, size=n_items, p=cluster_sizes).astype(np.int32)
    lat = centers[item_cluster] + 0.6 * rng.standard_normal((n_items, d)) / np.sqrt(d)
    lat /= np.linalg.norm(lat, axis=1, keepdims=True)
    item_latent = lat.astype(np.float32)
    item_pop = _zipf_weights(n_items, cfg.item_zipf, rng)
    item_quality = rng.standard_normal(n_items).astype(np.float32)
    log_pop = np.log(item_pop * n_items)
    item_dense = np.stack([
        (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9),  # log popularity, standardized
        item_quality + 0.3 * rng.standard_normal(n_items),  # observed quality score (noisy)
        rng.random(n_items),  # freshness
        rng.lognormal(0.0, 0.5, n_items) - 1.0,  # price-like
    ], axis=1).astype(np.float32)
    assert item_dense.shape[1] == ITEM_DENSE_DIM

    by_cluster = np.argsort(item_cluster, kind="stable").astype(np.int32)
    cluster_cum = np.cumsum(item_pop[by_cluster])
    counts = np.bincount(item_cluster, minlength=N_CATEGORIES)
    ends = np.cumsum(counts)
    starts = ends - counts
    cum0 = np.concatenate([[0.0], cluster_cum])
    cluster_lo = cum0[starts]
    cluster_mass = cum0[ends] - cum0[starts]
    # Clusters with no items: route their draws to the most popular cluster.
    empty = cluster_mass <= 0
    if empty.any():
        best = int(np.argmax(cluster_mass))
        cluster_lo[empty], cluster_mass[empty] = cluster_lo[best], cluster_mass[best]
    global_cum = np.cumsum(item_pop)

    # Users: preferred clusters (biased to big clusters), weights, activity, country.
    user_clusters = rng.choice(N_CATEGORIES, size=(n_users, 3), p=cluster_sizes).astype(np.int32)
    user_cluster_w = rng.dirichlet(np.array([4.0, 2.0, 1.0]), size=n_users)
    user_activity = _zipf_weights(n_users, cfg.activity_zipf, rng)
    user_country = rng.choice(N_COUNTRIES, size=n_users, p=_zipf_weights(N_COUNTRIES, 1.2, rng)).astype(np.int32)
    user_segment = (user_clusters[:, 0] % N_SEGMENTS).astype(np.int32)

    ratio = np.exp(rng.uniform(np.log(cfg.history_min_ratio), np.log(cfg.history_max_ratio), n_users))
    lengths = np.minimum(np.rint(cfg.history * ratio).astype(np.int64), cfg.max_history)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    w = World(item_latent, item_cluster, item_pop, item_quality, item_dense, by_cluster,
              cluster_cum, cluster_lo, cluster_mass, global_cum, user_clusters, user_cluster_w,
              user_activity, user_country, user_segment, np.empty(0, np.int32), np.empty(0, np.int32),
              offsets)
    owners = np.repeat(np.arange(n_users), lengths)
    w.hist_values = _draw_user_items(w, owners, cfg.history_pref, rng)

    # Static user features: taste projection (from the latent of the preferred clusters),
    # log activity, log history length.
    taste = (centers[user_clusters] * user_cluster_w[..., None]).sum(axis=1)
    proj = rng.standard_normal((d, 4)) / np.sqrt(d)
    act = np.log(user_activity * n_users)
    w.user_static = np.concatenate([
        taste @ proj + 0.2 * rng.standard_normal((n_users, 4)),
        ((act - act.mean()) / (act.std() + 1e-9))[:, None],
        np.log1p(lengths)[:, None] / np.log1p(max(cfg.history, 1)),
    ], axis=1).astype(np.float32)
    if len(_WORLD_CACHE) > 4:
        _WORLD_CACHE.clear()
    _WORLD_CACHE[key] = w
    return w


# ---------------------------------------------------------------------------------------
# Candidates and labels
# ---------------------------------------------------------------------------------------
def _distinct_rows(draw, n_rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, k) matrix, distinct values per row, from ``draw(rows, m) -> (len(rows), m)``."""
    out = np.empty((n_rows, k), dtype=np.int32)
    todo = np.arange(n_rows)
    m = 2 * k + 8
    for _ in range(6):
        if len(todo) == 0:
            return out
        a = draw(todo, m)
        order = np.argsort(a, axis=1, kind="stable")
        s = np.take_along_axis(a, order, axis=1)
        first_sorted = np.ones_like(s, dtype=bool)
        first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
        first = np.empty_like(first_sorted)
        np.put_along_axis(first, order, first_sorted, axis=1)
        keep = first & (np.cumsum(first, axis=1) <= k)
        ok = keep.sum(axis=1) == k
        out[todo[ok]] = a[ok][keep[ok]].reshape(-1, k)
        todo = todo[~ok]
        m *= 2
    for r in todo:  # pathological skew: fall back to a plain draw without replacement
        vals = draw(np.array([r]), m)[0]
        uniq = list(dict.fromkeys(vals.tolist()))[:k]
        if len(uniq) < k:
            pool = np.setdiff1d(np.arange(draw.n_items), uniq)
            uniq += rng.choice(pool, size=k - len(uniq), replace=False).tolist()
        out[r] = uniq
    return out


class _CandidateDraw:
    """Draws of candidate slots: affinity source with prob ``share``, popularity otherwise."""

    def __init__(self, w: World, users: np.ndarray, share: float, rng: np.random.Generator):
        self.w, self.users, self.share, self.rng = w, users, share, rng
        self.n_items = len(w.item_pop)

    def __call__(self, rows: np.ndarray, m: int) -> np.ndarray:
        u = np.repeat(self.users[rows], m)
        return _draw_user_items(self.w, u, self.share, self.rng).reshape(len(rows), m)


def _history_means(w: World, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mean item latent of each list (zeros for empty lists), chunked to bound memory."""
    n = len(offsets) - 1
    d = w.item_latent.shape[1]
    out = np.zeros((n, d), dtype=np.float64)
    lengths = np.diff(offsets)
    chunk = max(1, 4_000_000 // max(1, int(lengths.mean()) if n else 1))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        lo, hi = offsets[a], offsets[b]
        if hi == lo:
            continue
        lat = np.concatenate([w.item_latent[values[lo:hi]], np.zeros((1, d), np.float32)])
        starts = offsets[a:b] - lo
        nz = lengths[a:b] > 0
        sums = np.add.reduceat(lat, starts, axis=0, dtype=np.float64)
        out[a:b][nz] = sums[nz] / lengths[a:b][nz, None]
    return out


def _affinity(w: World, hist_mean: np.ndarray, req_of: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Cosine between each request's mean history latent and each candidate's latent."""
    norm = np.linalg.norm(hist_mean, axis=1, keepdims=True)
    h = np.where(norm > 0, hist_mean / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
    return np.einsum("ij,ij->i", h[req_of], w.item_latent[items])


def _logit_base(cfg: GeneratorConfig, w: World, aff, items, position) -> np.ndarray:
    return (cfg.affinity_weight * aff + cfg.quality_weight * w.item_quality[items]
            - cfg.position_bias * np.log1p(position))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_INTERCEPT_CACHE: dict = {}


def calibrate_intercept(cfg: GeneratorConfig, w: World) -> float:
    """Intercept c with mean label ~= cfg.label_rate, from a fixed sample of the world.

    Depends on the world (seed) and the config, never on the date, so all days of one world
    share one label model.
    """
    key = (id(w), cfg.candidates, cfg.history_drift, cfg.affinity_share, cfg.label_rate,
           cfg.affinity_weight, cfg.quality_weight, cfg.position_bias, cfg.label_noise)
    if key in _INTERCEPT_CACHE:
        return _INTERCEPT_CACHE[key]
    rng = np.random.default_rng([cfg.seed, 0xCA11B])
    n_req = 256
    users = rng.choice(len(w.user_activity), size=n_req, p=w.user_activity)
    offs = np.concatenate([[0], np.cumsum(w.hist_offsets[users + 1] - w.hist_offsets[users])])
    vals = np.concatenate([w.hist_values[w.hist_offsets[u]:w.hist_offsets[u + 1]] for u in users]) \
        if offs[-1] else np.empty(0, np.int32)
    hmean = _history_means(w, vals, offs)
    k = min(cfg.candidates, 200)
    cands = _distinct_rows(_CandidateDraw(w, users, cfg.affinity_share, rng), n_req, k, rng)
    req_of = np.repeat(np.arange(n_req), k)
    items = cands.ravel()
    aff = _affinity(w, hmean, req_of, items)
    # positions: the same ranking rule as the day (rank by noisy affinity), rescaled to K
    score = (aff + 0.3 * rng.standard_normal(aff.shape)).reshape(n_req, k)
    pos = np.argsort(np.argsort(-score, axis=1), axis=1).ravel() * (cfg.candidates / k)
    base = _logit_base(cfg, w, aff, items, pos) + cfg.label_noise * rng.standard_normal(aff.shape)
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(base + mid).mean() > cfg.label_rate:
            hi = mid
        else:
            lo = mid
    c = (lo + hi) / 2
    _INTERCEPT_CACHE[key] = c
    return c


# ---------------------------------------------------------------------------------------
# One day
# ---------------------------------------------------------------------------------------
@dataclass
class Day:
    cfg: GeneratorConfig
    request_id: np.ndarray  # (R,) int64, in request-time order
    user_id: np.ndarray  # (R,) int64
    request_ts: np.ndarray  # (R,) int64 microseconds since epoch
    history: pa.ListArray  # (R,) list<int32>
    user_dense: pa.ListArray  # (R,) list<float32>
    user_segment: np.ndarray
    user_country: np.ndarray
    cand: np.ndarray  # (R, K) int32 item ids, column = position
    label: np.ndarray  # (R, K) int8
    affinity: np.ndarray  # (R, K) float32, the generator's own affinity (for tests)
    row_order: np.ndarray  # (R*K,) flat (request * K + position) indices in raw-log order
    item_category: np.ndarray  # world arrays, gathered per row later
    item_dense: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.row_order)

    def table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows ``[start, stop)`` of the day in raw-log order, as an IMPRESSIONS_SCHEMA table."""
        flat = self.row_order[start:stop]
        k = self.cand.shape[1]
        req = (flat // k).astype(np.int64)
        pos = (flat % k).astype(np.int32)
        items = self.cand.ravel()[flat]
        req_idx = pa.array(req)
        n = len(flat)
        item_dense = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * ITEM_DENSE_DIM, ITEM_DENSE_DIM, dtype=np.int32)),
            pa.array(self.item_dense[items].ravel()))
        cols = [
            pa.array(self.request_id[req]),
            pa.array(self.user_id[req]),
            pa.array(self.request_ts[req], type=pa.timestamp("us", tz="UTC")),
            pa.array(np.full(n, (_parse_date(self.cfg.date) - EPOCH).days, dtype=np.int32), type=pa.date32()),
            self.history.take(req_idx),
            self.user_dense.take(req_idx),
            pa.array(self.user_segment[req]),
            pa.array(self.user_country[req]),
            pa.array(items),
            pa.array(self.item_category[items]),
            item_dense,
            pa.array(pos),
            pa.array(self.label.ravel()[flat]),
        ]
        return pa.Table.from_arrays(cols, schema=landing_schema(self.cfg.items))


def build_day(cfg: GeneratorConfig) -> Day:
    """Request-level arrays of one day (no row expansion yet)."""
    cfg.validate()
    w = build_world(cfg)
    date = _parse_date(cfg.date)
    days = (date - EPOCH).days
    rng = np.random.default_rng([cfg.seed, days, 0xDA7])
    R, K = cfg.requests, cfg.candidates

    # Request times: a diurnal mix (evening peak) within the UTC day, in microseconds.
    hour = np.where(rng.random(R) < 0.6, rng.normal(19.0, 3.0, R), rng.uniform(0, 24, R)) % 24.0
    t_us = np.sort((hour * 3600e6).astype(np.int64))
    users = rng.choice(cfg.users, size=R, p=w.user_activity).astype(np.int64)
    day_start_us = days * 86_400_000_000
    request_ts = day_start_us + t_us
    request_id = days * REQUEST_ID_STRIDE + np.arange(R, dtype=np.int64)

    # k-th request of each user today (requests are in time order).
    order = np.argsort(users, kind="stable")
    su = users[order]
    first = np.r_[True, su[1:] != su[:-1]]
    grp_start = np.maximum.accumulate(np.where(first, np.arange(R), 0))
    kth = np.empty(R, dtype=np.int64)
    kth[order] = np.arange(R) - grp_start
    n_today = np.bincount(users, minlength=cfg.users)

    # Per active user, a buffer = base history ++ today's new items; request k sees the
    # window buffer[k*drift : k*drift + L_u] (the most recent L_u items).
    base_len = np.diff(w.hist_offsets)
    drift = cfg.history_drift if cfg.max_history > 0 else 0
    extra = np.where(base_len > 0, np.maximum(n_today - 1, 0) * drift, 0)
    active = np.flatnonzero(n_today)
    buf_len = base_len[active] + extra[active]
    buf_off = np.zeros(cfg.users + 1, dtype=np.int64)
    buf_off[active + 1] = buf_len
    np.cumsum(buf_off, out=buf_off)
    buf = np.empty(int(buf_off[-1]), dtype=np.int32)
    # base part
    own = np.repeat(active, base_len[active])
    within = np.arange(len(own)) - np.repeat(np.cumsum(base_len[active]) - base_len[active], base_len[active])
    buf[buf_off[own] + within] = w.hist_values[w.hist_offsets[own] + within]
    # today's new items
    n_new = extra[active]
    if n_new.sum():
        own_new = np.repeat(active, n_new)
        within_new = np.arange(len(own_new)) - np.repeat(np.cumsum(n_new) - n_new, n_new)
        buf[buf_off[own_new] + base_len[own_new] + within_new] = _draw_user_items(w, own_new, cfg.history_pref, rng)

    L = base_len[users]
    starts = buf_off[users] + np.where(L > 0, kth * drift, 0)
    h_off = np.zeros(R + 1, dtype=np.int64)
    np.cumsum(L, out=h_off[1:])
    idx = np.repeat(starts - h_off[:-1], L) + np.arange(h_off[-1])
    h_vals = buf[idx]
    history = pa.ListArray.from_arrays(pa.array(h_off.astype(np.int32) if h_off[-1] < 2**31 else h_off),
                                       pa.array(h_vals, type=pa.int32()))
    if history.type != pa.list_(pa.int32()):
        history = history.cast(pa.list_(pa.int32()))

    # User dense: static (6) + log1p(k-th request today) + log1p(requests today).
    ud = np.concatenate([w.user_static[users], np.log1p(kth)[:, None],
                         np.log1p(n_today[users])[:, None]], axis=1).astype(np.float32)
    assert ud.shape[1] == USER_DENSE_DIM
    user_dense = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (R + 1) * USER_DENSE_DIM, USER_DENSE_DIM, dtype=np.int32)), pa.array(ud.ravel()))

    # Candidates, ranked by a noisy affinity score into positions 0..K-1.
    cand = _distinct_rows(_CandidateDraw(w, users, cfg.affinity_share, rng), R, K, rng)
    hmean = _history_means(w, h_vals, h_off)
    aff = _affinity(w, hmean, np.repeat(np.arange(R), K), cand.ravel()).reshape(R, K)
    score = aff + 0.3 * rng.standard_normal(aff.shape).astype(np.float32)
    rank = np.argsort(-score, axis=1, kind="stable")
    cand = np.take_along_axis(cand, rank, axis=1)
    aff = np.take_along_axis(aff, rank, axis=1)
    pos = np.broadcast_to(np.arange(K), (R, K))
    c = calibrate_intercept(cfg, w)
    logit = (_logit_base(cfg, w, aff, cand, pos) + c
             + cfg.label_noise * rng.standard_normal((R, K)))
    label = (rng.random((R, K)) < _sigmoid(logit)).astype(np.int8)

    # Raw-log order: each row is logged at request_ts + a scroll delay (grows with
    # position, plus noise); mean delay = log_spread mean inter-arrivals, so rows of
    # concurrent requests interleave.
    gap_us = 86_400e6 / R
    mean_delay = cfg.log_spread * gap_us
    delay = mean_delay * (pos / max(K, 1) + rng.exponential(0.5, (R, K)))
    event = t_us[:, None].astype(np.float64) + delay
    row_order = np.argsort(event.ravel(), kind="stable")

    return Day(cfg, request_id, users, request_ts, history, user_dense, w.user_segment[users],
               w.user_country[users], cand, label, aff, row_order, w.item_cluster, w.item_dense)


def generate_table(cfg: GeneratorConfig) -> pa.Table:
    """One day of synthetic request logs with exactly IMPRESSIONS_SCHEMA, in raw-log order."""
    return build_day(cfg).table()


# ---------------------------------------------------------------------------------------
# Landing
# ---------------------------------------------------------------------------------------
def landing_root(out_dir) -> Path:
    if out_dir is None:
        from reqdedup.config import get_settings

        return get_settings().landing_dir
    return Path(out_dir).expanduser().resolve()


def write_landing(cfg: GeneratorConfig, out_dir=None) -> dict:
    """Write one day under ``<landing>/date=D/part-NNNNN.parquet`` (replacing that folder)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg.validate()
    target = landing_root(out_dir) / f"date={cfg.date}"
    day = build_day(cfg)
    n = day.rows
    n_files = max(1, -(-n // cfg.rows_per_file))
    show = cfg.progress if cfg.progress is not None else n >= 1_000_000
    tmp = temp_dir_for(target)
    try:
        with tqdm(total=n, unit="row", desc=f"generate {cfg.date}", disable=not show, file=sys.stderr) as bar:
            for i in range(n_files):
                a, b = i * cfg.rows_per_file, min(n, (i + 1) * cfg.rows_per_file)
                pq.write_table(day.table(a, b), tmp / f"part-{i:05d}.parquet")
                bar.update(b - a)
        replace_dir_atomically(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "date": cfg.date,
        "path": str(target),
        "rows": int(n),
        "requests": int(cfg.requests),
        "users_active": int(len(np.unique(day.user_id))),
        "files": n_files,
        "label_rate": round(float(day.label.mean()), 6),
        "seconds": round(time.perf_counter() - t0, 3),
    }
