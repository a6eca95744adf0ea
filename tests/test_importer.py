"""Importer of real interaction logs: sessions, history, labels, candidates, schema, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reqdedup.data.importer import ImportConfig, InteractionLogError, import_interactions
from reqdedup.errors import InputError
from reqdedup.schema import IMPRESSIONS_SCHEMA, USER_COLUMNS

DAY1 = 1767225600  # 2026-01-01T00:00:00Z
DAY2 = DAY1 + 86400


def _log() -> pd.DataFrame:
    rows = [
        # user 10: session A (items 1, 2), session B after 60 min (items 3, 1), session C next day (4)
        (10, 1, DAY1 + 0, 5.0), (10, 2, DAY1 + 60, 2.0),
        (10, 3, DAY1 + 3600, 4.0), (10, 1, DAY1 + 3700, 5.0),
        (10, 4, DAY2 + 100, 3.0),
        # user 20: session (item 2), then a session with a low (5) and a high (6) rating
        (20, 2, DAY1 + 30, 4.0), (20, 5, DAY1 + 4000, 1.0), (20, 6, DAY1 + 4100, 5.0),
    ]
    # background users with one interaction each (cold starts) so the catalog is bigger
    rows += [(100 + k, 100 + k % 40, DAY1 + 7 * k, 3.0) for k in range(200)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])


def _read(summary) -> pd.DataFrame:
    tables = [pq.read_table(p) for p in summary["paths"]]
    for t in tables:
        assert t.schema.equals(IMPRESSIONS_SCHEMA, check_metadata=False)
    return pa.concat_tables(tables).to_pandas()


def _maps(out):
    users = pq.read_table(out / "_mappings" / "users.parquet").to_pandas()
    items = pq.read_table(out / "_mappings" / "items.parquet").to_pandas()
    return dict(zip(users.raw_user_id, users.user_id)), dict(zip(items.raw_item_id, items.item_id))


@pytest.fixture
def csv_log(tmp_path):
    p = tmp_path / "log.csv"
    _log().to_csv(p, index=False)
    return p


def test_sessions_history_labels_csv(csv_log, tmp_path):
    out = tmp_path / "landing"
    cfg = ImportConfig(candidates=6, history=10, min_rating=3.0, seed=1)
    s = import_interactions(csv_log, cfg, out_dir=out)
    assert s["dates"] == ["2026-01-01", "2026-01-02"]
    assert s["requests"] == 3  # B and C of user 10, second session of user 20; cold starts skipped
    assert s["items"] == 46 and s["users_in_log"] == 202
    df = _read(s)
    assert s["rows"] == len(df) == 3 * 6
    umap, imap = _maps(out)
    inv = {v: k for k, v in imap.items()}
    df["raw_item"] = df["item_id"].map(inv)
    df["hist_raw"] = df["user_history"].map(lambda h: [inv[i] for i in h])

    r = df[(df.user_id == umap[10]) & (df.event_date.astype(str) == "2026-01-01")]
    assert r.request_id.nunique() == 1
    assert r.hist_raw.iloc[0] == [1, 2]  # only items before the session start
    assert pd.Timestamp(r.request_ts.iloc[0]) == pd.Timestamp(DAY1 + 3600, unit="s", tz="UTC")
    assert set(r[r.label == 1].raw_item) == {3, 1}
    assert len(r) == 6 and r.raw_item.nunique() == 6
    assert sorted(r.position) == list(range(6))

    r = df[df.user_id == umap[20]]
    assert r.hist_raw.iloc[0] == [2]
    assert set(r[r.label == 1].raw_item) == {6}  # rating 5 >= 3
    assert 5 in set(r[r.label == 0].raw_item)  # rating 1 < 3: engaged but negative
    assert 6 not in set(r[r.label == 0].raw_item) and r.raw_item.nunique() == len(r)

    r = df[df.event_date.astype(str) == "2026-01-02"]
    assert r.hist_raw.iloc[0] == [1, 2, 3, 1]
    assert set(r[r.label == 1].raw_item) == {4}
    # point-in-time item features: item 4 never seen before 2026-01-02 -> zeros
    assert np.allclose(r[r.raw_item == 4].item_dense.iloc[0], 0.0)

    # user block identical within each request
    blk = df[["request_id", *USER_COLUMNS]].copy()
    for c in ("user_history", "user_dense"):
        blk[c] = blk[c].map(lambda a: tuple(a.tolist()))
    assert (blk.groupby("request_id").nunique() == 1).all().all()
    # request ids encode the date
    assert (df.request_id // 10**8 == (pd.to_datetime(df.event_date) - pd.Timestamp("1970-01-01")).dt.days).all()


def test_all_interactions_positive_without_min_rating(csv_log, tmp_path):
    s = import_interactions(csv_log, ImportConfig(candidates=4, history=2), out_dir=tmp_path / "o")
    df = _read(s)
    umap, imap = _maps(tmp_path / "o")
    r = df[df.user_id == umap[20]]
    assert set(r[r.label == 1].item_id) == {imap[5], imap[6]}
    # history capped at 2, the most recent ids
    r = df[df.event_date.astype(str) == "2026-01-02"]
    assert [x for x in r.user_history.iloc[0]] == [imap[3], imap[1]]
    assert (df.groupby("request_id").size() == 4).all()


def test_session_gap_and_cold_start_option(csv_log, tmp_path):
    # a 2-hour gap merges user 10's sessions A and B, and user 20's two sessions: the only
    # request left with history is user 10's day-2 session, whose history is all of day 1
    s = import_interactions(csv_log, ImportConfig(candidates=5, session_gap_minutes=120), out_dir=tmp_path / "a")
    assert s["requests"] == 1 and s["dates"] == ["2026-01-02"]
    assert _read(s).user_history.map(len).iloc[0] == 4
    s0 = import_interactions(csv_log, ImportConfig(candidates=5, min_history=0), out_dir=tmp_path / "b")
    assert s0["skipped_sessions"] == 0 and s0["requests"] == s0["sessions"]
    df = _read(s0)
    assert (df.user_history.map(len) == 0).any()


def test_parquet_iso_strings_and_string_ids(tmp_path):
    df = _log()
    df["user_id"] = "u" + df["user_id"].astype(str)
    df["item_id"] = "i" + df["item_id"].astype(str)
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="s", utc=True).map(lambda t: t.isoformat())
    p = tmp_path / "log.parquet"
    df.to_parquet(p)
    out = tmp_path / "o"
    s = import_interactions(p, ImportConfig(candidates=6, history=10, min_rating=3.0), out_dir=out)
    assert s["requests"] == 3 and s["rows"] == 18
    umap, imap = _maps(out)
    assert "u10" in umap and "i4" in imap
    assert sorted(imap.values()) == list(range(len(imap)))


def test_parquet_timestamp_type_and_category(tmp_path):
    df = _log()
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    df["category"] = df["item_id"] % 5
    p = tmp_path / "log.parquet"
    df.to_parquet(p)
    s = import_interactions(p, ImportConfig(candidates=6), out_dir=tmp_path / "o")
    out = _read(s)
    _, imap = _maps(tmp_path / "o")
    inv = {v: k for k, v in imap.items()}
    assert (out.item_category == out.item_id.map(inv) % 5).all()


def test_deterministic(csv_log, tmp_path):
    a = import_interactions(csv_log, ImportConfig(candidates=6, seed=3), out_dir=tmp_path / "a")
    b = import_interactions(csv_log, ImportConfig(candidates=6, seed=3), out_dir=tmp_path / "b")
    for pa_, pb in zip(a["paths"], b["paths"]):
        assert pq.read_table(pa_).equals(pq.read_table(pb))


@pytest.mark.parametrize("content,needle", [
    ("user_id,item_id,rating\n1,2,3\n", "missing required column"),
    ("", "empty"),
    ("user_id,item_id,timestamp\n", "no rows"),
    ("user_id,item_id,timestamp\n1,2,100\nabc,3,200\n", "user_id"),
    ("user_id,item_id,timestamp\n1,2,100\n2,3,yesterday\n", "timestamp"),
    ("user_id,item_id,timestamp\n1,2,2026-01-01T00:00:00Z\n2,3,not a date\n", "timestamp"),
    ("user_id,item_id,timestamp,rating\n1,2,100,5\n2,3,200,great\n", "rating"),
    ("user_id,item_id,timestamp\n1,,100\n", "item_id"),
])
def test_bad_input_names_file(tmp_path, content, needle):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(InteractionLogError) as e:
        import_interactions(p, ImportConfig(), out_dir=tmp_path / "o")
    assert str(p) in str(e.value) and needle in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, InputError)


def test_missing_file_and_min_rating_without_rating(tmp_path):
    with pytest.raises(InteractionLogError, match="not found"):
        import_interactions(tmp_path / "nope.csv", ImportConfig(), out_dir=tmp_path / "o")
    p = tmp_path / "x.csv"
    p.write_text("user_id,item_id,timestamp\n1,2,100\n")
    with pytest.raises(InteractionLogError, match="rating"):
        import_interactions(p, ImportConfig(min_rating=3), out_dir=tmp_path / "o")


def test_negatives_exclude_session_items_and_fill(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    df = pd.DataFrame({"user_id": rng.integers(0, 50, n), "item_id": rng.zipf(1.5, n) % 300,
                       "timestamp": DAY1 + np.sort(rng.integers(0, 3 * 86400, n))})
    p = tmp_path / "big.csv"
    df.to_csv(p, index=False)
    s = import_interactions(p, ImportConfig(candidates=20, history=30, session_gap_minutes=60), out_dir=tmp_path / "o")
    out = _read(s)
    assert len(s["dates"]) == 3
    g = out.groupby("request_id")
    assert (g.item_id.nunique() == g.size()).all()
    assert (g.size() <= 20).all() and (g.size() == 20).mean() > 0.9
    assert (g.position.max() == g.size() - 1).all()
    assert out.user_history.map(len).max() <= 30
    # raw-log order: rows sorted by event time, requests interleave when sessions overlap
    rid = out.request_id.to_numpy()
    assert (rid[1:] != rid[:-1]).mean() > 0.05
    # labels: every request has at least one engaged item
    assert (g.label.max() == 1).all()


def test_second_import_keeps_ids_and_numbers_new_ones_after(tmp_path):
    """The id maps persist across imports: the same raw user/item gets the same id in a second
    log, new raw ids get ids past the existing ones; the landing files carry the catalog size."""
    from reqdedup.contract import items_from_metadata

    out = tmp_path / "landing"
    first = pd.DataFrame([(u, 1000 + (u * 7 + k) % 30, DAY1 + 3600 * k + u, 4.0) for u in range(50, 80)
                          for k in range(4)], columns=["user_id", "item_id", "timestamp", "rating"])
    p1 = tmp_path / "first.csv"
    first.to_csv(p1, index=False)
    s1 = import_interactions(p1, ImportConfig(candidates=4), out_dir=out)
    users1, items1 = _maps(out)
    assert sorted(users1.values()) == list(range(30)) and s1["items"] == len(items1)
    # the second log: users 60..89 (60..79 known, 80..89 new) and some new items; raw ids shuffled
    second = pd.DataFrame([(u, 1000 + (u * 5 + k) % 40, DAY2 + 3600 * k + u, 4.0) for u in range(89, 59, -1)
                           for k in range(4)], columns=["user_id", "item_id", "timestamp", "rating"])
    p2 = tmp_path / "second.csv"
    second.to_csv(p2, index=False)
    s2 = import_interactions(p2, ImportConfig(candidates=4), out_dir=out)
    users2, items2 = _maps(out)
    assert {k: users2[k] for k in users1} == users1 and {k: items2[k] for k in items1} == items1
    assert sorted(users2[u] for u in range(80, 90)) == list(range(30, 40))
    assert min(v for k, v in items2.items() if k not in items1) == len(items1)
    df = _read({"paths": [p for p in s2["paths"] if p.endswith("2026-01-02")]})
    raw_of = {v: k for k, v in users2.items()}
    assert set(df.user_id.map(raw_of)) <= set(range(60, 90)) and df.user_id.map(raw_of).isin(range(60, 80)).any()
    assert items_from_metadata(pq.read_schema(next(iter(sorted((out / "date=2026-01-02").glob("*.parquet"))))).metadata) \
        == len(items2) == s2["items"]
    # a retried import gives the same ids again
    import_interactions(p2, ImportConfig(candidates=4), out_dir=out)
    assert _maps(out) == (users2, items2)
    # a string-id log cannot extend an integer map
    p3 = tmp_path / "third.csv"
    p3.write_text("user_id,item_id,timestamp\nalice,x,100\n")
    with pytest.raises(InputError, match="integer raw ids"):
        import_interactions(p3, ImportConfig(candidates=1), out_dir=out)


def test_concurrent_imports_never_share_an_id(tmp_path):
    """Two imports at once into one landing folder (one id map): the map is extended under a
    lock, so every raw id has one id and no id is given to two raw ids."""
    import threading

    out = tmp_path / "landing"
    paths = []
    for n, (day, users) in enumerate(((DAY1, range(0, 40)), (DAY2, range(20, 60)))):
        df = pd.DataFrame([(u, 500 + (u + k) % 25 + 10 * n, day + 3600 * k + u, 4.0) for u in users for k in range(3)],
                          columns=["user_id", "item_id", "timestamp", "rating"])
        p = tmp_path / f"log{n}.csv"
        df.to_csv(p, index=False)
        paths.append(p)
    errors = []

    def run(p):
        try:
            import_interactions(p, ImportConfig(candidates=3), out_dir=out)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    users, items = _maps(out)
    assert set(users) == set(range(60)) and sorted(users.values()) == list(range(60))
    assert sorted(items.values()) == list(range(len(items)))


def test_recbole_atomic_inter_file_reads_like_the_csv(csv_log, tmp_path):
    """A RecBole atomic file (.inter: tab-separated, name:type headers), the format of the
    MovieLens-100k that the recbole wheel ships, imports to the same rows as the CSV."""
    df = _log()
    inter = tmp_path / "log.inter"
    df.rename(columns={"user_id": "user_id:token", "item_id": "item_id:token", "rating": "rating:float",
                       "timestamp": "timestamp:float"}).to_csv(inter, sep="\t", index=False)
    cfg = ImportConfig(candidates=4, history=3, min_rating=3.0)
    a = _read(import_interactions(inter, cfg, out_dir=tmp_path / "a"))
    b = _read(import_interactions(csv_log, cfg, out_dir=tmp_path / "b"))
    pd.testing.assert_frame_equal(a, b)


def test_movielens_100k_from_the_recbole_wheel():
    from reqdedup.data.samples import movielens_100k

    try:
        path = movielens_100k()
    except InputError as e:
        pytest.skip(str(e))
    head = path.read_text().splitlines()[:2]
    assert head[0].split("\t") == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert len(head[1].split("\t")) == 4
