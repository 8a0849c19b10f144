#!/usr/bin/env bash
# Quick start: install (scripts/setup.sh) and run the whole default study on the embedded digits backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$(pwd)/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 MPLBACKEND=Agg
snakemake --cores all "$@"
echo "done: tables and plots in reports/ (start with reports/README.md)"
