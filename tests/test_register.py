"""`reqdedup register` refusals and idempotence without training (fast): a missing or failed
evaluation never registers, an unreachable MLflow store is a clear error, and an evaluation
that already has a registered version is a no-op. The full path (train, log the pyfunc,
aliases) is in tests/test_evaluate.py."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from reqdedup.cli import main as cli_main
from reqdedup.errors import EX_TEMPFAIL, InputError, ServiceUnavailableError
from reqdedup.registry.register import CHALLENGER, CHAMPION, TAG_COMPLETE, TAG_EVALUATION, register


def _summary(tmp_path, status="succeeded", **extra):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not used")
    runs = [{"config": c, "seed": s, "model_path": str(ckpt), "mlflow_run_id": None,
             "metrics": {"auc": 0.7, "recall@10": 0.3}} for c in ("iid", "sorted_fixed") for s in (0, 1)]
    summary = {"status": status, "evaluation_id": "ev-test123", "eval_set_id": "es-x", "parent_run_id": None,
               "config": {"configs": ["iid", "sorted_fixed"], "seeds": [0, 1], "eval": {"k": 10}, "mlflow": {}},
               "gate": {"tolerance": 0.005, "metrics": ["auc", "recall@10"]},
               "aggregate": {"configs": {c: {"auc": {"mean": 0.7}, "recall@10": {"mean": 0.3}}
                                         for c in ("iid", "sorted_fixed")},
                             # the gate decides on the interval of the change (non-inferior here)
                             "intervals": {"sorted_fixed": {m: {"point": 0.0, "low": -0.001, "high": 0.001,
                                                                "level": 0.95, "n_seeds": 2}
                                                            for m in ("auc", "recall@10")}}},
               "runs": runs, **extra}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def test_missing_summary_is_a_clear_error(settings, tmp_path):
    with pytest.raises(InputError, match="no evaluation summary"):
        register(settings, summary_path=tmp_path / "nope.json")


def test_failed_evaluation_never_registers(settings, tmp_path, capsys):
    path = _summary(tmp_path, status="failed", error="torchrun exited with 1")
    with pytest.raises(InputError, match="never registers"):
        register(settings, summary_path=path)
    assert cli_main(["register", "--summary", str(path)]) == 2
    assert "status 'failed'" in capsys.readouterr().err


def test_incomplete_evaluation_never_registers(settings, tmp_path):
    path = _summary(tmp_path)
    data = json.loads(path.read_text())
    data["runs"] = [r for r in data["runs"] if r["config"] != "sorted_fixed"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="no 'sorted_fixed' runs"):
        register(settings, summary_path=path)


def test_bad_tolerance(settings, tmp_path):
    with pytest.raises(InputError, match="tolerance"):
        register(settings, summary_path=_summary(tmp_path), tolerance=-0.1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_is_retriable(settings, tmp_path, monkeypatch, capsys):
    """Connection refused: a ServiceUnavailableError and CLI exit 75 (EX_TEMPFAIL), which the
    DAG's tasks let Airflow retry; never the InputError (exit 2) of a misconfiguration."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    bad = dataclasses.replace(settings, mlflow_tracking_uri=uri)
    with pytest.raises(ServiceUnavailableError, match="unavailable"):
        register(bad, summary_path=_summary(tmp_path))
    monkeypatch.setenv("REQDEDUP_MLFLOW_TRACKING_URI", uri)
    assert cli_main(["register", "--summary", str(_summary(tmp_path))]) == EX_TEMPFAIL == 75
    assert "unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["foo://bar", "htp://127.0.0.1:5000", "http://"])
def test_misconfigured_mlflow_uri_is_an_input_error(settings, tmp_path, monkeypatch, capsys, uri):
    bad = dataclasses.replace(settings, mlflow_tracking_uri=uri)
    with pytest.raises(InputError, match="REQDEDUP_MLFLOW_TRACKING_URI"):
        register(bad, summary_path=_summary(tmp_path))
    monkeypatch.setenv("REQDEDUP_MLFLOW_TRACKING_URI", uri)
    assert cli_main(["register", "--summary", str(_summary(tmp_path))]) == 2


