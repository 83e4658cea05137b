"""A trained detector from a checkpoint, ready for inference.

One loader for every consumer (`vfnet predict`, `vfnet eval`, orchestration, Python users):

    model, cfg, device = load_model("work_dirs/shapes_tiny/checkpoints/last.pt")
    (pred,) = model.predict(images, image_sizes, scales)   # see VFNet.predict

`class_info` gives the COCO category ids and names that go with the model's class indices.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch

from vfnet.checkpoint import checkpoint_config, load_checkpoint, restore_into
from vfnet.config import Config, apply_overrides
from vfnet.data import DatasetError
from vfnet.data.coco import parse_coco, read_json
from vfnet.engine import resolve_device
from vfnet.model import VFNet

log = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    """What `load_model` returns (unpacks as `model, cfg, device`)."""

    model: VFNet  # in eval mode, on `device`
    cfg: Config  # the checkpoint's resolved config with the overrides applied
    device: torch.device


def load_model(checkpoint: str | Path, overrides: list[str] | None = None,
               device: torch.device | None = None) -> LoadedModel:
    """The model of a training checkpoint in eval mode, its config and the device it is on.

    `overrides` are `--set` strings (`"infer.score_thr=0.1"`) applied to the stored config; the
    device is `device`, else the config's `train.device` ("auto": CUDA when available). Raises
    CheckpointError (a `vfnet.errors.UserError`) naming the file when it is missing, corrupt,
    not a vfnet checkpoint or does not fit its config, ConfigError for a bad override.
    """
    state = load_checkpoint(checkpoint)
    cfg = apply_overrides(checkpoint_config(state, checkpoint), overrides or [])
    cfg.model.pretrained = ""  # the checkpoint holds every weight
    device = device or resolve_device(cfg.train.device)
    model = VFNet(cfg)
    restore_into(checkpoint, state, model)
    return LoadedModel(model.to(device).eval(), cfg, device)


def class_info(cfg: Config) -> tuple[list[int], list[str]]:
    """COCO category ids and names of the model's classes.

    Names: the config's `model.class_names` (stored with every checkpoint), else those of its val
    (else train) annotation file; ids: from that annotation file when it has one per class, else
    `1..C`. Without either, names are `class_i`.
    """
    stored = list(cfg.model.class_names)
    for ann in (cfg.data.val_ann, cfg.data.train_ann):
        try:
            _, cat_ids, names = parse_coco(read_json(ann), ann)
        except DatasetError:
            continue
        if len(cat_ids) == cfg.model.num_classes:
            return cat_ids, stored or names
    ids = list(range(1, cfg.model.num_classes + 1))
    if stored:
        return ids, stored
    log.warning("class names unknown (not in the checkpoint, annotation files of its config not readable): "
                "using category ids 1..%d", cfg.model.num_classes)
    return ids, [f"class_{i}" for i in range(cfg.model.num_classes)]
