"""RequestBatch, dedup helpers and the model: dedup mode computes what per-row mode computes."""

from __future__ import annotations

import pytest
import torch

from reqdedup.train.batch import HISTORY_PAD, RequestBatch, synthetic_batch
from reqdedup.train.dedup import (
    check_user_block_consistent,
    expand_to_rows,
    jagged_history_to_padded,
    request_inverse,
    rows_to_request_batch,
)
from reqdedup.train.losses import recommendation_losses
from reqdedup.train.model import ModelConfig, RecModel

TINY = ModelConfig(items=50, seq_len=16, d_model=16, n_layers=2, n_heads=2, ff_dim=32, emb_dim=8,
                   user_mlp=(16,), item_mlp=(16,), head_mlp=(16, 8))


def _batch(requests=4, candidates=5, users=2, seed=0, positive_rate=0.4) -> RequestBatch:
    return synthetic_batch(requests, candidates, TINY.seq_len, TINY.items, seed, users=users,
                           positive_rate=positive_rate, min_history=0)


# ---- RequestBatch -----------------------------------------------------------------------
def test_synthetic_batch_shapes_and_padding_convention():
    b = _batch(requests=6, candidates=3, users=3)
    assert (b.num_requests, b.num_rows, b.seq_len) == (6, 18, 16)
    assert b.history.shape == (6, 16) and b.user_dense.shape == (6, 8) and b.item_dense.shape == (18, 4)
    assert b.history.dtype == torch.int64 and b.row_request.dtype == torch.int64
    positions = torch.arange(16)[None, :]
    valid = positions < b.history_len[:, None]
    assert torch.all(b.history[~valid] == HISTORY_PAD)
    assert torch.all(b.history[valid] >= 1) and torch.all(b.history[valid] <= TINY.items)  # shifted by +1
    assert torch.equal(b.row_request, torch.arange(6).repeat_interleave(3))
    assert b.unique_users().numel() == 3
    assert torch.equal(b.row_user_ids(), b.user_ids.repeat_interleave(3))


def test_synthetic_batch_is_reproducible_from_seed():
    a, b, c = _batch(seed=3), _batch(seed=3), _batch(seed=4)
    assert torch.equal(a.history, b.history) and torch.equal(a.label, b.label)
    assert not torch.equal(a.history, c.history)


def test_to_moves_and_casts_only_float_tensors():
    b = _batch().to("cpu", torch.float64)
    assert b.user_dense.dtype == torch.float64 and b.label.dtype == torch.float64
    assert b.history.dtype == torch.int64


# ---- dedup helpers ----------------------------------------------------------------------
def test_request_inverse_reconstructs_ids():
    ids = torch.tensor([42, 7, 42, 7, 99, 42])
    unique_ids, inverse = request_inverse(ids)
    assert unique_ids.tolist() == [7, 42, 99]
    assert torch.equal(unique_ids[inverse], ids)


def test_expand_to_rows_is_index_select():
    per_request = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert expand_to_rows(per_request, torch.tensor([1, 0, 1])).tolist() == [[3.0, 4.0], [1.0, 2.0], [3.0, 4.0]]


def _row_level(b: RequestBatch, request_ids: torch.Tensor, perm: torch.Tensor) -> dict:
    """The row-level tensors a loader would read for `b`, rows in order `perm`."""
    r = b.row_request[perm]
    return dict(
        request_ids=request_ids[r], user_ids=b.user_ids[r], history=b.history[r], history_len=b.history_len[r],
        user_dense=b.user_dense[r], user_segment=b.user_segment[r], user_country=b.user_country[r],
        item_id=b.item_id[perm], item_category=b.item_category[perm], item_dense=b.item_dense[perm],
        label=b.label[perm],
    )


def test_rows_to_request_batch_recovers_the_request_block():
    b = _batch(requests=4, candidates=3)
    request_ids = torch.tensor([30, 10, 40, 20])  # not in row order: dedup sorts by id
    perm = torch.randperm(b.num_rows, generator=torch.Generator().manual_seed(1))
    got = rows_to_request_batch(**_row_level(b, request_ids, perm))
    order = torch.argsort(request_ids)  # request k of `got` is request order[k] of `b`
    assert got.num_requests == 4 and got.num_rows == 12
    assert torch.equal(got.history, b.history[order])
    assert torch.equal(got.user_dense, b.user_dense[order])
    assert torch.equal(got.user_ids, b.user_ids[order])
    # every row still points at its own request's user block
    assert torch.equal(got.history[got.row_request], b.history[b.row_request[perm]])
    assert torch.equal(got.item_id, b.item_id[perm])


