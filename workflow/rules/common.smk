# Helpers shared by every rule: config validation, the study's target list, paths of pulled checkpoints.
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from epd.backbones import backbone_class
from epd.config import TABLE_LABELS, check_study, study_rows
from epd.solvers.learned import parse_peer
from epd.errors import ConfigError
from epd.report.grids import grid_names

min_version("9.0")

validate(config, "../schemas/config.schema.yaml")
try:
    check_study(config)  # runnable solvers, every prompt file / released table / result folder on disk
except ConfigError as e:
    raise WorkflowError(str(e)) from None

RESULTS = "results"
DATA = os.environ.get("EPD_DATA_DIR", "data")
# One study per config file: its resolved config, expected rows and run export live apart from other studies'.
STUDY = config["run"].get("study") or (
    Path(workflow.overwrite_configfiles[-1]).stem if workflow.overwrite_configfiles else "default"
)
STUDY_DIR = f"{RESULTS}/studies/{STUDY}"
RESOLVED_CONFIG = f"{STUDY_DIR}/config.yaml"


def _write_resolved_config():
    """The validated config (defaults filled) for the epd commands; rewritten only when it changes, so its
    mtime never triggers reruns."""
    text = yaml.safe_dump(config, sort_keys=True)
    path = Path(RESOLVED_CONFIG)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


_write_resolved_config()

BACKBONES = list(config["backbones"])


def sec(b):
    return config["backbones"][b]


def bb_class(b):
    """The adapter class of backbone b: its capabilities (trainable, weights_folder, ...) without loading weights."""
    return backbone_class(sec(b)["kind"])


def digest(obj):
    """Short hash of a config subsection: a rule's params, so editing that subsection reruns only its dependants."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def distill_nfes(b):
    return sec(b).get("distill_nfes", sec(b)["nfes"])


def rdpo_nfes(b):
    return sec(b).get("rdpo_nfes", [])


def sample_targets(b):
    """(solver label, nfe) pairs sampled and evaluated for backbone b."""
    return study_rows(sec(b))


def expected_rows():
    return {b: sorted({s for s, _ in sample_targets(b)}) for b in BACKBONES}


def needs_reference(b):
    """The high-NFE reference solve: the RMSE reference, and the image set FID-type metrics compare with."""
    return "rmse_vs_teacher" in sec(b)["metrics"] or fid_vs_reference(b)


def fid_vs_reference(b):
    return "fid_clean" in sec(b)["metrics"]


def all_targets():
    """The report, and every intermediate a user may delete to have exactly it (and what reads it) regenerated:
    Snakemake does not rebuild a missing intermediate whose consumers are up to date unless it is a target."""
    out = ["reports/README.md"]
    out += [f"reports/{b}/table.md" for b in BACKBONES]
    out += [f"reports/{b}/{name}" for b in BACKBONES for name in report_grids(b) + report_plots(b)]
    for b in BACKBONES:
        pairs = sample_targets(b)
        out += [f"{RESULTS}/{b}/samples/{s}/nfe{n}/summary.json" for s, n in pairs]
        out += [f"{RESULTS}/{b}/eval/{s}/nfe{n}/summary.json" for s, n in pairs]
        out += [table_for(b, s, n) for s, n in pairs if s in TABLE_LABELS]
        out += [peer_file(b, s, n) for s, n in pairs if is_peer(b, s)]
    return out


# ------------------------------------------------------------------------ checkpoints: pulled (DVC) or produced
def pulled(path):
    """A DVC-pulled copy under data/checkpoints/ if present; marked ancient so fresh mtimes from `dvc pull`
    never trigger reruns."""
    p = Path(DATA) / "checkpoints" / path
    return ancient(str(p)) if p.exists() else None


def backbone_dir(b):
    if not bb_class(b).trainable:
        return f"{RESULTS}/{b}/backbone"
    p = Path(DATA) / "checkpoints" / b / "backbone" / "model.safetensors"
    return str(p.parent) if p.exists() else f"{RESULTS}/{b}/backbone"


def backbone_input(wildcards):
    b = wildcards.b
    if not bb_class(b).trainable:
        return f"{RESULTS}/{b}/backbone/weights.json"
    return pulled(f"{b}/backbone/model.safetensors") or f"{RESULTS}/{b}/backbone/model.safetensors"


def weights_flag(b):
    return f"--weights {backbone_dir(b)}" if bb_class(b).weights_folder else ""


def distilled_table(b, nfe):
    return pulled(f"{b}/distill/nfe{nfe}/table.safetensors") or f"{RESULTS}/{b}/distill/nfe{nfe}/table.safetensors"


def rdpo_table(b, nfe):
    return pulled(f"{b}/rdpo/nfe{nfe}/table_best.safetensors") or f"{RESULTS}/{b}/rdpo/nfe{nfe}/table_best.safetensors"


def table_for(b, s, nfe):
    """The EPD table a study row samples with (``s`` in TABLE_LABELS), pulled or produced."""
    return distilled_table(b, nfe) if s == "epd_distilled" else rdpo_table(b, nfe)


def peer_file(b, s, nfe):
    """What a learned-peer row samples with: an AMED table or a learned grid (``epd peer ...``)."""
    name = "table.safetensors" if parse_peer(s)[0] == "amed" else "grid.json"
    return f"{RESULTS}/{b}/peers/{s}/nfe{nfe}/{name}"


def is_peer(b, s):
    return s in (sec(b).get("peers") or {}).get("solvers", [])


def sample_inputs(wildcards):
    b, s, n = wildcards.b, wildcards.solver, wildcards.nfe
    ins = {"backbone": backbone_input(wildcards)}
    if s in TABLE_LABELS:
        ins["table"] = table_for(b, s, n)
    if is_peer(b, s):
        ins["peer"] = peer_file(b, s, n)
    return ins


def sample_args(wildcards, input):
    b, s, n = wildcards.b, wildcards.solver, wildcards.nfe
    if s in TABLE_LABELS:
        return f"--solver epd --predictor_path {input.table}"
    if s.startswith("released_"):
        return f"--solver epd --predictor_path {sec(b)['predictors'][s[len('released_'):]]}"
    if is_peer(b, s):
        return f"--solver {s} --predictor_path {input.peer}" if parse_peer(s)[0] == "amed" else f"--sigmas {input.peer}"
    return f"--solver {s} --nfe {n}"


def sample_gpus(wildcards, gpus):
    """`epd sample` over a job's GPUs (a cluster profile's per-rule `gpu` count): an EPD table's K points of each
    step on different GPUs (point-parallel), a baseline solver's seeds sharded; one GPU or none adds nothing."""
    if gpus <= 1:
        return ""
    mode = "points" if wildcards.solver in TABLE_LABELS or wildcards.solver.startswith("released_") else "seeds"
    return f"--gpus {gpus} --parallel {mode}"


