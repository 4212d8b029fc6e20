"""overlap_sampler: the Overlap Sampler for region-based object detectors.

``import overlap_sampler`` loads the compiled ops (``torch.ops.overlap_sampler``)
and registers their fake kernels. See README.md and docs/ops.md.
"""

from .ops import (
    NEGATIVE_STRATEGIES,
    POSITIVE_STRATEGIES,
    SampleResult,
    assign_bins,
    box_iou,
    build_info,
    max_iou,
    sample,
    sample_from_uniforms,
    splits_from_counts,
    weighted_sample,
)

__version__ = build_info["version"]

# The detector side imports torchvision and pycocotools: load it on first use
# so that `import overlap_sampler` stays as light as the ops.
_LAZY = {
    "SamplerConfig": "sampling",
    "build_detector": "detection",
    "install_sampler": "detection",
    "OverlapRoIHeads": "detection",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "NEGATIVE_STRATEGIES", "OverlapRoIHeads", "POSITIVE_STRATEGIES", "SampleResult", "SamplerConfig",
    "__version__", "assign_bins", "build_detector", "install_sampler",
    "box_iou", "build_info", "max_iou", "sample", "sample_from_uniforms", "splits_from_counts",
    "weighted_sample",
]
