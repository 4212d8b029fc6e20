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


def not_a_torch_file(path: str) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, judged from its first bytes, or None if it may be one
    (a zip archive, a pickle or an old tar archive). For the others torch's own reason is unhelpful: a
    text file beginning with "e" gives "KeyError: 101"."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x80")) or head[257:262] == b"ustar":
        return None
    if not head:
        return "an empty file, not a torch.save file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a text file's first 512 bytes may end inside a character
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text is not None and all(c.isprintable() or c in "\t\n\r" for c in text):
        first = (text.strip().splitlines() or [""])[0]
        return f"a text file, not a torch.save file: it begins {first[:40]!r}"
    return f"not a torch.save file: it begins with the bytes {head[:8]!r}"
