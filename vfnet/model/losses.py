"""The VFNet loss: varifocal loss on the IoU-aware class scores plus GIoU losses on the initial
and the refined boxes (docs/design.md §3).

- VFL on every point; the target of a positive point is q = IoU(refined box, gt), detached and
  floored at 1e-6, at its gt class (sparse labels/scores, never a dense [N, C] target); normalised
  by max(number of positives averaged over workers, 1).
- GIoU loss (1 - GIoU) on the initial and on the refined box of every positive point, weighted
  per point by that box's own detached IoU with its gt and normalised by max(sum of those weights
  averaged over workers, 1).

Shapes are fixed (no boolean indexing): background points enter the box terms with weight 0 and
harmless stand-in boxes, so the losses are 0, but still attached to the graph, without positives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.ops import VarifocalLossOp
from vfnet.core.config import LossConfig
from vfnet.model.assign import Targets
from vfnet.model.boxes import IOU_EPS, distance_to_box, giou_aligned, iou_aligned


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over the workers of an initialised torch.distributed group (else itself)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level maps [B, K, H_l, W_l] -> [B, P, K], points in level order then row-major."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


class VFNetLoss:
    """The weighted VFNet loss terms, with the varifocal loss op given at construction
    (`kernels.ops.VarifocalLossOp`, e.g. `Ops.from_name(cfg.model.kernels).varifocal_loss`)."""

    def __init__(self, cfg: LossConfig, varifocal_loss: VarifocalLossOp) -> None:
        self.cfg = cfg
        self.varifocal_loss = varifocal_loss

    def __call__(
        self,
        cls_logits: torch.Tensor,
        bbox_init: torch.Tensor,
        bbox_refine: torch.Tensor,
        points: torch.Tensor,
        targets: Targets,
    ) -> dict[str, torch.Tensor]:
        """Compute the weighted loss terms.

        cls_logits [B, P, C]; bbox_init, bbox_refine [B, P, 4] (l, t, r, b) pixels; points [P, 2]
        (x, y) pixels; targets from `vfnet.model.assign.atss_assign`.
        Returns `loss_cls`, `loss_bbox_init`, `loss_bbox_refine` (weighted; the total is their sum)
        and `num_pos` (this worker's positives, detached float).
        """
        cfg = self.cfg
        batch, num_points, num_classes = cls_logits.shape
        for name, value in (("bbox_init", bbox_init), ("bbox_refine", bbox_refine)):
            if value.shape != (batch, num_points, 4):
                raise ValueError(f"{name} must be [{batch}, {num_points}, 4], got {tuple(value.shape)}")
        positive = targets.positive.reshape(-1)
        pos_col = positive.unsqueeze(1)
        flat_points = points.to(torch.float32).expand(batch, -1, -1).reshape(-1, 2)
        # Background points: distances 1 and a target equal to the box they decode to (IoU 1, no NaN).
        stand_in = torch.ones((), dtype=torch.float32, device=points.device)
        stand_in_boxes = distance_to_box(flat_points, stand_in.expand(4))
        gt = torch.where(pos_col, targets.boxes.reshape(-1, 4).float(), stand_in_boxes)

        def box_loss(distances: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
            safe = torch.where(pos_col, distances.reshape(-1, 4).float(), stand_in)
            boxes = distance_to_box(flat_points, safe)
            iou = iou_aligned(boxes.detach(), gt).clamp(min=IOU_EPS)
            point_weight = torch.where(positive, iou, torch.zeros_like(iou))
            normaliser = reduce_mean(point_weight.sum()).clamp(min=1)
            loss = (point_weight * (1 - giou_aligned(boxes, gt))).sum() / normaliser
            return weight * loss, point_weight

        loss_init, _ = box_loss(bbox_init, cfg.init_weight)
        loss_refine, iou_refine = box_loss(bbox_refine, cfg.refine_weight)

        num_pos = positive.sum().to(torch.float32)
        loss_cls = self.varifocal_loss(
            cls_logits.reshape(-1, num_classes).float(),  # as the reference: the loss runs in fp32
            targets.labels.reshape(-1),
            iou_refine,
            alpha=cfg.alpha,
            gamma=cfg.gamma,
            iou_weighted=cfg.iou_weighted,
            reduction="sum",
        )
        loss_cls = cfg.cls_weight * loss_cls / reduce_mean(num_pos).clamp(min=1)
        return {
            "loss_cls": loss_cls,
            "loss_bbox_init": loss_init,
            "loss_bbox_refine": loss_refine,
            "num_pos": num_pos.detach(),
        }
