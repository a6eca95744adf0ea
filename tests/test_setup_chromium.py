"""scripts/setup_chromium.sh (called by scripts/setup.sh, so `make test` on a fresh machine
installs the browser test's Chromium): on a PATH of stubs, so nothing is installed here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_chromium.sh"


def fake_bin(tmp_path: Path, *, apt: bool, chromium: bool = False) -> Path:
    """A PATH with only what the script needs, a recording apt-get that 'installs' a chromium
    stub, and optionally a chromium already there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "rm", "env", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    if apt:
        (bin_dir / "apt-get").write_text(f"#!{shutil.which('bash')}\necho \"$*\" >> {tmp_path}/apt.log\n"
                                         f"if [ \"$1\" = install ]; then printf '#!/bin/sh\\n' > {bin_dir}/chromium; "
                                         f"{shutil.which('chmod')} +x {bin_dir}/chromium; fi\n")
        (bin_dir / "apt-get").chmod(0o755)
    if chromium:
        (bin_dir / "chromium").write_text("#!/bin/sh\n")
        (bin_dir / "chromium").chmod(0o755)
    return bin_dir


def run(tmp_path: Path, bin_dir: Path):
    reason = tmp_path / "missing.txt"
    out = subprocess.run([shutil.which("bash"), str(SCRIPT), str(reason)], env={"PATH": str(bin_dir)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    log = tmp_path / "apt.log"
    return out, (reason.read_text().strip() if reason.exists() else None), \
        (log.read_text().splitlines() if log.exists() else [])


def test_chromium_present_nothing_done(tmp_path):
    (tmp_path / "missing.txt").write_text("old reason")
    out, reason, apt = run(tmp_path, fake_bin(tmp_path, apt=True, chromium=True))
    assert reason is None and apt == [] and out.stdout == ""


def test_no_apt_a_clear_reason_for_the_browser_test(tmp_path):
    out, reason, apt = run(tmp_path, fake_bin(tmp_path, apt=False))
    assert "no apt-get" in reason and "no apt-get" in out.stderr and "test_browser.py will skip" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs as root (the CI container is)")
def test_missing_chromium_installed_through_apt_then_idempotent(tmp_path):
    bin_dir = fake_bin(tmp_path, apt=True)
    out, reason, apt = run(tmp_path, bin_dir)
    assert reason is None, out.stderr
    assert apt[0].startswith("update") and "install -y -qq --no-install-recommends chromium" in apt[1]
    assert (bin_dir / "chromium").exists()
    _, reason, apt_again = run(tmp_path, bin_dir)  # second run: chromium is there, apt untouched
    assert reason is None and apt_again == apt


def test_the_set_up_installs_it_not_ci():
    """`make test` (scripts/setup.sh) does the whole set-up; .ci/run installs nothing itself."""
    assert "scripts/setup_chromium.sh" in (REPO / "scripts" / "setup.sh").read_text()
    assert "apt-get" not in (REPO / ".ci" / "run").read_text()
