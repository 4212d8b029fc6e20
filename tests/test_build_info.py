"""The native library loads, reports its build, and explains a broken install."""

import importlib

import pytest
import torch

import overlap_sampler
from overlap_sampler.ops import _load


def test_build_info_describes_the_library():
    info = overlap_sampler.build_info
    assert info["version"] == overlap_sampler.__version__
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_version"] and "90" in info["cuda_architectures"].split(",")
    else:  # no kernels, so no architectures to report
        assert info["cuda_version"] == "" and info["cuda_architectures"] == ""


def test_every_op_is_registered():
    for name in ("box_iou", "max_iou", "assign_bins", "weighted_sample", "sample", "sample_from_uniforms"):
        assert hasattr(torch.ops.overlap_sampler, name)


def test_missing_library_says_how_to_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("No module named 'overlap_sampler._C'")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match="not built.*pip install --no-build-isolation -e ."):
        _load.load_library()


def test_library_for_another_torch_says_how_to_rebuild(monkeypatch):
    class Stale:
        build_info = dict(overlap_sampler.build_info, torch_version="1.0.0")

    monkeypatch.setattr(importlib, "import_module", lambda name: Stale)
    with pytest.raises(ImportError, match=r"built for torch 1\.0\.0 but torch .* is installed.*Rebuild"):
        _load.load_library()


def test_undefined_symbol_is_explained(monkeypatch):
    def broken(name):
        raise ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperators")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="built for another torch"):
        _load.load_library()
