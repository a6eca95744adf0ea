"""The request-level scorer as an MLflow pyfunc model, and the helper that logs it.

Input: a pandas DataFrame with ONE ROW PER REQUEST (the user block once, the candidates as
lists):

=========================  =====================  ==============================================
column                     type                   meaning
=========================  =====================  ==============================================
request_id                 string, optional       echoed back (default: the row position)
user_history               list[int]              raw item ids, oldest first (may be empty)
user_dense                 list[float], 8         user dense features
user_segment               int, 0..15            (signature type Any: see request_schema)
user_country               int, 0..63            (signature type Any)
candidate_item_id          list[int], n >= 1      raw item ids of the candidates
candidate_item_category    list[int], n           0..63
candidate_item_dense       list[list[float]]      n x 4 (nested; a flat list of 4n also works)
=========================  =====================  ==============================================

Output: a DataFrame with one row per request: ``request_id``, ``scores`` (engagement
probability per candidate, in candidate order) and ``retrieval_scores`` (user . item dot
product per candidate).

Bad input (a missing column, a request without candidates, candidate lists of different
lengths, wrong types, out-of-range ids, NaN features) raises
``MlflowException(..., error_code=INVALID_PARAMETER_VALUE)``, which MLflow's scoring server
answers with HTTP 400 and the message; nothing is scored.

Payload limits (settings ``serve_max_requests_per_call``, ``serve_max_candidates_per_request``,
``serve_max_history``, env ``REQDEDUP_SERVE_MAX_*``): a call past one is refused before any
request is built or scored, with ``MlflowException(error_code=INVALID_PARAMETER_VALUE)`` ->
HTTP 400 and a message naming the limit, its value and its variable. (MLflow's error codes map
to no 413, so the status is 400, as for every other refused payload.)

Served by MLflow's own server::

    mlflow models serve -m models:/reqdedup@champion --env-manager local --host 127.0.0.1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from reqdedup.contract import ITEM_DENSE_DIM, NUM_CATEGORIES, NUM_COUNTRIES, NUM_SEGMENTS, USER_DENSE_DIM

CHECKPOINT_ARTIFACT = "checkpoint"
DEVICE_ENV = "REQDEDUP_SERVE_DEVICE"  # overrides the logged model_config "device" at load time
REQUIRED_COLUMNS = ("user_history", "user_dense", "user_segment", "user_country",
                    "candidate_item_id", "candidate_item_category", "candidate_item_dense")
OPTIONAL_COLUMNS = ("request_id",)
DEFAULT_MODEL_CONFIG = {"device": "auto", "precision": "fp32", "max_batch_requests": 256,
                        "max_batch_rows": 262_144}
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/reqdedup, shipped as code_paths


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _resolve_device(name: str) -> str:
    import torch

    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MlflowException(f"serving device {name!r} requested but CUDA is not available")
    return name


@dataclass(frozen=True)
class ServeLimits:
    max_requests_per_call: int
    max_candidates_per_request: int
    max_history: int

    @classmethod
    def from_settings(cls, settings) -> "ServeLimits":
        return cls(settings.serve_max_requests_per_call, settings.serve_max_candidates_per_request,
                   settings.serve_max_history)


def _length(value: Any) -> int:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return 0  # not a list: the request's own checks name it
    return len(value)


def check_limits(model_input, limits: ServeLimits) -> None:
    """MlflowException (HTTP 400) naming the limit when the frame is past one."""
    def refuse(what: str, got: int, setting: str, limit: int, where: str = "") -> MlflowException:
        return _invalid(f"payload too large: {where}{got} {what}, past the limit {setting} = {limit} "
                        f"(REQDEDUP_{setting.upper()}); split the call or raise the limit")

    if len(model_input) > limits.max_requests_per_call:
        raise refuse("requests in one call", len(model_input), "serve_max_requests_per_call",
                     limits.max_requests_per_call)
    for column, setting, limit, what in (
            ("candidate_item_id", "serve_max_candidates_per_request", limits.max_candidates_per_request, "candidates"),
            ("user_history", "serve_max_history", limits.max_history, "history ids")):
        lengths = [_length(v) for v in model_input[column]]
        over = [i for i, n in enumerate(lengths) if n > limit]
        if over:
            i = over[0]
            rid = model_input["request_id"].iloc[i] if "request_id" in model_input.columns else i
            raise refuse(what, lengths[i], setting, limit, f"request {i} (request_id {rid!r}) has ")


def dataframe_to_requests(model_input: Any, limits: ServeLimits | None = None) -> list:
    """Turn the request-level DataFrame into `Request`s; MlflowException on a malformed frame
    or one past the `limits`."""
    import pandas as pd

    from reqdedup.serve.scorer import Request

    if isinstance(model_input, dict):
        try:
            model_input = pd.DataFrame(model_input)
        except ValueError as e:
            raise _invalid(f"input must be a DataFrame with one row per request: {e}") from None
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise _invalid(f"input must be a pandas DataFrame with one row per request, got {type(model_input).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in model_input.columns]
    if missing:
        raise _invalid(f"input is missing column(s) {missing}; a request-level row needs "
                       f"{list(REQUIRED_COLUMNS)} (request_id optional)")
    if len(model_input) == 0:
        raise _invalid("input holds no requests (0 rows)")
    if limits is not None:
        check_limits(model_input, limits)
    has_id = "request_id" in model_input.columns
    requests = []
    for pos, row in enumerate(model_input.itertuples(index=False)):
        rid = getattr(row, "request_id") if has_id else None
        if rid is None or (isinstance(rid, float) and rid != rid):  # missing -> the row position
            rid = str(pos)
        requests.append(Request(
            history=row.user_history, user_dense=row.user_dense, user_segment=row.user_segment,
            user_country=row.user_country, item_id=row.candidate_item_id,
            item_category=row.candidate_item_category, item_dense=row.candidate_item_dense,
            request_id=str(rid), user_id=getattr(row, "user_id", None)))
    return requests


class RequestLevelModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of `RequestScorer`: one DataFrame row per request, scores per candidate."""

    def load_context(self, context) -> None:
        from reqdedup.config import get_settings
        from reqdedup.serve.scorer import RequestScorer, load_model

        self.limits = ServeLimits.from_settings(get_settings())
        cfg = dict(DEFAULT_MODEL_CONFIG)
        cfg.update(getattr(context, "model_config", None) or {})
        device = _resolve_device(os.environ.get(DEVICE_ENV) or str(cfg["device"]))
        model = load_model(context.artifacts[CHECKPOINT_ARTIFACT])
        self.scorer = RequestScorer(model, device, precision=str(cfg["precision"]),
                                    max_batch_requests=int(cfg["max_batch_requests"]),
                                    max_batch_rows=int(cfg["max_batch_rows"]),
                                    context_cache_requests=get_settings().serve_context_cache_requests)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from reqdedup.serve.scorer import RequestError

        if getattr(self, "limits", None) is None:  # built without load_context (tests, direct use)
            from reqdedup.config import get_settings

            self.limits = ServeLimits.from_settings(get_settings())
        requests = dataframe_to_requests(model_input, self.limits)
        try:
            results = self.scorer.score(requests)
        except RequestError as e:
            raise _invalid(str(e)) from None
        return pd.DataFrame({
            "request_id": [r.request_id for r in requests],
            "scores": [res.scores.tolist() for res in results],
            "retrieval_scores": [res.retrieval_scores.tolist() for res in results],
        })


