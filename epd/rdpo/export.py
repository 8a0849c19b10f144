"""``epd rdpo-export``: turn an RDPO policy checkpoint into an EPD table snapshot (spec §6.8).

The policy mean (Dirichlet means for positions and weights, log-normal means for scales) is sanitised (sorted,
separated by 1e-6) and written as a native snapshot next to two JSON files in the original's layout::

    <output_dir>/network-snapshot-export-stepXXXXXX.{safetensors,json}
    <output_dir>/export-manifest-stepXXXXXX.json          # run_dir, policy_checkpoint, export_step, timestamp,
                                                         # sanitized_rows{reordered, adjusted}, latest_metrics
    <output_dir>/training_options-export-stepXXXXXX.json  # template options, pred_kwargs, export_info

Scales: like the original, a scale is kept only where the template table's range ``s > 0`` and is clamped into
``(1 - s, 1 + s)`` (rough edge §10.4: a head trained on a range-0 template is dropped, and the export says so).
``keep_policy_scales=True`` (``--keep-policy-scales``) writes the policy's scale means unchanged instead.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import re
from pathlib import Path

import torch

from ..errors import ConfigError, EPDError
from ..io import atomic_write_json, load_error_text
from ..legacy import BACKEND_TO_BACKBONE
from ..predictor import load as load_table, save as save_table
from ..table import EPDTable
from .policy import EPDParamPolicy, sanitize_rows

__all__ = ["export_checkpoint", "load_policy_checkpoint", "find_latest_checkpoint", "export_run",
           "pred_kwargs_from_meta", "METRIC_KEYS", "add_arguments", "run"]

log = logging.getLogger(__name__)

METRIC_KEYS = ("step", "mixed_reward_mean", "mixed_reward_std", "kl", "policy_loss", "elapsed_sec")
_CKPT_RE = re.compile(r"policy-step(\d+)\.pt$")
_BACKBONE_TO_BACKEND = {v: k for k, v in BACKEND_TO_BACKBONE.items()}
# Original constructor kwargs of EPD_predictor, in its order (training_options.json ``pred_kwargs``).
_PRED_KWARGS = ("num_steps", "sampler_stu", "sampler_tea", "M", "guidance_type", "guidance_rate", "schedule_rho",
                "schedule_type", "afs", "dataset_name", "scale_dir", "scale_time", "num_points", "fcn", "alpha",
                "max_order", "predict_x0", "lower_order_final", "backend", "backend_config", "img_resolution",
                "sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift")


# ---------------------------------------------------------------------- checkpoints
def load_policy_checkpoint(checkpoint: str | Path | dict) -> tuple[EPDParamPolicy, int | None, str]:
    """Load a policy checkpoint (``torch.load(..., weights_only=True)``, never full unpickling).

    Accepts the original's bare ``state_dict`` or a dict holding it under ``"policy"`` (with an optional
    ``"step"``). Returns ``(policy, step or None, source description)``.
    """
    if isinstance(checkpoint, dict):
        obj, source, step = checkpoint, "policy state dict", None
    else:
        path = Path(checkpoint)
        source = str(path)
        if not path.is_file():
            raise EPDError(f"policy checkpoint {path}: not found")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or disallowed content
            raise EPDError(f"policy checkpoint {path}: unreadable ({load_error_text(e)})") from None
        m = _CKPT_RE.search(path.name)
        step = int(m.group(1)) if m else None
    if isinstance(obj, dict) and isinstance(obj.get("policy"), dict):
        step = obj.get("step", step)
        obj = obj["policy"]
    policy = EPDParamPolicy.from_state_dict(obj, source=f"policy checkpoint {source}")
    return policy, (int(step) if step is not None else None), source


def find_latest_checkpoint(run_dir: Path) -> Path:
    """The ``checkpoints/policy-stepXXXXXX.pt`` with the largest step."""
    cands = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("policy-step*.pt")
             if (m := _CKPT_RE.search(p.name))]
    if not cands:
        raise EPDError(f"run directory {run_dir}: no checkpoints/policy-step*.pt; pass --checkpoint")
    return max(cands)[1]


# ---------------------------------------------------------------------- metadata
def _model_overrides(model_cfg: dict | None) -> dict:
    """Table metadata from a run's ``model`` config section (original key names accepted)."""
    out = {}
    for key, value in (model_cfg or {}).items():
        if value is None:
            continue
        if key == "backend":
            out["backbone"] = BACKEND_TO_BACKBONE.get(value, value)
        elif key == "resolution":
            out["img_resolution"] = value
        elif key in ("backend_options", "backbone_config"):
            out["backbone_config"] = dict(value)
        elif key in ("backbone", "dataset_name", "guidance_type", "guidance_rate", "schedule_type", "schedule_rho",
                     "sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift", "img_resolution", "afs",
                     "num_steps", "num_points"):
            out[key] = value
    return out


