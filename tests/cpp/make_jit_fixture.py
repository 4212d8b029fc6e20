"""Build the inputs of the C++ TorchScript test (tests/cpp/jit_load.cpp).

    python tests/cpp/make_jit_fixture.py BUILD_DIR     # writes BUILD_DIR/jit_fixture/
    python tests/cpp/make_jit_fixture.py --print-preload

For each case it saves ``<case>.pt`` (a scripted module) and ``<case>_io.pt`` (``torch.save`` of
``{"inputs": tuple of forward arguments, "expected": the scripted module's output}``, which C++
reads with ``torch::pickle_load``). The cases:

* ``fasterrcnn``, ``maskrcnn``: tiny random-init detectors from
  ``overlap_sampler.detection.build_detector`` ("small" backbone, OverlapRoIHeads) exported with
  ``export_torchscript`` (which already checks that the reloaded file equals eager in Python), on
  two 128 px images of different heights. Expected = the output of the reloaded file.
* ``ops``: a scripted function of ``torch.ops.overlap_sampler`` ops (box_iou, max_iou,
  sample_from_uniforms) on a random batch; ``ops_io_wrong.pt`` has one expected value moved by
  one ulp, to check that jit_load notices.

Everything is computed on one CPU thread with the JIT fusers off; jit_load.cpp does the same, so
the C++ outputs must be bit-identical.

``--print-preload`` prints, one per line, the shared libraries a non-Python program must
``dlopen(RTLD_NOW | RTLD_GLOBAL)`` (in this order) before ``torch::jit::load`` can resolve
``torchvision::nms`` / ``roi_align``: torchvision's op library needs ``libtorch_python.so``
(a DT_NEEDED entry, although it uses none of its symbols), which in turn needs the CPython
runtime ``libpython3.X.so`` for ~330 ``Py*`` symbols. Loading libpython does not start an
interpreter; it only satisfies the dynamic linker.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig

import torch

SEED = 0
IMAGE_SIZE = 128
NUM_CLASSES = 3
DETECTIONS = 30  # per image (torchvision's default 100 only makes the files bigger)


def preload_libraries() -> list[str]:
    """Absolute paths to dlopen, in order, to register torchvision's ops outside Python."""
    import torchvision

    libraries = []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libpython = os.path.join(sysconfig.get_config_var("LIBDIR"),
                                 sysconfig.get_config_var("LDLIBRARY"))
        if os.path.exists(libpython):
            libraries.append(libpython)
    # (A statically linked python has no libpython.so; its Py* symbols are not exported to
    # other programs, and the preload below fails with "undefined symbol: Py...".)
    torch_python = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_python.so")
    if os.path.exists(torch_python):
        libraries.append(torch_python)
    folder = os.path.dirname(torchvision.__file__)
    # torchvision >= 0.26 ships its kernels as _C_stable.so (built on the libtorch stable ABI);
    # older releases as _C.so / _C.<python tag>.so.
    candidates = [os.path.join(folder, "_C_stable.so"), os.path.join(folder, "_C.so"),
                  *sorted(glob.glob(os.path.join(folder, "_C.*.so")))]
    extension = next((path for path in candidates if os.path.exists(path)), None)
    if extension is None:
        raise SystemExit(f"no torchvision op library (_C_stable.so / _C.so) in {folder}")
    libraries.append(extension)
    return libraries


def _detector_case(arch: str, folder: str) -> None:
    from overlap_sampler.detection import build_detector
    from overlap_sampler.engine.export import example_images, export_torchscript, no_jit_fusion

    torch.manual_seed(SEED)
    model = build_detector(arch, NUM_CLASSES, backbone="small", min_size=IMAGE_SIZE,
                           max_size=IMAGE_SIZE, box_detections_per_img=DETECTIONS).eval()
    images = example_images(IMAGE_SIZE, count=2, seed=SEED)
    path = export_torchscript(model, os.path.join(folder, f"{arch}.pt"), images)
    loaded = torch.jit.load(path)
    with torch.no_grad(), no_jit_fusion():
        expected = loaded(images)
    detections = expected[1]
    if not all(len(d["boxes"]) for d in detections):
        raise SystemExit(f"{arch}: an image has no detections; the comparison would be vacuous")
    torch.save({"inputs": (images,), "expected": expected}, os.path.join(folder, f"{arch}_io.pt"))
    print(f"{arch}: {[len(d['boxes']) for d in detections]} detections per image")


def _ops_pipeline(proposals: torch.Tensor, proposal_splits: torch.Tensor,
                  gt_boxes: torch.Tensor, gt_splits: torch.Tensor, uniforms: torch.Tensor):
    iou = torch.ops.overlap_sampler.box_iou(proposals, gt_boxes)
    max_values, argmax = torch.ops.overlap_sampler.max_iou(proposals, proposal_splits,
                                                           gt_boxes, gt_splits)
    sampled = torch.ops.overlap_sampler.sample_from_uniforms(
        proposals, proposal_splits, gt_boxes, gt_splits, uniforms, batch_size_per_image=32,
        pos_weight=2.0)
    return [iou, max_values, argmax] + list(sampled)


def _ops_case(folder: str) -> None:
    import overlap_sampler  # noqa: F401  (registers torch.ops.overlap_sampler)
    from overlap_sampler.testing import make_batch

    proposals, proposal_splits, gt, gt_splits = make_batch([60, 25], [4, 2], seed=SEED)
    generator = torch.Generator().manual_seed(SEED)
    uniforms = torch.rand(proposals.shape[0] + gt.shape[0], dtype=torch.float64,
                          generator=generator)
    inputs = (proposals, proposal_splits, gt, gt_splits, uniforms)
    scripted = torch.jit.script(_ops_pipeline)
    path = os.path.join(folder, "ops.pt")
    scripted.save(path)
    expected = torch.jit.load(path)(*inputs)
    eager = _ops_pipeline(*inputs)
    if not all(torch.equal(a, b) for a, b in zip(eager, expected)):
        raise SystemExit("ops: the scripted pipeline differs from eager")
    torch.save({"inputs": inputs, "expected": expected}, os.path.join(folder, "ops_io.pt"))
    # One value off by one ulp: jit_load must report exactly that difference.
    wrong = [t.clone() for t in expected]
    wrong[0].view(-1)[7] = torch.nextafter(wrong[0].view(-1)[7], torch.tensor(2.0))
    torch.save({"inputs": inputs, "expected": wrong}, os.path.join(folder, "ops_io_wrong.pt"))
    print(f"ops: {len(expected)} output tensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build_dir", nargs="?", help="writes BUILD_DIR/jit_fixture/")
    parser.add_argument("--print-preload", action="store_true",
                        help="print the libraries to dlopen before torch::jit::load")
    args = parser.parse_args(argv)
    if args.print_preload:
        print("\n".join(preload_libraries()))
        return 0
    if args.build_dir is None:
        parser.error("BUILD_DIR is required (or --print-preload)")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # "TorchScript is deprecated"
    warnings.filterwarnings("ignore", message="RCNN always returns")
    torch.set_num_threads(1)
    folder = os.path.join(args.build_dir, "jit_fixture")
    os.makedirs(folder, exist_ok=True)
    _ops_case(folder)
    for arch in ("fasterrcnn", "maskrcnn"):
        _detector_case(arch, folder)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
