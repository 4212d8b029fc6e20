"""Sampler settings (:class:`SamplerConfig`, ``sampling/config.py``) and the rival samplers
(``libra``, ``ohem``, ``isr``) that run beside the Overlap Sampler op."""

from .config import BUDGET_FIELDS, METHOD_FIELDS, OHEM_VARIANTS, POSITIVE_KEYS, PRESETS, SAMPLERS, SamplerConfig

__all__ = ["BUDGET_FIELDS", "METHOD_FIELDS", "OHEM_VARIANTS", "POSITIVE_KEYS", "PRESETS", "SAMPLERS", "SamplerConfig"]
