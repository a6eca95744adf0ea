#!/usr/bin/env bash
# Headless Chromium for tests/test_browser.py (called by scripts/setup.sh), idempotent and quiet:
# nothing to do where a chromium is on PATH; else Debian's `chromium` through apt-get when this
# is root or has password-less sudo. Otherwise (or if the install fails) one line says why,
# the reason goes to the file given as $1, and the browser test skips with it.
set -uo pipefail
missing=${1:?usage: setup_chromium.sh REASON_FILE}
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  rm -f "$missing"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
fi
if ! command -v apt-get >/dev/null; then
  why="chromium not installed and no apt-get here: install a Chromium and put it on PATH"
elif [ "$(id -u)" != 0 ] && [ -z "$sudo" ]; then
  why="chromium not installed and not root (no password-less sudo): run 'apt-get install -y chromium' as root"
else
  echo "[setup] installing Debian's chromium (for tests/test_browser.py)"
  if $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
      && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
      && command -v chromium >/dev/null; then
    why=""
  else
    why="chromium not installed: 'apt-get install -y chromium' failed (its output is above)"
  fi
fi
if [ -n "$why" ]; then
  echo "[setup] $why; tests/test_browser.py will skip" >&2
  echo "$why" > "$missing"
else
  rm -f "$missing"
fi
exit 0
