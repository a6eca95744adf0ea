"""End to end (Spark): a feature added after ingest reaches the model's input, training runs
on it, and a `features backfill` changes what the next training reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.errors import InputError
from reqdedup.lake.backfill import backfill_feature
from reqdedup.lake.catalog import load_table
from reqdedup.lake.features import add_feature, feature_table
from reqdedup.lake.ingest import ingest_date, publish_date
from reqdedup.train.config import config_from_dict
from reqdedup.train.model import RecModel
from reqdedup.train.reader import ReaderSpec, RequestReader, plan
from reqdedup.train.worker import FINAL_MODEL, METRICS, train

pytestmark = pytest.mark.slow

# Own dates, far from the other lake tests' (the feature window is 7 days).
DAYS = ["2026-06-10", "2026-06-11"]
SMALL = dict(users=40, requests=90, candidates=8, history=16, items=500, seed=5)
COLUMNS = ["item_ctr_7d", "user_requests_7d", "item_impressions_7d"]


def _publish(settings, day):
    try:
        table = load_table("impressions", settings)
        if table.current_snapshot() is not None and table.scan(
                row_filter=f"event_date = '{day}'", selected_fields=("request_id",)).to_arrow().num_rows:
            return
    except InputError:
        pass
    write_landing(GeneratorConfig(date=day, **{**SMALL, "seed": SMALL["seed"] + int(day[-2:])}),
                  out_dir=settings.landing_dir)
    ingest_date(day, settings)
    publish_date(day, settings)


def _side_values(settings) -> dict:
    """(request_id, item_id) -> the side tables' values of COLUMNS for the training day."""
    day = f"event_date = '{DAYS[1]}'"
    ctr = load_table(feature_table("item_ctr_7d"), settings).scan(row_filter=day).to_arrow().to_pydict()
    users = load_table(feature_table("user_requests_7d"), settings).scan(row_filter=day).to_arrow().to_pydict()
    per_user = dict(zip(users["user_id"], users["user_requests_7d"]))
    return {(r, i): (0.0 if c is None else c, per_user[u], n) for u, r, i, c, n in zip(
        ctr["user_id"], ctr["request_id"], ctr["item_id"], ctr["item_ctr_7d"], ctr["item_impressions_7d"])}


def _read(settings, buckets=None) -> dict:
    """(request_id, item_id) -> what the reader puts in RequestBatch.dense_features."""
    units = plan(DAYS[1], DAYS[1], buckets=buckets, settings=settings, feature_columns=COLUMNS)
    spec = ReaderSpec(seq_len=16, batch_rows=32, workers=0, order="table", feature_columns=tuple(COLUMNS))
    out = {}
    for batch in RequestReader(units, spec).batches(0):
        req = batch.request_ids[batch.row_request].tolist()
        for r, i, v in zip(req, batch.item_id.tolist(), batch.dense_features.tolist()):
            out[(r, i)] = tuple(v)
    return out


def _bucket_of_rows(settings) -> dict:
    t = load_table("impressions", settings).scan(row_filter=f"event_date = '{DAYS[1]}'",
                                                 selected_fields=("user_id", "request_id", "item_id")).to_arrow()
    from reqdedup.lake.backfill import buckets_of_users

    b = buckets_of_users(sorted(set(t.column("user_id").to_pylist())), settings.buckets)
    return {(r, i): b[u] for u, r, i in zip(*(t.column(c).to_pylist() for c in ("user_id", "request_id", "item_id")))}


@pytest.fixture(scope="module")
def lake(settings, spark):
    for day in DAYS:
        _publish(settings, day)
    # Feature columns named before the feature exists for the day: refused, naming the table.
    with pytest.raises(InputError, match=r"features_item_ctr_7d (does not exist|has no rows for event_date "
                                         r"2026-06-11).*reqdedup features add item_ctr_7d"):
        plan(DAYS[1], settings=settings, feature_columns=COLUMNS)
    for name in ("item_ctr_7d", "user_requests_7d"):
        add_feature(name, DAYS[1], DAYS[1], settings)
    return settings


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-6) for k in a)


def test_a_feature_added_after_ingest_reaches_the_model_input(lake, settings, tmp_path):
    expected = _side_values(settings)
    got = _read(settings)
    assert _close(got, expected)
    assert any(v[0] > 0 for v in got.values()) and any(v[1] > 0 for v in got.values())  # real values, not zeros

    cfg = config_from_dict({
        "name": "features_e2e",
        "data": {"train_start": DAYS[1], "train_end": DAYS[1], "order": "table", "batch_rows": 128, "workers": 0,
                 "feature_columns": COLUMNS},
        "model": {"items": 500, "seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "ff_dim": 32,
                  "emb_dim": 8, "user_mlp": [16], "item_mlp": [16], "head_mlp": [16]},
        "train": {"epochs": 1},
        "dist": {"nproc_per_node": 1, "device": "cpu"},
        "output": {"run_dir": str(tmp_path / "run")},
        "mlflow": {"enabled": False},
    })
    result = train(cfg, settings)
    assert result["final"]["rows"] > 0 and np.isfinite(result["final"]["loss"])
    saved = torch.load(tmp_path / "run" / FINAL_MODEL, weights_only=False)
    assert saved["model_config"]["feature_dim"] == len(COLUMNS)
    assert (tmp_path / "run" / METRICS).exists()
    model = RecModel(cfg.model)
    model.load_state_dict(saved["model"])
    model.eval()
    # The head's input holds the side tables' values of the batch rows.
    units = plan(DAYS[1], settings=settings, feature_columns=COLUMNS)
    batch = next(iter(RequestReader(units, ReaderSpec(seq_len=16, batch_rows=128, workers=0, order="table",
                                                      feature_columns=tuple(COLUMNS))).batches(0)))
    seen = {}
    hook = model.ranking_head.mlp[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    model(batch)
    hook.remove()
    want = torch.tensor([expected[(r, i)] for r, i in zip(batch.request_ids[batch.row_request].tolist(),
                                                           batch.item_id.tolist())])
    assert torch.allclose(seen["x"][:, -len(COLUMNS):], torch.sign(want) * torch.log1p(want.abs()), rtol=1e-5)


def test_backfill_changes_what_the_next_training_reads(lake, settings, spark):
    before = _read(settings)
    buckets = _bucket_of_rows(settings)
    # The previous day's impressions change (e.g. late labels) after the feature was computed.
    spark.sql(f"UPDATE {settings.spark_table('impressions')} SET label = 1 - label "
              f"WHERE event_date = DATE'{DAYS[0]}'")
    assert _close(_read(settings), before)  # the side table still holds the old values
    chosen = sorted(set(buckets.values()))[0]
    backfill_feature("item_ctr_7d", DAYS[1], DAYS[1], buckets=[chosen], settings=settings)
    after = _read(settings)
    assert _close(after, _side_values(settings))  # what training reads is the side table now
    inside = [k for k in after if buckets[k] == chosen]
    outside = [k for k in after if buckets[k] != chosen]
    assert inside and outside
    assert any(not np.isclose(after[k][0], before[k][0]) for k in inside), "backfill changed nothing read"
    assert all(np.allclose(after[k], before[k]) for k in outside)  # other buckets untouched
    only = _read(settings, buckets=[chosen])
    assert _close(only, {k: after[k] for k in inside})
