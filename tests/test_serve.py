"""Request-level scorer and its pyfunc wrapper: same scores as per-candidate scoring, batching
does not change them, bad input is refused with a clear error (never a silent score)."""

from __future__ import annotations

import copy

import pytest
import torch

from reqdedup.serve.scorer import MODES, Request, RequestError, RequestScorer, collate, check_request, load_model
from reqdedup.train.model import ModelConfig, RecModel

TINY = ModelConfig(items=50, seq_len=16, d_model=16, n_layers=2, n_heads=2, ff_dim=32, emb_dim=8,
                   user_mlp=(16,), item_mlp=(16,), head_mlp=(16, 8))


def _model(seed: int = 0) -> RecModel:
    torch.manual_seed(seed)
    model = RecModel(TINY)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _requests(count: int = 6, seed: int = 1, as_lists: bool = True) -> list[Request]:
    """Requests with different history lengths (empty, short, longer than seq_len) and
    candidate counts."""
    g = torch.Generator().manual_seed(seed)
    hist_lens = [0, 3, 25, 16, 9, 1, 12, 7]
    out = []
    for i in range(count):
        n = 1 + (i * 3) % 7
        h = hist_lens[i % len(hist_lens)]
        fields = dict(
            history=torch.randint(0, TINY.items, (h,), generator=g),
            user_dense=torch.randn(8, generator=g),
            user_segment=int(torch.randint(0, 16, (1,), generator=g)),
            user_country=int(torch.randint(0, 64, (1,), generator=g)),
            item_id=torch.randint(0, TINY.items, (n,), generator=g),
            item_category=torch.randint(0, 64, (n,), generator=g),
            item_dense=torch.randn(n, 4, generator=g),
        )
        if as_lists:
            fields = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        out.append(Request(**fields, request_id=f"r{i}"))
    return out


@pytest.fixture(scope="module")
def scorer():
    return RequestScorer(_model(), "cpu")


def _assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.scores.shape == y.scores.shape
        torch.testing.assert_close(x.scores, y.scores, atol=atol, rtol=1e-5)
        torch.testing.assert_close(x.retrieval_scores, y.retrieval_scores, atol=atol, rtol=1e-5)


# ---- what it computes -------------------------------------------------------------------
def test_request_level_scores_equal_per_candidate_scores(scorer):
    reqs = _requests()
    request_level = scorer.score(reqs)
    per_candidate = scorer.score(reqs, mode="per_candidate")
    _assert_same(request_level, per_candidate)
    for r, res in zip(reqs, request_level):
        assert res.scores.shape == (len(r.item_id),) and res.scores.dtype == torch.float32
        assert torch.all((res.scores > 0) & (res.scores < 1))  # probabilities


def test_scores_match_the_model_forward_by_hand(scorer):
    """Engagement = sigmoid(ranking logit), retrieval = user . item, user tower run once."""
    req = _requests(3, seed=5)[2]  # a history longer than seq_len: the most recent 16 ids count
    model = scorer.model
    hist = torch.tensor(req.history[-TINY.seq_len:]) + 1
    with torch.no_grad():
        user = model.user_tower(hist[None], torch.tensor([hist.numel()]), torch.tensor([req.user_dense]),
                                torch.tensor([req.user_segment]), torch.tensor([req.user_country]))
        items = model.item_tower(torch.tensor(req.item_id), torch.tensor(req.item_category),
                                 torch.tensor(req.item_dense))
        users = user.expand(items.shape[0], -1)
        prob = torch.sigmoid(model.ranking_head(users, items))
        retrieval = (users * items).sum(-1)
    (res,) = scorer.score([req])
    torch.testing.assert_close(res.scores, prob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.retrieval_scores, retrieval, atol=1e-5, rtol=1e-5)


def test_batching_requests_equals_scoring_them_one_by_one():
    reqs = _requests(8)
    one_forward = RequestScorer(_model(), "cpu").score(reqs)
    one_by_one = [RequestScorer(_model(), "cpu").score([r])[0] for r in reqs]
    chunked = RequestScorer(_model(), "cpu", max_batch_requests=3, max_batch_rows=10).score(reqs)
    _assert_same(one_forward, one_by_one)
    _assert_same(one_forward, chunked)
    order = RequestScorer(_model(), "cpu").score(list(reversed(reqs)))
    _assert_same(one_forward, list(reversed(order)))


