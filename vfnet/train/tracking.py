"""Experiment tracking: the engine's records as named scalars, and the TensorBoard writer.

The engine hands every `metrics.jsonl` record (one per log interval, `mode: "train"`, and one
per evaluation, `mode: "eval"`) to its recorders on rank 0. `scalars` names the values the same
way for every tracker:

- `train/loss`, `train/loss_cls`, `train/loss_bbox_init`, `train/loss_bbox_refine`,
  `train/num_pos`, `train/grad_norm` (with clipping): means over the log interval;
- `train/lr`; `train/time_per_iter`, `train/data_time` (seconds); `train/images_per_s`: images
  of the global batch (all workers) per second of the interval's mean iteration time;
- `eval/bbox_mAP`, `eval/bbox_mAP_50`, ... (the COCO stats; -1 = no ground truth of that size).

The step is the iteration count (`iter`: optimiser steps done).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vfnet.core.optional import require

_TRAIN_KEYS = ("loss", "loss_cls", "loss_bbox_init", "loss_bbox_refine", "num_pos", "grad_norm", "lr",
               "time_per_iter", "data_time")
_NOT_SCALARS = ("mode", "iter", "epoch")


def scalars(record: dict[str, Any], images_per_iter: int) -> dict[str, float]:
    """The named scalars of one engine record (see the module docstring)."""
    if record["mode"] == "train":
        out = {f"train/{k}": float(record[k]) for k in _TRAIN_KEYS if k in record}
        if record.get("time_per_iter", 0) > 0:
            out["train/images_per_s"] = images_per_iter / record["time_per_iter"]
        return out
    return {f"eval/{k}": float(v) for k, v in record.items() if k not in _NOT_SCALARS}


class TensorBoardRecorder:
    """Writes the engine's records as TensorBoard scalars into `logdir` (event files
    `events.out.tfevents.*`; view with `tensorboard --logdir WORKDIR/tensorboard`).

    `resume_iter`: the iteration a resumed run restarts from; TensorBoard then hides the events
    of earlier writers past it (they are redone), as `metrics.jsonl` drops its records."""

    def __init__(self, logdir: Path, images_per_iter: int, resume_iter: int | None = None) -> None:
        require("tensorboard", "TensorBoard logging (train.tensorboard = false turns it off)")
        from torch.utils.tensorboard import SummaryWriter

        self.images_per_iter = images_per_iter
        purge = resume_iter + 1 if resume_iter is not None else None
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge)

    def __call__(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record, self.images_per_iter).items():
            self.writer.add_scalar(name, value, global_step=int(record["iter"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
