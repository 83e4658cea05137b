"""vfnet.core.atomic: all-or-nothing writes, and a full disk during a checkpoint write."""
import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from vfnet.core import atomic
from vfnet.core.checkpoint import load_checkpoint, save_checkpoint
from vfnet.core.config import Config
from vfnet.core.errors import EnvError


def test_writes_replace_whole_files(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic.write_json(target, {"x": 1})
    assert target.read_text() == '{"x": 1}\n'
    atomic.write_text(target, "two")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text() == "two" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]  # no temp files left


def test_failure_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError, match="half way"), atomic.atomic_write(target, "w") as fh:
        fh.write("new, partial")
        raise RuntimeError("half way")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_permissions_are_those_of_a_plain_write(tmp_path, umask):
    """A new file gets 0o666 less the umask (not mkstemp's 0o600); a replaced file keeps its mode."""
    old = os.umask(umask)
    try:
        atomic.write_text(tmp_path / "new.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        kept = tmp_path / "kept.txt"
        kept.write_text("x")
        kept.chmod(0o640)
        atomic.write_bytes(kept, b"y")
        atomic.copy_file(tmp_path / "new.txt", tmp_path / "copy.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_bytes() == b"y"
    assert (tmp_path / "copy.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_umask_without_proc(monkeypatch):
    """Where /proc/self/status is missing the umask is read by setting it and putting it back."""
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)
    old = os.umask(0o027)
    try:
        assert atomic._new_file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # put back
    finally:
        os.umask(old)


def test_temp_names_are_unique_per_writer(tmp_path):
    target = tmp_path / "a.txt"
    with atomic.atomic_write(target, "w") as one, atomic.atomic_write(target, "w") as two:
        temps = sorted(p.name for p in tmp_path.iterdir())
        assert len(temps) == 2 and all(n.startswith(".a.txt.") and n.endswith(".tmp") for n in temps)
        one.write("one")
        two.write("two")
    assert target.read_text() == "one"  # the last to finish wins, whole


def test_copy_file_links_or_copies(tmp_path):
    src = atomic.write_text(tmp_path / "src", "data")
    dst = atomic.copy_file(src, tmp_path / "dst")
    assert dst.read_text() == "data" and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A 1 MiB tmpfs holds one ~0.6 MB checkpoint but not a second copy: the second save fails
    with one clear error naming the file, and the first checkpoint is intact and verifies."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    torch.manual_seed(0)
    model = nn.Linear(400, 400)  # 160k float32 weights: ~0.64 MB
    with _tmpfs(tmp_path / "small", "1m") as disk:
        save_checkpoint(disk, model=model, optimizer=None, iteration=1, epoch=0, config=Config())
        with torch.no_grad():
            model.weight.add_(1.0)
        with pytest.raises(EnvError, match=r"last\.pt: cannot write: No space left on device"):
            save_checkpoint(disk, model=model, optimizer=None, iteration=2, epoch=0, config=Config())
        state = load_checkpoint(disk / "last.pt")  # verifies its content hash
        assert state["iteration"] == 1
        assert not torch.equal(state["model"]["weight"], model.weight)
        assert [p.name for p in disk.iterdir()] == ["last.pt"]  # the partial temp file is gone
