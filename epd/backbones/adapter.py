"""What a backbone kind offers, asked of its class: no weights are loaded, so Snakemake can ask while it parses.

Every adapter class (:class:`~epd.backbones.digits.DigitsBackbone`, :class:`~epd.backbones.gmm.GMMBackbone`,
:class:`~epd.backbones.diffusers_common.DiffusersBackbone` and its SD1.5/SD3/FLUX subclasses) derives from
:class:`BackboneAdapter`: it builds itself from a config section (:meth:`BackboneAdapter.from_section`) and states
its optional capabilities. Stages and workflow rules query these (``epd.backbones.backbone_class(kind).trainable``)
instead of comparing kind names.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["BackboneAdapter", "CAPABILITIES"]

# Optional capabilities: name -> what having it means (a true flag, or a classmethod that is not None).
CAPABILITIES = {
    "trainable": "`epd backbone train` trains it into its weights folder (the workflow trains it or uses a "
                 "DVC-pulled copy, instead of resolving released weights)",
    "weights_folder": "stages load it from a weights folder given as `--weights DIR`; its metrics read their "
                      "weights from the same folder (`epd evaluate --weights-dir DIR`)",
    "needs_weights_check": "`epd backbone check` validates its local weights folder before any job loads it",
    "metric_features": "differentiable features of its own metric, for `distill.feature_weight`",
    "heldout_reference": "held-out real images: the built-in reference of its set metrics (FD without --fid-ref)",
    "block_checkpointing": "its network can recompute activations block by block in backward passes "
                           "(`enable_block_checkpointing()`): with `distill.checkpoint_denoiser` the recomputation "
                           "of one denoiser call then keeps only block boundaries, not the whole call's activations",
}


class BackboneAdapter:
    """Class-level description of a backbone kind (see the module docstring).

    Attributes:
        name (`str`): registry name (the config's ``kind``).
        trainable (`bool`): see :data:`CAPABILITIES`.
        weights_folder (`bool`): see :data:`CAPABILITIES`.
        needs_weights_check (`bool`): :meth:`check` validates the weights without loading them.
        metric_features: None, or a classmethod ``(weights_dir, device="cpu") -> features``, ``features(x)``
            differentiable in the final states ``x`` of the backbone.
        heldout_reference: None, or a classmethod ``(weights_dir) -> images`` ``(N, 3, H, W)`` in ``[0, 1]``.
        block_checkpointing (`bool`): instances have ``enable_block_checkpointing()``.
    """

    name = ""
    trainable = False
    weights_folder = False
    needs_weights_check = False
    metric_features = None
    heldout_reference = None
    block_checkpointing = False

    @classmethod
    def from_section(cls, section: dict, device: str = "cpu", **kw):
        """Build the backbone of a config's ``backbones.<name>`` section (``kw``: e.g. ``weights_dir``)."""
        raise NotImplementedError(f"{cls.__name__}.from_section")

    @classmethod
    def check(cls, section: dict | None = None, path=None):
        """Validate the local weights of ``section`` without loading them (where :attr:`needs_weights_check`)."""
        raise ConfigError(f"backbone {cls.name!r} has no local weights to check")

    def weights(self):
        """Every weight tensor of the loaded backbone (frozen by the stages that only learn a table)."""
        return list(getattr(self.denoiser, "parameters", lambda: [])())

    @classmethod
    def supports(cls, capability: str) -> bool:
        """Whether this class has ``capability`` (a key of :data:`CAPABILITIES`)."""
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown backbone capability {capability!r}; known: {sorted(CAPABILITIES)}")
        value = getattr(cls, capability)
        return value is not None and value is not False
