"""ATSS target assignment (adaptive training sample selection), batched over images and gts.

Semantics (DESIGN.md §3, the reference VFNet/ATSS assigner): every point (x, y) of every level
carries a square anchor of side `anchor_scale * stride` centred on it. Per image, level and gt, the
`topk` points nearest to the gt centre are candidates; the gt's IoU threshold is the mean plus the
unbiased standard deviation of its candidates' anchor IoUs; a candidate is positive when its IoU
is >= the threshold and the point lies inside the gt by more than 0.01 px on every side. A point
positive for several gts takes the one with the largest IoU.

Only the points inside an image's own padded extent (`point_valid`, see `valid_points`) can be
candidates for its gts, so an image's targets do not depend on the sizes of the other images in its
batch (points outside are background). Where fewer than `topk` points of a level are valid, all of
them are candidates. Equal distances go to the lower point index. The threshold statistics are
computed in float64, so they do not depend on where the candidates sit in the batch.

Everything runs on the points' device with fixed shapes: gts are padded per batch and masked, and
the only Python loop is over the pyramid levels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vfnet.boxes import box_centers, iou_pairwise

INSIDE_MARGIN = 0.01  # px a positive point must lie inside its gt


@dataclass
class Targets:
    """Per-point training targets for a batch.

    labels: [B, P] int64, the gt class 0..C-1, or C (background).
    boxes: [B, P, 4] xyxy of the assigned gt (zeros at background points).
    positive: [B, P] bool, labels < C.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    positive: torch.Tensor


