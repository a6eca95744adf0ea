"""Crossing ranker (target-aware, context/crossing dedup): dedup == naive in value and gradient."""

from __future__ import annotations

import pytest
import torch

from reqdedup.train.batch import RequestBatch, synthetic_batch
from reqdedup.train.crossing import candidate_slots
from reqdedup.train.losses import recommendation_losses
from reqdedup.train.model import ModelConfig, RecModel


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw) -> ModelConfig:
    base = dict(items=200, seq_len=12, d_model=16, n_layers=2, n_heads=2, ff_dim=32, emb_dim=8,
                user_mlp=(16,), item_mlp=(16,), head_mlp=(16, 8), ranking="crossing")
    return ModelConfig(**{**base, **kw})


def ragged_batch(counts: list[int], history_lens: list[int], seq_len: int, items: int, seed: int = 0,
                 shuffle_rows: bool = False) -> RequestBatch:
    """Requests with the given candidate counts and history lengths (0 allowed); with
    `shuffle_rows` the rows of different requests are interleaved (an iid-ordered batch)."""
    r = len(counts)
    b = synthetic_batch(r, max(counts), seq_len, items, seed, positive_rate=0.3)
    hl = torch.tensor(history_lens)
    history = b.history.masked_fill(torch.arange(seq_len)[None, :] >= hl[:, None], 0)
    keep = torch.cat([torch.arange(c) + i * max(counts) for i, c in enumerate(counts)])
    if shuffle_rows:
        keep = keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(seed))]
    return RequestBatch(user_ids=b.user_ids, history=history, history_len=hl, user_dense=b.user_dense,
                        user_segment=b.user_segment, user_country=b.user_country,
                        row_request=b.row_request[keep], item_id=b.item_id[keep],
                        item_category=b.item_category[keep], item_dense=b.item_dense[keep], label=b.label[keep])


def _loss_and_grads(model: RecModel, batch: RequestBatch, mode: str):
    model.zero_grad(set_to_none=True)
    out = model(batch, mode=mode)
    loss, _ = recommendation_losses(out, batch, temperature=0.5)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize("crossing_layers", [None, 1])
