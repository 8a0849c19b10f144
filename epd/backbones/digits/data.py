"""Prompts and data of the digits backbone.

* :func:`parse_prompt` / :func:`parse_prompts` — text prompts (``"7"``, ``"seven"``, ``"a handwritten digit seven"``)
  to labels.
* :func:`load_split` — ``sklearn.datasets.load_digits`` (1797 8×8 images), a seeded stratified split into train
  and held-out sets, pixels mapped to ``[-1, 1]``, optional integer (nearest) upsampling.
* :func:`heldout_images` — the held-out real digits of a trained folder's split: the reference set of digits-FD.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ConfigError, EPDError

__all__ = ["NUM_CLASSES", "NULL_CLASS", "BASE_RES", "PROMPTS", "parse_prompt", "parse_prompts", "check_labels",
           "DigitsSplit", "load_split", "to_base_resolution", "heldout_images"]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label used for the unconditional branch of classifier-free guidance
BASE_RES = 8

# --------------------------------------------------------------------------------------------------------------
# Prompts.

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten digit {w}" for w in _WORDS]
ACCEPTED_FORMS = "'7', 'seven', 'digit 7', 'digit seven', 'a handwritten digit seven' (any digit 0-9, any case)"
_PROMPT_RE = re.compile(r"^(?:(?:a|an|the)\s+)?(?:handwritten\s+)?(?:(?:digit|number)\s+)?(\w+)$")


def parse_prompt(text: str) -> int:
    """Map a text prompt to a digit label.

    Args:
        text (`str`): e.g. ``"7"``, ``"seven"``, ``"digit 7"``, ``"a handwritten digit seven"`` (case-insensitive;
            surrounding spaces and a final period are ignored).

    Returns:
        `int`: the label in ``0..9``.

    Raises:
        EPDError: for anything else, listing the accepted forms.
    """
    if not isinstance(text, str):
        raise EPDError(f"prompt {text!r}: expected text; accepted forms: {ACCEPTED_FORMS}")
    norm = " ".join(text.strip().lower().rstrip(".").split())
    m = _PROMPT_RE.match(norm)
    if m:
        word = m.group(1)
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word in _WORDS:
            return _WORDS.index(word)
    raise EPDError(f"prompt {text!r} is not a digit prompt; accepted forms: {ACCEPTED_FORMS}")


def parse_prompts(prompts: list[str]) -> torch.Tensor:
    """Labels ``(B,)`` (int64) for a list of prompts (see :func:`parse_prompt`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long)


def check_labels(labels: torch.Tensor, what: str = "labels") -> torch.Tensor:
    """Validate integer class labels in ``0..9``."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise EPDError(f"{what}: expected a 1-D integer tensor of digit labels, got {labels.dtype} "
                       f"of shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise EPDError(f"{what}: label {int(bad[0])} out of range; digit labels are 0..{NUM_CLASSES - 1}")
    return labels.long()


# --------------------------------------------------------------------------------------------------------------
# Data.

@dataclass
class DigitsSplit:
    """A train/held-out split of the digits, images ``(N, 1, H, W)`` float32 in ``[-1, 1]``, labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor

    @property
    def resolution(self) -> int:
        return self.x_train.shape[-1]


def load_split(seed: int = 0, n_heldout: int = 297, upsample: int = 1) -> DigitsSplit:
    """Load scikit-learn's bundled digits and split them, stratified by class, with a fixed seed.

    Args:
        seed (`int`): ``random_state`` of the stratified split.
        n_heldout (`int`): number of held-out images (the rest is the train split).
        upsample (`int`): integer nearest-neighbour upsampling factor (1 keeps 8×8, 2 gives 16×16).

    Returns:
        :class:`DigitsSplit`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(upsample, int) or upsample < 1:
        raise ConfigError(f"upsample: expected an integer >= 1, got {upsample!r}")
    d = load_digits()
    if not 10 <= n_heldout <= len(d.target) - 10:
        raise ConfigError(f"n_heldout: expected 10..{len(d.target) - 10}, got {n_heldout}")
    idx_tr, idx_ho = train_test_split(range(len(d.target)), test_size=n_heldout, random_state=seed,
                                      stratify=d.target)
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if upsample > 1:
        x = x.repeat_interleave(upsample, -1).repeat_interleave(upsample, -2)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, ho = torch.tensor(idx_tr), torch.tensor(idx_ho)
    return DigitsSplit(x[tr].contiguous(), y[tr], x[ho].contiguous(), y[ho])


def to_base_resolution(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in ``[0, 1]`` (grey or RGB) to ``(B, 1, 8, 8)`` in ``[-1, 1]`` (channel mean,
    area downsampling by the integer factor ``H / 8``)."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2] or images.shape[-1] % BASE_RES:
        raise EPDError(f"images: expected (B, C, H, H) with H a multiple of {BASE_RES}, got {tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True) * 2 - 1
    f = x.shape[-1] // BASE_RES
    return F.avg_pool2d(x, f) if f > 1 else x


def heldout_images(weights_dir) -> torch.Tensor:
    """Held-out real digits ``(B, 3, H, W)`` in ``[0, 1]`` of the split recorded in ``<weights_dir>/model.json``."""
    if not weights_dir or not (Path(weights_dir) / "model.json").is_file():
        raise ConfigError("digits_fd without --fid-ref needs --weights-dir pointing at the trained backbone folder")
    data = json.loads((Path(weights_dir) / "model.json").read_text()).get("data", {})
    split = load_split(seed=int(data.get("split_seed", 0)), n_heldout=int(data.get("n_heldout", 297)),
                       upsample=int(data.get("upsample", 1)))
    return ((split.x_heldout + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
