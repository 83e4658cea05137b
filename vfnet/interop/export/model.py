"""The exportable detector: an image batch in, padded detections out, all in standard operators.

`ExportableVFNet(model)` wraps a trained `vfnet.model.VFNet`:

    images [B, 3, H, W] float32 RGB pixel values 0-255 (any B, H, W; the images already resized
        to the model's scale: resizing is not in the graph)
    -> boxes [B, K, 4] float32 xyxy in input pixels, scores [B, K] float32, labels [B, K] int64,
       num_detections [B] int64, with K = infer.max_per_img

Rows at or beyond num_detections[b] are padding: boxes 0, scores 0, labels -1. Detections are
sorted by decreasing score. Inside the graph: normalisation with `data.mean` / `data.std`,
zero padding (in the normalised domain, as the data pipeline pads) bottom/right to a multiple of
`data.size_divisor`, the network with the star conv of `vfnet.interop.export.star_conv` and every
DCNv2 layer (backbone DCN stages, the head's `dcn_on_last_conv`) running
`vfnet.interop.export.deform_conv.deform_conv2d_export` (`use_export_ops`), then the
post-processing of `VFNet.detections` (the rules of `vfnet.model.postprocess`), written with TopK,
Gather, Where and NonMaxSuppression: per level the top `infer.nms_pre` (point, class) pairs whose
score (sigmoid) is above `infer.score_thr` (ties: lower point * C + class first), decoded against
the level's points and clipped to the H x W image, boxes whose width or height is not above
`infer.min_bbox_size` dropped, class-wise NMS at `infer.nms_iou`, the best `infer.max_per_img`
kept (ties: lower candidate index first). `predict` applies the size test in original-image
pixels; here the input pixels are the only ones known, so the two agree when the input is the
original image or `min_bbox_size` is 0 (the default).

`ExportableVFNet(model, with_head=True)` also returns the raw head outputs (for checks):
cls_logits [B, P, C], bbox_init [B, P, 4], bbox_refine [B, P, 4], P = points of all levels
(P3 first, row-major), distances in input pixels.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vfnet.core.errors import ArgumentError
from vfnet.interop.export.deform_conv import deform_conv2d_export
from vfnet.interop.export.nms import non_max_suppression
from vfnet.interop.export.star_conv import star_deform_conv2d_pair_export
from vfnet.model import VFNet
from vfnet.model.boxes import distance_to_box
from vfnet.model.dcn import ModulatedDeformConv
from vfnet.model.detector import level_points
from vfnet.model.losses import flatten_levels
from vfnet.model.postprocess import large_enough


def use_export_ops(model: VFNet) -> int:
    """Swap, in place, the ops of `model` that are not standard tensor operators for their
    exportable forms: the head's star conv (`star_deform_conv2d_pair_export`) and the op of every
    DCNv2 layer, wherever it sits (`ModulatedDeformConv.deform_conv` -> `deform_conv2d_export`).
    Returns the number of DCNv2 layers swapped."""
    model.head.star_pair = star_deform_conv2d_pair_export
    layers = [m for m in model.modules() if isinstance(m, ModulatedDeformConv)]
    for layer in layers:
        layer.deform_conv = deform_conv2d_export
    return len(layers)


class ExportableVFNet(nn.Module):
    """forward(images [B, 3, H, W] 0-255 RGB) -> (boxes, scores, labels, num_detections); see the
    module docstring. Holds a copy of `model` (its parts and weights, in eval mode) whose star conv
    and DCNv2 layers run their exportable ops (`use_export_ops`); `model` itself is left as it is.
    The normalisation and padding come from the config `model` was built from (`model.cfg.data`)."""

    def __init__(self, model: VFNet, *, with_head: bool = False):
        super().__init__()
        if model.cfg is None:
            raise ArgumentError("the export needs the model's data config (mean, std, size_divisor): "
                                "build the model with VFNet.from_config")
        if model.infer.nms_pre <= 0:
            raise ArgumentError(f"infer.nms_pre must be > 0 to export (a fixed top-k), got {model.infer.nms_pre}")
        self.model = copy.deepcopy(model).eval()
        use_export_ops(self.model)
        self.with_head = with_head
        self.infer = self.model.infer
        self.num_classes = model.head.num_classes
        self.strides = list(model.head.strides)
        data = model.cfg.data
        self.size_divisor = data.size_divisor
        self.register_buffer("mean", torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = images.shape[-2:]
        x = (images.float() - self.mean) / self.std
        d = self.size_divisor
        # the padded side written as d * ceil(side / d): torch.export's symbolic shapes then know it
        # is a multiple of d, which Res2Net's ceil-mode avg-down pools need to be traced
        x = F.pad(x, (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h))
        outputs = self.model(x)
        boxes, scores, labels = [], [], []
        for level, (logits, refine) in enumerate(zip(outputs.cls_scores, outputs.bbox_refine)):
            b, s, lab = self._level_candidates(logits, refine, self.strides[level], h, w)
            boxes.append(b)
            scores.append(s)
            labels.append(lab)
        detections = self._select(torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1))
        if not self.with_head:
            return detections
        return detections + (flatten_levels(outputs.cls_scores), flatten_levels(outputs.bbox_init),
                             flatten_levels(outputs.bbox_refine))

    def _level_candidates(self, logits: torch.Tensor, refine: torch.Tensor, stride: int, h, w
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level's candidates, the rule of `vfnet.model.postprocess.top_pairs` with a fixed count
        k = nms_pre: boxes [B, k, 4] clipped to h x w, scores [B, k] (0 where the pair fails the
        score or the size test, or the level has fewer than k pairs), labels [B, k]."""
        batch, classes, height, width = logits.shape
        k, thr = self.infer.nms_pre, self.infer.score_thr
        flat = flatten_levels([logits]).float().sigmoid().reshape(batch, -1)  # index = point * C + class
        flat = flat.masked_fill(flat <= thr, -1.0)
        # k failing entries make the sort at least k long (levels with fewer pairs)
        flat = torch.cat([flat, flat.new_full((batch, k), -1.0)], dim=1)
        values, index = flat.sort(dim=1, descending=True, stable=True)
        values, index = values[:, :k], index[:, :k]
        point = torch.clamp(index // classes, max=height * width - 1)
        distances = torch.gather(flatten_levels([refine]).float(), 1, point.unsqueeze(-1).expand(-1, -1, 4))
        x1, y1, x2, y2 = distance_to_box(level_points((height, width), stride, logits.device)[point],
                                         distances).unbind(-1)
        boxes = torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], dim=-1)
        keep = (values > thr) & large_enough(boxes, self.infer.min_bbox_size)
        return boxes, torch.where(keep, values, torch.zeros_like(values)), index % classes

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class-wise NMS over the candidates (boxes [B, N, 4], scores [B, N] with 0 = not a
        candidate, labels [B, N]), then the best `max_per_img` by decreasing score, padded."""
        batch, n = scores.shape
        classes = torch.arange(self.num_classes, device=labels.device).view(1, -1, 1)
        class_scores = torch.where(labels.unsqueeze(1) == classes, scores.unsqueeze(1),
                                   torch.zeros_like(scores.unsqueeze(1)))  # [B, C, N]
        selected = non_max_suppression(boxes, class_scores, self.infer.nms_iou, self.infer.score_thr)
        kept = torch.zeros(batch, n, dtype=torch.bool, device=scores.device)
        kept = kept.index_put((selected[:, 0], selected[:, 2]), torch.ones_like(selected[:, 0], dtype=torch.bool))
        ranked = torch.where(kept, scores, torch.full_like(scores, -1.0))
        top_scores, order = ranked.sort(dim=1, descending=True, stable=True)
        top_scores, order = top_scores[:, :self.infer.max_per_img], order[:, :self.infer.max_per_img]
        valid = top_scores >= 0
        out_boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4))
        out_boxes = torch.where(valid.unsqueeze(-1), out_boxes, torch.zeros_like(out_boxes))
        out_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        out_labels = torch.where(valid, torch.gather(labels, 1, order), torch.full_like(order, -1))
        return out_boxes, out_scores, out_labels, valid.sum(dim=1)