@pytest.mark.parametrize("shuffle_rows", [False, True])
def test_dedup_equals_naive_logits_and_gradients(crossing_layers, shuffle_rows):
    torch.manual_seed(0)
    cfg = _cfg(crossing_layers=crossing_layers)
    model = RecModel(cfg).train()
    batch = ragged_batch([5, 1, 3, 7], [12, 0, 4, 9], cfg.seq_len, cfg.items, seed=3, shuffle_rows=shuffle_rows)
    out_d, loss_d, grads_d = _loss_and_grads(model, batch, "dedup")
    out_n, loss_n, grads_n = _loss_and_grads(model, batch, "per_row")
    assert torch.isfinite(out_d["logit"]).all()
    torch.testing.assert_close(out_d["logit"], out_n["logit"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_d["user_emb_rows"], out_n["user_emb_rows"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_d, loss_n, rtol=1e-5, atol=1e-6)
    assert grads_d.keys() == grads_n.keys()
    # the crossing really trains: the candidate token and the attention weights get gradients
    assert grads_d["candidate_token.proj.weight"].abs().sum() > 0
    assert grads_d["user_tower.encoder.layers.1.self_attn.in_proj_weight"].abs().sum() > 0
    for name in grads_d:
        torch.testing.assert_close(grads_d[name], grads_n[name], rtol=1e-3, atol=1e-5, msg=name)


def test_logit_depends_on_the_history_per_candidate():
    """Target-aware: the same candidate scores differently under another history (and the
    two-tower head would too, via the user embedding), and the crossing input matters."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = RecModel(cfg).eval()
    batch = ragged_batch([4, 4], [12, 12], cfg.seq_len, cfg.items, seed=1)
    with torch.no_grad():
        base = model(batch)["logit"]
        ctx = model.context(batch.history, batch.history_len)
        zero_kv = type(ctx)(ctx.hidden, [k * 0 for k in ctx.keys], [v * 0 for v in ctx.values], ctx.history_len)
        no_cross = model.score_candidates(batch, context=zero_kv)["logit"]
    assert not torch.allclose(base, no_cross)


def test_eval_mode_dedup_equals_naive_and_rows_are_independent():
    """In eval mode (BatchNorm running stats) a request scored alone gets the scores it gets in a batch."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = RecModel(cfg).eval()
    batch = ragged_batch([3, 6, 2], [5, 12, 0], cfg.seq_len, cfg.items, seed=2)
    with torch.no_grad():
        dedup = model(batch)["logit"]
        naive = model(batch, mode="per_row")["logit"]
        rows = torch.nonzero(batch.row_request == 1).squeeze(1)
        alone = RequestBatch(
            user_ids=batch.user_ids[1:2], history=batch.history[1:2], history_len=batch.history_len[1:2],
            user_dense=batch.user_dense[1:2], user_segment=batch.user_segment[1:2],
            user_country=batch.user_country[1:2], row_request=torch.zeros(rows.numel(), dtype=torch.int64),
            item_id=batch.item_id[rows], item_category=batch.item_category[rows], item_dense=batch.item_dense[rows],
            label=batch.label[rows])
        alone_logit = model(alone)["logit"]
    torch.testing.assert_close(dedup, naive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone_logit, dedup[rows], rtol=1e-4, atol=1e-5)


def test_candidate_slots_handles_interleaved_rows():
    rr = torch.tensor([2, 0, 2, 1, 0, 2])
    slot, c_max = candidate_slots(rr, 3)
    assert c_max == 3
    assert slot.tolist() == [0, 0, 1, 0, 1, 2]


def test_two_tower_default_unchanged_and_modes_agree():
    torch.manual_seed(0)
    cfg = _cfg(ranking="two_tower")
    model = RecModel(cfg).eval()
    assert not hasattr(model, "candidate_token")
    batch = ragged_batch([3, 2], [7, 0], cfg.seq_len, cfg.items)
    with torch.no_grad():
        a, b = model(batch), model(batch, mode="per_row")
    torch.testing.assert_close(a["logit"], b["logit"], rtol=1e-4, atol=1e-5)
    assert a["user_emb"].shape == (2, cfg.emb_dim)


def test_unknown_ranking_raises():
    with pytest.raises(ValueError, match="ranking"):
        RecModel(_cfg(ranking="din"))


def test_crossing_training_loss_decreases_on_cpu():
    """A short CPU run on a fixed set of batches with history-dependent labels: the loss falls."""
    torch.manual_seed(0)
    cfg = _cfg(items=50)
    model = RecModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    batches = []
    for s in range(4):
        b = synthetic_batch(8, 6, cfg.seq_len, cfg.items, s, users=8, positive_rate=0.0)
        # engaged iff the candidate appears in the request's history (a crossing signal)
        hist = b.history.index_select(0, b.row_request) - 1
        b.item_id[::2] = hist[::2, 0].clamp(min=0)
        b.label = (hist == b.item_id[:, None]).any(dim=1).float()
        batches.append(b)
    losses = []
    for epoch in range(25):
        total = 0.0
        for b in batches:
            out = model(b)
            loss, _ = recommendation_losses(out, b, retrieval_weight=0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total / len(batches))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("model,key", [
    ({"ranking": "din"}, "model.ranking"),
    ({"ranking": "crossing", "n_layers": 2, "crossing_layers": 3}, "model.crossing_layers"),
    ({"ranking": "crossing", "crossing_layers": 0}, "model.crossing_layers"),
    ({"ranking": "crossing", "crossing_layers": "all"}, "model.crossing_layers"),
])
def test_config_refuses_bad_crossing_keys(model, key):
    from reqdedup.errors import InputError
    from reqdedup.train.config import config_from_dict

    with pytest.raises(InputError, match=key):
        config_from_dict({"model": model}, "cfg.yaml")
    ok = config_from_dict({"model": {"ranking": "crossing", "n_layers": 2, "crossing_layers": 1}}, "cfg.yaml")
    assert ok.model.first_crossing_layer() == 1


# ---- serving --------------------------------------------------------------------------
def _serving_model() -> RecModel:
    torch.manual_seed(0)
    model = RecModel(_cfg(items=50, seq_len=16, crossing_layers=1))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _serving_requests(seed: int = 1):
    from reqdedup.serve.scorer import Request

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (h, n) in enumerate([(0, 3), (5, 1), (25, 7), (16, 4), (9, 2)]):
        out.append(Request(history=torch.randint(0, 50, (h,), generator=g).tolist(),
                           user_dense=torch.randn(8, generator=g).tolist(), user_segment=i, user_country=2 * i,
                           item_id=torch.randint(0, 50, (n,), generator=g).tolist(),
                           item_category=torch.randint(0, 64, (n,), generator=g).tolist(),
                           item_dense=torch.randn(n, 4, generator=g).tolist(), request_id=f"r{i}", user_id=100 + i))
    return out


def test_scorer_crossing_request_level_equals_per_candidate_and_batching():
    from reqdedup.serve.scorer import RequestScorer

    scorer = RequestScorer(_serving_model(), "cpu")
    reqs = _serving_requests()
    level = scorer.score(reqs, "request_level")
    naive = scorer.score(reqs, "per_candidate")
    alone = [scorer.score([r])[0] for r in reqs]
    for a, b, c in zip(level, naive, alone):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.scores, c.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.retrieval_scores, b.retrieval_scores, rtol=1e-4, atol=1e-5)


def test_context_cache_hits_give_the_same_scores_and_stay_bounded():
    from reqdedup.serve.scorer import RequestScorer

    plain = RequestScorer(_serving_model(), "cpu")
    cached = RequestScorer(_serving_model(), "cpu", context_cache_requests=3)
    reqs = _serving_requests()
    expected = plain.score(reqs)
    first = cached.score(reqs)  # 5 misses; the LRU keeps the last 3
    assert cached.context_cache_stats() == {"capacity": 3, "size": 3, "hits": 0, "misses": 5, "hit_rate": 0.0}
    second = cached.score(reqs[2:] + reqs[:1])  # r2..r4 hit, r0 was evicted
    stats = cached.context_cache_stats()
    assert (stats["hits"], stats["misses"], stats["size"]) == (3, 6, 3)
    for a, b in zip(expected, first):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    for a, b in zip(expected[2:] + expected[:1], second):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    # same user, other history: a miss, not the old K/V
    changed = _serving_requests()[2]
    changed.history = list(reversed(changed.history))
    cached.score([changed])
    assert cached.context_cache_stats()["misses"] == 7


def test_context_cache_setting_is_checked(monkeypatch):
    from reqdedup.config import get_settings
    from reqdedup.errors import InputError
    from reqdedup.serve.scorer import RequestScorer

    monkeypatch.setenv("REQDEDUP_SERVE_CONTEXT_CACHE_REQUESTS", "-1")
    with pytest.raises(InputError, match="serve_context_cache_requests"):
        get_settings()
    monkeypatch.setenv("REQDEDUP_SERVE_CONTEXT_CACHE_REQUESTS", "64")
    assert get_settings().serve_context_cache_requests == 64
    with pytest.raises(ValueError, match="serve_context_cache_requests"):
        RequestScorer(_serving_model(), "cpu", context_cache_requests=-2)


def test_eval_crossing_config_trains_the_crossing_ranker_in_every_run():
    from pathlib import Path

    from reqdedup.evaluate.matrix import load_matrix, train_config

    path = Path(__file__).resolve().parents[1] / "configs" / "eval_crossing.yaml"
    cfg = load_matrix(path)
    runs = {c: train_config(cfg, c, 0, run_dir="/tmp/x") for c in cfg.configs}
    assert all(tc.model.ranking == "crossing" for tc in runs.values())
    assert runs["iid"].train.user_encoding == "per_row"  # the naive per-candidate path
    assert runs["sorted_fixed"].train.user_encoding == "dedup"
    two_tower = load_matrix(path, ["model.ranking=two_tower"])
    assert train_config(two_tower, "iid", 0, run_dir="/tmp/x").model.ranking == "two_tower"
    assert len(cfg.seeds) >= 5


def test_evaluate_shard_scores_with_the_crossing_head():
    """The matrix's evaluation ranks with the model's own head (here the crossing one)."""
    from types import SimpleNamespace

    import numpy as np

    from reqdedup.evaluate.matrix_worker import evaluate_shard

    torch.manual_seed(0)
    cfg = _cfg()
    model = RecModel(cfg).eval()
    batch = ragged_batch([4, 3, 5], [12, 0, 6], cfg.seq_len, cfg.items, seed=4)
    pool_ids = np.unique(batch.item_id.numpy())
    first = [int(torch.nonzero(batch.item_id == i)[0, 0]) for i in pool_ids]
    data = SimpleNamespace(pool_ids=pool_ids, pool_item=torch.from_numpy(pool_ids), batches=[batch],
                           pool_category=batch.item_category[first], pool_dense=batch.item_dense[first])
    part = evaluate_shard(model, data)
    with torch.no_grad():
        expected = model(batch)["logit"]
    np.testing.assert_allclose(part["logits"], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert part["ranks"].shape[0] == int((batch.label > 0.5).sum()) and (part["ranks"] >= 1).all()


def test_pyfunc_loads_a_crossing_checkpoint_with_the_context_cache(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import pandas as pd

    from reqdedup.serve.pyfunc import CHECKPOINT_ARTIFACT, RequestLevelModel, example_requests
    from reqdedup.serve.scorer import RequestScorer

    model = _serving_model()
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, path)
    monkeypatch.setenv("REQDEDUP_SERVE_CONTEXT_CACHE_REQUESTS", "8")
    served = RequestLevelModel()
    served.load_context(SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(path)}, model_config={"device": "cpu"}))
    frame = pd.DataFrame(example_requests(items=50))
    first = served.predict(None, frame)
    second = served.predict(None, frame)
    assert served.scorer.context_cache_stats()["misses"] == 2 and served.scorer.context_cache_stats()["hits"] == 2
    expected = RequestScorer(_serving_model(), "cpu").score(
        [dict(r) for r in example_requests(items=50)])
    for got, again, want in zip(first["scores"], second["scores"], expected):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), want.scores, rtol=1e-4, atol=1e-5)
        assert got == again
