"""Resolve local weight files and folders; never download.

``resolve(kind, name)`` looks, in order, at

1. an explicit path (config value or argument),
2. the kind's environment variable (e.g. ``FLUX_MODEL_PATH``) and then ``$EPD_WEIGHTS_DIR/<relative path>``,
3. ``<repo>/data/weights/<relative path>`` (the DVC-tracked folder; ``EPD_DATA_DIR`` overrides ``data/``),
4. the local Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``), offline, for entries that name a hub repo.

When nothing is found, :class:`MissingWeightsError` lists every place looked, and a ``dvc pull`` target only for
files that DVC actually tracks (the listing of ``data.dvc`` in the repository's DVC store).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import EPDError

__all__ = ["WeightSpec", "REGISTRY", "resolve", "MissingWeightsError", "data_dir", "register", "check_all"]


class MissingWeightsError(EPDError, FileNotFoundError):
    """Weights are not on this machine; the message names every place looked and how to get them."""


@dataclass(frozen=True)
class WeightSpec:
    """Where one weight file or folder lives.

    Args:
        rel (`str`): path relative to a weights root (``data/weights/<rel>``, ``$EPD_WEIGHTS_DIR/<rel>``).
        env (`str`, *optional*): environment variable holding a direct path.
        hf_repo (`str`, *optional*): hub repo id whose local cache snapshot may hold it (offline lookup only).
        hf_file (`str`, *optional*): file inside that snapshot (None: the snapshot folder itself).
        is_dir (`bool`): a folder (diffusers/transformers layout) rather than a file.
        what (`str`): human description for error messages.
    """

    rel: str
    env: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    is_dir: bool = False
    what: str = ""


REGISTRY: dict[tuple[str, str], WeightSpec] = {}


def register(kind: str, name: str, spec: WeightSpec) -> None:
    REGISTRY[(kind, name)] = spec


# Backbones (diffusers folders).
register("backbone", "sd15", WeightSpec("sd15", "SD15_MODEL_PATH", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                        is_dir=True, what="Stable Diffusion 1.5 diffusers folder"))
register("backbone", "sd3", WeightSpec("sd3-medium", "SD3_MODEL_PATH", "stabilityai/stable-diffusion-3-medium-diffusers",
                                       is_dir=True, what="SD3-Medium diffusers folder"))
register("backbone", "flux", WeightSpec("flux1-dev", "FLUX_MODEL_PATH", "black-forest-labs/FLUX.1-dev",
                                        is_dir=True, what="FLUX.1-dev diffusers folder"))
# Scorers.
register("scorer", "hps", WeightSpec("hps/HPS_v2.1_compressed.pt", "HPS_WEIGHTS", "xswu/HPSv2", "HPS_v2.1_compressed.pt",
                                     what="HPSv2.1 checkpoint (open_clip ViT-H-14 state_dict)"))
register("scorer", "pickscore", WeightSpec("pickscore/PickScore_v1", "PICKSCORE_MODEL_PATH", "yuvalkirstain/PickScore_v1",
                                           is_dir=True, what="PickScore_v1 transformers CLIPModel folder"))
register("scorer", "pickscore_processor", WeightSpec(
    "pickscore/processor", "PICKSCORE_PROCESSOR_PATH", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", is_dir=True,
    what="CLIP-ViT-H-14 processor folder (tokenizer + image processor)"))
register("scorer", "imagereward", WeightSpec("imagereward/ImageReward.pt", "IMAGEREWARD_WEIGHTS", "THUDM/ImageReward",
                                             "ImageReward.pt", what="ImageReward-v1.0 checkpoint"))
register("scorer", "imagereward_med_config", WeightSpec("imagereward/med_config.json", None, "THUDM/ImageReward",
                                                        "med_config.json", what="ImageReward BLIP med_config.json"))
register("scorer", "imagereward_bert", WeightSpec("imagereward/bert-base-uncased", "IMAGEREWARD_BERT_PATH",
                                                  "google-bert/bert-base-uncased", is_dir=True,
                                                  what="bert-base-uncased tokenizer folder (vocab.txt)"))
register("scorer", "clip_l14", WeightSpec("clip/ViT-L-14.pt", "CLIP_L14_WEIGHTS", None, None,
                                          what="OpenAI CLIP ViT-L/14 checkpoint (clip package format)"))
register("scorer", "aesthetic", WeightSpec("aesthetic/sac+logos+ava1-l14-linearMSE.pth", "AESTHETIC_WEIGHTS", None, None,
                                           what="LAION improved aesthetic predictor MLP"))
register("scorer", "mps", WeightSpec("mps/MPS_overall_state_dict.pt", "MPS_WEIGHTS", None, None,
                                     what="MPS overall checkpoint (state_dict)"))
register("scorer", "mps_processor", WeightSpec("mps/processor", "MPS_PROCESSOR_PATH", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                               is_dir=True, what="CLIP-ViT-H-14 processor folder for MPS"))
register("scorer", "inception", WeightSpec("fid/pt_inception-2015-12-05.pth", "FID_INCEPTION_WEIGHTS", None, None,
                                           what="FID Inception-v3 weights (pytorch-fid format)"))


def repo_root() -> Path:
    """The checkout root (folder holding the Snakefile), else the current directory."""
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "Snakefile").exists() and (p / "epd").is_dir():
            return p
    return Path.cwd()


def data_dir() -> Path:
    """The DVC-tracked data folder: ``$EPD_DATA_DIR`` or ``<repo>/data``."""
    return Path(os.environ.get("EPD_DATA_DIR") or repo_root() / "data")


def _hf_cache_dirs() -> list[Path]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    out.append(home / "hub")
    return out


def _hf_lookup(spec: WeightSpec) -> list[Path]:
    """Candidate paths in the local HF cache layout ``models--org--name/snapshots/<rev>/...`` (no network)."""
    if not spec.hf_repo:
        return []
    cands = []
    for cache in _hf_cache_dirs():
        snap_root = cache / ("models--" + spec.hf_repo.replace("/", "--")) / "snapshots"
        if snap_root.is_dir():
            for snap in sorted(snap_root.iterdir()):
                cands.append(snap / spec.hf_file if spec.hf_file else snap)
        else:
            cands.append(snap_root / "<revision>" / (spec.hf_file or ""))
    return cands


def resolve(kind: str, name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Return the local path of weights ``(kind, name)`` or raise :class:`MissingWeightsError`.

    Args:
        kind (`str`): ``"backbone"`` or ``"scorer"`` (or any registered kind).
        name (`str`): registered name (see :data:`REGISTRY`).
        explicit (`str`, *optional*): a path from the config or command line, tried first.
    """
    try:
        spec = REGISTRY[(kind, name)]
    except KeyError:
        known = sorted(n for k, n in REGISTRY if k == kind)
        raise EPDError(f"weights: unknown {kind} {name!r}; known: {known}") from None
    looked: list[Path] = []

    def ok(p: Path) -> bool:
        looked.append(p)
        return p.is_dir() if spec.is_dir else p.is_file()

    if explicit:
        p = Path(explicit).expanduser()
        if ok(p):
            return p
    if spec.env and os.environ.get(spec.env):
        p = Path(os.environ[spec.env]).expanduser()
        if ok(p):
            return p
    if os.environ.get("EPD_WEIGHTS_DIR"):
        p = Path(os.environ["EPD_WEIGHTS_DIR"]).expanduser() / spec.rel
        if ok(p):
            return p
    p = data_dir() / "weights" / spec.rel
    if ok(p):
        return p
    for p in _hf_lookup(spec):
        if ok(p):
            return p
    raise MissingWeightsError(missing_message([(kind, name, spec, looked)]))