def report_grids(b):
    """The sample grids the report writes for backbone b: one per sampled NFE, and the overview (released tables'
    NFEs are known only from their files, so their grids are written but not declared)."""
    return grid_names(n for _, n in sample_targets(b) if int(n) > 0)


def report_plots(b):
    """The plots the report surely writes for backbone b: metric vs NFE always; the Stage-1 loss and learned tables
    when this workflow produces a distilled table (not pulled); the RDPO curves when it produces an RDPO table."""
    rdpo_made = [n for n in rdpo_nfes(b) if not pulled(f"{b}/rdpo/nfe{n}/table_best.safetensors")]
    distill_used = {n for s, n in sample_targets(b) if s == "epd_distilled"} | set(rdpo_made)
    out = ["metric_vs_nfe.png"]
    if any(not pulled(f"{b}/distill/nfe{n}/table.safetensors") for n in distill_used):
        out += ["distill_loss.png", "epd_tables.png"]
    if rdpo_made:
        out.append("rdpo_curves.png")
    return out


def eval_inputs(wildcards):
    ins = {"samples": f"{RESULTS}/{wildcards.b}/samples/{wildcards.solver}/nfe{wildcards.nfe}/summary.json"}
    if needs_reference(wildcards.b):
        ins["reference"] = f"{RESULTS}/{wildcards.b}/samples/reference/summary.json"
    return ins


def all_evaluations(wildcards=None):
    return [f"{RESULTS}/{b}/eval/{s}/nfe{n}/summary.json" for b in BACKBONES for s, n in sample_targets(b)]


wildcard_constraints:
    b="|".join(BACKBONES),
    solver="[a-z0-9_]+",
    nfe=r"\d+",


# Every job: the `epd` of the Python running Snakemake (so `.venv/bin/snakemake` works without activation),
# offline hub, MLflow on the configured store, one torch thread budget.
shell.prefix(
    f"set -euo pipefail; export PATH={Path(sys.executable).parent}:$PATH; "
    + (f"export EPD_WEIGHTS_DIR={Path(config['run']['weights_dir']).resolve()}; " if config["run"].get("weights_dir") else "")
    + "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 "
    f"MLFLOW_TRACKING_URI={config['run']['tracking_uri']} OMP_NUM_THREADS={config['run']['threads']} "
    f"EPD_THREADS={config['run']['threads']}; "
)
