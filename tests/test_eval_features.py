"""The evaluation reads the side-table columns a model was trained with (fast: the lake
read is replaced by the rows it would return; the per-bucket merge itself is tested in
tests/test_reader_features.py and, with Spark, tests/test_train_features.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reqdedup.data.generator import GeneratorConfig, generate_table


def test_eval_batches_carry_the_trained_feature_columns(monkeypatch, settings):
    import reqdedup.lake.features as features
    from reqdedup.evaluate.matrix_worker import EvalData

    rows = generate_table(GeneratorConfig(date="2026-03-02", users=20, requests=40, candidates=5, history=8,
                                          items=100, seed=3)).sort_by([("user_id", "ascending"),
                                                                       ("request_id", "ascending")])
    ctr = (rows.column("item_id").to_numpy() % 13) / 13.0
    joined = rows.append_column("item_ctr_7d", pa.array(ctr, pa.float64()))
    asked = {}

    def fake_read(start, end=None, *, features, **kw):
        asked.update(features=list(features), start=start, end=end)
        return iter(joined.to_batches(max_chunksize=64))

    monkeypatch.setattr(features, "read_request_batches_with_features", fake_read)
    spec = {"start": "2026-03-02", "end": "2026-03-02", "buckets": None, "batch_requests": 16}
    data = EvalData(spec, settings, seq_len=8, rank=0, world=1, feature_columns=["item_ctr_7d"])
    assert asked["features"] == ["item_ctr_7d"]  # the side table that holds the column
    got = np.concatenate([b.dense_features[:, 0].numpy() for b in data.batches])
    want = np.concatenate([ctr[np.isin(rows.column("request_id").to_numpy(), b.request_ids.numpy())] for b in data.batches])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert sum(b.num_rows for b in data.batches) == rows.num_rows
