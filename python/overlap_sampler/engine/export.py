"""Export a trained detector: TorchScript (the whole detector) and torch.export (the backbone).

TorchScript is how the whole detector runs without Python: ``torch.jit.load`` in Python or
``torch::jit::load`` in C++ (see tests/cpp/jit_load.cpp). The scripted graph calls
``torchvision::nms`` / ``torchvision::roi_align`` (and, in its training branch,
``overlap_sampler::sample``), so a loader must have torchvision's and overlap_sampler's op
libraries loaded first.

Every export is checked: the saved file is loaded back and its outputs must be *equal* to the
eager model's on the example images (see :func:`export_torchscript` for why exact equality holds).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import zipfile
from typing import Any, Iterator, Optional, Sequence

import torch

from ..io_safety import atomic_path, check_not_inputs, prepare_output_file, same_file

# The extra file of an exported detector that maps its labels to dataset categories.
CATEGORIES_FILE = "categories.json"

_OUTPUT_KEYS = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")


def detections_of(output: Any) -> list:
    """The per-image detection dicts, whether the model is eager or scripted (a scripted
    GeneralizedRCNN always returns ``(losses, detections)``)."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
        return output[1]
    return output


def detect(model: torch.nn.Module, images: Sequence[torch.Tensor]) -> list:
    """``model(images)``'s per-image detection dicts, eager or scripted, without the warning a
    scripted detector gives at every call (that it returns ``(losses, detections)``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RCNN always returns a")
        return detections_of(model(images))


@contextlib.contextmanager
def no_jit_fusion() -> Iterator[None]:
    """TorchScript with its fusers (NNC on CPU/GPU, oneDNN Graph) off, restored on exit.

    Like ``torch.jit.fuser("none")`` without its "nvfuser is no longer supported" warnings. A
    fuser may rewrite a pointwise chain (e.g. box decoding) into one kernel whose rounding
    differs from eager's by an ulp, which can flip an NMS decision; with fusion off the scripted
    graph runs the very kernels eager mode runs.
    """
    c = torch._C
    saved = (c._jit_can_fuse_on_cpu(), c._jit_can_fuse_on_gpu(), c._jit_texpr_fuser_enabled(),
             c._jit_llga_enabled())
    c._jit_override_can_fuse_on_cpu(False)
    c._jit_override_can_fuse_on_gpu(False)
    c._jit_set_texpr_fuser_enabled(False)
    c._jit_set_llga_enabled(False)
    try:
        yield
    finally:
        c._jit_override_can_fuse_on_cpu(saved[0])
        c._jit_override_can_fuse_on_gpu(saved[1])
        c._jit_set_texpr_fuser_enabled(saved[2])
        c._jit_set_llga_enabled(saved[3])


def _describe(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {list(a.shape)} vs {list(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    difference = (a.double() - b.double()).abs()
    return (f"{int((difference > 0).sum())} of {a.numel()} values differ, "
            f"max abs difference {difference.max().item():.3g}")


def compare_detections(expected: Sequence[dict], actual: Sequence[dict], *,
                       what: str = "exported") -> list[str]:
    """Every difference between two lists of detection dicts, as readable lines (empty if equal).

    Tensors are compared with ``torch.equal`` (same shape, dtype and values).
    """
    problems = []
    if len(expected) != len(actual):
        return [f"{what} model returned {len(actual)} detection dicts, eager {len(expected)}"]
    for i, (eager, other) in enumerate(zip(expected, actual)):
        if set(eager) != set(other):
            problems.append(f"image {i}: keys {sorted(other)} vs eager {sorted(eager)}")
            continue
        for key in eager:
            a, b = eager[key], other[key]
            if not torch.equal(a.cpu(), b.cpu()) or a.dtype != b.dtype:
                problems.append(f"image {i}: '{key}' differs ({what} vs eager: "
                                f"{_describe(b.cpu(), a.cpu())})")
    return problems


def _check_images(example_images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(example_images, torch.Tensor) or not len(example_images):
        raise ValueError("example_images must be a non-empty list of float [3, H, W] tensors")
    for i, image in enumerate(example_images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
            got = (f"{image.dtype} {list(image.shape)}" if isinstance(image, torch.Tensor)
                   else type(image).__name__)
            raise ValueError(f"example_images[{i}] must be a float [3, H, W] tensor, got {got}")
    return list(example_images)


def export_torchscript(model: torch.nn.Module, path: str,
                       example_images: Sequence[torch.Tensor], *,
                       extra_files: Optional[dict[str, str]] = None) -> str:
    """Script ``model`` with ``torch.jit.script``, save it to ``path`` and verify the saved file.

    ``extra_files`` (name -> text) are stored in the archive beside the code (``torch.jit.save``'s
    ``_extra_files``); :func:`export_checkpoint` stores the label mapping there.

    The file is loaded back with ``torch.jit.load`` and run on ``example_images`` (float32
    [3, H, W] in [0, 1], on the model's device); its detections (``boxes`` float32 [n, 4]
    x1y1x2y2 absolute pixels, ``scores``, ``labels`` int64, ``masks`` [n, 1, H, W] for Mask R-CNN)
    must be *equal* (``torch.equal``) to the eager model's.

    Exact equality holds because the scripted graph calls the same ATen kernels in the same order
    as eager mode; the only thing that could change the arithmetic is a JIT fuser rewriting
    pointwise chains, so the check runs with fusers off (:func:`no_jit_fusion`; a C++ runner
    wanting bit-identical results does the same, see tests/cpp/jit_load.cpp) -- the graph is
    what is being checked. The model is put in eval mode (and left there).

    The scripted detector returns ``(losses, detections)`` like every scripted torchvision
    GeneralizedRCNN; in C++: ``module.forward({images}).toTuple()->elements()[1]``.

    The file is written atomically and only once verified (:mod:`overlap_sampler.io_safety`): a
    temporary file beside ``path``, created before the scripting so that an unwritable ``path``
    fails at once, is saved, reloaded, checked, then renamed to ``path``.

    Returns:
        ``path``.

    Raises:
        RuntimeError: the model cannot be scripted (the TorchScript error is included), or the
            reloaded module's outputs differ from eager (each difference is named); ``path`` is
            then not written.
        OutputError: ``path`` cannot be written (named, with the reason).
    """
    images = _check_images(example_images)
    prepare_output_file(path, "TorchScript file")
    model.eval()
    with atomic_path(path, what="TorchScript file") as tmp:
        try:
            scripted = torch.jit.script(model)
        except Exception as error:  # TorchScript raises several types; all mean "cannot script".
            raise RuntimeError(
                f"export_torchscript: torch.jit.script failed for {type(model).__name__}; the model "
                f"must be TorchScript-compatible (see the error below).\n{error}") from error
        torch.jit.save(scripted, tmp, _extra_files=dict(extra_files or {}))
        device = next(iter(model.parameters()), torch.empty(0)).device
        loaded = torch.jit.load(tmp, map_location=device)
        loaded.eval()
        with torch.no_grad(), no_jit_fusion():
            expected = detect(model, images)
            # Two runs: the profiling executor optimises the graph after the first.
            for run in range(2):
                problems = compare_detections(expected, detect(loaded, images),
                                              what=f"reloaded TorchScript (run {run + 1})")
                if problems:
                    raise RuntimeError(f"export_torchscript: the scripted model does not reproduce the eager "
                                       f"model, so {path} is not written:\n  " + "\n  ".join(problems))
    return path


class _BackboneInput(torch.nn.Module):
    """The detector's inference front end that torch.export can trace: normalise + backbone."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone((images - self.mean) / self.std)