def test_outage_classification():
    """The chain MLflow's REST client raises for a refused connection, a timeout and a locked
    SQLite store are transient; an unknown scheme and a missing driver are not."""
    import requests
    from mlflow.exceptions import MlflowException

    from reqdedup.registry.tracking import classify, is_transient

    def raised(outer, inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    refused = raised(MlflowException("API request to http://x/api failed"),
                     requests.exceptions.ConnectionError(ConnectionRefusedError(111, "Connection refused")))
    timeout = raised(MlflowException("API request failed"), requests.exceptions.ReadTimeout("read timed out"))
    locked = raised(MlflowException("(sqlite3.OperationalError) database is locked"), RuntimeError("x"))
    assert all(is_transient(e) for e in (refused, timeout, locked, TimeoutError("t"), ConnectionResetError()))
    assert isinstance(classify(refused, "http://x", "testing"), ServiceUnavailableError)
    scheme = MlflowException("got unsupported URI 'foo://bar' for model registry data storage")
    driver = ModuleNotFoundError("No module named 'psycopg'")
    assert not is_transient(scheme) and not is_transient(driver)
    assert isinstance(classify(driver, "postgresql://x", "testing"), InputError)


def test_dag_retries_exit_75_and_fails_fast_on_exit_2():
    """The DAG helper: exit 75 is an ordinary (retried) error, exit 2 an AirflowFailException."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dags"))
    from airflow.sdk.exceptions import AirflowFailException
    from reqdedup_dag_common import run_streaming

    code = "import sys; print('reqdedup register: unavailable: down', file=sys.stderr); sys.exit({})"
    with pytest.raises(ServiceUnavailableError, match="retried") as info:
        run_streaming([sys.executable, "-c", code.format(75)])
    assert not isinstance(info.value, AirflowFailException)
    with pytest.raises(AirflowFailException):
        run_streaming([sys.executable, "-c", code.format(2)])


def test_same_evaluation_twice_is_a_noop(settings, tmp_path):
    """A complete version tagged with the evaluation id exists: register creates nothing."""
    from mlflow import MlflowClient

    from reqdedup.registry.tracking import init_tracking

    s = dataclasses.replace(settings, registered_model="reqdedup_noop_test")
    init_tracking(s)
    client = MlflowClient(s.mlflow_tracking_uri)
    client.create_registered_model(s.registered_model)
    mv = client.create_model_version(s.registered_model, source=str(tmp_path), tags={TAG_EVALUATION: "ev-test123",
                                                                                   TAG_COMPLETE: "true"})
    out = register(s, summary_path=_summary(tmp_path))
    assert out["status"] == "already_registered" and out["version"] == str(mv.version)
    assert len(client.search_model_versions(f"name = '{s.registered_model}'")) == 1


def test_a_version_registered_before_the_complete_tag_is_left_alone(settings, tmp_path):
    """A version of an older register (gate tag, no complete tag): done, its aliases untouched."""
    from mlflow import MlflowClient

    from reqdedup.registry.tracking import init_tracking

    s = dataclasses.replace(settings, registered_model="reqdedup_legacy_test")
    init_tracking(s)
    client = MlflowClient(s.mlflow_tracking_uri)
    client.create_registered_model(s.registered_model)
    old = client.create_model_version(s.registered_model, source=str(tmp_path),
                                      tags={TAG_EVALUATION: "ev-test123", "reqdedup.gate": "promoted"})
    newer = client.create_model_version(s.registered_model, source=str(tmp_path), tags={TAG_EVALUATION: "ev-other"})
    client.set_registered_model_alias(s.registered_model, CHAMPION, newer.version)
    out = register(s, summary_path=_summary(tmp_path))
    assert out["status"] == "already_registered" and out["version"] == str(old.version)
    assert str(client.get_model_version_by_alias(s.registered_model, CHAMPION).version) == str(newer.version)


# ---- complete or resume: a crash between the steps --------------------------------------
class _Crash(RuntimeError):
    pass


@pytest.fixture
def fake_pyfunc(monkeypatch):
    """log_request_model replaced by a tiny pyfunc (the test checkpoint is not a real model):
    what is tested is the registration's steps, not the model."""
    import mlflow

    import reqdedup.serve.pyfunc as pyfunc

    class Tiny(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    calls = []

    def fake(checkpoint_path, *, name="model", registered_model_name=None, **kw):
        assert registered_model_name is None  # the version is created by register, with its tag
        calls.append(checkpoint_path)
        return mlflow.pyfunc.log_model(name=name, python_model=Tiny(), pip_requirements=["mlflow"])

    monkeypatch.setattr(pyfunc, "log_request_model", fake)
    return calls


def _crash_on(monkeypatch, method: str, when=lambda *a, **k: True):
    from mlflow import MlflowClient

    real = getattr(MlflowClient, method)

    def boom(self, *a, **k):
        if when(*a, **k):
            raise _Crash(f"injected crash in {method}")
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, method, boom)


def _model(settings, tag):
    from mlflow import MlflowClient

    s = dataclasses.replace(settings, registered_model=f"reqdedup_resume_{tag}")
    return s, MlflowClient(s.mlflow_tracking_uri)


@pytest.mark.parametrize("method,when", [
    ("set_registered_model_alias", lambda name, alias, version: alias == CHALLENGER),
    ("set_model_version_tag", lambda name, version, key, value: key == "reqdedup.gate"),
    ("set_registered_model_alias", lambda name, alias, version: alias == CHAMPION),
    ("set_model_version_tag", lambda name, version, key, value: key == TAG_COMPLETE),
], ids=["before-challenger", "before-gate-tag", "before-champion", "before-complete"])
def test_crash_after_the_version_is_resumed_not_reported_done(settings, tmp_path, monkeypatch, fake_pyfunc,
                                                              method, when):
    """A crash between creating the version and finishing its tags/aliases: the retry finds
    the version by its evaluation tag, finishes the missing steps, and creates nothing new."""
    s, client = _model(settings, tmp_path.name)
    path = _summary(tmp_path)
    with monkeypatch.context() as m:
        _crash_on(m, method, when)
        with pytest.raises(_Crash):
            register(s, summary_path=path)
    versions = client.search_model_versions(f"name = '{s.registered_model}'")
    assert len(versions) == 1 and TAG_COMPLETE not in versions[0].tags
    out = register(s, summary_path=path)
    assert out["status"] == "registered" and out["resumed"], out
    assert out["version"] == str(versions[0].version) and len(fake_pyfunc) == 1
    assert out["promoted"] and out["aliases"] == [CHALLENGER, CHAMPION], json.dumps(out["decision"])
    mv = client.get_model_version(s.registered_model, out["version"])
    assert mv.tags[TAG_COMPLETE] == "true" and mv.tags["reqdedup.gate"] == "promoted"
    assert len(client.search_model_versions(f"name = '{s.registered_model}'")) == 1
    again = register(s, summary_path=path)
    assert again["status"] == "already_registered" and again["version"] == out["version"]


def test_crash_before_the_version_reuses_the_register_run(settings, tmp_path, monkeypatch, fake_pyfunc):
    """A crash after the model is logged, before the version exists: the retry works in the
    same register run and registers exactly one version."""
    import mlflow

    s, client = _model(settings, tmp_path.name)
    path = _summary(tmp_path)
    with monkeypatch.context() as m:
        def boom(*a, **k):
            raise _Crash("injected crash in register_model")
        m.setattr(mlflow, "register_model", boom)
        with pytest.raises(_Crash):
            register(s, summary_path=path)
    assert client.search_model_versions(f"name = '{s.registered_model}'") == []
    first_run = client.search_runs([mlflow.get_experiment_by_name(s.mlflow_experiment).experiment_id],
                                   filter_string=f"tags.`{TAG_EVALUATION}` = 'ev-test123'",
                                   order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    out = register(s, summary_path=path)
    assert out["status"] == "registered" and out["resumed"] and out["register_run_id"] == first_run
    versions = client.search_model_versions(f"name = '{s.registered_model}'")
    assert [str(v.version) for v in versions] == [out["version"]]
    assert versions[0].run_id == first_run


@pytest.mark.parametrize("error,raised", [
    (lambda: RuntimeError("lookup failed"), RuntimeError),
    (lambda: __import__("requests").exceptions.ConnectionError("Connection refused"), ServiceUnavailableError),
], ids=["error", "outage"])
def test_failed_lookup_never_creates_a_version(settings, tmp_path, monkeypatch, fake_pyfunc, error, raised):
    """The lookup of an earlier registration fails: the error is raised (an outage as
    ServiceUnavailableError), never read as "not registered yet"."""
    from mlflow import MlflowClient

    s, client = _model(settings, tmp_path.name)

    def failing(self, *a, **k):
        raise error()

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "search_model_versions", failing)
        with pytest.raises(raised):
            register(s, summary_path=_summary(tmp_path))
    assert client.search_model_versions(f"name = '{s.registered_model}'") == [] and fake_pyfunc == []
