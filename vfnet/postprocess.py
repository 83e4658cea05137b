"""Inference post-processing rules (the reference dense-head test procedure, DESIGN.md §3).

Per image and level, the candidates are the `nms_pre` highest (point, class) pairs among those
whose score is strictly above `score_thr` (threshold first, then top-k; ties in score go to the
lower flat index point * C + class, i.e. a stable sort of the pairs in row-major order). The
levels' candidates are concatenated in level order, decoded and clipped to the resized image,
mapped to original-image pixels, and those whose width or height is not above `min_bbox_size`
(negative: no size filter) are dropped before class-wise NMS.

Everything here has fixed shapes per batch (a validity mask instead of data-dependent lengths), so
it runs without host synchronisation and exports.
"""
from __future__ import annotations

import torch


def top_pairs(
    scores: torch.Tensor, score_thr: float, nms_pre: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `nms_pre` (point, class) pairs with score > score_thr, per image, of one level.

    scores: [B, P, C] probabilities. nms_pre <= 0 keeps every passing pair. Returns, each [B, k]
    with k = min(nms_pre, P * C) (P * C when nms_pre <= 0), in decreasing score order: the scores,
    the point indices (int64, into P), the labels (int64, into C) and a bool mask of the entries
    that are real candidates (False where fewer than k pairs pass the threshold).
    """
    batch, _, num_classes = scores.shape
    flat = scores.reshape(batch, -1)
    # Failing pairs sort after every passing one (scores are >= 0 > -1) and are masked out.
    flat = flat.masked_fill(flat <= score_thr, -1.0)
    k = flat.shape[1] if nms_pre <= 0 else min(nms_pre, flat.shape[1])
    values, index = flat.sort(dim=1, descending=True, stable=True)
    values, index = values[:, :k], index[:, :k]
    return values, index // num_classes, index % num_classes, values > score_thr


def large_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """boxes [..., 4] xyxy -> [...] bool: width and height both > min_size (all True if < 0)."""
    if min_size < 0:
        return torch.ones(boxes.shape[:-1], dtype=torch.bool, device=boxes.device)
    wh = boxes[..., 2:] - boxes[..., :2]
    return (wh > min_size).all(dim=-1)
