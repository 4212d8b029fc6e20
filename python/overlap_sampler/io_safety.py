"""Output files, safely: whole or not at all, never over an input, no temporary files left behind.

The one way every command that writes (``train``, ``eval``, ``predict``, ``export``, the benchmarks)
puts files on disk:

* :func:`atomic_write` (and :func:`write_text`, :func:`write_json`, :func:`atomic_path`,
  :func:`replace_with_link`): the bytes go to a temporary file in the destination's folder, are
  flushed (and fsynced), then ``os.replace``\\ d over the destination. A reader, or a run killed
  mid-write, sees the old file or the new one, never half of one; on an error the temporary is
  removed.
* :func:`prepare_output_dir` / :func:`prepare_output_file`: before the expensive work, create the
  folder and prove it writable by creating (and removing) a temporary file in it, so an unwritable
  destination fails at once with an error naming it, not after an hour of training or scripting.
  They also remove stale temporaries of ours there (:func:`remove_stale_temporaries`).
* :func:`check_not_inputs`: refuse to write a file that is one the command reads (same file by
  ``os.stat`` identity, hard links included, or by real path), naming both paths.

Temporary files are named ``.<name>~<pid>-<32 hex digits>.overlap-sampler-tmp``: hidden, beside
the destination ``<name>``, with the writer's process id. Only names of exactly this form (and the
two forms older versions used, see :data:`LEGACY_TEMPORARY`) are ever removed, and only when stale:
untouched for :data:`STALE_AFTER_S` and their writer no longer running on this machine, or untouched
for :data:`ABANDONED_AFTER_S` (the pid may since have been reused). The age guard keeps a writer on
another machine sharing the folder safe, whose pid means nothing here.

Errors preparing, creating or renaming an output raise :class:`OutputError` (an ``OSError``) whose
message names the destination, not the temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any, Optional

__all__ = ["ABANDONED_AFTER_S", "LEGACY_TEMPORARY", "OutputError", "STALE_AFTER_S", "TEMPORARY_SUFFIX",
           "atomic_path", "atomic_write", "check_not_inputs", "prepare_output_dir", "prepare_output_file",
           "remove_stale_temporaries", "replace_with_link", "same_file", "temporary_name", "write_json",
           "write_text"]

TEMPORARY_SUFFIX = ".overlap-sampler-tmp"
_TEMPORARY = re.compile(r"\..*~(?P<pid>[0-9]+)-[0-9a-f]{32}" + re.escape(TEMPORARY_SUFFIX), re.DOTALL)
#: Temporary names of earlier versions (checkpoint.py), removed by the same rules.
LEGACY_TEMPORARY = (re.compile(r"\.tmp_(?P<pid>[0-9]+)_[0-9a-f]{32}\.pth"),
                    re.compile(r"\.tmp_last_checkpoint\.pth\.(?P<pid>[0-9]+)"))
#: A temporary untouched this long whose writer is gone is stale (seconds).
STALE_AFTER_S = 600.0
#: A temporary untouched this long is stale whoever holds its pid now (seconds).
ABANDONED_AFTER_S = 86400.0
# Room for the pid, the token and the suffix within the usual 255-byte name limit.
_NAME_ROOM = 150


class OutputError(OSError):
    """An output file or folder cannot be written; the message names it and says why."""


def temporary_name(path: str) -> str:
    """A fresh temporary path beside ``path`` (same folder, so ``os.replace`` is a rename)."""
    folder, name = os.path.split(os.path.abspath(path))
    name = os.fsencode(name)[:_NAME_ROOM].decode(errors="ignore")  # a cut character is dropped
    return os.path.join(folder, f".{name}~{os.getpid()}-{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _create(tmp: str, path: str, what: str) -> int:
    """``os.open`` of a new ``tmp`` for ``path``. Mode 0666 reduced by the umask, as for a plain
    ``open``: mkstemp's owner-only 0600 would keep teammates from reading a run's outputs."""
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {_reason(e)} (creating a file in "
                          f"{os.path.dirname(tmp)})") from e


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where folders can be opened: not on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: str, path: str, what: str, fsync: bool) -> None:
    # A replace needs only the folder writable: a file its owner made read-only (a published
    # model, committed results) would be replaced silently where an in-place write is refused.
    if os.path.isfile(path) and not os.path.islink(path) and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {what} {path}: it is read-only")
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {_reason(e)}") from e
    if fsync:
        _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", *, fsync: bool = True, what: str = "output",
                 encoding: Optional[str] = "utf-8") -> Iterator[IO[Any]]:
    """``with atomic_write(path, "wb") as f:`` a file object whose contents replace ``path`` when the
    block ends without an error; on an error ``path`` is untouched and the temporary removed.

    ``mode``: ``"w"`` (text, ``encoding``) or ``"wb"``. ``fsync`` flushes the file and the rename to
    disk (what a checkpoint needs to survive a power cut; drawn images can skip it). ``what`` names
    the file in errors (``"checkpoint"``, ``"output"``...).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    tmp = temporary_name(path)
    fd = _create(tmp, path, what)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        _commit(tmp, path, what, fsync)
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str, *, fsync: bool = True, what: str = "output") -> Iterator[str]:
    """:func:`atomic_write` for writers that take a path, not a file object: yields a temporary path
    (created empty, so its mode is a plain file's) for the block to write -- and check, before it
    counts -- then renames it to ``path``. The temporary is removed on an error."""
    path = os.fspath(path)
    tmp = temporary_name(path)
    os.close(_create(tmp, path, what))
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.utime(tmp)  # fresh: a slow writer's temporary must not look stale to another cleaner
        _commit(tmp, path, what, fsync)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_text(path: str, text: str, *, fsync: bool = True, what: str = "output") -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_write(path, "w", fsync=fsync, what=what) as f:
        f.write(text)
    return path


