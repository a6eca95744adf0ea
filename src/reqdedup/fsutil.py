"""Folder writes that readers never see half done: build in a temp folder, then rename."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir_atomically(tmp: Path, target: Path) -> None:
    """Move a finished temp folder into place, replacing ``target`` (rename, then delete old)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_dir_for(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp
