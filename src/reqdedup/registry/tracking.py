"""MLflow tracking set-up shared by training, evaluation and registration."""

from __future__ import annotations

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError


def init_tracking(settings: Settings | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the settings' store; create the experiment with its artifact root
    under the home folder (the SQLite store's default root would be ./mlruns of the CWD).
    Returns the experiment id."""
    import os

    # Fail in seconds, not minutes of retries, when a tracking server is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    settings = settings or get_settings()
    name = experiment or settings.mlflow_experiment
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
            exp_id = mlflow.create_experiment(name, artifact_location=settings.mlflow_artifacts_dir.as_uri())
        else:
            exp_id = found.experiment_id
    except Exception as e:  # connection refused, bad URI, locked store...
        raise InputError(f"MLflow tracking store {settings.mlflow_tracking_uri} cannot be reached: {e}") from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
