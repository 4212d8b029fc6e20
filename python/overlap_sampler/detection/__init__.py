"""Detectors with the Overlap Sampler: torchvision Faster/Mask R-CNN whose RoI
head samples with ``torch.ops.overlap_sampler.sample`` and weighs its loss.

* :class:`OverlapRoIHeads` / :func:`install_sampler`: the RoI head (``roi_heads.py``);
* :func:`weighted_fastrcnn_loss`: the ε-weighted Fast R-CNN loss (``losses.py``);
* :func:`build_detector`: Faster/Mask R-CNN with a ResNet-50/18-FPN or a small
  CPU-friendly backbone, never downloading anything (``models.py``).
"""

from .losses import weighted_fastrcnn_loss
from .models import ARCHITECTURES, BACKBONES, build_detector, load_backbone_weights, load_weights
from .roi_heads import OverlapRoIHeads, install_sampler

__all__ = [
    "ARCHITECTURES", "BACKBONES", "OverlapRoIHeads", "build_detector", "install_sampler",
    "load_backbone_weights", "load_weights", "weighted_fastrcnn_loss",
]
