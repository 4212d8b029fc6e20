"""io_safety: atomic writes, refusing to write over inputs, stale temporaries of killed writers."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from overlap_sampler import io_safety
from overlap_sampler.io_safety import (
    ABANDONED_AFTER_S,
    STALE_AFTER_S,
    OutputError,
    atomic_path,
    atomic_write,
    check_not_inputs,
    prepare_output_dir,
    prepare_output_file,
    remove_stale_temporaries,
    replace_with_link,
    temporary_name,
    write_json,
)


def age(path, seconds: float) -> None:
    """Set ``path``'s modification time ``seconds`` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def refuse_writes_in(monkeypatch, folder) -> None:
    """Make creating files in ``folder`` fail as a read-only folder does (chmod does not stop root)."""
    real_open, folder = os.open, os.path.abspath(folder)

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.path.abspath(path)) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(str(target)) as f:
            f.write("half of the new")
            raise RuntimeError("midway")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    write_json(str(target), {"a": 1})
    assert target.read_text() == '{"a": 1}\n' and os.listdir(tmp_path) == ["metrics.json"]
    with atomic_path(str(tmp_path / "model.pt")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.isfile(tmp)
        with open(tmp, "wb") as f:
            f.write(b"scripted")
    assert (tmp_path / "model.pt").read_bytes() == b"scripted"
    with pytest.raises(ValueError):
        with atomic_path(str(tmp_path / "bad.pt")) as tmp:
            raise ValueError("verification failed")
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model.pt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_get_the_mode_of_a_plain_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_json(str(tmp_path / "a.json"), [])
        replace_with_link(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    finally:
        os.umask(previous)
    for name in ("a.json", "b.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode
    assert os.path.samefile(tmp_path / "a.json", tmp_path / "b.json")


def test_an_output_that_is_an_input_is_refused_naming_both(tmp_path, monkeypatch):
    checkpoint = tmp_path / "run" / "last.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    os.link(checkpoint, tmp_path / "hard.pth")
    os.symlink(checkpoint, tmp_path / "soft.pth")
    monkeypatch.chdir(tmp_path)
    # Every spelling of its entry (links to it are replaced, not written through: test_links_and_entries).
    for output in (str(checkpoint), "run/last.pth", "run/../run/last.pth", "./run/last.pth"):
        with pytest.raises(ValueError, match=f"writing the TorchScript file {output} would overwrite the "
                                             f"checkpoint {checkpoint}, which this command reads: choose"):
            check_not_inputs([("TorchScript file", output)], [("checkpoint", str(checkpoint))])
    check_not_inputs([("TorchScript file", "run/model.pt"), ("nothing", None)],
                     [("checkpoint", str(checkpoint)), ("weights", None)])


def test_output_folders_are_checked_before_the_work(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("a file")
    with pytest.raises(OutputError, match=r"the output folder .*file.txt: .*file.txt is a file, not a folder"):
        prepare_output_dir(str(tmp_path / "file.txt"))
    with pytest.raises(OutputError, match=r"the TorchScript file .*file.txt/sub/m.pt: .*file.txt is a file"):
        prepare_output_file(str(tmp_path / "file.txt" / "sub" / "m.pt"), "TorchScript file")
    with pytest.raises(OutputError, match=r"the TorchScript file .* is a folder: give the path of the file"):
        prepare_output_file(str(tmp_path), "TorchScript file")
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_writes_in(monkeypatch, locked)
    with pytest.raises(OutputError, match=r"cannot write the TorchScript file .*locked/m.pt: Permission denied"):
        prepare_output_file(str(locked / "m.pt"), "TorchScript file")
    with pytest.raises(OutputError, match=r"cannot write checkpoint .*locked/c.pth: Permission denied"):
        with atomic_write(str(locked / "c.pth"), "wb", what="checkpoint"):
            pass
    monkeypatch.undo()
    assert prepare_output_dir(str(tmp_path / "new" / "deeper")) and (tmp_path / "new" / "deeper").is_dir()
    assert os.listdir(tmp_path / "new" / "deeper") == []  # the probe is gone


_KILLED_WRITER = """
import os, signal, sys
from overlap_sampler.io_safety import atomic_write
with atomic_write(sys.argv[1], "wb", what="checkpoint") as f:
    f.write(b"x" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_midway_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    target = tmp_path / "checkpoint_0000002.pth"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)])
    assert proc.returncode == -signal.SIGKILL
    (left,) = os.listdir(tmp_path)
    assert not target.exists() and left.startswith(".checkpoint_0000002.pth~")
    # Fresh: it may belong to a writer on another machine sharing the folder.
    assert remove_stale_temporaries(str(tmp_path)) == [] and (tmp_path / left).exists()
    age(tmp_path / left, STALE_AFTER_S + 1)
    prepare_output_dir(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_only_our_stale_temporaries_are_removed(tmp_path):
    dead, hex32 = dead_pid(), "0123456789abcdef" * 2
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".model.pt~{dead}-{hex32}.overlap-sampler-tmp",  # ours, writer gone
                 f".tmp_{dead}_{hex32}.pth",  # checkpoint.py's name before io_safety
                 f".tmp_last_checkpoint.pth.{dead}",
                 "metrics.json.tmp"]  # a legacy name given by the caller
        kept = [f".model.pt~{sleeper.pid}-{hex32}.overlap-sampler-tmp",  # writer still running
                f".model.pt~{dead}-{hex32[:31]}.overlap-sampler-tmp",  # not quite our pattern
                f"model.pt~{dead}-{hex32}.overlap-sampler-tmp",  # not hidden: not ours
                f".tmp_{dead}_{hex32}.pth.bak", "metrics.json.tmp.keep", "notes.tmp", "model.pt"]
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"")
            age(tmp_path / name, STALE_AFTER_S + 10)
        # Links and folders of our naming are left alone, and so is what a link points to.
        (tmp_path / "target.bin").write_bytes(b"precious")
        link = tmp_path / f".link~{dead}-{hex32}.overlap-sampler-tmp"
        os.symlink(tmp_path / "target.bin", link)
        folder = tmp_path / f".dir~{dead}-{hex32}.overlap-sampler-tmp"
        folder.mkdir()
        for path in (link, folder):
            age(path, ABANDONED_AFTER_S + 10)
        removed = remove_stale_temporaries(str(tmp_path), legacy_names=("metrics.json.tmp",))
        assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["target.bin", link.name, folder.name])
        # After a day the pid may belong to another process: the file is abandoned.
        age(tmp_path / kept[0], ABANDONED_AFTER_S + 10)
        assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / kept[0])]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporary_names_fit_long_file_names(tmp_path):
    long_name = "é" * 120 + ".pt"  # 243 bytes
    tmp = temporary_name(str(tmp_path / long_name))
    assert len(os.fsencode(os.path.basename(tmp))) < 255 and io_safety._TEMPORARY.fullmatch(os.path.basename(tmp))
    write_json(str(tmp_path / long_name), {})
    assert os.listdir(tmp_path) == [long_name]


def test_older_versions_names_are_removed_only_where_the_caller_names_older_files(tmp_path):
    # Outside a training folder (no legacy names given) `.tmp_<pid>_<hex>.pth` may be another tool's.
    dead, hex32 = dead_pid(), "0123456789abcdef" * 2
    name = f".tmp_{dead}_{hex32}.pth"
    (tmp_path / name).write_bytes(b"")
    age(tmp_path / name, ABANDONED_AFTER_S + 10)
    assert remove_stale_temporaries(str(tmp_path)) == []
    assert remove_stale_temporaries(str(tmp_path), legacy_names=("metrics.json.tmp",)) == [str(tmp_path / name)]


def test_a_read_only_destination_is_refused_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_text("published")
    path.chmod(0o444)
    # os.access as a user without write permission sees it (root may write anything).
    real_access = os.access
    monkeypatch.setattr(io_safety.os, "access",
                        lambda p, mode, **kw: False if os.fspath(p) == str(path) else real_access(p, mode, **kw))
    with pytest.raises(OutputError, match=f"cannot write output {path}: it is read-only"):
        write_json(str(path), {"a": 1})
    assert path.read_text() == "published" and os.listdir(tmp_path) == ["model.pt"]


def test_links_and_entries(tmp_path):
    """An output replaces its directory entry: a hard link or a link to an input is replaced and the
    input kept; only an entry that is the input's real path clashes (or, for an appended output,
    any name of the same file)."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"w")
    hard, soft = tmp_path / "hard.pth", tmp_path / "soft.pth"
    os.link(weights, hard)
    os.symlink(weights, soft)
    check_not_inputs([("output", str(hard)), ("output", str(soft))], [("weights", str(weights))])
    with pytest.raises(ValueError, match="would overwrite the weights"):
        check_not_inputs([("output", str(weights))], [("weights", str(soft))])  # what the link names
    with pytest.raises(ValueError, match="would overwrite the weights"):
        check_not_inputs([("log", str(hard))], [("weights", str(weights))], appended=[str(hard)])
    write_json(str(hard), {"new": 1})
    assert weights.read_bytes() == b"w"  # replaced the name, kept the file