def export_backbone(model: torch.nn.Module, path: str, example_batch: torch.Tensor, *,
                    dynamic_size: bool = True) -> str:
    """``torch.export`` the detector's normalisation + backbone (+ FPN); save it as ``.pt2``.

    Input: float32 [B, 3, H, W] images already resized and padded (H, W multiples of 32 for the
    FPN; ``model.transform(images)[0].tensors``). With ``dynamic_size`` H and W are symbolic
    (any multiple of 32 up to 2048, above the smallest size the example's shapes allow) and so
    is B when ``example_batch`` has B >= 2. Output: the backbone's dict of FPN feature maps,
    float32 [B, C, H/s, W/s] (ResNet-FPN: levels "0".."3" and "pool", C = 256).

    Why not the whole detector (tried with torch 2.14.1 / torchvision 0.29.1):
    ``torch.export.export(model, ([image],), strict=False)`` traces the resize/normalise transform
    and the backbone, then stops in the RPN's box filtering::

        GuardOnDataDependentSymNode: Could not guard on data-dependent expression
        4*u1 > 4000 (unhinted: 4*u1 > 4000).  Caused by: (torchvision/ops/boxes.py:86 in
        batched_nms)

    ``u1`` is the number of proposals left after dropping small and low-score boxes: a
    data-dependent size, and ``batched_nms`` branches on it (``boxes.numel() > 4000`` picks the
    per-class loop or the coordinate trick). Past that, ``torchvision::nms`` returns a
    data-dependent count, and the RoI heads index, top-k and paste masks on those counts; the
    backbone + RPN alone stops at the same line. Exporting further would mean rewriting the RPN
    and box post-processing with fixed-size, padded outputs (as overlap_sampler's own ops do).
    The backbone is the part with a static graph (and the bulk of the compute); the full
    detector exports through TorchScript (:func:`export_torchscript`).

    The saved program is loaded back with ``torch.export.load`` and must return outputs equal to
    the eager backbone's on ``example_batch``; as in :func:`export_torchscript`, ``path`` is written
    atomically and only once verified.
    """
    if not isinstance(example_batch, torch.Tensor) or example_batch.dim() != 4:
        raise ValueError("example_batch must be a float [B, 3, H, W] tensor, got "
                         f"{getattr(example_batch, 'shape', type(example_batch).__name__)}")
    module = _BackboneInput(model).eval()
    dynamic_shapes = None
    if dynamic_size:
        # Sizes stay multiples of 32 so every FPN level has an integral size.
        h = torch.export.Dim("h32", min=1, max=64)
        w = torch.export.Dim("w32", min=1, max=64)
        dynamic_shapes = {"images": {2: 32 * h, 3: 32 * w}}
        if example_batch.shape[0] >= 2:  # torch.export specialises sizes 0 and 1
            dynamic_shapes["images"][0] = torch.export.Dim("batch", min=1, max=1024)
    prepare_output_file(path, "backbone program")
    with torch.no_grad(), atomic_path(path, what="backbone program") as tmp:
        program = torch.export.export(module, (example_batch,), dynamic_shapes=dynamic_shapes)
        # File objects: torch.export warns about a path not ending in .pt2, as a temporary's does.
        with open(tmp, "wb") as f:
            torch.export.save(program, f)
        with open(tmp, "rb") as f:
            loaded = torch.export.load(f).module()
        expected, actual = module(example_batch), loaded(example_batch)
        problems = [f"level {k!r}: {_describe(actual[k], expected[k])}" for k in expected
                    if not torch.equal(expected[k], actual[k])]
        if problems:
            raise RuntimeError(f"export_backbone: the exported program does not reproduce the eager backbone, "
                               f"so {path} is not written:\n  " + "\n  ".join(problems))
    return path