def test_scoring_never_takes_the_native_transformer_fast_path(monkeypatch):
    """Eval must run the attention code training runs: the native fast path's CUDA masked
    softmax reads out of bounds past 2^31 scores (an illegal memory access on the H200)."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch._transformer_encoder_layer_fwd (MHA fast path) was called")

    model = _model()
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", refuse)
    reqs = _requests()
    with pytest.raises(AssertionError, match="fast path"):  # the plain eval model does take it
        with torch.inference_mode():
            model.eval()(collate([check_request(r, i, TINY.items) for i, r in enumerate(reqs)], TINY.seq_len))
    scorer = RequestScorer(model, "cpu")
    for mode in MODES:
        assert len(scorer.score(reqs, mode=mode)) == len(reqs)
    RequestScorer(model, "cpu")  # a second scorer on the same model adds no second hook
    layers = [m for m in model.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    assert layers and all(len(m._forward_pre_hooks) == 1 for m in layers)


def test_chunks_respect_request_and_row_limits():
    s = RequestScorer(_model(), "cpu", max_batch_requests=3, max_batch_rows=10)
    checked = s.check(_requests(8))
    groups = s.chunks(checked)
    assert sum(len(g) for g in groups) == 8
    for g in groups:
        assert len(g) <= 3
        assert len(g) == 1 or sum(c.num_candidates for c in g) <= 10


def test_tensor_lists_mappings_and_flat_dense_are_accepted(scorer):
    lists = _requests(3)
    tensors = _requests(3, as_lists=False)
    mappings = [{"user_history": r.history, "user_dense": r.user_dense, "user_segment": r.user_segment,
                 "user_country": r.user_country, "candidate_item_id": r.item_id,
                 "candidate_item_category": r.item_category,
                 "candidate_item_dense": [x for row in r.item_dense for x in row]} for r in lists]
    base = scorer.score(lists)
    _assert_same(base, scorer.score(tensors))
    _assert_same(base, scorer.score(mappings))


def test_collate_keeps_user_block_once_and_the_history_convention():
    reqs = _requests(3)
    checked = [check_request(r, i, TINY.items) for i, r in enumerate(reqs)]
    b = collate(checked, TINY.seq_len)
    assert b.num_requests == 3 and b.num_rows == sum(len(r.item_id) for r in reqs)
    assert b.history.shape == (3, TINY.seq_len)  # padded to the longest (25 -> cut to 16)
    assert b.history_len.tolist() == [0, 3, 16]
    assert torch.all(b.history[0] == 0)
    assert b.history[1, :3].tolist() == [x + 1 for x in reqs[1].history]  # ids shifted by +1
    assert b.history[2].tolist() == [x + 1 for x in reqs[2].history[-16:]]  # most recent 16
    assert b.row_request.tolist() == [0] * len(reqs[0].item_id) + [1] * len(reqs[1].item_id) + [2] * len(reqs[2].item_id)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_cpu_fp32():
    reqs = _requests()
    cpu = RequestScorer(_model(), "cpu").score(reqs)
    gpu = RequestScorer(_model(), "cuda", precision="bf16").score(reqs)
    _assert_same(cpu, gpu, atol=5e-2)


def test_checkpoint_round_trip(tmp_path):
    model = _model(3)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": TINY.to_dict(), "config": {"name": "x"}}, path)
    reqs = _requests(3)
    _assert_same(RequestScorer(model, "cpu").score(reqs), RequestScorer.from_checkpoint(str(path)).score(reqs))
    assert load_model(str(path)).cfg == TINY
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a reqdedup model checkpoint"):
        load_model(str(tmp_path / "bad.pt"))


class _NotWeights:  # pickled by reference: a weights-only load refuses it
    pass


def test_checkpoints_load_weights_only(tmp_path):
    """One loader (reqdedup.train.model.load_checkpoint) reads every checkpoint with
    weights_only=True: a file that would run code on unpickling is refused, naming it."""
    from reqdedup.train.model import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"model": _model(3).state_dict(), "model_config": TINY.to_dict(), "extra": _NotWeights()}, path)
    for load in (load_checkpoint, load_model):
        with pytest.raises(ValueError, match=f"{path}.*weights-only"):
            load(path)


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="precision"):
        RequestScorer(_model(), "cpu", precision="fp8")
    with pytest.raises(ValueError, match="mode"):
        RequestScorer(_model(), "cpu", mode="rows")
    with pytest.raises(ValueError, match="mode"):
        RequestScorer(_model(), "cpu").score(_requests(1), mode="rows")
    assert MODES == ("request_level", "per_candidate")


# ---- bad input --------------------------------------------------------------------------
def _bad(change):
    reqs = _requests(3)
    req = copy.deepcopy(reqs[1])
    change(req)
    reqs[1] = req
    return reqs


BAD_INPUTS = {
    "no candidates": (lambda r: setattr(r, "item_id", []) or setattr(r, "item_category", [])
                      or setattr(r, "item_dense", []), r"request 1 \(request_id 'r1'\): no candidates"),
    "category length": (lambda r: setattr(r, "item_category", r.item_category[:-1] or [1, 2]),
                        "candidate_item_category values for .* candidates"),
    "dense length": (lambda r: setattr(r, "item_dense", r.item_dense[:-1] or [[0.0] * 4] * 3),
                     "candidate_item_dense must be .* candidates x 4 floats"),
    "dense width": (lambda r: setattr(r, "item_dense", [row[:3] for row in r.item_dense]),
                    "candidate_item_dense must be"),
    "history is a string": (lambda r: setattr(r, "history", "1,2,3"), "user_history must be a list of numbers"),
    "string in history": (lambda r: setattr(r, "history", [1, "x"]), "user_history must be a list of numbers"),
    "float item ids": (lambda r: setattr(r, "item_id", [0.5] * len(r.item_id)), "candidate_item_id must hold integers"),
    "nested history": (lambda r: setattr(r, "history", [[1, 2], [3, 4]]), "user_history must be a flat list"),
    "history id out of range": (lambda r: setattr(r, "history", [1, TINY.items]), "user_history holds 50, outside 0..49"),
    "negative item id": (lambda r: setattr(r, "item_id", [-1] + r.item_id[1:]), "candidate_item_id holds -1"),
    "category out of range": (lambda r: setattr(r, "item_category", [64] * len(r.item_category)),
                              "candidate_item_category holds 64, outside 0..63"),
    "segment is a float": (lambda r: setattr(r, "user_segment", 1.5), "user_segment must be an integer, got float 1.5"),
    "segment is a string": (lambda r: setattr(r, "user_segment", "3"), "user_segment must be an integer, got str"),
    "segment is a bool": (lambda r: setattr(r, "user_segment", True), "user_segment must be an integer, got bool"),
    "segment missing": (lambda r: setattr(r, "user_segment", float("nan")), "user_segment is missing"),
    "country out of range": (lambda r: setattr(r, "user_country", 64), "user_country is 64, outside 0..63"),
    "user dense length": (lambda r: setattr(r, "user_dense", [0.0] * 7), "user_dense must hold 8 floats"),
    "user dense NaN": (lambda r: setattr(r, "user_dense", [float("nan")] + r.user_dense[1:]),
                       "user_dense holds a NaN or infinite value"),
    "item dense inf": (lambda r: setattr(r, "item_dense", [[float("inf")] * 4] + r.item_dense[1:]),
                       "candidate_item_dense holds a NaN or infinite value"),
    "user dense strings": (lambda r: setattr(r, "user_dense", ["a"] * 8), "user_dense must be a list of numbers"),
    "history None": (lambda r: setattr(r, "history", None), "user_history must be a list of numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_request_raises_a_clear_error(scorer, case):
    change, message = BAD_INPUTS[case]
    with pytest.raises(RequestError, match=message) as info:
        scorer.score(_bad(change))
    assert "request 1 (request_id 'r1')" in str(info.value)


def test_bad_container_and_missing_field(scorer):
    with pytest.raises(RequestError, match="no requests"):
        scorer.score([])
    with pytest.raises(RequestError, match="list of requests"):
        scorer.score(_requests(1)[0])
    with pytest.raises(RequestError, match="request 0 must be a Request"):
        scorer.score([42])
    with pytest.raises(RequestError, match=r"request 0 \(request_id 'x'\): request is missing field 'history'"):
        scorer.score([{"request_id": "x", "user_dense": [0.0] * 8}])


def test_empty_history_scores_finite(scorer):
    req = _requests(1)[0]
    assert req.history == []
    (res,) = scorer.score([req])
    assert torch.isfinite(res.scores).all() and torch.isfinite(res.retrieval_scores).all()


# ---- pyfunc, in process -----------------------------------------------------------------
pd = pytest.importorskip("pandas")


def _frame(reqs):
    return pd.DataFrame([{
        "request_id": r.request_id, "user_history": r.history, "user_dense": r.user_dense,
        "user_segment": r.user_segment, "user_country": r.user_country, "candidate_item_id": r.item_id,
        "candidate_item_category": r.item_category, "candidate_item_dense": r.item_dense} for r in reqs])


@pytest.fixture(scope="module")
def pyfunc_model():
    from reqdedup.serve.pyfunc import RequestLevelModel

    m = RequestLevelModel()
    m.scorer = RequestScorer(_model(), "cpu")
    return m


def test_pyfunc_predict_returns_one_row_per_request(pyfunc_model):
    reqs = _requests(4)
    out = pyfunc_model.predict(None, _frame(reqs))
    assert list(out.columns) == ["request_id", "scores", "retrieval_scores"]
    assert out["request_id"].tolist() == ["r0", "r1", "r2", "r3"]
    expected = pyfunc_model.scorer.score(reqs, mode="per_candidate")
    for row, exp in zip(out.itertuples(), expected):
        torch.testing.assert_close(torch.tensor(row.scores), exp.scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(row.retrieval_scores), exp.retrieval_scores, atol=1e-5, rtol=1e-5)
    no_ids = _frame(reqs).drop(columns=["request_id"])
    assert pyfunc_model.predict(None, no_ids)["request_id"].tolist() == ["0", "1", "2", "3"]


def test_pyfunc_bad_input_is_an_invalid_parameter_error(pyfunc_model):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    def expect(frame, message):
        with pytest.raises(MlflowException, match=message) as info:
            pyfunc_model.predict(None, frame)
        assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
        assert info.value.get_http_status_code() == 400

    reqs = _requests(3)
    expect(_frame(reqs).drop(columns=["user_history"]), r"missing column\(s\) \['user_history'\]")
    expect(_frame(reqs).iloc[:0], "no requests")
    expect("not a frame", "must be a pandas DataFrame")
    expect(_frame(_bad(lambda r: setattr(r, "item_id", []) or setattr(r, "item_category", [])
                       or setattr(r, "item_dense", []))), "no candidates")
    expect(_frame(_bad(lambda r: setattr(r, "item_category", [1] * (len(r.item_id) + 1)))),
           "the candidate lists must have the same length")
    expect(_frame(_bad(lambda r: setattr(r, "user_segment", "a"))), "user_segment must be an integer")


def test_serve_command_runs_mlflow_models_serve_on_localhost(settings):
    import sys
    from pathlib import Path

    from reqdedup.serve.pyfunc import serve_command

    argv, env = serve_command("models:/reqdedup@champion", port=5123, settings=settings)
    assert argv[1:] == ["models", "serve", "-m", "models:/reqdedup@champion", "--env-manager", "local",
                        "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]
    assert env["MLFLOW_TRACKING_URI"] == settings.mlflow_tracking_uri
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)  # uvicorn from this venv


def test_request_schema_and_example_agree():
    from mlflow.types.schema import AnyType, Array

    from reqdedup.serve.pyfunc import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, example_requests, request_schema

    inputs, outputs = request_schema()
    assert set(inputs.input_names()) == set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    assert inputs.required_input_names() == [c for c in inputs.input_names() if c != "request_id"]
    types = dict(zip(inputs.input_names(), inputs.input_types()))
    assert isinstance(types["user_segment"], AnyType) and isinstance(types["candidate_item_dense"], Array)
    assert outputs.input_names() == ["request_id", "scores", "retrieval_scores"]
    scorer = RequestScorer(_model(), "cpu")
    examples = example_requests(items=TINY.items)
    assert len(examples) == 2 and all(r["candidate_item_id"] for r in examples)
    assert len(scorer.score(examples)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_per_candidate_past_2_31_attention_scores_matches_request_level():
    """The H200 crash case: fp32 eval, 600 padded 1,024-token sequences in one forward
    (> 2^31 attention scores), which torch's native MHA fast path mishandled."""
    cfg = ModelConfig(items=100_000, seq_len=1024, d_model=256, n_layers=2, n_heads=4, ff_dim=1024, emb_dim=64)
    torch.manual_seed(0)
    model = RecModel(cfg)
    g = torch.Generator().manual_seed(3)
    reqs = [Request(history=torch.randint(0, cfg.items, (h,), generator=g).tolist(),
                    user_dense=torch.randn(8, generator=g).tolist(), user_segment=1, user_country=2,
                    item_id=torch.randint(0, cfg.items, (300,), generator=g).tolist(),
                    item_category=torch.randint(0, 64, (300,), generator=g).tolist(),
                    item_dense=torch.randn(300, 4, generator=g).tolist())
            for h in (1024, 700)]
    scorer = RequestScorer(model, "cuda", precision="fp32", max_batch_rows=1_000_000)
    per_candidate = scorer.score(reqs, mode="per_candidate")
    torch.cuda.synchronize()
    _assert_same(scorer.score(reqs), per_candidate, atol=1e-3)


