"""The training loop: used alone (`vfnet train`) and inside each Ray Train worker.

The engine never imports Ray: a caller plugs in through `TrainHooks`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfnet.config import Config


@dataclass
class TrainHooks:
    """How a caller (e.g. a Ray Train worker) plugs into the engine; the engine never imports Ray."""

    # (epoch, start_batch) -> this worker's batches for that epoch; replaces build_train_loader
    train_batches: Callable[[int, int], Iterable[Any]] | None = None
    iters_per_epoch: int | None = None  # required with train_batches
    # called on EVERY rank after each checkpoint save and evaluation:
    # (metrics, checkpoint file on rank 0 / None on other ranks)
    report: Callable[[dict[str, float], Path | None], None] | None = None
    resume_from: Path | None = None  # resume from this checkpoint instead of workdir/checkpoints/last.pt


def train(
    cfg: Config, workdir: str | Path, *, resume: bool = True, hooks: TrainHooks | None = None
) -> dict[str, float]:
    """Train `cfg` in `workdir`; return the final COCO metrics by name plus `iterations`."""
    raise NotImplementedError("engine body lands in the next commit")
