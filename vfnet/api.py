"""The public API: `load_model` (a checkpoint's model, config and device) and `Detector` (images
in, boxes out). Importing it loads the model and data code, never the trainer.

    model, cfg, device = load_model("work_dirs/shapes_tiny/checkpoints/last.pt")
    (pred,) = model.predict(images, image_sizes, scales)   # see VFNet.predict

    from vfnet import Detector
    detector = Detector.from_checkpoint("work_dirs/shapes_tiny/checkpoints/last.pt", device="cpu")
    result = detector("image.png")           # one image -> one Detections
    results = detector(["a.png", "b.png"])   # a list (or a batched array/tensor) -> a list
    detector.to_onnx("model.onnx")

Images are file paths, PIL images, uint8 numpy arrays [H, W, 3] (RGB) or uint8 tensors [3, H, W]
(RGB, as `torchvision.io.decode_image` returns them); a list of any of these, a numpy array
[B, H, W, 3] or a tensor [B, 3, H, W] is a batch. Each image is resized and normalised as in
evaluation (`data.img_scale`, `data.mean`, `data.std`); boxes come back in its own pixels.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vfnet.core.checkpoint import checkpoint_config, load_checkpoint, restore_into
from vfnet.core.config import Config, apply_overrides
from vfnet.core.device import resolve_device
from vfnet.core.errors import ArgumentError, DatasetError
from vfnet.data import Sample, build_transform, collate
from vfnet.data.coco import DEFAULT_MAX_IMAGE_PIXELS, decode_image, parse_coco, read_json
from vfnet.model import VFNet

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


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
    CheckpointError (a `vfnet.core.errors.UserError`) naming the file when it is missing, corrupt,
    not a vfnet checkpoint or does not fit its config, ConfigError for a bad override.
    """
    state = load_checkpoint(checkpoint)
    cfg = apply_overrides(checkpoint_config(state, checkpoint), overrides or [])
    cfg.model.pretrained = ""  # the checkpoint holds every weight
    device = device or resolve_device(cfg.train.device)
    model = VFNet.from_config(cfg)
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


@dataclass
class Detections:
    """One image's detections, by decreasing score (at most `infer.max_per_img`).

    boxes [k, 4] float32 (x1, y1, x2, y2) in the input image's pixels (continuous coordinates:
    a box covering pixel columns 0..9 has x1 = 0, x2 = 10); scores [k] float32 in (0, 1]; labels
    [k] int64 class indices 0..C-1; names [k] their class names; category_ids [k] the COCO
    category ids of the training annotations.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    category_ids: list[int]

    def __len__(self) -> int:
        return len(self.scores)


class Detector:
    """A trained VFNet with its preprocessing and class names; call it on images.

    Build with `Detector.from_checkpoint(path, device=...)` or `Detector(model, class_names,
    category_ids)` (model: a `vfnet.model.VFNet` in eval mode).
    """

    def __init__(self, model: VFNet, class_names: Sequence[str], category_ids: Sequence[int] | None = None):
        if len(class_names) != model.cfg.model.num_classes:
            raise ArgumentError(f"{len(class_names)} class names for a model with "
                             f"{model.cfg.model.num_classes} classes")
        self.model = model.eval()
        self.cfg: Config = model.cfg
        self.class_names = list(class_names)
        self.category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
        self._transform = build_transform(self.cfg.data, train=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        overrides: Sequence[str] = ()) -> Detector:
        """Load a `vfnet train` (or `vfnet convert`) checkpoint onto `device` (default: the
        config's `train.device`, "auto" = CUDA when available). `overrides` are `key=value`
        config overrides (e.g. "infer.score_thr=0.3"). CheckpointError / ConfigError (both
        `vfnet.core.errors.UserError`) name the file or key at fault."""
        model, cfg, _ = load_model(path, list(overrides), torch.device(device) if device is not None else None)
        category_ids, names = class_info(cfg)
        return cls(model, names, category_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 8
                 ) -> Detections | list[Detections]:
        """Detect objects in one image (-> Detections) or a batch (-> list of Detections);
        `batch_size` images go through the network at a time."""
        single, batch = _as_list(images)
        if batch_size < 1:
            raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
        results = []
        for start in range(0, len(batch), batch_size):
            samples = [self._sample(image) for image in batch[start:start + batch_size]]
            data = collate(samples, self.cfg.data.size_divisor).to(self.device)
            for pred in self.model.predict(data.images, data.image_sizes, data.scales):
                labels = pred["labels"].cpu()
                results.append(Detections(
                    boxes=pred["boxes"].float().cpu(), scores=pred["scores"].float().cpu(), labels=labels,
                    names=[self.class_names[i] for i in labels.tolist()],
                    category_ids=[self.category_ids[i] for i in labels.tolist()]))
        return results[0] if single else results

    def _sample(self, image: ImageInput) -> Sample:
        pil = to_pil(image, self.cfg.data.max_image_pixels)
        t = self._transform(pil, np.zeros((0, 4), np.float32))
        return Sample(image=t.image, boxes=t.boxes, labels=torch.zeros(0, dtype=torch.int64), image_id=0,
                      orig_size=(pil.height, pil.width), scale=t.scale)

    def to_onnx(self, path: str | Path) -> Path:
        """Write the ONNX model (see `vfnet.interop.export.model` for its inputs and outputs)."""
        from vfnet.interop.export import export_onnx

        return export_onnx(self.model, path)

    def to_torch_export(self, path: str | Path) -> Path:
        """Write the `torch.export` program (.pt2; see `vfnet.interop.export`)."""
        from vfnet.interop.export import export_torch

        return export_torch(self.model, path)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> tuple[bool, list[ImageInput]]:
    """(single?, the images as a list)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return False, list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ArgumentError("no images given")
        return False, list(images)
    return True, [images]


def to_pil(image: ImageInput, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, a uint8 array [H, W, 3] or a uint8 tensor
    [3, H, W]; ArgumentError naming what is wrong otherwise, DatasetError for a bad file."""
    if isinstance(image, (str, Path)):
        return decode_image(Path(image), image, max_pixels)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ArgumentError(f"image tensor must be uint8 [3, H, W] (RGB), got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ArgumentError(f"image array must be uint8 [H, W, 3] (RGB), got {image.dtype} {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image))
    raise ArgumentError(f"an image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}")
