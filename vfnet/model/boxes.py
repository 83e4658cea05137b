"""Box utilities: conversions, point-distance encoding, IoU / GIoU and class-wise NMS.

Boxes are (x1, y1, x2, y2) in pixels unless a name says otherwise; distances are (l, t, r, b)
from a point to the four sides of a box, in pixels. Everything is plain PyTorch (torchvision's
compiled ops are not available on the CPU machines) and runs on any device.
"""
from __future__ import annotations

import torch

IOU_EPS = 1e-6  # floor of unions and enclosing areas (the reference's bbox_overlaps eps)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x, y, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    xy, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat([xy, xy + wh], dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (x, y, w, h)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_centers(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [..., 2] (cx, cy)."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] area (negative extents count as 0)."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def distance_to_box(
    points: torch.Tensor, distances: torch.Tensor, max_shape: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode distances to boxes.

    points: [..., 2] (x, y); distances: [..., 4] (l, t, r, b); max_shape: optional [..., 2]
    (h, w) broadcastable to the leading dims: x is clamped to [0, w] and y to [0, h].
    Returns [..., 4] xyxy.
    """
    boxes = torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)
    if max_shape is None:
        return boxes
    h = max_shape[..., 0:1].to(boxes.dtype)
    w = max_shape[..., 1:2].to(boxes.dtype)
    upper = torch.cat([w, h, w, h], dim=-1)
    return torch.minimum(boxes.clamp(min=0), upper)


def box_to_distance(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Encode boxes as distances: points [..., 2], boxes [..., 4] xyxy -> [..., 4] (l, t, r, b)."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def _aligned_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlap, union (floored at IOU_EPS) and the two boxes' elementwise corner extremes."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (box_area(a) + box_area(b) - overlap).clamp(min=IOU_EPS)
    return overlap, union, torch.cat(
        [torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], dim=-1
    )


def iou_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding boxes: a, b [..., 4] xyxy (broadcastable) -> [...]."""
    overlap, union, _ = _aligned_parts(a, b)
    return overlap / union


def giou_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of corresponding boxes: a, b [..., 4] xyxy -> [...] in (-1, 1]."""
    overlap, union, enclosing = _aligned_parts(a, b)
    enclose_area = box_area(enclosing).clamp(min=IOU_EPS)
    return overlap / union - (enclose_area - union) / enclose_area


def iou_pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair: a [..., N, 4], b [..., M, 4] xyxy -> [..., N, M]."""
    return iou_aligned(a.unsqueeze(-2), b.unsqueeze(-3))


def giou_pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of every pair: a [..., N, 4], b [..., M, 4] xyxy -> [..., N, M]."""
    return giou_aligned(a.unsqueeze(-2), b.unsqueeze(-3))


# ---------------------------------------------------------------------------------------------
# Non-maximum suppression

NMS_MAX_JOINT = 10_000  # from this many boxes on, NMS runs class by class (the reference's split_thr)
NMS_CHECK_EVERY = 4  # greedy-NMS iterations between convergence tests (each one a host sync)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-wise greedy NMS, as the reference's (mmcv's `batched_nms` with `nms`).

    boxes [K, 4] xyxy, scores [K], labels [K] int. A box is suppressed by a higher-scoring kept
    box of the same label whose IoU with it is > iou_threshold. Returns the kept indices [k]
    (int64) by decreasing score; boxes are visited in `torch.sort(descending=True)` order, as
    the reference does, so equal scores resolve as there. Below NMS_MAX_JOINT boxes the classes
    are processed jointly, each class's boxes shifted by label * (max coordinate + 1) (the
    reference's shift, so the IoUs are computed on the same shifted values; widened when
    coordinates are negative), from NMS_MAX_JOINT on class by class.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [K, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must be [K] with "
            f"K = {boxes.shape[0]} (boxes)"
        )
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] < NMS_MAX_JOINT:
        unit = boxes.max() + 1 - boxes.min().clamp(max=0)
        return _greedy_nms(boxes + (labels.to(boxes.dtype) * unit)[:, None], scores, iou_threshold)
    kept = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).squeeze(1)
        kept[members[_greedy_nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(kept).squeeze(1)
    return keep[scores[keep].argsort(descending=True)]


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of one set of boxes [K, 4]; returns kept indices in decreasing-score order.

    Vectorised: with the boxes sorted by score, `suppresses[j, i]` says box j (earlier) overlaps
    box i (later) by more than the threshold; the greedy result is the unique fixed point of
    keep[i] = not any_j(keep[j] and suppresses[j, i]), reached by iterating from all-kept. After
    t iterations the first t boxes are final, so it ends after at most K iterations; in practice
    after the length of the longest suppression chain (a few). Convergence is tested (a
    device-to-host read) only every NMS_CHECK_EVERY iterations: iterating past the fixed point
    changes nothing.
    """
    order = scores.sort(descending=True).indices
    sorted_boxes = boxes[order].float()
    iou = iou_pairwise(sorted_boxes, sorted_boxes)
    suppresses = torch.triu(iou > iou_threshold, diagonal=1).float()
    keep = torch.ones(len(order), dtype=torch.float32, device=boxes.device)
    for step in range(1, len(order) + 1):
        new_keep = (keep @ suppresses == 0).float()
        if step % NMS_CHECK_EVERY == 0 and torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep.bool()]
