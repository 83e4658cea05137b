"""Inference post-processing rules (the reference dense-head test procedure, docs/design.md §3).

Per image and level, the candidates are the `nms_pre` highest (point, class) pairs among those
whose score is strictly above `score_thr`: threshold first, then top-k. The passing pairs are taken
in row-major (point, class) order and ordered by `torch.sort(descending=True)`, the call the
reference makes on the same values, so equal scores resolve as they do there. The levels'
candidates are concatenated in level order, decoded and clipped to the resized image, mapped to
original-image pixels, and those whose width or height is not above `min_bbox_size` (negative:
no size filter) are dropped before class-wise NMS.
"""
from __future__ import annotations

import torch


def top_pairs(scores: torch.Tensor, score_thr: float, nms_pre: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `nms_pre` (point, class) pairs with score > score_thr of one image and level.

    scores: [P, C] probabilities (the level's points row-major). nms_pre <= 0 keeps every passing
    pair. Returns, each [k] in decreasing score order: the scores, the point indices and the
    labels (int64).
    """
    passing = scores > score_thr
    pairs = passing.nonzero()  # [n, 2] (point, class), row-major
    values, order = scores[passing].sort(descending=True)
    if nms_pre > 0:
        values, order = values[:nms_pre], order[:nms_pre]
    point, label = pairs[order].unbind(dim=1)
    return values, point, label


def large_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """boxes [..., 4] xyxy -> [...] bool: width and height both > min_size (all True if < 0)."""
    if min_size < 0:
        return torch.ones(boxes.shape[:-1], dtype=torch.bool, device=boxes.device)
    wh = boxes[..., 2:] - boxes[..., :2]
    return (wh > min_size).all(dim=-1)