@pytest.mark.parametrize("column", ["user_dense", "history", "user_segment", "user_ids"])
def test_disagreeing_user_block_names_the_request(column):
    b = _batch(requests=3, candidates=4)
    rows = _row_level(b, torch.tensor([100, 200, 300]), torch.arange(b.num_rows))
    bad = rows[column].clone()
    bad[6] = bad[6] + 1  # row 6 belongs to request 200 (rows 4..7)
    rows[column] = bad
    with pytest.raises(ValueError, match=r"request_id 200\b"):
        rows_to_request_batch(**rows)


def test_consistency_check_treats_repeated_nan_as_consistent():
    request_ids = torch.tensor([5, 5, 6])
    _, inverse = request_inverse(request_ids)
    dense = torch.tensor([[float("nan"), 1.0], [float("nan"), 1.0], [2.0, 3.0]])
    first = check_user_block_consistent(request_ids, inverse, {"user_dense": dense})
    assert first.tolist() == [0, 2]
    dense[1, 1] = 9.0
    with pytest.raises(ValueError, match="request_id 5.*user_dense"):
        check_user_block_consistent(request_ids, inverse, {"user_dense": dense})


def test_jagged_history_keeps_most_recent_tail_shifted():
    values = torch.tensor([0, 1, 2, 3, 4, 5, 6], dtype=torch.int32)
    offsets = torch.tensor([0, 5, 5, 7])  # lists [0..4], [], [5, 6]
    history, history_len = jagged_history_to_padded(values, offsets, seq_len=3)
    assert history_len.tolist() == [3, 0, 2]
    assert history.tolist() == [[3, 4, 5], [0, 0, 0], [6, 7, 0]]


# ---- model --------------------------------------------------------------------------------
def _run(model: RecModel, batch: RequestBatch, mode: str):
    model.zero_grad(set_to_none=True)
    out = model(batch, mode=mode)
    loss, _ = recommendation_losses(out, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("train", [True, False])
def test_dedup_and_per_row_give_same_outputs_and_gradients(train):
    torch.manual_seed(0)
    model = RecModel(TINY).double().train(train)
    batch = _batch(requests=4, candidates=5, users=2).to("cpu", torch.float64)
    out_dedup, grads_dedup = _run(model, batch, "dedup")
    out_row, grads_row = _run(model, batch, "per_row")
    assert out_dedup["logit"].shape == (20,) and out_dedup["user_emb_rows"].shape == (20, 8)
    for key in ("logit", "user_emb_rows", "item_emb", "retrieval_score"):
        torch.testing.assert_close(out_dedup[key], out_row[key])
    assert grads_dedup.keys() == grads_row.keys()
    assert any(n.startswith("user_tower.encoder") for n in grads_dedup)  # the tower is trained
    for name in grads_dedup:
        torch.testing.assert_close(grads_dedup[name], grads_row[name], msg=name)


def test_user_embedding_ignores_tokens_beyond_history_len():
    torch.manual_seed(0)
    model = RecModel(TINY).eval()
    batch = _batch(requests=3, candidates=2)
    batch.history_len[:] = torch.tensor([4, 0, 16])
    batch.history[0, 4:] = 0
    batch.history[1, :] = 0
    noisy = RequestBatch(**{**batch.__dict__, "history": batch.history.clone()})
    noisy.history[0, 4:] = 7  # garbage after the valid prefix must be masked out
    noisy.history[1, :] = 9
    with torch.no_grad():
        clean_emb, noisy_emb = model.encode_users(batch), model.encode_users(noisy)
    assert torch.isfinite(clean_emb).all()
    torch.testing.assert_close(clean_emb, noisy_emb)


def test_unknown_mode_is_an_error():
    model = RecModel(TINY)
    with pytest.raises(ValueError, match="mode"):
        model(_batch(), mode="rowwise")


def test_history_longer_than_configured_seq_len_is_an_error():
    model = RecModel(TINY)
    long = synthetic_batch(2, 2, TINY.seq_len * 2, TINY.items, 0)
    with pytest.raises(ValueError, match="seq_len"):
        model(long)


def test_model_config_round_trips_through_dict():
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY


def test_training_core_imports_with_torch_alone():
    """The GPU machine has Python + torch only: numpy/pyarrow/pandas must not be needed."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('numpy', 'pyarrow', 'pandas'): sys.modules[name] = None\n"
            "import reqdedup.train.batch, reqdedup.train.dedup, reqdedup.train.model\n"
            "import reqdedup.train.losses, reqdedup.train.syncbn, reqdedup.bench.train\n")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