@pytest.mark.parametrize("setting,message", [
    ("serve_max_requests_per_call", "3 requests in one call"),
    ("serve_max_candidates_per_request", "candidates"),
    ("serve_max_history", "history ids"),
])
def test_payload_past_a_serving_limit_is_a_400_naming_the_limit(pyfunc_model, monkeypatch, setting, message):
    """Each limit is a setting (REQDEDUP_SERVE_MAX_*); a payload past it is refused before
    scoring with INVALID_PARAMETER_VALUE (HTTP 400), the message naming the limit."""
    from mlflow.exceptions import MlflowException

    from reqdedup.config import get_settings
    from reqdedup.serve.pyfunc import RequestLevelModel, ServeLimits

    reqs = _requests(3)
    observed = {"serve_max_requests_per_call": len(reqs),
                "serve_max_candidates_per_request": max(len(r.item_id) for r in reqs),
                "serve_max_history": max(len(r.history) for r in reqs)}[setting]
    monkeypatch.setenv(f"REQDEDUP_{setting.upper()}", str(observed - 1))
    limited = RequestLevelModel()
    limited.scorer = pyfunc_model.scorer
    limited.limits = ServeLimits.from_settings(get_settings())
    assert getattr(limited.limits, setting.removeprefix("serve_")) == observed - 1
    with pytest.raises(MlflowException, match=f"{message}.*{setting} = {observed - 1}") as info:
        limited.predict(None, _frame(reqs))
    assert info.value.get_http_status_code() == 400 and f"REQDEDUP_{setting.upper()}" in info.value.message
    # at the limit it scores
    monkeypatch.setenv(f"REQDEDUP_{setting.upper()}", str(observed))
    limited.limits = ServeLimits.from_settings(get_settings())
    assert len(limited.predict(None, _frame(reqs))) == len(reqs)


def test_serving_limits_refuse_bad_settings(monkeypatch):
    from reqdedup.config import get_settings
    from reqdedup.errors import InputError

    monkeypatch.setenv("REQDEDUP_SERVE_MAX_REQUESTS_PER_CALL", "0")
    with pytest.raises(InputError, match="serve_max_requests_per_call"):
        get_settings()
