"""Typed handoffs between stages: a command's result JSON at a path it is given.

Every pipeline stage of the CLI takes ``--result PATH`` and writes its result there with
:func:`write_result` (a temp file in the same folder, fsync, then ``os.replace``: a reader
sees the whole previous file, the whole new one, or none, never a half-written one). The
Airflow tasks read it back with :func:`read_result` instead of parsing the command's stdout.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from reqdedup.errors import InputError


def write_result(path: str | Path, result: dict) -> Path:
    """Write ``result`` (a JSON object) to ``path`` atomically; returns the path."""
    if not isinstance(result, dict):
        raise TypeError(f"a stage result is a JSON object, not {type(result).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_result(path: str | Path) -> dict:
    """The result JSON object at ``path``; InputError naming the file and the check."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no stage result (the file does not exist)")
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: the stage result is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: the stage result is a JSON {type(value).__name__}, not an object")
    return value
