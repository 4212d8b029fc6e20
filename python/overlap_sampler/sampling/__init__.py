"""Sampler settings: :class:`SamplerConfig` (see ``sampling/config.py``)."""

from .config import POSITIVE_KEYS, SAMPLERS, SamplerConfig

__all__ = ["POSITIVE_KEYS", "SAMPLERS", "SamplerConfig"]