def example_images(size: int | tuple[int, int] = 256, count: int = 2, *,
                   device: str | torch.device = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Deterministic example images: ``count`` float32 [3, H, W] tensors in [0, 1].

    Smooth blobs rather than white noise, so even a freshly initialised detector finds boxes to
    compare. ``size`` is H = W or (H, W); the second image is 3/4 as tall to exercise padding.
    """
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    images = []
    for k in range(count):
        h = height if k % 2 == 0 else max(32, height * 3 // 4)
        coarse = torch.rand(1, 3, max(2, h // 16), max(2, width // 16), generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(h, width), mode="bilinear",
                                                align_corners=False)[0]
        images.append(image.clamp(0, 1).to(device))
    return images


def export_checkpoint(checkpoint: str, output: str, *,
                      example_image_size: int | tuple[int, int] = 256,
                      backbone_output: Optional[str] = None, device: str = "cpu") -> str:
    """Export a training checkpoint to TorchScript at ``output`` (checked against eager).

    The file carries the label -> category mapping as the extra file ``categories.json``
    (:data:`CATEGORIES_FILE`; read it with :func:`load_categories`).

    Args:
        checkpoint: a checkpoint written by ``overlap_sampler.engine.checkpoint.save_checkpoint``.
        output: the ``.pt`` TorchScript file to write.
        example_image_size: size of the two synthetic images the export is verified on.
        backbone_output: also ``torch.export`` the backbone to this ``.pt2`` file.
        device: where the verification runs (``"auto"``, ``"cpu"``, ``"cuda[:N]"``; the saved module
            loads on any device).

    Nothing is written over the checkpoint, and both outputs are checked writable before the
    slow part (loading, scripting, verifying).

    Returns:
        ``output``.
    """
    from overlap_sampler.engine.checkpoint import categories_of, load_checkpoint, model_from_checkpoint_state
    from overlap_sampler.engine.distributed import resolve_device

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    for name, path, example in (("output", output, "model.pt"), ("backbone_output", backbone_output, "backbone.pt2")):
        if path is not None and os.path.isdir(path):
            raise ValueError(f"{name} {path!r} is a directory: give the file to write, e.g. "
                             f"{os.path.join(path, example)!r}")
    outputs = [("TorchScript file", output), ("backbone program", backbone_output)]
    check_not_inputs(outputs, [("checkpoint", checkpoint)])
    if backbone_output is not None and same_file(output, backbone_output):
        raise ValueError(f"output and backbone_output are one file, {output}: give each its own path")
    device = resolve_device(device)
    sizes = (example_image_size,) * 2 if isinstance(example_image_size, int) else tuple(example_image_size)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 for s in sizes):
        raise ValueError(f"example_image_size must be at least 32 pixels, got {example_image_size!r}")
    for what, path in outputs:
        if path is not None:
            prepare_output_file(path, what)
    state = load_checkpoint(checkpoint, map_location="cpu")
    model, _ = model_from_checkpoint_state(state, checkpoint)
    model.to(device).eval()
    images = example_images(example_image_size, device=device)
    export_torchscript(model, output, images,
                       extra_files={CATEGORIES_FILE: json.dumps(categories_of(state), indent=1)})
    print(f"wrote {output} (TorchScript; reloaded outputs equal eager on {len(images)} images; "
          f"labels -> categories in its {CATEGORIES_FILE})")
    if backbone_output is not None:
        with torch.no_grad():
            batch = model.transform(images)[0].tensors
        export_backbone(model, backbone_output, batch)
        print(f"wrote {backbone_output} (torch.export of the backbone; outputs equal eager)")
    return output


def load_categories(path: str) -> list[dict[str, Any]]:
    """The label mapping stored in a TorchScript file by :func:`export_checkpoint`:
    ``[{"label": l, "category_id": id, "name": name}, ...]`` (labels from 1; 0 is the background).

    Read straight from the zip archive (``<archive>/extra/categories.json``): the model is not
    loaded, so this needs neither the ops nor the time to deserialise the weights.
    Raises ``ValueError`` if ``path`` is not such an archive or has no mapping.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.split("/")[1:] == ["extra", CATEGORIES_FILE]]
            if not names:
                raise ValueError(f"{path} has no {CATEGORIES_FILE} (not written by export_checkpoint)")
            return json.loads(archive.read(names[0]))
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a TorchScript archive ({e})") from e
