"""One training step: the one the engine's loop runs and the benchmarks time.

`train_step(model, batch, optimizer, amp=..., grad_clip=...)` does, in order:

1. forward and loss (`model.loss`, ATSS targets and the three losses) under bf16 autocast when
   `amp` is set and the batch is on CUDA; float32 otherwise (the CPU never autocasts);
2. the step statistics, a float32 device tensor: the total loss (the sum of `LOSS_NAMES`), each
   loss and `num_pos`; under an initialised torch.distributed group of more than one rank they are
   all-reduced to their mean over the ranks (a collective: every rank must run the step equally
   often, as DDP requires anyway);
3. `zero_grad(set_to_none=True)` and backward (the `vfnet.backward` profiler range);
4. with `grad_clip > 0`, the gradients clipped to that total 2-norm and `grad_norm` (the norm
   before clipping) appended to the statistics; then `optimizer.step()` (both in the
   `vfnet.optimizer` range).

Every rank makes the same collectives in the same order whatever its batch holds: a batch whose
images have no boxes (a shard of unannotated images) has no positives, and the loss keeps its
fixed shapes (`vfnet.model.losses`), so the box terms are exactly 0, every loss is finite, every
trainable parameter still gets a gradient (DDP's all-reduce needs one from each rank) and the
normalisers are all-reduced as on the other ranks (tests/orchestration/test_empty_rank.py: two
gloo processes, one with only such images).

Nothing is read back to the host, so the step never waits for the device: the caller reads the
statistics when it needs them (the engine: at log, checkpoint and evaluation times). A non-finite
loss is not checked here; the optimiser steps anyway and the caller decides (the engine raises
`NonFiniteLossError` and keeps its last good checkpoint). The learning rate is the optimiser's:
set it before the call (the engine's `LrSchedule.apply`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.profiler import record_function

from vfnet.data import Batch

LOSS_NAMES = ("loss_cls", "loss_bbox_init", "loss_bbox_refine")
BACKWARD_RANGE = "vfnet.backward"  # profiler range names (benchmarks.profile_step groups by them)
OPTIMIZER_RANGE = "vfnet.optimizer"


class StepStats(NamedTuple):
    """A step's statistics: `values[i]` is named `names[i]`; values float32 [k] on the device,
    k = 5 ("loss", *LOSS_NAMES, "num_pos"), 6 with "grad_norm" (clipping on)."""

    names: tuple[str, ...]
    values: torch.Tensor


def train_step(model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, *,
               amp: bool = True, grad_clip: float = 0.0) -> StepStats:
    """One optimiser step of `model` (a VFNet, or one wrapped in DistributedDataParallel) on
    `batch`, whose tensors are on the model's device: images [B, 3, H, W] normalised pixels,
    boxes B x [n_i, 4] xyxy pixels, labels B x [n_i]. See the module docstring for what it does
    with `amp` (bf16 autocast, CUDA only) and `grad_clip` (max gradient 2-norm, 0 = off)."""
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    device_type = batch.images.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp and device_type == "cuda"):
        outputs = model(batch.images)
        losses = core.loss(outputs, batch.boxes, batch.labels, batch.padded_sizes)
    loss = sum(losses[k] for k in LOSS_NAMES)
    values = torch.stack([loss.detach().float(), *(losses[k].detach().float() for k in LOSS_NAMES),
                          losses["num_pos"].detach().float().reshape(())])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    names: tuple[str, ...] = ("loss", *LOSS_NAMES, "num_pos")
    with record_function(BACKWARD_RANGE):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function(OPTIMIZER_RANGE):
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
            names += ("grad_norm",)
            values = torch.cat([values, norm.detach().float().reshape(1)])
        optimizer.step()
    return StepStats(names, values)