# ---- logging -----------------------------------------------------------------------------
def request_schema():
    """The input and output `Schema` of the request-level model (Array types, nested dense)."""
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.string, "request_id", required=False),
        ColSpec(Array(DataType.long), "user_history"),
        ColSpec(Array(DataType.double), "user_dense"),
        # Any, not long: for a long column MLflow's JSON parser casts 1.5 to 1 before the model
        # sees it (a silently wrong score); as Any the value reaches the model's own check.
        ColSpec(AnyType(), "user_segment"),
        ColSpec(AnyType(), "user_country"),
        ColSpec(Array(DataType.long), "candidate_item_id"),
        ColSpec(Array(DataType.long), "candidate_item_category"),
        ColSpec(Array(Array(DataType.double)), "candidate_item_dense"),
    ])
    outputs = Schema([
        ColSpec(DataType.string, "request_id"),
        ColSpec(Array(DataType.double), "scores"),
        ColSpec(Array(DataType.double), "retrieval_scores"),
    ])
    return inputs, outputs


def example_requests(items: int = 100, history: int = 6, candidates: tuple[int, ...] = (3, 2)) -> list[dict]:
    """Small valid request-level records (the logged input example; also handy in docs/tests)."""
    out = []
    for r, n in enumerate(candidates):
        out.append({
            "request_id": f"example-{r}",
            "user_history": [(7 * r + 3 * k) % items for k in range(history)],
            "user_dense": [round(0.1 * (k - 4) + 0.05 * r, 3) for k in range(USER_DENSE_DIM)],
            "user_segment": r % NUM_SEGMENTS,
            "user_country": (5 + r) % NUM_COUNTRIES,
            "candidate_item_id": [(11 * r + 13 * k + 1) % items for k in range(n)],
            "candidate_item_category": [(r + k) % NUM_CATEGORIES for k in range(n)],
            "candidate_item_dense": [[round(0.25 * (k + j) - 0.5, 3) for j in range(ITEM_DENSE_DIM)] for k in range(n)],
        })
    return out


