"""Analyses of trained detectors (``overlap-sampler analyze ...``).

- ``upper_bound.py``: the paper's Table 1, the AP a detector would reach if its scores before NMS
  met the ideal of a sampling heuristic (IoU-balanced, ISR, overlap sampler).
- ``iou_hist.py``: the paper's Figure 4 on a detector's own RPN proposals, the IoU_p,n of the
  negatives (and the keys of the positives) that each sampler picks from the same proposals.

Nothing is imported here, so that ``overlap-sampler --help`` stays fast: import the module.
"""
