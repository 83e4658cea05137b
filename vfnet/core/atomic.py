"""Atomic file writes: every file the project writes goes through `atomic_write`, except the
append-only logs named below.

The data go to a temporary file with a process-unique name next to the target
(`.<name>.<random>.tmp`, made by `tempfile.mkstemp`), which is flushed and fsynced, renamed over
the target, and the directory fsynced. A reader, or the next run after a crash or a full disk,
sees the old file or the complete new one, never a partial one; a failed write removes its
temporary file. The file gets the permissions a plain `open(path, "w")` would leave: the
target's own when it exists, else 0o666 less the process umask (mkstemp's 0o600 would hide
checkpoints and results from the group, e.g. from a TensorBoard server run by another user).
Any OSError on the way (no space left, read-only file system, permission denied) becomes an
`EnvError` naming the target file.

Append-only logs, the exceptions: a training run's `metrics.jsonl` (`vfnet.train.metrics_log`)
gets one line per record, appended with one write, since rewriting the whole file per record
would cost time quadratic in the run's length; a crash leaves at most a torn last line, which
`read_records` and a resumed run skip (every rewrite of the file goes through `write_text`). The
TensorBoard event files are appended by TensorBoard's own writer, whose readers read files
still being written and stop at an incomplete last record.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vfnet.core.errors import EnvError


def fsync_dir(directory: str | Path) -> None:
    """fsync a directory, making a rename in it durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_write_mode(path: Path) -> int:
    """The permission bits `open(path, "w")` would leave: `path`'s own, or a new file's."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return _new_file_mode()


def _new_file_mode() -> int:
    """0o666 less the process umask: read from /proc/self/status where Linux reports it, else
    by setting it and putting it back (which other threads could observe for an instant)."""
    try:
        with open("/proc/self/status") as fh:
            umask = next((int(line.split()[1], 8) for line in fh if line.startswith("Umask:")), None)
    except OSError:
        umask = None
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _write_failed(path: Path, exc: OSError) -> EnvError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return EnvError(f"{path}: cannot write: {reason}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing (`mode` "wb" or "w", UTF-8) that replaces `path` when
    the block ends without an exception; the parent directory is created if needed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            os.fchmod(fh.fileno(), _plain_write_mode(path))
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically replace `path` with `data`; the path."""
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically replace `path` with `text` (UTF-8); the path."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, payload: Any, **dumps: Any) -> Path:
    """Atomically replace `path` with `payload` as JSON (`dumps` go to `json.dumps`), ending
    in a newline; the path."""
    return write_text(path, json.dumps(payload, **dumps) + "\n")


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Atomically make `dst` a complete copy of `src`: a hard link when the file system allows
    (no data copied), else a byte copy; the path."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as fh, atomic_write(dst) as out:
            shutil.copyfileobj(fh, out)
        return dst
    try:
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(dst, exc) from exc
    return dst