def dvc_tracked() -> set[str]:
    """Paths (relative to ``data/``) that ``data.dvc`` tracks, read from the repository's DVC store or cache;
    empty when the listing is not on this machine."""
    root = repo_root()
    try:
        text = (root / "data.dvc").read_text()
    except OSError:
        return set()
    md5 = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("- md5:")), "")
    if not md5.endswith(".dir"):
        return set()
    for store in (root / ".dvc" / "store", root / ".dvc" / "cache"):
        listing = store / "files" / "md5" / md5[:2] / md5[2:]
        if listing.is_file():
            try:
                return {e["relpath"] for e in json.loads(listing.read_text())}
            except (ValueError, KeyError, TypeError):
                return set()
    return set()


def _dvc_has(rel: str, tracked: set[str]) -> bool:
    target = f"weights/{rel}"
    return any(t == target or t.startswith(target + "/") for t in tracked)


def missing_message(items) -> str:
    lines = [f"weights not found: {len(items)} missing (nothing is downloaded; place the files locally):"]
    tracked = dvc_tracked()
    pullable = []
    for kind, name, spec, looked in items:
        lines.append(f"  {kind} '{name}' ({spec.what or spec.rel}); looked at:")
        lines += [f"    - {p}" for p in looked]
        hint = f"    fix: put it at data/weights/{spec.rel}"
        if spec.env:
            hint += f", or set {spec.env}=<path>"
        hint += ", or set EPD_WEIGHTS_DIR=<dir containing " + spec.rel + ">"
        lines.append(hint)
        if _dvc_has(spec.rel, tracked):
            pullable.append(spec.rel)
    if pullable:
        lines.append(f"  DVC tracks {', '.join(pullable)}: dvc pull data.dvc")
    return "\n".join(lines)


def check_all(pairs: list[tuple[str, str]], explicit: dict | None = None) -> dict[tuple[str, str], Path]:
    """Resolve several weights at once; one error lists every missing item (before anything is loaded)."""
    found, missing = {}, []
    for kind, name in pairs:
        try:
            found[(kind, name)] = resolve(kind, name, (explicit or {}).get(name))
        except MissingWeightsError:
            spec = REGISTRY[(kind, name)]
            looked = []
            for p in ([Path((explicit or {}).get(name))] if (explicit or {}).get(name) else []):
                looked.append(p)
            if spec.env and os.environ.get(spec.env):
                looked.append(Path(os.environ[spec.env]))
            if os.environ.get("EPD_WEIGHTS_DIR"):
                looked.append(Path(os.environ["EPD_WEIGHTS_DIR"]) / spec.rel)
            looked.append(data_dir() / "weights" / spec.rel)
            looked += _hf_lookup(spec)
            missing.append((kind, name, spec, looked))
    if missing:
        raise MissingWeightsError(missing_message(missing))
    return found
