"""Feature columns in the reader: a per-partition merge of side-table files into the rows,
the values reaching RequestBatch.dense_features and the ranking head; bad input refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reqdedup.data.generator import GeneratorConfig, generate_table
from reqdedup.errors import InputError
from reqdedup.train.config import config_from_dict
from reqdedup.train.model import ModelConfig, RecModel
from reqdedup.train.reader import (
    FeatureSource,
    ReaderSpec,
    RequestReader,
    decode_unit,
    match_sorted_keys,
    plan,
    plan_files,
)

SEQ = 16
ITEM_KEYS = ("user_id", "request_id", "item_id")


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    t = generate_table(GeneratorConfig(date="2026-03-01", users=50, requests=160, candidates=10, history=20,
                                       items=300, seed=11))
    return t.sort_by([("user_id", "ascending"), ("request_id", "ascending")])


def _write(folder, table: pa.Table, cuts, row_group_size=89):
    folder.mkdir(parents=True, exist_ok=True)
    edges = [0, *cuts, table.num_rows]
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        pq.write_table(table.slice(a, b - a), folder / f"part-{i:03d}.parquet", row_group_size=row_group_size)
    return [str(p) for p in sorted(folder.glob("*.parquet"))]


def _item_values(rows: pa.Table) -> pa.Table:
    """A per-row side table (keys + two values a test can recompute from the keys)."""
    r = rows.column("request_id").to_numpy()
    i = rows.column("item_id").to_numpy()
    ctr = (i % 97) / 97.0 + (r % 7) / 1000.0
    n = (r * 31 + i) % 1000
    return pa.table({"user_id": rows.column("user_id"), "request_id": rows.column("request_id"),
                     "item_id": rows.column("item_id"), "item_ctr_7d": pa.array(ctr, pa.float64()),
                     "item_impressions_7d": pa.array(n, pa.int64())})


def _user_values(rows: pa.Table) -> pa.Table:
    users = np.unique(rows.column("user_id").to_numpy())
    return pa.table({"user_id": pa.array(users, pa.int64()), "user_requests_7d": pa.array(users * 3 + 1, pa.int64())})


@pytest.fixture(scope="module")
def lake(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("feat")
    n = rows.num_rows
    imp = _write(root / "imp", rows, [n // 3 + 5, 2 * n // 3 + 1])  # requests split across files
    side = _item_values(rows)
    # Two side files whose user ranges overlap (each sorted, their concatenation not): the
    # reader must still find every row.
    perm = np.r_[np.arange(0, n, 2), np.arange(1, n, 2)]
    item_paths = _write(root / "item", side.take(pa.array(perm)), [n // 2], row_group_size=500)
    user_paths = _write(root / "user", _user_values(rows), [])
    return {"imp": imp, "item": item_paths, "user": user_paths, "root": root}


def _units(lake, item_paths=None, user_paths=None, item_cols=("item_ctr_7d", "item_impressions_7d")):
    sources = (FeatureSource("lake.features_item_ctr_7d", ITEM_KEYS, tuple(item_cols),
                             tuple(item_paths or lake["item"])),
               FeatureSource("lake.features_user_requests_7d", ("user_id",), ("user_requests_7d",),
                             tuple(user_paths or lake["user"])))
    return [replace(u, features=sources) for u in plan_files(lake["imp"])]


COLUMNS = ("user_requests_7d", "item_ctr_7d", "item_impressions_7d")  # interleaves the two tables


def _expected(rows: pa.Table) -> dict:
    side = _item_values(rows).to_pydict()
    users = dict(zip(*_user_values(rows).to_pydict().values()))
    return {(r, i): (users[u], c, float(n)) for u, r, i, c, n in zip(
        side["user_id"], side["request_id"], side["item_id"], side["item_ctr_7d"], side["item_impressions_7d"])}


@pytest.mark.parametrize("order,buffers", [("table", {}), ("request_shuffle", {}), ("iid", {}),
                                           # small buffers: rows carried over between windows
                                           ("request_shuffle", {"buffer_requests": 7}), ("iid", {"buffer_rows": 150})])
def test_side_values_reach_the_batch_of_every_row(lake, rows, order, buffers):
    spec = ReaderSpec(seq_len=SEQ, batch_rows=64, workers=1, order=order, feature_columns=COLUMNS, **buffers)
    expected = _expected(rows)
    seen = 0
    for batch in RequestReader(_units(lake), spec).batches(0):
        assert batch.dense_features is not None and batch.dense_features.shape == (batch.num_rows, 3)
        req = batch.request_ids[batch.row_request].tolist()
        for r, i, got in zip(req, batch.item_id.tolist(), batch.dense_features.tolist()):
            assert got == pytest.approx(expected[(r, i)], rel=1e-6)
        seen += batch.num_rows
    assert seen == rows.num_rows


def test_without_feature_columns_batches_have_none(lake, rows):
    units = plan_files(lake["imp"])
    batch = next(iter(RequestReader(units, ReaderSpec(seq_len=SEQ, batch_rows=64, workers=0)).batches(0)))
    assert batch.dense_features is None


def test_null_values_are_zero_and_the_model_takes_them(lake, rows, tmp_path):
    side = _item_values(rows)
    ctr = side.column("item_ctr_7d").to_numpy().copy()
    nulls = np.zeros(ctr.size, bool)
    nulls[::5] = True  # e.g. no history at all
    side = side.set_column(3, "item_ctr_7d", pa.array(ctr, mask=nulls))
    paths = _write(tmp_path / "item", side, [])
    chunks = list(decode_unit(_units(lake, paths)[0], SEQ, feature_columns=COLUMNS))
    null_keys = {(r, i) for r, i in zip(np.asarray(side.column("request_id"))[nulls], np.asarray(side.column("item_id"))[nulls])}
    got = 0
    for c in chunks:
        req = np.repeat(c.request_id.numpy(), c.cand_count.numpy())
        for r, i, v in zip(req, c.item_id.tolist(), c.features[:, 1].tolist()):
            if (r, i) in null_keys:
                assert v == 0.0
                got += 1
    assert got > 0


def test_the_ranking_head_reads_the_feature_values(lake, rows):
    spec = ReaderSpec(seq_len=SEQ, batch_rows=64, workers=0, order="table", feature_columns=COLUMNS)
    batch = next(iter(RequestReader(_units(lake), spec).batches(0)))
    model = RecModel(ModelConfig(items=300, seq_len=SEQ, d_model=16, n_layers=1, n_heads=2, ff_dim=32, emb_dim=8,
                                 feature_dim=len(COLUMNS)))
    model.eval()
    seen = {}
    hook = model.ranking_head.mlp[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    logit = model(batch)["logit"]
    hook.remove()
    x = batch.dense_features
    assert torch.allclose(seen["x"][:, -len(COLUMNS):], torch.sign(x) * torch.log1p(x.abs()))
    changed = replace(batch, dense_features=batch.dense_features * 3 + 1)
    assert not torch.allclose(model(changed)["logit"], logit)  # the values change the score
    with pytest.raises(ValueError, match="3 dense features per row"):
        model(replace(batch, dense_features=None))


def test_a_row_missing_from_the_side_table_is_refused(lake, rows, tmp_path):
    side = _item_values(rows)
    paths = _write(tmp_path / "item", side.slice(0, side.num_rows - 3), [])
    unit = _units(lake, paths)[-1]
    with pytest.raises(InputError, match=r"lake.features_item_ctr_7d: no row for .*request_id.*recompute it"):
        list(decode_unit(unit, SEQ, feature_columns=COLUMNS))


def test_duplicate_keys_and_non_finite_values_are_refused(lake, rows, tmp_path):
    side = _item_values(rows)
    dup = _write(tmp_path / "dup", pa.concat_tables([side, side.slice(0, 1)]).sort_by(
        [(k, "ascending") for k in ITEM_KEYS]), [])
    with pytest.raises(InputError, match="appears twice"):
        list(decode_unit(_units(lake, dup)[0], SEQ, feature_columns=COLUMNS))
    ctr = side.column("item_ctr_7d").to_numpy().copy()
    ctr[0] = np.nan
    nan = _write(tmp_path / "nan", side.set_column(3, "item_ctr_7d", pa.array(ctr)), [])
    with pytest.raises(InputError, match="features_item_ctr_7d: column 'item_ctr_7d' holds nan"):
        list(decode_unit(_units(lake, nan)[0], SEQ, feature_columns=COLUMNS))


def test_reading_with_other_columns_than_planned_is_refused(lake):
    with pytest.raises(InputError, match="planned with feature columns"):
        list(decode_unit(_units(lake)[0], SEQ, feature_columns=("item_ctr_7d",)))


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("last_max", [6, 2**40])  # item-sized last key (the merge) or not (the sort)
def test_match_sorted_keys_finds_equal_tuples(width, last_max):
    rng = np.random.default_rng(width)
    side = np.unique(rng.integers(0, 6, size=(300, width)), axis=0)
    side[:, -1] = side[:, -1] * (last_max // 6)
    side = np.unique(side, axis=0)
    probe = side[rng.integers(0, len(side), size=500)].copy()
    probe[::3, -1] += 1  # some keys absent from the side
    probe[::7, 0] = 99
    idx, repeated = match_sorted_keys(list(side.T), list(probe.T))
    where = {tuple(k): n for n, k in enumerate(side.tolist())}
    assert idx.tolist() == [where.get(tuple(k), -1) for k in probe.tolist()]
    assert not repeated.any() and (idx < 0).any() and (idx >= 0).any()
    twice = np.r_[side[:1], side]
    _, repeated = match_sorted_keys(list(twice.T), list(probe.T))
    assert repeated.sum() == 2 and repeated[:2].all()


def _cfg(**data):
    return {"data": {"train_start": "2026-01-01", **data}, "model": {"items": 100}}


def test_config_feature_columns_size_the_model_and_bad_names_are_refused():
    cfg = config_from_dict(_cfg(feature_columns=["item_ctr_7d", "user_requests_7d"]))
    assert cfg.data.feature_columns == ["item_ctr_7d", "user_requests_7d"] and cfg.model.feature_dim == 2
    assert config_from_dict(_cfg()).model.feature_dim == 0
    with pytest.raises(InputError, match=r"data.feature_columns: feature column 'item_ctr_30d' is in no feature "
                                         r"table .*features_item_ctr_7d: item_ctr_7d, item_impressions_7d"):
        config_from_dict(_cfg(feature_columns=["item_ctr_30d"]))
    with pytest.raises(InputError, match=r"'item_ctr_7d' \(table .*features_item_ctr_7d\) is named twice"):
        config_from_dict(_cfg(feature_columns=["item_ctr_7d", "item_ctr_7d"]))
    with pytest.raises(InputError, match="data.feature_columns must be a list"):
        config_from_dict(_cfg(feature_columns="item_ctr_7d"))
    raw = _cfg(feature_columns=["item_ctr_7d"])
    raw["model"]["feature_dim"] = 3
    with pytest.raises(InputError, match="model.feature_dim"):
        config_from_dict(raw)


def test_landing_source_refuses_feature_columns(settings):
    landing = replace(settings, read_source="landing")
    with pytest.raises(InputError, match="need REQDEDUP_READ_SOURCE=iceberg"):
        plan("2026-01-01", settings=landing, feature_columns=["item_ctr_7d"])


def test_reader_spec_refuses_feature_columns_that_are_not_names(lake):
    with pytest.raises(InputError, match="feature_columns must be a tuple of column names"):
        RequestReader(_units(lake), ReaderSpec(seq_len=SEQ, feature_columns="item_ctr_7d"))


def test_arrow_rows_with_feature_columns_give_dense_features(rows):
    """The row-level path (e.g. an evaluation reading read_request_batches_with_features)."""
    from reqdedup.train.loader import arrow_to_request_batch

    part = rows.slice(0, 200)
    side = _item_values(part)
    ctr = side.column("item_ctr_7d").to_numpy().copy()
    with_features = part.append_column("item_ctr_7d", pa.array(ctr, mask=np.arange(ctr.size) % 4 == 0)).append_column(
        "item_impressions_7d", side.column("item_impressions_7d"))
    batch = arrow_to_request_batch(with_features, SEQ, feature_columns=["item_impressions_7d", "item_ctr_7d"])
    want = np.stack([side.column("item_impressions_7d").to_numpy(), np.where(np.arange(ctr.size) % 4 == 0, 0, ctr)], 1)
    assert batch.dense_features.shape == (200, 2)
    assert np.allclose(batch.dense_features.numpy(), want, rtol=1e-6)
    assert arrow_to_request_batch(part, SEQ).dense_features is None
    with pytest.raises(InputError, match="no feature column 'user_requests_7d'"):
        arrow_to_request_batch(with_features, SEQ, feature_columns=["user_requests_7d"])


def test_feature_join_bench_reads_every_row_both_ways(tmp_path):
    from reqdedup.bench.feature_join import run

    out = run(requests=120, candidates=5, users=30, repeats=1, workdir=str(tmp_path))
    assert out["rows"] == out["plain_rows_read"] == out["features_rows_read"] == 600
    assert len(out["plain_rows_per_s"]) == len(out["features_rows_per_s"]) == 1
    assert out["plain_rows_per_s"][0] > 0 and out["features_rows_per_s"][0] > 0
