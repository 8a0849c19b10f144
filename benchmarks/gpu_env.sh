# Python environment for the lent GPU machine (no network). Source it from the repository root at the start of a
# device command, with `.whl` in the call's carry list:
#     source benchmarks/gpu_env.sh && snakemake --cores 4 --configfile configs/smoke.yaml
# .whl/wheels.tar.xz holds the packages the machine lacks or has at other versions (transformers 4.55.4,
# tokenizers 0.21.4, huggingface-hub 0.36.2, diffusers, open_clip, ImageReward, clip, snakemake, mlflow-skinny + its
# SQLite store, jsonschema; list in .whl/MANIFEST.txt) as wheels in one xz archive. They go to $EPD_SITE (/tmp/site),
# which comes first on PYTHONPATH, so they override the machine's newer transformers/tokenizers/huggingface-hub.
# Any failure exits the calling shell non-zero with a message.

_gpu_env_fail() { echo "gpu_env.sh: $*" >&2; exit 1; }
[ -f epd/cli.py ] || _gpu_env_fail "source this from the repository root"
_py=$(command -v python3) || _gpu_env_fail "no python3 on PATH"
EPD_SITE=${EPD_SITE:-/tmp/site}

# 1. Install once per archive content (a warm machine keeps /tmp/site; the stamp is the archives' checksum).
_stamp=$(cat .whl/*.tar.xz .whl/*.whl 2>/dev/null | md5sum | cut -c1-32 || true)
[ "$_stamp" = d41d8cd98f00b204e9800998ecf8427e ] && _gpu_env_fail "no .whl/*.tar.xz or .whl/*.whl: add .whl to carry"
if [ "$(cat "$EPD_SITE/.gpu_env_stamp" 2>/dev/null)" != "$_stamp" ]; then
    _whl=$(mktemp -d /tmp/whl.XXXXXX)
    for _a in .whl/*.tar.xz; do
        [ -e "$_a" ] || continue
        "$_py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$_a" "$_whl" \
            || _gpu_env_fail "cannot unpack $_a"
    done
    cp .whl/*.whl "$_whl"/ 2>/dev/null || true
    # clip does `from pkg_resources import packaging`: add the carried setuptools<81 only if the machine's has none
    env -u PYTHONPATH "$_py" -W ignore -c 'import pkg_resources' 2>/dev/null && rm -f "$_whl"/setuptools-*.whl
    "$_py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$EPD_SITE" \
        "$_whl"/*.whl || _gpu_env_fail "pip install of the carried wheels failed"
    echo "$_stamp" >"$EPD_SITE/.gpu_env_stamp"
    rm -rf "$_whl"
fi

export PYTHONPATH="$EPD_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true

# 2. Commands the Snakemake rules call: pip wrote $EPD_SITE/bin/snakemake (shebang: this python3); `epd` is the
#    repository's own console script, so a shim runs epd.cli:main.
mkdir -p "$EPD_SITE/bin"
printf '#!/bin/sh\nexec %s -c '\''import sys; sys.argv[0] = "epd"; from epd.cli import main; sys.exit(main())'\'' "$@"\n' \
    "$_py" >"$EPD_SITE/bin/epd"
[ -x "$EPD_SITE/bin/snakemake" ] || printf '#!/bin/sh\nexec %s -m snakemake "$@"\n' "$_py" >"$EPD_SITE/bin/snakemake"
chmod +x "$EPD_SITE/bin/epd" "$EPD_SITE/bin/snakemake"
export PATH="$EPD_SITE/bin:$PATH"

# 3. Every package the pipeline imports must import (a version conflict raises here), then print the versions.
"$_py" -W ignore - <<'EOF' || _gpu_env_fail "an import failed (see above)"
import importlib, sys
bad, ver = [], {}
for m in ["torch", "diffusers", "transformers", "tokenizers", "huggingface_hub", "open_clip", "clip", "ImageReward",
          "snakemake", "mlflow", "sqlalchemy", "alembic", "jsonschema", "epd.cli"]:
    try:
        ver[m] = getattr(importlib.import_module(m), "__version__", "")
    except Exception as e:
        bad.append(f"{m}: {type(e).__name__}: {e}")
if "torch" in ver:
    import torch
    ver["torch"] += f" (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU)"
print(f"gpu_env: python {sys.version.split()[0]}, " + ", ".join(f"{k} {ver[k]}" for k in
      ["torch", "diffusers", "transformers", "tokenizers", "huggingface_hub", "snakemake", "mlflow"] if k in ver))
if bad:
    sys.exit("gpu_env: cannot import\n  " + "\n  ".join(bad))
EOF
unset _py _stamp _whl _a