def pinned_requirements() -> list[str]:
    """torch / mlflow / pandas pinned to the versions installed here (local tag dropped)."""
    import pandas
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"pandas=={pandas.__version__}"]


def log_request_model(checkpoint_path, *, name: str = "model", registered_model_name: str | None = None,
                      extra_pip_requirements: list[str] | None = None):
    """Log the request-level pyfunc for `checkpoint_path` (a `model.pt`) in the ACTIVE run.

    The checkpoint is an artifact of the model, `src/reqdedup` travels as code_paths (so the
    served model imports `reqdedup` with no install), the signature is `request_schema()`, the
    input example two small requests, and the pip requirements pin torch, mlflow and pandas.
    With `registered_model_name` the model is also registered (a new version). Returns the
    `mlflow.models.model.ModelInfo`.
    """
    import pandas as pd

    from reqdedup.serve.scorer import load_model

    if mlflow.active_run() is None:
        raise MlflowException("log_request_model needs an active MLflow run (mlflow.start_run())")
    path = Path(checkpoint_path)
    if not path.is_file():
        raise MlflowException(f"checkpoint {path} does not exist", error_code=INVALID_PARAMETER_VALUE)
    model = load_model(str(path))  # fails early on a file that is not a reqdedup checkpoint
    inputs, outputs = request_schema()
    example = pd.DataFrame(example_requests(items=model.cfg.items))
    del model
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=RequestLevelModel(),
        artifacts={CHECKPOINT_ARTIFACT: str(path)},
        code_paths=[str(PACKAGE_DIR)],
        signature=mlflow.models.ModelSignature(inputs=inputs, outputs=outputs),
        input_example=example,
        pip_requirements=pinned_requirements() + list(extra_pip_requirements or []),
        model_config=dict(DEFAULT_MODEL_CONFIG),
        registered_model_name=registered_model_name,
    )


# ---- serving -----------------------------------------------------------------------------
def serve_command(model_uri: str, *, host: str = "127.0.0.1", port: int = 5001, workers: int = 1,
                  settings=None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of `mlflow models serve` for `model_uri` with the local environment.

    The env points MLflow at the settings' tracking store (so `models:/name@alias` resolves)
    and puts this interpreter's bin folder first on PATH (`mlflow models serve` execs
    `uvicorn` from PATH).
    """
    import sys

    from reqdedup.config import get_settings

    settings = settings or get_settings()
    bin_dir = Path(sys.executable).parent
    mlflow_bin = bin_dir / "mlflow"
    argv = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", host, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return argv, env