def pad_gts(
    gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-image gts into [B, G, 4] boxes, [B, G] labels and a [B, G] validity mask.

    G = max(1, max n_i); padding rows are zero boxes with label 0 and mask False.
    """
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} images but gt_labels has {len(gt_labels)}")
    num = max([1] + [int(b.shape[0]) for b in gt_boxes])
    batch = len(gt_boxes)
    boxes = torch.zeros(batch, num, 4, dtype=torch.float32, device=device)
    labels = torch.zeros(batch, num, dtype=torch.long, device=device)
    valid = torch.zeros(batch, num, dtype=torch.bool, device=device)
    for i, (b, l) in enumerate(zip(gt_boxes, gt_labels)):
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"gt_boxes[{i}] must be [n, 4], got {tuple(b.shape)}")
        if l.shape != b.shape[:1]:
            raise ValueError(f"gt_labels[{i}] must be [{b.shape[0]}], got {tuple(l.shape)}")
        n = b.shape[0]
        boxes[i, :n] = b.to(device=device, dtype=torch.float32)
        labels[i, :n] = l.to(device=device, dtype=torch.long)
        valid[i, :n] = True
    return boxes, labels, valid


def valid_points(
    points: torch.Tensor, image_sizes: torch.Tensor, size_divisor: int
) -> torch.Tensor:
    """Which points lie inside each image's own padded extent.

    points [P, 2] (x, y) input pixels (the grid points j * stride, i * stride); image_sizes [B, 2]
    int (h, w) of the resized, unpadded images. An image's padded extent is its size rounded up to
    a multiple of `size_divisor`; point (x, y) is inside when x < padded w and y < padded h, i.e.
    on a level of stride s the first ceil(padded / s) rows and columns: the feature map that image
    alone would have. Returns [B, P] bool.
    """
    padded = (image_sizes + size_divisor - 1) // size_divisor * size_divisor
    return (points[None, :, 0] < padded[:, None, 1]) & (points[None, :, 1] < padded[:, None, 0])


def atss_assign(
    level_points: list[torch.Tensor],
    strides: list[int],
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_valid: torch.Tensor,
    num_classes: int,
    *,
    point_valid: torch.Tensor | None = None,
    topk: int = 9,
    anchor_scale: float = 8.0,
) -> Targets:
    """Assign gts to points.

    level_points: per level [P_l, 2] (x, y) in input pixels (P = sum P_l, concatenated in level
    order); strides: per level; gt_boxes [B, G, 4] xyxy pixels, gt_labels [B, G] int, gt_valid
    [B, G] bool (padding False); point_valid: optional [B, P] bool, the points inside each image's
    padded extent (None: all). Returns Targets over the B x P points.
    """
    if len(level_points) != len(strides):
        raise ValueError(f"{len(level_points)} levels of points but {len(strides)} strides")
    points = torch.cat(level_points)  # [P, 2]
    half = torch.cat(
        [torch.full((p.shape[0], 1), anchor_scale * s / 2, dtype=points.dtype, device=points.device)
         for p, s in zip(level_points, strides)]
    )
    anchors = torch.cat([points - half, points + half], dim=1)  # [P, 4]
    gt_boxes = gt_boxes.to(points.dtype)
    overlaps = iou_pairwise(anchors, gt_boxes)  # [B, P, G]
    offsets = points[None, :, None, :] - box_centers(gt_boxes)[:, None, :, :]  # [B, P, G, 2]
    distances = offsets.pow(2).sum(-1).sqrt()
    if point_valid is None:
        point_valid = torch.ones(distances.shape[:2], dtype=torch.bool, device=points.device)
    elif point_valid.shape != distances.shape[:2]:
        raise ValueError(f"point_valid must be {tuple(distances.shape[:2])}, got {tuple(point_valid.shape)}")
    distances = distances.masked_fill(~point_valid.unsqueeze(-1), float("inf"))

    candidates = []
    start = 0
    for level in level_points:
        count = level.shape[0]
        k = min(topk, count)
        # a stable sort: equal distances go to the lower point index, whatever the padding
        nearest = distances[:, start:start + count].sort(dim=1, stable=True).indices[:, :k]
        candidates.append(nearest + start)
        start += count
    candidates = torch.cat(candidates, dim=1)  # [B, K, G] point indices
    real = point_valid.unsqueeze(-1).expand_as(distances).gather(1, candidates)  # [B, K, G]

    candidate_iou = overlaps.gather(1, candidates)
    threshold = _mean_plus_std(candidate_iou.double(), real)
    candidate_points = points[candidates]  # [B, K, G, 2]
    box = gt_boxes.unsqueeze(1)  # [B, 1, G, 4]
    margins = torch.cat([candidate_points - box[..., :2], box[..., 2:] - candidate_points], dim=-1)
    inside = margins.min(dim=-1).values > INSIDE_MARGIN
    positive = (candidate_iou.double() >= threshold) & inside & real & gt_valid.unsqueeze(1)

    # IoU of (point, gt) where positive, -inf elsewhere; candidates of one gt are distinct points.
    # (masked_fill with a Python scalar: torch.tensor(-inf, device=...) would be a blocking copy.)
    positive_iou = torch.full_like(overlaps, float("-inf")).scatter(
        1, candidates, candidate_iou.masked_fill(~positive, float("-inf"))
    )
    best_iou, best_gt = positive_iou.max(dim=2)  # [B, P]
    is_pos = best_iou > float("-inf")
    labels = torch.where(is_pos, gt_labels.gather(1, best_gt), torch.full_like(best_gt, num_classes))
    boxes = gt_boxes.gather(1, best_gt.unsqueeze(-1).expand(-1, -1, 4))
    boxes = torch.where(is_pos.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    return Targets(labels=labels, boxes=boxes, positive=is_pos)


def _mean_plus_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean + unbiased standard deviation over dim 1 of the entries where mask is True.

    values, mask [B, K, G] -> [B, 1, G]. NaN where fewer than two entries count (as torch.std).
    """
    weight = mask.to(values.dtype)
    count = weight.sum(dim=1, keepdim=True)
    mean = (values * weight).sum(dim=1, keepdim=True) / count
    var = ((values - mean).pow(2) * weight).sum(dim=1, keepdim=True) / (count - 1)
    return mean + var.sqrt()
