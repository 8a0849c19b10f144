"""A seconds-long digits study for CLI tests: the reliability suite's tiny trained backbone and a one-backbone
config (backbone ``d``) beside it."""

from pathlib import Path

import yaml

from reliability.harness import TINY_DIGITS


def tiny_digits_study(root: Path) -> Path:
    """Train the tiny digits backbone into ``root/digits`` and write ``root/config.yaml``; returns ``root``."""
    from epd.backbones.digits.train import DigitsTrainConfig, train

    train(DigitsTrainConfig.from_dict(TINY_DIGITS), root / "digits", progress=False)
    cfg = {"run": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
           "backbones": {"d": {"kind": "digits", "guidance": 1.5, "prompts": {"eval": "builtin:digits"},
                               "solvers": ["euler"], "nfes": [4], "metrics": ["digits_alignment"],
                               "student": {"num_points": 2, "afs": True, "schedule": "edm"}}}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root
