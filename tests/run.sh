#!/usr/bin/env bash
# Everything needed on a fresh machine, then lint and the whole test suite: `bash tests/run.sh [pytest args]`.
# Creates a virtual environment with the pinned CPU stack (cached per requirements) and installs
# Debian's chromium for the browser tests if it is missing.
# Without arguments (as CI runs it) `ruff check` and `ruff format --check` run first; with pytest arguments
# (a developer's quick run, e.g. `bash tests/run.sh -m unit`) only pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# One environment per set of requirements, kept between runs (and between clones, as CI makes):
# a fresh machine installs once, later runs start at once.
REQ_HASH=$(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-12)
VENV=${PHOTOMAKER_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/photomaker/test-venv-$REQ_HASH}
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
    touch "$VENV/.complete"
fi

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if [ $# -eq 0 ]; then
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
fi

exec "$VENV/bin/python" -m pytest "$@"
