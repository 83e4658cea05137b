"""Training checkpoints: atomic writes, `weights_only` loading, RNG states, retention.

A checkpoint is a dict that `torch.load(weights_only=True)` can read:
`format` (int), `model` (state dict), `optimizer` (state dict), `iteration` (completed optimiser
steps), `epoch` (epoch of the next iteration), `config` (the resolved config as a TOML string) and
`rng` (python / numpy / torch / cuda generator states, stored as tensors and plain numbers).
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfnet.config import Config, config_from_dict
from vfnet.errors import CheckpointError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

FORMAT = 1
_REQUIRED = ("format", "model", "iteration", "epoch", "config")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


# ---------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable values


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (CPU) and CUDA generator states of this process."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python_version": version,
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only when the device count matches)."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
        "has_gauss": state["numpy_has_gauss"],
        "gauss": state["numpy_gauss"],
    })
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` to a temp file in the target directory, fsync, then rename over `path`.

    A reader sees the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _atomic_copy(src: Path, dst: Path) -> None:
    """Make `dst` a complete copy of `src` atomically (a hard link when the filesystem allows)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    epoch: int,
    config: Config,
    epoch_file: int | None = None,
    keep: int = 3,
) -> Path:
    """Write `directory/last.pt` atomically and return its path.

    With `epoch_file=e` the same checkpoint is also kept as `epoch_{e}.pt`, and only the `keep`
    newest per-epoch files remain. `model` may be wrapped (DDP): its `.module` is saved.
    """
    directory = Path(directory)
    module = getattr(model, "module", model)
    state = {
        "format": FORMAT,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "iteration": int(iteration),
        "epoch": int(epoch),
        "config": config.to_toml(),
        "rng": rng_state(),
    }
    last = directory / "last.pt"
    if epoch_file is None:
        atomic_torch_save(state, last)
        return last
    per_epoch = atomic_torch_save(state, directory / f"epoch_{epoch_file}.pt")
    _atomic_copy(per_epoch, last)
    prune_epoch_files(directory, keep)
    return last


def prune_epoch_files(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-numbered `epoch_N.pt` files; return the deleted ones."""
    files = sorted(
        (int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _EPOCH_FILE.match(p.name))
    )
    doomed = [p for _, p in files[: max(len(files) - keep, 0)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)` and check its keys.

    Raises CheckpointError naming the file when it is missing, truncated, corrupt or not a vfnet
    checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, KeyError) as exc:
        reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path}: not a vfnet checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']} is not supported "
                              f"(expected {FORMAT})")
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    """The resolved Config stored in a loaded checkpoint."""
    try:
        return config_from_dict(tomllib.loads(state["config"]), source=f"{path} [config]")
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: stored config is unreadable: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
