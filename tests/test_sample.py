"""User-stratified sampling: whole users and requests, strata keep their shares, heavy users capped."""

from __future__ import annotations

from collections import Counter

import pytest

from reqdedup.errors import InputError
from reqdedup.lake.catalog import load_table
from reqdedup.lake.sample import SAMPLE_TABLE, sample_date

from test_features import ensure_published  # noqa: E402  (shared helper of the lake tests)

pytestmark = pytest.mark.slow

DAY = "2026-04-03"
RATE, CAP, SEED = 0.5, 3, 11


@pytest.fixture(scope="module")
def sampled(settings, spark):
    ensure_published(settings, DAY)
    out = sample_date(DAY, RATE, cap=CAP, seed=SEED, settings=settings)
    print("sample:", out)
    imp = load_table("impressions", settings).scan(row_filter=f"event_date = '{DAY}'").to_arrow()
    got = load_table(SAMPLE_TABLE, settings).scan(row_filter=f"event_date = '{DAY}'").to_arrow()
    return out, imp, got


def _fill(table):
    out = {}
    for u, r in zip(table.column("user_id").to_pylist(), table.column("request_id").to_pylist()):
        out.setdefault(u, set()).add(r)
    return out


def test_requests_stay_whole_and_users_keep_min_requests_cap(sampled):
    out, imp, got = sampled
    rows_of = Counter(zip(imp.column("request_id").to_pylist(), imp.column("item_id").to_pylist()))
    sampled_rows = Counter(zip(got.column("request_id").to_pylist(), got.column("item_id").to_pylist()))
    per_request_imp = Counter(imp.column("request_id").to_pylist())
    per_request_got = Counter(got.column("request_id").to_pylist())
    for rid, n in per_request_got.items():
        assert n == per_request_imp[rid], f"request {rid} lost candidates"
    assert all(rows_of[k] == 1 for k in sampled_rows)
    all_reqs, kept = _fill(imp), _fill(got)
    for user, reqs in kept.items():
        assert len(reqs) == min(CAP, len(all_reqs[user]))
    assert out["users_sampled"] == len(kept) and out["rows"] == got.num_rows
    assert out["capped_users"] == sum(len(all_reqs[u]) > CAP for u in kept) > 0  # the heavy users are capped


def test_every_stratum_keeps_its_share(sampled):
    out, imp, got = sampled
    assert len(out["strata"]) >= 2
    for s in out["strata"]:
        assert abs(s["share"] - RATE) <= 0.5 / s["users"] + 1e-9, s
    # Heavier strata hold heavier users.
    assert [s["min_requests"] for s in out["strata"]] == sorted(s["min_requests"] for s in out["strata"])
    # Inverse-probability weights: each sampled user stands for users/sampled of its stratum,
    # and a capped user's kept requests for all of its requests.
    all_reqs = _fill(imp)
    weight_of, stratum_of = {}, {}
    for u, rid, stratum, w in zip(got.column("user_id").to_pylist(), got.column("request_id").to_pylist(),
                                  got.column("sample_stratum").to_pylist(), got.column("sample_weight").to_pylist()):
        weight_of[rid], stratum_of[u] = w, stratum
    by = {s["sample_stratum"]: s for s in out["strata"]}
    for stratum, s in by.items():
        users = [u for u, st in stratum_of.items() if st == stratum]
        if not users:
            continue
        expected = s["users"] / s["sampled"] * sum(len(all_reqs[u]) for u in users)
        got_sum = sum(w for rid, w in weight_of.items() if stratum_of[_user_of(got, rid)] == stratum)
        assert got_sum == pytest.approx(expected)


def _user_of(table, rid, _cache={}):
    key = id(table)
    if key not in _cache:
        _cache[key] = dict(zip(table.column("request_id").to_pylist(), table.column("user_id").to_pylist()))
    return _cache[key][rid]


def test_user_ids_only_is_deterministic_and_matches_the_table(settings, sampled):
    out, _, got = sampled
    ids = sample_date(DAY, RATE, seed=SEED, settings=settings, write=False)
    assert ids["user_ids"] == sorted(set(got.column("user_id").to_pylist()))
    other = sample_date(DAY, RATE, seed=SEED + 1, settings=settings, write=False)
    assert other["user_ids"] != ids["user_ids"]


def test_bad_arguments_are_clear_errors(settings, sampled):
    with pytest.raises(InputError, match=r"--rate 0.0 must be in \(0, 1\]"):
        sample_date(DAY, 0.0, settings=settings)
    with pytest.raises(InputError, match="--cap 0"):
        sample_date(DAY, 0.5, cap=0, settings=settings)
    with pytest.raises(InputError, match="no published impressions for 2026-05-21"):
        sample_date("2026-05-21", 0.5, settings=settings, write=False)
