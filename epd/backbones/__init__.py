"""Backbone adapters implementing the Denoiser contract (:mod:`epd.backbones.base`)."""
