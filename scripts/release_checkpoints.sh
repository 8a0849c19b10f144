#!/usr/bin/env bash
# Release a finished study's checkpoints through DVC: copy what a user would pull instead of recompute (trained
# backbone + classifier, distilled tables, RDPO best tables) under data/checkpoints/<backbone>/, then
# `dvc add data` and `dvc push` to the in-repo file remote (.dvc/store). Commit data.dvc and .dvc/store after.
#   bash scripts/release_checkpoints.sh [backbone]      (default: digits)
set -euo pipefail
cd "$(dirname "$0")/.."
b="${1:-digits}"
src="results/$b"
dst="data/checkpoints/$b"
[ -f "$src/backbone/model.safetensors" ] || { echo "no finished study under $src: run snakemake --cores all first" >&2; exit 2; }
rm -rf "$dst.tmp" && mkdir -p "$dst.tmp/backbone"
cp "$src"/backbone/{model,classifier}.{safetensors,json} "$dst.tmp/backbone/"
for d in "$src"/distill/nfe*/; do
  n=$(basename "$d"); mkdir -p "$dst.tmp/distill/$n"; cp "$d"/table.{safetensors,json} "$dst.tmp/distill/$n/"
done
for d in "$src"/rdpo/nfe*/; do
  n=$(basename "$d"); mkdir -p "$dst.tmp/rdpo/$n"; cp "$d"/table_best.{safetensors,json} "$d/summary.json" "$dst.tmp/rdpo/$n/"
done
rm -rf "$dst" && mv "$dst.tmp" "$dst"
export DVC_NO_ANALYTICS=1
.venv/bin/dvc add data
.venv/bin/dvc push
echo "released $dst; now: git add data.dvc .dvc/store && git commit"
