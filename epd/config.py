"""Workflow configs: load YAML, validate against ``workflow/schemas/config.schema.yaml`` (defaults filled in),
and pick one backbone's section. ``epd validate-config FILE`` runs the same check from the command line."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import ConfigError

__all__ = ["load_config", "backbone_section", "validate", "schema_path", "study_files", "check_study",
           "skipped_pairs", "study_rows", "peer_rows", "dataclass_from_dict", "TABLE_LABELS", "ASSETS_DIR", "ASSETS_FETCH",
           "STUDY_KEYS"]

# Where ``epd assets fetch`` puts the original system's released files, and the command that brings them.
ASSETS_DIR = "data/original"
ASSETS_FETCH = "epd assets fetch   (or, offline: epd assets fetch --mirror DIR, DIR a checkout of the original repository)"
# Keys of a ``backbones.<name>`` section (the schema's ``$defs.backbone``) that describe the study, not the model:
# backbone adapters ignore them (the others, kind/guidance/model_path/resolution/coords/backend_config, are theirs).
STUDY_KEYS = ("solvers", "nfes", "distill_nfes", "rdpo_nfes", "metrics", "predictors", "prompts", "student", "teacher",
              "distill", "rdpo", "train", "bench", "sample", "peers", "paper_scale")


def dataclass_from_dict(cls, d: dict | None, section: str):
    """``cls(**d)`` for a settings dataclass, refusing unknown keys with one error naming the section and the
    accepted keys."""
    from dataclasses import fields

    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown keys {unknown}; accepted: {sorted(known)}")
    return cls(**d)


def schema_path() -> Path:
    return Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def _extend_with_default(validator_class):
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    import jsonschema

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate(config: dict, source: str = "config") -> dict:
    """Validate (and fill defaults into) ``config``; raises :class:`ConfigError` naming the key and allowed values."""
    path = schema_path()
    if not path.exists():
        return config
    import jsonschema

    schema = yaml.safe_load(path.read_text())
    Validator = _extend_with_default(jsonschema.Draft202012Validator)
    errors = sorted(Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
            where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
            allowed = ""
            if e.validator == "enum":
                allowed = f" (allowed: {e.validator_value})"
            elif e.validator in ("minimum", "exclusiveMinimum"):
                allowed = f" (must be {'>' if e.validator == 'exclusiveMinimum' else '>='} {e.validator_value})"
            elif e.validator == "additionalProperties":
                allowed = f" (allowed keys: {sorted(e.schema.get('properties', {}))})"
            lines.append(f"  {where}: {e.message}{allowed}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines))
    # second pass fills defaults inside backbone entries (patternProperties are not visited by the default filler)
    return config


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path}: file not found")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    return validate(cfg, str(path))


def backbone_section(config: dict, name: str) -> dict:
    bbs = config.get("backbones") or {}
    if name not in bbs:
        raise ConfigError(f"backbone: {name!r} is not in the config's backbones; configured: {sorted(bbs)}")
    sec = dict(bbs[name])
    sec.setdefault("name", name)
    return sec


def study_files(config: dict) -> list[tuple[str, str]]:
    """Every input file a study names besides weights: ``(config key, path)`` for prompt files, released
    predictors and external result folders."""
    from .prompts import prompt_file

    out = []
    for b, sec in (config.get("backbones") or {}).items():
        specs = {f"backbones.{b}.prompts.{k}": v for k, v in (sec.get("prompts") or {}).items()}
        specs[f"backbones.{b}.teacher.prompts"] = (sec.get("teacher") or {}).get("prompts")
        specs[f"backbones.{b}.rdpo.eval.prompts"] = ((sec.get("rdpo") or {}).get("eval") or {}).get("prompts")
        out += [(k, f) for k, v in specs.items() if v and (f := prompt_file(v))]
        out += [(f"backbones.{b}.predictors.{k}", v) for k, v in (sec.get("predictors") or {}).items()]
    for i, ext in enumerate((config.get("report") or {}).get("external") or []):
        out.append((f"report.external[{i}]", ext.split("=", 1)[-1]))
    return out


TABLE_LABELS = ("epd_distilled", "epd_rdpo")


def study_rows(sec: dict) -> list[tuple[str, int]]:
    """The ``(solver label, NFE)`` rows a backbone section samples and evaluates: each solver at each NFE it can
    run, the distilled and RDPO tables at theirs, and each released table (``released_<label>``, NFE 0)."""
    from .solvers import steps_for_nfe

    def runs(solver, nfe, afs=True):
        try:
            steps_for_nfe(solver, int(nfe), afs)
            return True
        except ConfigError:
            return False

    afs = (sec.get("student") or {}).get("afs", True)
    rows = [(s, n) for s in sec["solvers"] for n in sec["nfes"] if runs(s, n)]
    rows += [("epd_distilled", n) for n in sec.get("distill_nfes", sec["nfes"]) if runs("epd", n, afs)]
    rows += [("epd_rdpo", n) for n in sec.get("rdpo_nfes", []) if runs("epd", n, afs)]
    rows += [(f"released_{label}", 0) for label in sec.get("predictors") or {}]
    rows += peer_rows(sec)
    return rows


def peer_rows(sec: dict) -> list[tuple[str, int]]:
    """The learned peers' ``(label, NFE)`` rows: each of ``peers.solvers`` at each of ``peers.nfes`` (default: the
    section's ``nfes``) where its solver runs (AMED counts as EPD does, with the student's AFS)."""
    from .solvers import steps_for_nfe
    from .solvers.learned import parse_peer

    peers = sec.get("peers") or {}
    afs = (sec.get("student") or {}).get("afs", True)
    out = []
    for label in peers.get("solvers") or []:
        solver = parse_peer(label)[1]
        for n in peers.get("nfes", sec["nfes"]):
            try:
                steps_for_nfe(solver, int(n), afs)
                out.append((label, n))
            except ConfigError:
                continue
    return out


def skipped_pairs(config: dict) -> dict[str, list[str]]:
    """Backbone -> ``"solver@NFE"`` pairs of the config that cannot run (e.g. Heun at an odd NFE)."""
    from .solvers import steps_for_nfe

    out = {}
    for b, sec in (config.get("backbones") or {}).items():
        bad = []
        for s in sec.get("solvers") or []:
            for n in sec.get("nfes") or []:
                try:
                    steps_for_nfe(s, int(n))
                except ConfigError:
                    bad.append(f"{s}@{n}")
        if bad:
            out[b] = bad
    return out


def check_study(config: dict, root: str | Path = ".") -> None:
    """Checks a study needs before any job: every configured solver runs at one configured NFE at least, and every
    input file exists. Raises :class:`ConfigError` listing each problem with its fix."""
    problems = []
    skipped = skipped_pairs(config)
    for b, sec in (config.get("backbones") or {}).items():
        for s in sec.get("solvers") or []:
            if all(f"{s}@{n}" in skipped.get(b, []) for n in sec.get("nfes") or []):
                problems.append(f"backbones.{b}.solvers: {s} runs at none of nfes {sec.get('nfes')} "
                                f"(it spends 2 evaluations per step: use even NFEs, or remove it)")
    missing = [(k, f) for k, f in study_files(config) if not (Path(root) / f).exists()]
    problems += [f"{k}: {f} not found" for k, f in missing]
    if not problems:
        return
    fixes = []
    if any(Path(f).parts[:2] == tuple(Path(ASSETS_DIR).parts) for _, f in missing):
        fixes.append(f"the original system's released files under {ASSETS_DIR}/ are brought by: {ASSETS_FETCH}")
    raise ConfigError("study cannot start:\n" + "\n".join(f"  {p}" for p in problems)
                      + "".join(f"\n  fix: {f}" for f in fixes))


def add_arguments(p):
    p.add_argument("config", help="YAML config file")


def run(args):
    cfg = load_config(args.config)
    check_study(cfg)
    print(f"{args.config}: valid ({len(cfg.get('backbones', {}))} backbone(s): {', '.join(cfg.get('backbones', {}))})")
    return 0