def pred_kwargs_from_meta(meta: dict) -> dict:
    """The original ``pred_kwargs`` (``training.networks.EPD_predictor`` constructor) for table metadata."""
    kw = {"class_name": "training.networks.EPD_predictor"}
    for key in _PRED_KWARGS:
        if key == "backend":
            value = _BACKBONE_TO_BACKEND.get(meta.get("backbone"), meta.get("backbone"))
        elif key == "backend_config":
            value = meta.get("backbone_config")
        else:
            value = meta.get(key)
        if value is not None or key in ("guidance_type",):
            kw[key] = value
    return kw


def _export_scales(mean: EPDTable, meta: dict, keep: bool) -> tuple[dict, dict]:
    """Map the policy's scale means through the template's ranges like the original export (see module doc)."""
    out, notes = {}, {}
    for name in ("scale_dir", "scale_time"):
        m = getattr(mean, name)
        if m is None:
            continue
        s = float(meta.get(name) or 0.0)
        if keep:
            out[name], notes[name] = m, "policy mean (unclamped)"
        elif s > 0:
            frac = ((m - (1 - s)) / (2 * s)).clamp(1e-6, 1 - 1e-6)
            out[name], notes[name] = (1 - s) + 2 * s * frac, f"clamped into template range ({1 - s:g}, {1 + s:g})"
        else:
            notes[name] = "dropped: template range is 0 (as the original export does; --keep-policy-scales keeps it)"
            log.warning("%s: policy has a %s head but the template's range is 0; dropping it like the original "
                        "export (use --keep-policy-scales to keep it)", name, name)
    if out.get("scale_dir") is not None and meta.get("fcn"):
        out["scale_dir"][-1] = 1.0
    return out, notes


# ---------------------------------------------------------------------- export
def export_checkpoint(checkpoint, template_table: EPDTable, *, run_dir: str | Path | None = None,
                      model_config: dict | None = None, template_options: dict | None = None,
                      latest_metrics: dict | None = None, step: int | None = None,
                      output_dir: str | Path | None = None, keep_policy_scales: bool = False,
                      timestamp: str | None = None) -> tuple[EPDTable, dict, dict]:
    """Export a policy checkpoint's mean table.

    Args:
        checkpoint (`str`, `Path` or `dict`): ``policy-stepXXXXXX.pt`` or a loaded state dict.
        template_table (:class:`~epd.predictor.EPDTable`): the table the run started from (metadata and scale
            ranges; its shape must match the policy).
        run_dir (`str` or `Path`, *optional*): the RDPO run (recorded in the manifest).
        model_config (`dict`, *optional*): the run's ``model`` config section; non-null values override the
            template's metadata (the original's priority order).
        template_options (`dict`, *optional*): ``training_options.json`` of the template (copied into the options).
        latest_metrics (`dict`, *optional*): last metrics record of the run (``METRIC_KEYS`` are kept).
        step (`int`, *optional*): export step; default from the checkpoint's name or content.
        output_dir (`str` or `Path`, *optional*): if given, write the snapshot, manifest and options there.
        keep_policy_scales (`bool`): keep the policy's scale means instead of the original's range mapping.
        timestamp (`str`, *optional*): UTC ISO time for the manifest (default: now).

    Returns:
        ``(table, manifest, options)``.

    Raises:
        EPDError: unreadable checkpoint, or a policy whose step count / K differ from the template's.
    """
    policy, ckpt_step, source = load_policy_checkpoint(checkpoint)
    step = ckpt_step if step is None else step
    if step is None:
        raise EPDError(f"policy checkpoint {source}: cannot tell the export step (name it policy-stepXXXXXX.pt "
                       "or pass step=)")
    meta = _export_meta(policy, template_table, model_config, source)
    mean = policy.mean_table()
    scales, scale_notes = _export_scales(mean, meta, keep_policy_scales)
    s = sanitize_rows(mean.positions, mean.weights, scales.get("scale_dir"), scales.get("scale_time"))
    run_dir = None if run_dir is None else str(run_dir)
    provenance = {"source": "rdpo-export", "run_dir": run_dir, "policy_checkpoint": source, "export_step": step,
                  "template": template_table.provenance.get("source"), "policy": policy.describe(),
                  "sanitized_rows": {"reordered": s.reordered, "adjusted": s.adjusted}, "scales": scale_notes}
    try:
        table = EPDTable(s.positions, s.weights, s.scale_dir, s.scale_time, meta=meta, provenance=provenance)
    except ConfigError as e:
        raise EPDError(f"policy checkpoint {source}: exported table is invalid ({e})") from None
    sanitized = {"reordered": len(s.reordered), "adjusted": len(s.adjusted)}
    metrics = {k: _finite_or_none(latest_metrics[k]) for k in METRIC_KEYS if latest_metrics and k in latest_metrics}
    manifest = {"run_dir": run_dir, "policy_checkpoint": source, "export_step": step,
                "timestamp": timestamp or _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "sanitized_rows": sanitized, "latest_metrics": metrics}
    options = _export_options(table, template_options, run_dir, source, sanitized, scale_notes)
    if output_dir is not None:
        write_export(table, manifest, options, Path(output_dir), step)
    return table, manifest, options


