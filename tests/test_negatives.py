"""logQ correction (streaming frequency estimate) and mixed negatives from a uniform pool."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reqdedup.train.losses import in_batch_softmax_loss
from reqdedup.train.negatives import StreamingFrequency, UniformItemPool


def test_streaming_frequency_learns_the_gap_between_sightings():
    est = StreamingFrequency(items=5, alpha=0.2)
    for step in range(400):
        ids = [0] + ([1] if step % 4 == 0 else []) + ([2] if step % 10 == 0 else [])
        est.update(torch.tensor(ids))
    lq = est.log_q(torch.tensor([0, 1, 2, 3]))
    assert lq[0].item() == pytest.approx(0.0, abs=1e-3)  # every step: q = 1
    assert lq[1].item() == pytest.approx(-math.log(4), abs=1e-2)
    assert lq[2].item() == pytest.approx(-math.log(10), abs=5e-2)
    assert lq[3].item() == pytest.approx(-math.log(401), abs=1e-6)  # never seen: the rarest


def test_mixed_negatives_are_extra_softmax_columns_masked_on_the_positive():
    g = torch.Generator().manual_seed(0)
    u, v, x = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(3, 3, generator=g)
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13])
    extra_ids = torch.tensor([11, 20, 21])  # 11 is row 1's own positive: masked for row 1
    log_q = torch.tensor([0.1, -0.2, 0.3, 0.0])
    loss, stats = in_batch_softmax_loss(u, v, users, items, temperature=0.5, log_q=log_q, extra_item_emb=x,
                                        extra_item_ids=extra_ids, extra_log_q=-1.5)
    logits = torch.cat([u @ v.T / 0.5 - log_q[None], u @ x.T / 0.5 + 1.5], dim=1)
    logits[1, 4] = float("-inf")
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.arange(4)).item(), rel=1e-6)
    plain, _ = in_batch_softmax_loss(u, v, users, items, temperature=0.5, log_q=log_q)
    assert loss.item() > plain.item()  # more negatives in the denominator
    assert stats["false_negative_rate"].item() == 0.0


def test_uniform_pool_samples_only_seen_items_with_their_features():
    pool = UniformItemPool(items=100, dense_dim=2)
    with pytest.raises(ValueError, match="empty"):
        pool.sample(3)
    pool.add(torch.tensor([5, 7]), torch.tensor([1, 2]), torch.tensor([[0.5, 0.5], [1.0, 2.0]]))
    ids, cat, dense, log_q = pool.sample(1000, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {5, 7}
    assert torch.equal(cat, torch.where(ids == 5, 1, 2))
    assert torch.allclose(dense[ids == 7], torch.tensor([1.0, 2.0]))
    assert log_q == pytest.approx(math.log(1000 / 2))
    assert 400 < int((ids == 5).sum()) < 600  # uniform


def test_training_config_keys_drive_the_training_step():
    from reqdedup.errors import InputError
    from reqdedup.train.batch import synthetic_batch
    from reqdedup.train.config import config_from_dict
    from reqdedup.train.model import RecModel
    from reqdedup.train.worker import Negatives, train_step

    model_cfg = {"items": 50, "seq_len": 6, "d_model": 8, "n_layers": 1, "n_heads": 2, "ff_dim": 16, "emb_dim": 4,
                 "user_mlp": [8], "item_mlp": [8], "head_mlp": [8]}
    losses = {}
    for name, train in {"plain": {}, "logq": {"logq": True}, "mixed": {"mixed_negatives": 16}}.items():
        cfg = config_from_dict({"model": model_cfg, "train": train})
        torch.manual_seed(0)
        model = RecModel(cfg.model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
        neg = Negatives(cfg, "cpu", 0) if (cfg.train.logq or cfg.train.mixed_negatives) else None
        for step in range(4):  # different batches: items seen at different rates
            b = synthetic_batch(6, 4, 6, 10, generator=5 + step, users=3, positive_rate=0.5)
            loss, stats = train_step(model, opt, b, cfg, False, neg)
        losses[name] = (loss.item(), stats["retrieval_loss"].item())
    assert losses["logq"][1] != pytest.approx(losses["plain"][1])
    assert losses["mixed"][1] > losses["plain"][1]  # more negatives in every denominator
    with pytest.raises(InputError, match="train.mixed_negatives"):
        config_from_dict({"train": {"mixed_negatives": -1}})
