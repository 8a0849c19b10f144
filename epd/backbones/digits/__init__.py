"""The embedded default backbone as one package: a class-conditional EDM denoiser on scikit-learn's bundled digits,
its training, the independent classifier and the scorers built on it.

* :mod:`.model` — prompts, data split, network, the :class:`DigitsBackbone` and its checkpoint files.
* :mod:`.train` — ``epd backbone train`` (denoiser + classifier).
* :mod:`.classifier` — the classifier behind the digits metrics and its Fréchet distance.
* :mod:`.scorers` — the ``digits_*`` scorer factories registered in :mod:`epd.rewards`.

Importing the package loads the backbone only (not training, classifier or scorers).
"""

from .model import (DEFAULT_ARCH, FORMAT, FORMAT_VERSION, NULL_CLASS, NUM_CLASSES, PROMPTS, SIGMA_DATA, DigitsBackbone,
                    DigitsDenoiser, DigitsSplit, DigitsUNet, EDMPrecond, build_net, check_labels, edm_sigmas,
                    load_model, load_safetensors_checked, load_split, parse_prompt, parse_prompts, read_meta,
                    save_model, to_base_resolution)

__all__ = [
    "NUM_CLASSES", "NULL_CLASS", "SIGMA_DATA", "PROMPTS", "parse_prompt", "parse_prompts", "check_labels",
    "DigitsSplit", "load_split", "to_base_resolution", "DigitsUNet", "EDMPrecond", "build_net", "DEFAULT_ARCH",
    "DigitsDenoiser", "DigitsBackbone", "edm_sigmas", "FORMAT", "FORMAT_VERSION", "save_model", "load_model",
    "read_meta", "load_safetensors_checked",
]
