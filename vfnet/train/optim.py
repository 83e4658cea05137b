"""The optimiser (SGD or AdamW), its parameter groups and the learning-rate schedule.

Parameter groups follow the reference VFNet optimiser (SGD with `bias_lr_mult=2`,
`bias_decay_mult=0` applied parameter-wise): the bias of every layer that is not a normalisation
layer gets `lr * bias_lr_mult` and `weight_decay * bias_decay_mult`; normalisation layers
(BatchNorm, GroupNorm, ...) keep the base lr and the base weight decay for both their weight and
bias; everything else (conv weights, the per-level `Scale` scalars) gets the base values. Frozen
parameters (requires_grad False) are left out.

The learning rate is a pure function of the iteration (`LrSchedule.lr_factor`), so a resumed run
sets exactly the lr the uninterrupted run would have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vfnet.core.config import TrainConfig

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm
)


def scaled_lr(train_cfg: TrainConfig, world_size: int = 1) -> float:
    """Linear scaling rule: `lr * global_batch / base_batch_size`, global = batch_size * world_size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return train_cfg.lr * train_cfg.batch_size * world_size / train_cfg.base_batch_size


def param_groups(model: nn.Module, train_cfg: TrainConfig) -> list[dict]:
    """Split the trainable parameters of `model` into SGD groups.

    Each group carries `lr_mult` (multiplier of the scheduled lr) and `weight_decay`.
    """
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name == "bias" and not is_norm:
                key = (train_cfg.bias_lr_mult, train_cfg.weight_decay * train_cfg.bias_decay_mult)
            else:
                key = (1.0, train_cfg.weight_decay)
            buckets.setdefault(key, []).append(param)
    return [
        {"params": params, "lr_mult": lr_mult, "weight_decay": decay}
        for (lr_mult, decay), params in sorted(buckets.items())
    ]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """`train_cfg.optimizer` over `param_groups(model)`, lr scaled to the global batch: SGD with
    momentum (the reference's), or AdamW (betas 0.9, 0.999; weight decay decoupled from the
    gradient, per group as for SGD).

    The group lrs are set by `LrSchedule.apply` before every step.
    """
    base = scaled_lr(train_cfg, world_size)
    groups = param_groups(model, train_cfg)
    for group in groups:
        group["lr"] = base * group["lr_mult"]
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=base, weight_decay=train_cfg.weight_decay)
    return torch.optim.SGD(groups, lr=base, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay)


@dataclass(frozen=True)
class LrSchedule:
    """The lr at each iteration: linear warm-up times a step or cosine schedule.

    - warm-up: for iteration i < warmup_iters the factor is multiplied by
      `warmup_ratio + (1 - warmup_ratio) * i / warmup_iters` (so it starts at warmup_ratio);
    - step: multiplied by `gamma ** k`, k = number of `step_iters` <= i;
    - cosine: multiplied by `0.5 * (1 + cos(pi * i / total_iters))`.
    Iterations count completed optimiser steps, from 0.
    """

    base_lr: float
    total_iters: int
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    kind: str = "step"
    step_iters: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_config(cls, train_cfg: TrainConfig, *, iters_per_epoch: int, total_iters: int,
                    world_size: int = 1) -> LrSchedule:
        """The schedule of `train_cfg`; `lr_steps` (epochs) become iterations via iters_per_epoch."""
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        return cls(
            base_lr=scaled_lr(train_cfg, world_size),
            total_iters=total_iters,
            warmup_iters=train_cfg.warmup_iters,
            warmup_ratio=train_cfg.warmup_ratio,
            kind=train_cfg.schedule,
            step_iters=tuple(round(e * iters_per_epoch) for e in train_cfg.lr_steps),
            gamma=train_cfg.lr_gamma,
        )

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of `base_lr` at `iteration`."""
        if self.kind == "step":
            factor = self.gamma ** sum(iteration >= s for s in self.step_iters)
        elif self.kind == "cosine":
            progress = min(iteration / max(self.total_iters, 1), 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.kind!r}")
        if iteration < self.warmup_iters:
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        return factor

    def lr(self, iteration: int) -> float:
        """The base group's lr at `iteration`."""
        return self.base_lr * self.lr_factor(iteration)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set every group's lr for `iteration` (group lr = lr * its lr_mult); return the base lr."""
        lr = self.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr
