#!/usr/bin/env bash
# Everything needed on a fresh machine, then the whole test suite: `bash tests/run.sh [pytest args]`.
# Creates .venv, installs the pinned CPU stack, installs Debian's chromium for the browser tests if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

exec .venv/bin/python -m pytest "$@"
