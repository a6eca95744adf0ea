"""MLflow tracking set-up shared by training, evaluation and registration, and the one place
that tells an MLflow outage (retriable) from a misconfigured store (not retriable).

- an unreachable store (connection refused or reset, a timeout, a DNS failure, HTTP 429/502/
  503/504, a locked SQLite database) -> ``ServiceUnavailableError`` (CLI exit 75, Airflow
  retries the task);
- a misconfigured URI (an unknown scheme, an http URI without a host, a missing database
  driver) or any other failure to open the store -> ``InputError`` (CLI exit 2, no retry).
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlparse

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError, ServiceUnavailableError

# The schemes MLflow 3 has tracking stores for ('' and 'file' are local paths).
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")
_TRANSIENT_MARKERS = ("connection refused", "connection reset", "connection aborted", "timed out", "timeout",
                      "database is locked", "temporarily unavailable", "service unavailable", "bad gateway",
                      "gateway timeout", "too many requests", "too many 429 error responses",
                      "too many 502 error responses", "too many 503 error responses", "too many 504 error responses",
                      "name or service not known", "temporary failure in name resolution", "failed to resolve")
_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")


def check_tracking_uri(uri: str) -> str:
    """The settings' tracking URI, or InputError naming REQDEDUP_MLFLOW_TRACKING_URI and the check."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter: a local path
        scheme = ""
    if scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise InputError(f"setting mlflow_tracking_uri (REQDEDUP_MLFLOW_TRACKING_URI) = {uri!r}: unsupported "
                         f"scheme {parsed.scheme!r}; use one of {[s for s in TRACKING_SCHEMES if s]} or a path")
    if scheme in ("http", "https") and not parsed.hostname:
        raise InputError(f"setting mlflow_tracking_uri (REQDEDUP_MLFLOW_TRACKING_URI) = {uri!r}: "
                         f"an {scheme} URI needs a host (http://host:port)")
    return uri


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
    """Whether an exception from MLflow's client says the store is unreachable right now."""
    for c in _chain(e):
        if isinstance(c, (ConnectionError, TimeoutError)):  # refused/reset/aborted, socket timeouts
            return True
        mod = type(c).__module__ or ""
        name = type(c).__name__
        if mod.startswith("requests") and name in ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout"):
            return True
        if mod.startswith("urllib3") and name in ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                                  "ProtocolError", "NameResolutionError"):
            return True
        if str(getattr(c, "error_code", "")) in _TRANSIENT_CODES:
            return True
        text = str(c).lower()
        if mod.startswith("sqlalchemy") and "database is locked" in text:
            return True
        if any(m in text for m in _TRANSIENT_MARKERS):
            return True
    return False


def classify(e: BaseException, uri: str, doing: str) -> Exception:
    """The error to raise for a failed MLflow call: ServiceUnavailableError or InputError."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if is_transient(e):
        return ServiceUnavailableError(f"MLflow tracking store {uri} is unavailable while {doing} "
                                       f"(a retry may succeed): {first}")
    return InputError(f"MLflow tracking store {uri} cannot be used while {doing} (check "
                      f"REQDEDUP_MLFLOW_TRACKING_URI): {type(e).__name__}: {first}")


@contextlib.contextmanager
def transient_as_unavailable(uri: str, doing: str):
    """Inside: an MLflow outage becomes ServiceUnavailableError; every other error is raised as
    it is (never swallowed, never turned into a result)."""
    try:
        yield
    except (InputError, ServiceUnavailableError):
        raise
    except Exception as e:
        if is_transient(e):
            raise classify(e, uri, doing) from e
        raise


def init_tracking(settings: Settings | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the settings' store; create the experiment with its artifact root
    under the home folder (the SQLite store's default root would be ./mlruns of the CWD).
    Returns the experiment id. ServiceUnavailableError when the store is unreachable now,
    InputError when it is misconfigured (see the module doc)."""
    import os

    # Fail in seconds, not minutes of retries, when a tracking server is down: the retry is
    # Airflow's (ServiceUnavailableError -> exit 75 -> task retry with backoff).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    settings = settings or get_settings()
    uri = check_tracking_uri(settings.mlflow_tracking_uri)
    name = experiment or settings.mlflow_experiment
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
                # a tracking server: its own artifact root (served with --serve-artifacts)
                exp_id = mlflow.create_experiment(name)
            else:
                settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
                exp_id = mlflow.create_experiment(name, artifact_location=settings.mlflow_artifacts_dir.as_uri())
        else:
            exp_id = found.experiment_id
    except Exception as e:  # connection refused, bad URI, locked store...
        raise classify(e, uri, f"opening experiment {name!r}") from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
