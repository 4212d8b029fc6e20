"""Why ``torch.load(weights_only=True)`` refused a file, in one line for our error messages."""

from __future__ import annotations

import pickle
import re


def load_error_reason(error: Exception) -> str:
    """torch's reason without its advice to retry with ``weights_only=False``, which is wrong for a
    file that is not what we asked for (and unsafe for one from elsewhere)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return "not a torch.save file of tensors and plain containers" + (
            f": {detail.group(1).split('. ')[0]}" if detail else "")
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
