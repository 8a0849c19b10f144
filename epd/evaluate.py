"""``epd evaluate``: score a sample directory with registered metrics.

Order of work (so that bad input fails before anything heavy is loaded):

1. metric names, the FID reference and the output folder are validated;
2. images are paired with prompts through their sidecar JSONs (hidden files/folders such as
   ``.ipynb_checkpoints`` are skipped) and checked against ``--prompts`` (every prompt covered equally often);
3. every weight file of every requested metric is resolved (``--weights-dir``, ``$EPD_WEIGHTS_DIR``,
   ``data/weights``, the offline HF cache); one error lists all missing files and the ``dvc pull`` target;
4. every image is decoded once (corrupt/truncated files are reported together);
5. metrics run one at a time (one model in memory at a time);
6. only then are outputs written, each atomically: ``scores.csv`` (image, seed, prompt, one column per image
   metric), ``<metric>.json`` per metric in the original result schema (+ ``se``), ``summary.json``; and, when
   ``MLFLOW_TRACKING_URI`` is set, ``<metric>_mean``/``<metric>_se`` in an MLflow run.

Images are decoded as 8-bit RGB (grayscale replicated, palette expanded, alpha dropped; see
:mod:`epd.metrics.imagedir`).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import time
from pathlib import Path

from .errors import ConfigError, EPDError, NonFiniteError
from .memory import out_of_memory_names

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "evaluate", "log_mlflow", "sampling_cost"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="sample directory (PNG + sidecar JSON per image)")
    p.add_argument("--prompts", default=None, help="prompt file (.txt/.csv); images must cover it exactly")
    p.add_argument("--metrics", required=True, nargs="+",
                   help="metric names, space- or comma-separated (see `epd metrics list`)")
    p.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                   help="output folder (default: <images>_eval next to the images)")
    p.add_argument("--weights-dir", default=None, help="weights root tried before $EPD_WEIGHTS_DIR and data/weights")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--fid-ref", default=None,
                   help="reference set for set metrics (fid_clean, digits_fd): image directory, or .npz statistics "
                        "(fid_clean only)")
    p.add_argument("--label", default=None, help="run label stored in the result files (default: images dir name)")
    p.add_argument("--reference-latents", default=None,
                   help="latents.safetensors of a high-NFE reference solve (same seeds): adds rmse_vs_teacher")
    p.add_argument("--backbone", default=None, help="backbone name for the MLflow run (default: from sidecars)")


def _metric_names(raw: list[str]) -> list[str]:
    from .rewards import list_scorers

    names = [n.strip() for item in raw for n in item.split(",") if n.strip()]
    known = [n for n, _ in list_scorers()]
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"--metrics: unknown {bad}; registered: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--metrics: duplicate names in {names}")
    if not names:
        raise ConfigError("--metrics: give at least one metric")
    return names


def _decode_all(samples) -> None:
    from .metrics.imagedir import load_image

    errors = []
    for s in samples:
        try:
            load_image(s.path)
        except EPDError as e:
            errors.append(str(e))
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise EPDError(f"{len(errors)} unreadable image(s){more}:\n  " + "\n  ".join(errors[:3]))


def _uniform(samples, key):
    vals = {repr(s.meta.get(key)) for s in samples}
    return samples[0].meta.get(key) if len(vals) == 1 else None


def evaluate(images, metrics, prompts_file=None, out_dir=None, weights_dir=None, device="cpu", batch_size=8,
             fid_ref=None, label=None, reference_latents=None, backbone=None) -> dict:
    """Score a sample directory; see the module docstring for the order of checks and the outputs.

    Args:
        images: sample directory.
        metrics (`list[str]`): registered metric names.
        prompts_file (`str`, *optional*): prompt list the images must cover.
        out_dir (`str`, *optional*): output folder.
        weights_dir (`str`, *optional*): weights root.
        device (`str`): torch device.
        batch_size (`int`): images per forward pass.
        fid_ref (`str`, *optional*): reference images folder or ``.npz`` statistics (needed by set metrics).
        label (`str`, *optional*): run label.
        reference_latents (`str`, *optional*): ``latents.safetensors`` of a reference solve from the same seeds; the
            metric ``rmse_vs_teacher`` (per-image final-state RMSE against it) needs it and the folder's own
            ``latents.safetensors`` (``epd sample --save-latents``).
        backbone (`str`, *optional*): backbone name for the MLflow run tags.

    Returns:
        `dict`: the summary written to ``summary.json``.
    """
    from .io import read_prompts
    from .metrics.imagedir import check_prompts, pair_samples
    from .rewards import resolve_weights

    images = Path(images)
    names, want_rmse = _check_args(metrics, weights_dir, batch_size, fid_ref, reference_latents)
    out = Path(out_dir) if out_dir else images.parent / f"{images.name}_eval"
    if out.resolve() == images.resolve():
        raise ConfigError("--out (alias --out-dir) must differ from --images (result JSONs would mix with sidecars)")
    samples = pair_samples(images)
    per_prompt = check_prompts(samples, read_prompts(prompts_file), str(prompts_file)) if prompts_file else None
    resolve_weights(names, weights_dir)  # every missing file listed before anything is loaded
    _decode_all(samples)
    results, columns, descriptions = _score_all(names, samples, weights_dir, device, batch_size, fid_ref,
                                                images if want_rmse else None, reference_latents)
    label = label or images.name
    meta_common = {k: _uniform(samples, k) for k in ("backbone", "solver", "nfe", "nfe_sequential", "forward_passes",
                                                     "steps", "num_points", "num_steps", "snapshot")}
    meta_common = {k: v for k, v in meta_common.items() if v is not None}
    prompts_path = str(Path(prompts_file).resolve()) if prompts_file else None
    common = {"images_dir": str(images.resolve()), "prompts_file": prompts_path, "label": label}
    files = {f"{name}.json": _result_file(common, name, r, descriptions[name], fid_ref, {
        "duration": r["duration"], "num_images": len(samples), "batch_size": batch_size, "device": str(device),
        "weights": r["weights"], "label": label, "images_per_prompt": per_prompt, **meta_common})
        for name, r in results.items()}
    summary = {**common, "num_images": len(samples), "metrics": {n: r["stats"] for n, r in results.items()},
               "metadata": {"device": str(device), "batch_size": batch_size, **meta_common}}
    _write_outputs(out, samples, columns, files, summary)
    log_mlflow(summary, {"images_dir": str(images), "label": label, "num_images": len(samples)},
               tags={**meta_common, "backbone": backbone or meta_common.get("backbone", ""),
                     "images_dir": str(images.resolve()), "scores_csv": str((out / "scores.csv").resolve()),
                     **({"steps": meta_common["num_points"] - 1} if "num_points" in meta_common else {}),
                     **sampling_cost(images)})
    log.info("wrote %s", out)
    return summary


def _check_args(metrics, weights_dir, batch_size, fid_ref, reference_latents) -> tuple[list[str], bool]:
    """The registered metric names to run and whether ``rmse_vs_teacher`` is asked for; every flag checked."""
    from .rewards import required_folder, scorer_kind

    raw = [n.strip() for item in ([metrics] if isinstance(metrics, str) else metrics) for n in item.split(",")]
    want_rmse = "rmse_vs_teacher" in raw
    names = _metric_names([n for n in raw if n and n != "rmse_vs_teacher"]) if len(raw) > int(want_rmse) else []
    if want_rmse and not reference_latents:
        raise ConfigError("--reference-latents: rmse_vs_teacher needs latents.safetensors of a reference solve")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    need_folder = [n for n in names if required_folder(n)]
    if need_folder and weights_dir is None:
        raise ConfigError(f"--weights-dir: {', '.join(need_folder)} need {required_folder(need_folder[0])}; "
                          "pass --weights-dir DIR")
    set_metrics = [n for n in names if scorer_kind(n) == "set"]
    if set_metrics and not fid_ref and set_metrics != ["digits_fd"]:
        raise ConfigError(f"--fid-ref is required for {set_metrics} (a reference image folder or statistics .npz)")
    if fid_ref and not (Path(fid_ref).is_dir() or (Path(fid_ref).is_file() and str(fid_ref).endswith(".npz"))):
        raise ConfigError(f"--fid-ref {fid_ref}: not an image folder or an existing .npz statistics file")
    return names, want_rmse


def _score_all(names, samples, weights_dir, device, batch_size, fid_ref, rmse_images, reference_latents):
    """Run the metrics one at a time: ``(results, per-image score columns, descriptions)``; ``rmse_vs_teacher``
    last when ``rmse_images`` is given."""
    from .rewards import list_scorers

    descriptions = dict(list_scorers())
    results, columns = {}, {}
    for name in names:
        with out_of_memory_names("epd evaluate --batch-size", batch_size, f"metric {name}"):
            results[name] = _run_metric(name, samples, weights_dir, device, batch_size, fid_ref)
        if "scores" in results[name]:
            columns[name] = results[name].pop("scores")
    if rmse_images is not None:
        results["rmse_vs_teacher"] = _rmse_vs_reference(rmse_images, samples, reference_latents)
        columns["rmse_vs_teacher"] = results["rmse_vs_teacher"].pop("scores")
        descriptions["rmse_vs_teacher"] = "final-state RMSE against a reference solve from the same noise"
    return results, columns, descriptions


def _result_file(common: dict, name: str, r: dict, description: str, fid_ref, metadata: dict) -> dict:
    """``<metric>.json`` in the original result schema (+ ``se``)."""
    obj = {"images_dir": common["images_dir"], "pattern": "**/*.{png,jpg,jpeg,webp,bmp} (hidden skipped)",
           "prompts_file": common["prompts_file"], "metric": name, "description": description,
           "label": common["label"], "stats": r["stats"], "metadata": metadata}
    if "fid" in r:
        obj.update(fid=r["fid"], reference=r.get("reference") or str(Path(fid_ref).resolve()), protocol=r["protocol"])
    return obj


def sampling_cost(images: Path) -> dict:
    """``seconds_per_image``, ``cost_batch`` and ``machine`` recorded by ``epd sample`` in the folder's
    ``summary.json`` (empty when it recorded none)."""
    from .io import read_json

    path = Path(images) / "summary.json"
    doc = read_json(path) if path.is_file() else {}
    return {k: doc[k] for k in ("seconds_per_image", "cost_batch", "machine") if doc.get(k) is not None}


def _batches(paths, batch_size):
    """Decoded images in batches: a stacked tensor when sizes agree (what every scorer takes), else a list."""
    import torch

    from .metrics.imagedir import load_image

    for i in range(0, len(paths), batch_size):
        imgs = [load_image(p) for p in paths[i:i + batch_size]]
        yield i, torch.stack(imgs) if len({tuple(x.shape) for x in imgs}) == 1 else imgs


def _run_metric(name, samples, weights_dir, device, batch_size, fid_ref) -> dict:
    import numpy as np
    import torch

    from .metrics.imagedir import iter_image_files
    from .metrics.stats import summarize
    from .rewards import get_scorer

    t0 = time.time()
    scorer = get_scorer(name, weights_dir=weights_dir, device=device, batch_size=batch_size)
    paths = [s.path for s in samples]
    if getattr(scorer, "kind", "image") == "set":
        fa = np.concatenate([scorer.features(x) for _, x in _batches(paths, batch_size)])
        if fid_ref is None:  # the scorer's backbone's held-out real images (digits_fd: its own data split)
            from .backbones import backbone_class

            ref = scorer.features(backbone_class(scorer.backbone).heldout_reference(weights_dir))
        elif str(fid_ref).endswith(".npz"):
            ref = fid_ref
        else:
            ref_paths = iter_image_files(fid_ref)
            if not ref_paths:
                raise EPDError(f"--fid-ref {fid_ref}: contains no images")
            ref = np.concatenate([scorer.features(x) for _, x in _batches(ref_paths, batch_size)])
        value = float(scorer.compute(fa, ref))
        if not math.isfinite(value):
            raise NonFiniteError(f"metric {name} is NaN/inf for {len(samples)} images (features finite: "
                                 f"{bool(np.isfinite(fa).all())})")
        stats = {"count": len(samples), "mean": value, "std": None, "min": value, "max": value, "se": None}
        res = {"stats": stats, "fid": value, "protocol": getattr(scorer, "protocol", name)}
        if fid_ref is None:
            res["reference"] = "held-out split of the embedded digits"
    else:
        scores = []
        for i, x in _batches(paths, batch_size):
            scores.extend(float(v) for v in scorer(x, [s.prompt for s in samples[i:i + batch_size]]))
        bad = [i for i, v in enumerate(scores) if not math.isfinite(v)]
        if bad:
            s = samples[bad[0]]
            raise NonFiniteError(f"metric {name} returned {scores[bad[0]]} for image {s.rel} (seed {s.seed}, prompt "
                                 f"{s.prompt!r}); {len(bad)} of {len(scores)} scores are NaN/inf")
        st = summarize(scores)
        stats = {"count": st["n"], "mean": st["mean"], "std": st["std"], "min": st["min"], "max": st["max"],
                 "se": st["se"] if st["n"] > 1 else None}
        res = {"stats": stats, "scores": scores}
    res["weights"] = dict(getattr(scorer, "weights", {}))
    del scorer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    res["duration"] = time.time() - t0
    log.debug("%s: %s", name, res["stats"])  # `epd evaluate` prints each result once, at the end
    return res


def _write_outputs(out: Path, samples, columns: dict, files: dict, summary: dict) -> None:
    from .io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "seed", "prompt", *columns])
    for i, s in enumerate(samples):
        w.writerow([s.rel, "" if s.seed is None else s.seed, s.prompt, *(repr(columns[c][i]) for c in columns)])
    atomic_write_text(out / "scores.csv", buf.getvalue())
    for fname, obj in files.items():
        atomic_write_json(out / fname, obj)
    atomic_write_json(out / "summary.json", summary)


def _rmse_vs_reference(images: Path, samples, reference: str) -> dict:
    """Per-image RMSE between this folder's final states and the reference solve's, matched by seed."""
    import torch
    from safetensors.torch import load_file

    from .metrics.stats import summarize

    t0 = time.time()
    mine, ref = images / "latents.safetensors", Path(reference)
    for f in (mine, ref):
        if not f.is_file():
            raise EPDError(f"rmse_vs_teacher: {f} is missing (sample with --save-latents)")
    from safetensors import SafetensorError

    loaded = []
    for f in (mine, ref):
        try:
            t = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EPDError(f"rmse_vs_teacher: {f} is unreadable, truncated or corrupt ({e}); rerun `epd sample "
                           "--save-latents` for it") from None
        if {"seeds", "latents"} - t.keys() or len(t["seeds"]) != len(t["latents"]):
            raise EPDError(f"rmse_vs_teacher: {f} needs tensors 'seeds' (n,) and 'latents' (n, ...), got "
                           f"{ {k: tuple(v.shape) for k, v in t.items()} }")
        loaded.append(t)
    a, b = loaded
    idx_a = {int(s): i for i, s in enumerate(a["seeds"].tolist())}
    idx_b = {int(s): i for i, s in enumerate(b["seeds"].tolist())}
    scores = []
    for s in samples:
        if s.seed not in idx_a or s.seed not in idx_b:
            raise EPDError(f"rmse_vs_teacher: seed {s.seed} missing from {mine if s.seed not in idx_a else ref}")
        d = a["latents"][idx_a[s.seed]].double() - b["latents"][idx_b[s.seed]].double()
        scores.append(float(torch.sqrt((d ** 2).mean())))
    st = summarize(scores)
    return {"stats": {"count": st["n"], "mean": st["mean"], "std": st["std"], "min": st["min"], "max": st["max"],
                      "se": st["se"]}, "scores": scores, "weights": {}, "duration": time.time() - t0}


def log_mlflow(summary: dict, params: dict, tags: dict | None = None) -> bool:
    """One MLflow run (experiment ``epd/evaluate``) with ``<metric>_mean``/``_se``/``_std``/``_count`` and the
    tags the report needs (backbone, solver, nfe, forward passes, per-image CSV path); no-op without tracking."""
    from . import tracking

    if not tracking.enabled():
        return False
    tags = {k: v for k, v in (tags or {}).items() if v is not None}
    with tracking.start_run("evaluate", backbone=tags.pop("backbone", None) or None,
                            name=f"evaluate:{summary.get('label')}", tags=tags, params=params) as run:
        for name, st in summary["metrics"].items():
            if st.get("se") is None and st.get("std") is None:  # set metric (a distance)
                run.metrics({name: float(st["mean"])})
                continue
            run.metrics({f"{name}_mean": float(st["mean"]), f"{name}_count": float(st["count"])})
            if st.get("se") is not None:
                run.metrics({f"{name}_se": float(st["se"]), f"{name}_std": float(st["std"])})
    return True


def run(args) -> int:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = evaluate(args.images, args.metrics, args.prompts, args.out_dir, args.weights_dir, device,
                       args.batch_size, args.fid_ref, args.label, args.reference_latents, args.backbone)
    for name, st in summary["metrics"].items():
        se = f" ± {st['se']:.4g}" if st.get("se") is not None else ""
        print(f"{name}: {st['mean']:.6g}{se} (n={st['count']})")
    return 0
