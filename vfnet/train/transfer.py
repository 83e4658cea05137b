"""Start training from another model's weights (`model.init_from`): a vfnet or an mmdetection
VFNet checkpoint.

Not a resume: only weights are taken (no optimiser state, no iteration). Every tensor of the new
model whose name and shape match one in the checkpoint is copied; the others keep their fresh
initialisation (e.g. the class logits when `model.num_classes` differs), and each tensor skipped on
either side is logged with the reason.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vfnet.core.checkpoint import load_checkpoint
from vfnet.core.errors import CheckpointError
from vfnet.interop.mmdet import from_mmdet_name, is_mmdet_checkpoint, mmdet_weights, read_untrusted, refuse_unsupported

log = logging.getLogger(__name__)


def checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a vfnet or mmdetection checkpoint under our names, and the reasons for the
    mmdetection tensors that have no counterpart here ("name: why")."""
    obj = read_untrusted(path)
    if isinstance(obj, dict) and "format" in obj and "config" in obj:  # ours: checked and verified
        return dict(load_checkpoint(path)["model"]), []
    if not is_mmdet_checkpoint(obj):
        raise CheckpointError(f"{path}: neither a vfnet nor an mmdetection VFNet checkpoint")
    weights, _ = mmdet_weights(obj, path)
    refuse_unsupported(weights, path)
    state, unmatched = {}, []
    for name, value in weights.items():
        ours = from_mmdet_name(name)
        if ours is None:
            unmatched.append(f"{name}: no counterpart in vfnet's VFNet")
        else:
            state[ours] = value
    return state, unmatched


def init_from(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the matching tensors of checkpoint `path` into `model` (in place); log and return one
    line per skipped tensor."""
    source, skipped = checkpoint_weights(path)
    own = model.state_dict()
    taken = {}
    for name, value in source.items():
        if name not in own:
            skipped.append(f"{name}: not in this model")
        elif value.shape != own[name].shape:
            skipped.append(f"{name}: shape {tuple(value.shape)} in the checkpoint, {tuple(own[name].shape)} "
                           "here (keeps its initialisation)")
        else:
            taken[name] = value
    skipped += [f"{name}: not in the checkpoint (keeps its initialisation)" for name in own if name not in source]
    model.load_state_dict(taken, strict=False)
    log.info("init_from %s: %d of %d tensors loaded, %d skipped", path, len(taken), len(own), len(skipped))
    if len(taken) < len(own) / 2:
        log.warning("init_from %s: only %d of this model's %d tensors match the checkpoint (same depth, "
                    "widths, stacked_convs?)", path, len(taken), len(own))
    for line in skipped:
        log.info("init_from skipped %s", line)
    return skipped
