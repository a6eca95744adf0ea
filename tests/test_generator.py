"""Synthetic request-log generator: schema, determinism, raw-log order, skew, learnable labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from reqdedup.data.generator import GeneratorConfig, build_day, generate_table, write_landing
from reqdedup.schema import IMPRESSIONS_SCHEMA, USER_COLUMNS

CFG = GeneratorConfig(users=300, requests=800, candidates=30, history=48, items=3000, seed=7,
                      date="2026-01-05")


@pytest.fixture(scope="module")
def day():
    return build_day(CFG)


@pytest.fixture(scope="module")
def table(day):
    return day.table()


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = label == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_schema_and_size(table):
    assert table.schema.equals(IMPRESSIONS_SCHEMA, check_metadata=False)
    assert table.num_rows == CFG.requests * CFG.candidates
    assert table.column("request_id").null_count == 0


def test_user_block_identical_within_request(table):
    df = table.select(["request_id", "user_id", "request_ts", "event_date", *USER_COLUMNS]).to_pandas()
    for c in ("user_history", "user_dense"):
        df[c] = df[c].map(lambda a: tuple(a.tolist()))
    per_req = df.groupby("request_id").nunique()
    assert (per_req == 1).all().all()
    # histories have varying lengths around the mean, within [0.5x, 2x]
    lengths = df.drop_duplicates("request_id")["user_history"].map(len)
    assert lengths.min() >= CFG.history // 2 - 1 and lengths.max() <= 2 * CFG.history
    assert 0.7 * CFG.history < lengths.mean() < 1.6 * CFG.history


def test_candidates_distinct_and_positions(table):
    df = table.select(["request_id", "item_id", "position"]).to_pandas()
    g = df.groupby("request_id")
    assert (g["item_id"].nunique() == CFG.candidates).all()
    assert (g["position"].nunique() == CFG.candidates).all()
    assert df["position"].min() == 0 and df["position"].max() == CFG.candidates - 1
    assert df["item_id"].between(0, CFG.items - 1).all()


def test_value_ranges(table):
    df = table.select(["user_segment", "user_country", "item_category", "label", "user_id"]).to_pandas()
    assert df["user_segment"].between(0, 15).all()
    assert df["user_country"].between(0, 63).all()
    assert df["item_category"].between(0, 63).all()
    assert set(df["label"].unique()) <= {0, 1}
    assert df["user_id"].between(0, CFG.users - 1).all()
    ts = table.column("request_ts").to_pandas()
    assert (ts.dt.strftime("%Y-%m-%d") == CFG.date).all()
    assert {str(d) for d in table.column("event_date").to_pylist()} == {CFG.date}


def test_raw_log_order_interleaved(table):
    rid = table.column("request_id").to_numpy()
    same_as_prev = (rid[1:] == rid[:-1]).mean()
    assert same_as_prev < 0.2, same_as_prev
    # not grouped by user or by request either
    uid = table.column("user_id").to_numpy()
    assert (np.diff(uid) < 0).sum() > 0.2 * len(uid)
    assert (np.diff(rid) < 0).sum() > 0.1 * len(rid)


def test_user_activity_skew(day):
    n = np.bincount(day.user_id)
    n = np.sort(n[n > 0])[::-1]
    assert len(n) <= CFG.users
    top = n[: max(1, len(n) // 10)].sum() / n.sum()
    assert top > 0.4, top
    assert (n <= 2).mean() > 0.4


def test_labels_learnable(day):
    rate = day.label.mean()
    assert 0.04 < rate < 0.16, rate
    auc = _auc(day.affinity.ravel(), day.label.ravel())
    assert auc > 0.6, auc


def test_determinism_same_bytes(tmp_path):
    cfg = dataclasses.replace(CFG, requests=300, rows_per_file=4000)
    a = write_landing(cfg, out_dir=tmp_path / "a")
    b = write_landing(cfg, out_dir=tmp_path / "b")
    assert a["files"] == b["files"] == 3 and a["rows"] == 9000
    fa = sorted((tmp_path / "a" / f"date={cfg.date}").iterdir())
    fb = sorted((tmp_path / "b" / f"date={cfg.date}").iterdir())
    assert [f.name for f in fa] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]
    t = pq.read_table(tmp_path / "a" / f"date={cfg.date}")
    assert t.num_rows == 9000
    # the files are the raw-log order of generate_table, split in parts
    assert t.column("request_id").to_pylist() == generate_table(cfg).column("request_id").to_pylist()
    for k in ("date", "path", "rows", "requests", "users_active", "files", "label_rate", "seconds"):
        assert k in a


def test_write_replaces_previous_files(tmp_path):
    cfg = dataclasses.replace(CFG, requests=200, rows_per_file=2000)
    write_landing(cfg, out_dir=tmp_path)
    assert len(list((tmp_path / f"date={cfg.date}").iterdir())) == 3
    write_landing(dataclasses.replace(cfg, rows_per_file=10**6), out_dir=tmp_path)
    assert [p.name for p in (tmp_path / f"date={cfg.date}").iterdir()] == ["part-00000.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == [f"date={cfg.date}"]  # no temp folders left


def test_same_world_across_dates(table):
    other = generate_table(dataclasses.replace(CFG, date="2026-01-06"))
    a = table.select(["user_id", "user_segment", "user_country", "item_id", "item_category", "item_dense", "request_id"]).to_pandas()
    b = other.select(["user_id", "user_segment", "user_country", "item_id", "item_category", "item_dense", "request_id"]).to_pandas()
    # request ids are unique across dates
    assert not set(a["request_id"]) & set(b["request_id"])
    # users keep their static attributes, items their category and features
    ua = a.drop_duplicates("user_id").set_index("user_id")
    ub = b.drop_duplicates("user_id").set_index("user_id")
    common = ua.index.intersection(ub.index)
    assert len(common) > 20
    assert (ua.loc[common, ["user_segment", "user_country"]] == ub.loc[common, ["user_segment", "user_country"]]).all().all()
    ia = a.drop_duplicates("item_id").set_index("item_id")
    ib = b.drop_duplicates("item_id").set_index("item_id")
    ci = ia.index.intersection(ib.index)
    assert len(ci) > 100
    assert (ia.loc[ci, "item_category"] == ib.loc[ci, "item_category"]).all()
    assert all(np.array_equal(x, y) for x, y in zip(ia.loc[ci, "item_dense"], ib.loc[ci, "item_dense"]))
    # ...but the day's traffic differs
    assert not np.array_equal(a["user_id"].to_numpy()[:100], b["user_id"].to_numpy()[:100])


def test_history_from_user_base(day):
    """A user's first request of the day shows the same base history on every date."""
    other = build_day(dataclasses.replace(CFG, date="2026-01-09"))

    def first_hist(d):
        out = {}
        for i, u in enumerate(d.user_id):
            if u not in out:
                out[int(u)] = d.history[i].values.to_numpy()
        return out

    ha, hb = first_hist(day), first_hist(other)
    common = sorted(set(ha) & set(hb))
    assert common
    assert all(np.array_equal(ha[u], hb[u]) for u in common)


def test_bad_config():
    with pytest.raises(ValueError):
        generate_table(dataclasses.replace(CFG, date="2026-13-01"))
    with pytest.raises(ValueError):
        generate_table(dataclasses.replace(CFG, candidates=CFG.items + 1))
