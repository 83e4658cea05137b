"""Training checkpoints: atomic writes, content hashes, `weights_only` loading, RNG states,
retention, and finding the newest checkpoint that verifies.

A checkpoint is a dict that `torch.load(weights_only=True)` can read:
`format` (int), `model` (state dict), `optimizer` (state dict), `iteration` (completed optimiser
steps), `epoch` (epoch of the next iteration), `config` (the resolved config as a TOML string),
`rng` (python / numpy / torch / cuda generator states, stored as tensors and plain numbers) and
`sha256` (`state_digest` of everything else, written at save and verified at load: a flipped
bit anywhere in the tensors or values is reported as corruption, naming the file).
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfnet.core.atomic import atomic_write, copy_file
from vfnet.core.config import Config, config_from_dict
from vfnet.core.errors import CheckpointError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

FORMAT = 2  # 2: with the content hash `sha256`; 1 (no hash) still loads
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
# Content hash


def state_digest(state: dict[str, Any]) -> str:
    """sha256 (hex) of a checkpoint's content, every entry but `sha256` itself: keys, plain
    values, and each tensor's dtype, shape and bytes, in a canonical order. Two states that load
    equal have equal digests; one flipped bit in any tensor or value changes it."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "sha256"})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(f"K{key!r}".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


# ---------------------------------------------------------------------------------------------
# Saving and loading


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` through `vfnet.core.atomic.atomic_write`: a reader sees the old file or the
    complete new one, never a partial write; EnvError naming the file when it cannot be written
    (a full disk: torch reports the failed write as a RuntimeError, raised here as the OSError)."""
    with atomic_write(path) as fh:
        sink = _WriteErrors(fh)
        try:
            torch.save(obj, sink)
        except RuntimeError as exc:
            if sink.error is None:
                raise
            raise sink.error from exc
    return Path(path)


class _WriteErrors:
    """A file wrapper for `torch.save` that keeps the OSError of a failed write."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


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
    """Write `directory/last.pt` atomically, with its content hash, and return its path.

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
    state["sha256"] = state_digest(state)
    last = directory / "last.pt"
    if epoch_file is None:
        atomic_torch_save(state, last)
        return last
    per_epoch = atomic_torch_save(state, directory / f"epoch_{epoch_file}.pt")
    copy_file(per_epoch, last)
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
    """Read a checkpoint with `torch.load(weights_only=True)`, check its structure and verify
    its content hash (format 2; format 1 files have none and load with a warning).

    Raises CheckpointError naming the file when it is missing, truncated, corrupt (the hash does
    not match), not a vfnet checkpoint, or a pickle that needs more than tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load's parser raises ~10 types on bad bytes
        reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): "
                              f"{type(exc).__name__}: {reason}") from None
    _check_structure(state, path)
    if state["format"] == 1:
        log.warning("%s: format 1 checkpoint has no content hash: not verified", path)
    elif state_digest(state) != state["sha256"]:
        raise CheckpointError(f"{path}: checkpoint is corrupt: its content does not match the "
                              f"sha256 written when it was saved")
    return state


def _check_structure(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path}: not a vfnet checkpoint (missing {', '.join(missing)})")
    fmt = state["format"]
    if type(fmt) is not int or fmt not in (1, FORMAT):
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not supported (expected {FORMAT})")
    expected = {"model": dict, "iteration": int, "epoch": int, "config": str}
    if fmt == FORMAT:
        expected["sha256"] = str
    for key, kind in expected.items():
        if key not in state or not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: not a vfnet checkpoint (entry {key!r} is missing or not "
                                  f"a {kind.__name__})")
    bad = [k for k, v in state["model"].items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: not a vfnet checkpoint (model entry {bad[0]!r} is not a tensor)")
    for key in ("optimizer", "rng"):
        if key in state and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: not a vfnet checkpoint (entry {key!r} is not a dict)")


def checkpoint_candidates(directory: str | Path) -> list[Path]:
    """The checkpoints of a run's checkpoint directory, newest first: `last.pt`, then the
    `epoch_N.pt` files by decreasing N (those that exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    epochs = sorted(((int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_FILE.match(p.name))),
                    reverse=True)
    last = directory / "last.pt"
    return ([last] if last.is_file() else []) + [p for _, p in epochs]


def load_newest_valid(candidates: list[Path],
                      map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The first of `candidates` (newest first) that loads and verifies, and its path; each one
    skipped is logged with its reason. None when there are no candidates; CheckpointError naming
    every candidate when none verifies (starting over silently would lose the run)."""
    reasons = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            reasons.append(str(exc))
            continue
        if reasons:
            log.warning("resuming from %s, the newest checkpoint that verifies (skipped %d newer)",
                        path, len(reasons))
        return state, path
    if reasons:
        raise CheckpointError(f"no checkpoint verifies: {'; '.join(reasons)}")
    return None


def restore_into(path: str | Path, state: dict[str, Any], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, rng: bool = False) -> None:
    """Load a checkpoint's model (and optimizer, and with `rng` the RNG states) state into live
    objects; CheckpointError naming the file when they do not fit (another model's checkpoint)."""
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if rng:
            set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"{path}: does not fit this model and config: {reason}") from exc


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    """The resolved Config stored in a loaded checkpoint."""
    try:
        return config_from_dict(tomllib.loads(state["config"]), source=f"{path} [config]")
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: stored config is unreadable: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
