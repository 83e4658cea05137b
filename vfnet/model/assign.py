"""ATSS target assignment (adaptive training sample selection), batched over images and gts.

Semantics (docs/design.md §3, the reference VFNet/ATSS assigner): every point (x, y) of every level
carries a square anchor of side `anchor_scale * stride` centred on it. Per image, level and gt, the
`topk` points nearest to the gt centre are candidates; the gt's IoU threshold is the mean plus the
unbiased standard deviation of its candidates' anchor IoUs; a candidate is positive when its IoU
is >= the threshold and the point lies inside the gt by more than 0.01 px on every side. A point
positive for several gts takes the one with the largest IoU.

Only the points inside an image's own padded extent (its resized size rounded up to the size
divisor: on a level of stride s the first ceil(padded / s) rows and columns, the feature map that
image alone would have) can be candidates for its gts, so an image's targets do not depend on the
sizes of the other images in its batch (points outside are background). The nearest points are
picked by `torch.topk` on exactly the distances the reference picks from (that image's own grid of
the level), so equal distances resolve as they do there; where fewer than `topk` points of a
level are valid, all of them are candidates. The threshold statistics are computed in float64.

Everything runs on the points' device with fixed shapes: gts are padded per batch and masked; the
Python loops are over the pyramid levels and, only for images smaller than the batch, over images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vfnet.model.boxes import box_centers, iou_pairwise

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


def atss_assign(
    level_points: list[torch.Tensor],
    strides: list[int],
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_valid: torch.Tensor,
    num_classes: int,
    *,
    level_shapes: list[tuple[int, int]] | None = None,
    padded_sizes: list[tuple[int, int]] | None = None,
    topk: int = 9,
    anchor_scale: float = 8.0,
) -> Targets:
    """Assign gts to points.

    level_points: per level [P_l, 2] (x, y) in input pixels, row-major over the level's
    (H_l, W_l) grid (P = sum P_l, concatenated in level order); strides: per level; gt_boxes
    [B, G, 4] xyxy pixels, gt_labels [B, G] int, gt_valid [B, G] bool (padding False);
    padded_sizes: per image (h, w) of its own padded extent, host ints (None: every image fills
    the batch), with level_shapes the (H_l, W_l) of the levels. Returns Targets over the B x P
    points.
    """
    if len(level_points) != len(strides):
        raise ValueError(f"{len(level_points)} levels of points but {len(strides)} strides")
    extents = None
    if padded_sizes is not None:
        if level_shapes is None or len(level_shapes) != len(strides):
            raise ValueError("padded_sizes needs level_shapes, one (H, W) per level")
        if len(padded_sizes) != gt_boxes.shape[0]:
            raise ValueError(f"{len(padded_sizes)} padded_sizes for {gt_boxes.shape[0]} images")
        extents = [[(min(-(-h // s), rows), min(-(-w // s), cols)) for s, (rows, cols) in zip(strides, level_shapes)]
                   for h, w in padded_sizes]
    points = torch.cat(level_points)  # [P, 2]
    num_points = points.shape[0]
    half = torch.cat(
        [torch.full((p.shape[0], 1), anchor_scale * s / 2, dtype=points.dtype, device=points.device)
         for p, s in zip(level_points, strides)]
    )
    anchors = torch.cat([points - half, points + half], dim=1)  # [P, 4]
    gt_boxes = gt_boxes.to(points.dtype)
    overlaps = iou_pairwise(anchors, gt_boxes)  # [B, P, G]
    offsets = points[None, :, None, :] - box_centers(gt_boxes)[:, None, :, :]  # [B, P, G, 2]
    distances = offsets.pow(2).sum(-1).sqrt()

    # [B, K, G] point indices; P marks a padding slot (an image with fewer valid points)
    candidates = _nearest(distances, [p.shape[0] for p in level_points], level_shapes, extents, topk)
    real = candidates < num_points
    safe = candidates.clamp(max=num_points - 1)
    candidate_iou = overlaps.gather(1, safe)
    threshold = _mean_plus_std(candidate_iou.double(), real)
    candidate_points = points[safe]  # [B, K, G, 2]
    box = gt_boxes.unsqueeze(1)  # [B, 1, G, 4]
    margins = torch.cat([candidate_points - box[..., :2], box[..., 2:] - candidate_points], dim=-1)
    inside = margins.min(dim=-1).values > INSIDE_MARGIN
    positive = (candidate_iou.double() >= threshold) & inside & real & gt_valid.unsqueeze(1)

    # IoU of (point, gt) where positive, -inf elsewhere; the real candidates of one gt are distinct
    # points, padding slots all write -inf into the extra row P, which is dropped.
    # (masked_fill with a Python scalar: torch.tensor(-inf, device=...) would be a blocking copy.)
    batch, _, num_gts = overlaps.shape
    positive_iou = overlaps.new_full((batch, num_points + 1, num_gts), float("-inf")).scatter(
        1, candidates, candidate_iou.masked_fill(~positive, float("-inf"))
    )[:, :num_points]
    best_iou, best_gt = positive_iou.max(dim=2)  # [B, P]
    is_pos = best_iou > float("-inf")
    labels = torch.where(is_pos, gt_labels.gather(1, best_gt), torch.full_like(best_gt, num_classes))
    boxes = gt_boxes.gather(1, best_gt.unsqueeze(-1).expand(-1, -1, 4))
    boxes = torch.where(is_pos.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    return Targets(labels=labels, boxes=boxes, positive=is_pos)


def _nearest(
    distances: torch.Tensor,
    level_sizes: list[int],
    level_shapes: list[tuple[int, int]] | None,
    extents: list[list[tuple[int, int]]] | None,
    topk: int,
) -> torch.Tensor:
    """Per image, level and gt the `topk` nearest valid points: distances [B, P, G] -> [B, K, G]
    indices into P, K = sum_l min(topk, P_l); slots beyond an image's valid points hold P.

    Each pick is `topk(largest=False)` over the distances of that image's valid grid of the level,
    flattened row-major (the whole level when the image fills the batch, then batched).
    """
    batch, num_points, num_gts = distances.shape
    picks, start = [], 0
    for level, count in enumerate(level_sizes):
        k = min(topk, count)
        block = distances[:, start:start + count]
        if extents is None or all(e[level] == level_shapes[level] for e in extents):
            picks.append(block.topk(k, dim=1, largest=False).indices + start)
        else:
            rows, cols = level_shapes[level]
            per_image = []
            for b, extent in enumerate(extents):
                valid_rows, valid_cols = extent[level]
                grid = block[b].reshape(rows, cols, num_gts)[:valid_rows, :valid_cols]
                kb = min(topk, valid_rows * valid_cols)
                local = grid.reshape(-1, num_gts).topk(kb, dim=0, largest=False).indices
                index = local // valid_cols * cols + local % valid_cols + start
                if kb < k:
                    index = torch.cat([index, index.new_full((k - kb, num_gts), num_points)])
                per_image.append(index)
            picks.append(torch.stack(per_image))
        start += count
    return torch.cat(picks, dim=1)


def _mean_plus_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean + unbiased standard deviation over dim 1 of the entries where mask is True.

    values, mask [B, K, G] -> [B, 1, G]. NaN where fewer than two entries count (as torch.std).
    """
    weight = mask.to(values.dtype)
    count = weight.sum(dim=1, keepdim=True)
    mean = (values * weight).sum(dim=1, keepdim=True) / count
    var = ((values - mean).pow(2) * weight).sum(dim=1, keepdim=True) / (count - 1)
    return mean + var.sqrt()
