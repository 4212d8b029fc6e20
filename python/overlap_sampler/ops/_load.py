"""Find and load the compiled library, with an error that says what to do."""

from __future__ import annotations

import importlib
import torch

_REBUILD = (
    "Rebuild it against the installed torch from the repository root with "
    "`pip install --no-build-isolation -e .` (or run `bash scripts/setup.sh`)."
)


def load_library() -> dict:
    """Import ``overlap_sampler._C`` (which registers ``torch.ops.overlap_sampler``).

    Returns the build information dict (version, CUDA on/off, CUDA version,
    architectures, the torch version it was built against).
    """
    try:
        native = importlib.import_module("overlap_sampler._C")
    except ImportError as error:
        # Editable installs keep the .so in site-packages and the .py files in the
        # source tree; importlib searches every folder of the package __path__.
        message = str(error)
        if "undefined symbol" in message or "cannot open shared object" in message:
            raise ImportError(
                f"overlap_sampler's native library failed to load ({message}). It was probably "
                f"built for another torch than the installed {torch.__version__}. {_REBUILD}"
            ) from error
        raise ImportError(
            f"overlap_sampler's native library (overlap_sampler._C) is missing: the package was "
            f"not built. {_REBUILD}"
        ) from error
    info = dict(native.build_info)
    built_for = info["torch_version"].split("+")[0]
    running = torch.__version__.split("+")[0]
    if built_for != running:
        raise ImportError(
            f"overlap_sampler was built for torch {info['torch_version']} but torch "
            f"{torch.__version__} is installed. {_REBUILD}"
        )
    return info
