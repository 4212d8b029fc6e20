"""Analyses of trained detectors (``overlap-sampler analyze ...``).

- ``upper_bound.py``: the paper's Table 1, the AP a detector would reach if its scores before NMS
  met the ideal of a sampling heuristic (IoU-balanced, ISR, overlap sampler).

Nothing is imported here, so that ``overlap-sampler --help`` stays fast: import the module.
"""