def write_json(path: str, obj: Any, *, fsync: bool = True, what: str = "output", **dump_options: Any) -> str:
    """``json.dump(obj, **dump_options)`` to ``path`` atomically, ending in a newline; returns ``path``."""
    with atomic_write(path, "w", fsync=fsync, what=what) as f:
        json.dump(obj, f, **dump_options)
        f.write("\n")
    return path


def write_figure(path: str, fig: Any, *, what: str = "plot") -> str:
    """A matplotlib figure as a PNG (100 dpi) at ``path``, atomically; the figure is closed either
    way (an unclosed pyplot figure stays in memory). Returns ``path``."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb", fsync=False, what=what) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def replace_with_link(source: str, path: str, *, what: str = "output") -> None:
    """Make ``path`` a hard link to ``source`` (no extra disk), atomically: a temporary link renamed
    over ``path``. Where hard links are not supported, an atomic copy of ``source``."""
    tmp = temporary_name(path)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src, atomic_write(path, "wb", what=what) as dst:
            shutil.copyfileobj(src, dst)
        return
    try:
        _commit(tmp, path, what, fsync=True)
    except BaseException:
        _remove_quietly(tmp)
        raise


# ---------------------------------------------------------------------- before writing
def _blocking_file(folder: str) -> Optional[str]:
    """The first existing component of ``folder`` that is not a folder (a file in the way), if any."""
    current = os.path.abspath(folder)
    while True:
        if os.path.lexists(current):
            return None if os.path.isdir(current) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _prepare(folder: str, subject: str, legacy_names: Iterable[str]) -> None:
    """Create ``folder``, prove it writable, clean it; errors say "cannot write <subject>: why"."""
    blocking = _blocking_file(folder)
    if blocking is not None:
        raise OutputError(f"cannot write {subject}: {blocking} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {subject}: cannot create the folder {folder} ({_reason(e)})") from e
    probe = temporary_name(os.path.join(folder, "probe"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OutputError(f"cannot write {subject}: {_reason(e)} (in the folder {folder})") from e
    os.close(fd)
    _remove_quietly(probe)
    remove_stale_temporaries(folder, legacy_names=legacy_names)


def prepare_output_dir(folder: str, what: str = "output folder", *, legacy_names: Iterable[str] = ()) -> str:
    """Before the work: create ``folder`` (and its parents) and prove it writable by creating and
    removing a temporary file in it; then remove the stale temporaries of ours there
    (:func:`remove_stale_temporaries`, ``legacy_names`` passed on). Returns ``folder``.

    Raises :class:`OutputError` naming ``folder`` (as ``what``) and the reason: a file where a
    folder should be, no permission, a read-only file system...
    """
    _prepare(folder, f"the {what} {folder}", legacy_names)
    return folder


def prepare_output_file(path: str, what: str = "output") -> str:
    """:func:`prepare_output_dir` for the folder of the file ``path`` (errors name ``path``, as
    ``what``); ``path`` itself must not be a folder. Returns ``path``."""
    if os.path.isdir(path):
        raise OutputError(f"the {what} {path} is a folder: give the path of the file to write")
    _prepare(os.path.dirname(os.path.abspath(path)), f"the {what} {path}", ())
    return path


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode where both exist (hard links, bind
    mounts, case-insensitive names), else the same real path (links resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _entry(path: str) -> str:
    """The directory entry that ``os.replace(tmp, path)`` replaces: ``path`` with its folder's links
    resolved but not its own (a link named ``path`` is replaced, not what it points to)."""
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def check_not_inputs(outputs: Iterable[tuple[str, Optional[str]]], inputs: Iterable[tuple[str, Optional[str]]],
                     advice: str = "choose another output path", *, appended: Iterable[str] = ()) -> None:
    """``ValueError`` if writing an output would change one of the inputs.

    ``outputs`` and ``inputs`` are ``(what, path)`` pairs (None paths are skipped), e.g.
    ``[("TorchScript file", "model.pt")]`` and ``[("checkpoint", "run/last_checkpoint.pth")]``; the
    message names both, e.g. "writing the TorchScript file x.pth would overwrite the checkpoint
    x.pth, which this command reads: choose another output path". Outputs are written by replacing
    their directory entry (:func:`atomic_write`), which changes an input only when the entry is
    the input's real path: a hard link or a link to an input is replaced, the input kept. Outputs
    written in place (``appended``: logs) change any name of the same file, so for them a shared
    inode counts too. Linear in the number of paths.
    """
    appended = {_entry(path) for path in appended}
    by_inode: dict[tuple[int, int], tuple[str, str]] = {}
    by_real: dict[str, tuple[str, str]] = {}
    for what, path in inputs:
        if path is None:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(path)
            by_inode.setdefault((st.st_dev, st.st_ino), (what, path))
        by_real.setdefault(os.path.realpath(path), (what, path))
    for what, path in outputs:
        if path is None:
            continue
        hit = by_real.get(_entry(path))
        if hit is None and _entry(path) in appended:
            hit = by_real.get(os.path.realpath(path))
        if hit is None and _entry(path) in appended:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                hit = by_inode.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise ValueError(f"writing the {what} {path} would overwrite the {hit[0]} {hit[1]}, which this "
                             f"command reads: {advice}")


# ---------------------------------------------------------------------- stale temporaries
def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one we may not signal does)."""
    if os.name == "nt":
        return True  # os.kill there terminates the process: leave such files to ABANDONED_AFTER_S
    if pid == os.getpid():
        return True
    if not 0 < pid < 2**31:
        return False  # no process has it (and os.kill(0, ...) would signal our own process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _writer_pid(name: str, legacy_names: Iterable[str]) -> tuple[bool, Optional[int]]:
    """(whether ``name`` is a temporary name of ours, its writer's pid if the name holds one). The
    older versions' patterns count only where ``legacy_names`` says the folder is one they wrote
    in (a training folder): elsewhere such common names may be another tool's."""
    for pattern in (_TEMPORARY, *(LEGACY_TEMPORARY if legacy_names else ())):
        match = pattern.fullmatch(name)
        if match:
            return True, int(match.group("pid"))
    return name in legacy_names, None


def remove_stale_temporaries(folder: str, *, legacy_names: Iterable[str] = (),
                             now: Optional[float] = None) -> list[str]:
    """Remove the stale temporary files of ours directly in ``folder``; returns their paths.

    Only regular files (never links or folders) named as :func:`temporary_name` names them, as
    :data:`LEGACY_TEMPORARY`, or exactly one of ``legacy_names`` (fixed names an older version used,
    e.g. ``metrics.json.tmp`` in a training folder) are candidates; a candidate is stale when
    untouched for :data:`STALE_AFTER_S` and its writer (the pid in its name; for ``legacy_names``
    none) no longer runs here, or when untouched for :data:`ABANDONED_AFTER_S`. Errors (a file
    gone meanwhile, no permission) are ignored: cleaning up must never stop a command.
    """
    legacy_names = tuple(legacy_names)
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        ours, pid = _writer_pid(name, legacy_names)
        if not ours:
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        age = now - st.st_mtime
        if not stat.S_ISREG(st.st_mode) or age < STALE_AFTER_S:
            continue
        if age < ABANDONED_AFTER_S and pid is not None and _running(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed
