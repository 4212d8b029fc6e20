"""Shared fixtures: devices to test on and random crowded detection batches."""

from __future__ import annotations

import pytest
import torch

import overlap_sampler
from overlap_sampler.testing import jitter_around, make_batch, random_boxes  # noqa: F401

HAS_CUDA = torch.cuda.is_available() and overlap_sampler.build_info["cuda"]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")


def cpu_and_cuda():
    """Parametrisation over the devices this machine can run."""
    return ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(scope="module")
def bench_ops():
    """benchmarks/bench_ops.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_ops", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
