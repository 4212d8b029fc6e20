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

__all__ = [
    "NEGATIVE_STRATEGIES", "POSITIVE_STRATEGIES", "SampleResult", "__version__", "assign_bins",
    "box_iou", "build_info", "max_iou", "sample", "sample_from_uniforms", "splits_from_counts",
    "weighted_sample",
]
