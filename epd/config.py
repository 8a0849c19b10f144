"""Workflow configs: load YAML, validate against ``workflow/schemas/config.schema.yaml`` (defaults filled in),
and pick one backbone's section. ``epd validate-config FILE`` runs the same check from the command line."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import ConfigError

__all__ = ["load_config", "backbone_section", "validate", "schema_path"]


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


def add_arguments(p):
    p.add_argument("config", help="YAML config file")


def run(args):
    cfg = load_config(args.config)
    print(f"{args.config}: valid ({len(cfg.get('backbones', {}))} backbone(s): {', '.join(cfg.get('backbones', {}))})")
    return 0