def _export_meta(policy: EPDParamPolicy, template_table: EPDTable, model_config: dict | None, source: str) -> dict:
    """The exported table's metadata: the template's, overridden by the run's ``model`` section; the policy's
    step count and K must match both."""
    tshape = tuple(template_table.positions.shape)
    pshape = (policy.num_steps - 1, policy.num_points)
    if tshape != pshape:
        raise EPDError(f"policy checkpoint {source}: base_log_alpha_pos has shape "
                       f"{tuple(policy.base_log_alpha_pos.shape)} (N-1={pshape[0]} steps, K={pshape[1]} points) but the template table "
                       f"{template_table.provenance.get('source', '')} has (N-1, K) = {tshape}; export against "
                       "the snapshot the run started from")
    meta = {k: v for k, v in template_table.meta.items() if k not in ("num_steps", "num_points")}
    over = _model_overrides(model_config)
    for key in ("num_steps", "num_points"):
        want = pshape[0] + 1 if key == "num_steps" else pshape[1]
        if over.get(key, want) != want:
            raise EPDError(f"model.{key}: run config says {over[key]} but the policy checkpoint {source} has {want}")
        over.pop(key, None)
    if "backbone_config" in over and isinstance(meta.get("backbone_config"), dict):
        over["backbone_config"] = {**meta["backbone_config"], **over["backbone_config"]}
    meta.update(over)
    return meta


def _export_options(table: EPDTable, template_options: dict | None, run_dir: str | None, source: str,
                    sanitized: dict, scale_notes: dict) -> dict:
    """``training_options-export-stepXXXXXX.json``: the template's options with the exported ``pred_kwargs``."""
    options = copy.deepcopy(template_options) if template_options else {}
    options["pred_kwargs"] = pred_kwargs_from_meta(table.meta)
    options["export_info"] = {"source_run": run_dir, "policy_checkpoint": source,
                              "sanitized_rows": {"reordered_rows": sanitized["reordered"],
                                                 "adjusted_rows": sanitized["adjusted"]}}
    if scale_notes:
        options["export_info"]["scales"] = scale_notes
    return options


def write_export(table: EPDTable, manifest: dict, options: dict, output_dir: Path, step: int,
                 write_manifest: bool = True) -> dict[str, Path]:
    """Write the export artefacts atomically (the manifest unless ``write_manifest`` is False, the original's
    ``--no-manifest``); returns their paths."""
    paths = {"snapshot": save_table(table, output_dir / f"network-snapshot-export-step{step:06d}"),
             "manifest": output_dir / f"export-manifest-step{step:06d}.json",
             "options": output_dir / f"training_options-export-step{step:06d}.json"}
    atomic_write_json(paths["options"], options)
    if not write_manifest:
        del paths["manifest"]
        return paths
    atomic_write_json(paths["manifest"], manifest)
    return paths


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ---------------------------------------------------------------------- run directories
def _read_resolved_config(run_dir: Path) -> dict:
    import yaml

    for p in (run_dir / "configs" / "resolved_config.yaml", run_dir / "resolved_config.yaml"):
        if p.is_file():
            try:
                doc = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise EPDError(f"{p}: not valid YAML ({e})") from None
            return doc if isinstance(doc, dict) else {}
    return {}


