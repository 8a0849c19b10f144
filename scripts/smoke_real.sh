#!/usr/bin/env bash
# The real-backbone chain on CPU: tiny random SD1.5 / SD3 / FLUX pipelines and tiny random weights for all six
# scorers and the FID Inception, written by `epd weights fake` where the resolver reads real weights; each study
# runs teacher -> distill -> RDPO -> sample -> evaluate (six metrics + FID) -> report, and its table must hold the
# baseline, distilled and RDPO rows with every metric column.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 MPLBACKEND=Agg
[ -f data/weights-tiny/fake_weights.json ] || .venv/bin/epd weights fake --size tiny --out data/weights-tiny
for fam in sd15 sd3 flux; do
  .venv/bin/snakemake --cores all --configfile "configs/smoke_$fam.yaml"
  .venv/bin/python - "$fam" <<'PY'
import csv, sys
fam = sys.argv[1]
rows = list(csv.DictReader(open(f"reports/smoke_{fam}/table.csv")))
labels = {r["solver"] for r in rows}
need = {"euler", "dpmpp_2m", "epd_distilled", "epd_rdpo"}
cols = ["hps", "pickscore", "imagereward", "clip", "aesthetic", "mps", "fid_clean"]
missing = [c for c in cols if not any(c in k for k in rows[0])]
assert need <= labels, f"smoke_{fam}: rows {sorted(labels)} lack {sorted(need - labels)}"
assert not missing, f"smoke_{fam}: table lacks metric columns {missing}"
print(f"smoke_{fam}: rows {sorted(labels)}, all {len(cols)} metric columns")
PY
done
