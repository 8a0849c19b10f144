"""The embedded default backbone as one package: a class-conditional EDM denoiser on scikit-learn's bundled digits,
its training, the independent classifier and the scorers built on it.

* :mod:`.data` — prompts → labels, the seeded train/held-out split of scikit-learn's digits.
* :mod:`.model` — the preconditioned U-Net and its checkpoint files (``model.safetensors`` + ``model.json``).
* :mod:`.backbone` — :class:`DigitsBackbone`, the :class:`~epd.backbones.base.Backbone` with CFG inside.
* :mod:`.train` — ``epd backbone train`` (denoiser + classifier).
* :mod:`.classifier` — the classifier behind the digits metrics and its Fréchet distance.
* :mod:`.scorers` — the ``digits_*`` scorer factories registered in :mod:`epd.rewards`.

Importing the package loads the backbone only (not training, classifier or scorers).
"""

from .backbone import DigitsBackbone, DigitsDenoiser, edm_sigmas
from .data import (NULL_CLASS, NUM_CLASSES, PROMPTS, DigitsSplit, check_labels, heldout_images, load_split,
                   parse_prompt, parse_prompts, to_base_resolution)
from .model import (DEFAULT_ARCH, FORMAT, FORMAT_VERSION, SIGMA_DATA, DigitsUNet, EDMPrecond, build_net, load_model,
                    load_safetensors_checked, read_meta, save_model)

__all__ = [
    "NUM_CLASSES", "NULL_CLASS", "SIGMA_DATA", "PROMPTS", "parse_prompt", "parse_prompts", "check_labels",
    "DigitsSplit", "load_split", "to_base_resolution", "heldout_images", "DigitsUNet", "EDMPrecond", "build_net",
    "DEFAULT_ARCH", "DigitsDenoiser", "DigitsBackbone", "edm_sigmas", "FORMAT", "FORMAT_VERSION", "save_model",
    "load_model", "read_meta", "load_safetensors_checked", "BACKBONE",
]

BACKBONE = DigitsBackbone  # the adapter class epd.backbones.backbone_class("digits") returns