def _latest_metrics(run_dir: Path) -> dict | None:
    for p in (run_dir / "logs" / "metrics.jsonl", run_dir / "metrics.jsonl"):
        if p.is_file():
            lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
            for ln in reversed(lines):  # the last complete record (a crash may leave a partial line)
                try:
                    return json.loads(ln)
                except json.JSONDecodeError:
                    continue
    return None


def _locate_template(recorded: str, run_dir: Path) -> Path | None:
    """The recorded start snapshot, or, for a relocated run tree, the same trailing path under an ancestor."""
    p = Path(recorded)
    if not p.is_absolute():
        p = run_dir / p
    if p.exists():
        return p
    parts = Path(recorded).parts
    for anc in run_dir.resolve().parents:
        for n in range(min(len(parts) - 1, 4), 0, -1):
            cand = anc.joinpath(*parts[-n:])
            if cand.exists():
                return cand
    return None


def export_run(run_dir: str | Path, *, checkpoint: str | Path | None = None, output_dir: str | Path | None = None,
               template: str | Path | None = None, keep_policy_scales: bool = False,
               write_manifest: bool = True) -> dict[str, Path]:
    """Export a run directory's checkpoint (default: the latest) into ``<run_dir>/export`` (or ``output_dir``);
    ``write_manifest=False`` leaves out ``export-manifest-stepXXXXXX.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EPDError(f"run directory {run_dir}: not found")
    if checkpoint is None:
        ckpt = find_latest_checkpoint(run_dir)
    else:
        ckpt = Path(checkpoint)
        if not ckpt.is_absolute() and not ckpt.exists():
            ckpt = run_dir / ckpt
    cfg = _read_resolved_config(run_dir)
    if template is None:
        recorded = (cfg.get("data") or {}).get("predictor_snapshot")
        if not recorded:
            raise EPDError(f"run directory {run_dir}: resolved config names no data.predictor_snapshot; "
                           "pass --template")
        template = _locate_template(str(recorded), run_dir)
        if template is None:
            raise EPDError(f"run directory {run_dir}: start snapshot {recorded} not found (also looked for its "
                           "trailing path under the run's parent folders); pass --template")
    template = Path(template)
    table = load_table(template)
    opts_path = (template if template.is_dir() else template.parent) / "training_options.json"
    template_options = json.loads(opts_path.read_text()) if opts_path.is_file() else None
    tbl, manifest, options = export_checkpoint(
        ckpt, table, run_dir=run_dir, model_config=cfg.get("model"), template_options=template_options,
        latest_metrics=_latest_metrics(run_dir), keep_policy_scales=keep_policy_scales)
    return write_export(tbl, manifest, options, Path(output_dir) if output_dir else run_dir / "export",
                        manifest["export_step"], write_manifest)


# ---------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("run_dir", help="RDPO run directory (holds checkpoints/, configs/resolved_config.yaml, logs/)")
    p.add_argument("--checkpoint", help="policy checkpoint (absolute, or relative to RUN_DIR); default: latest step")
    p.add_argument("--out", "--output-dir", dest="output_dir",
                   help="where to write the export (default: RUN_DIR/export); --output-dir is the original's name")
    p.add_argument("--template", help="start snapshot of the run (default: the resolved config's "
                                      "data.predictor_snapshot)")
    p.add_argument("--keep-policy-scales", action="store_true",
                   help="write the policy's scale means as they are instead of mapping them through the template's "
                        "scale ranges (the original drops scales whose range is 0)")
    p.add_argument("--device", default="cpu",
                   help="accepted for the original exporter's command line; the export (policy mean, sanitising) "
                        "always computes on the CPU, so its numbers do not depend on this flag")
    p.add_argument("--no-manifest", action="store_true",
                   help="do not write export-manifest-stepXXXXXX.json (as the original's --no-manifest)")


def run(args) -> int:
    if args.device != "cpu":
        log.info("--device %s: the export computes on the CPU (a few small tensors); nothing runs on %s",
                 args.device, args.device)
    paths = export_run(args.run_dir, checkpoint=args.checkpoint, output_dir=args.output_dir, template=args.template,
                       keep_policy_scales=args.keep_policy_scales, write_manifest=not args.no_manifest)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
