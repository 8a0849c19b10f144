#!/usr/bin/env bash
# Create .venv with the tested pin set (torch/torchvision first, from the local wheels where pip finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
