"""Errors a user can act on.

- ``InputError``: bad input data or configuration. The CLI prints it as one line and exits
  with status 2; a DAG task fails at once, without retries (retrying cannot fix it).
- ``ServiceUnavailableError``: a service the command needs (the MLflow tracking store) cannot
  be reached right now: connection refused, a timeout, a locked database. The CLI prints
  it as one line and exits with status 75 (``EX_TEMPFAIL`` of sysexits.h); a DAG task lets
  Airflow retry it.
"""

EX_USAGE_INPUT = 2  # the CLI's exit status for InputError (argparse's too)
EX_TEMPFAIL = 75  # sysexits.h: temporary failure, the caller is invited to retry


class InputError(ValueError):
    """Bad input data or configuration (names the file or setting and the failed check)."""


class ServiceUnavailableError(RuntimeError):
    """A service needed now cannot be reached (names the service and the cause): retriable."""


class NonFiniteScoresError(ValueError):
    """A model produced NaN or infinite scores: they never reach the metrics or the gate."""
