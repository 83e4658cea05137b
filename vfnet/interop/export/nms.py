"""`vfnet::non_max_suppression`: ONNX's NonMaxSuppression as a torch operator.

`torch.export` records it as one node (the way it records `torchvision::nms`), the ONNX export
translates it to the standard `NonMaxSuppression` operator, and in eager PyTorch (and when a
loaded `torch.export` program runs) it runs `vfnet.model.boxes.batched_nms`. A saved `torch.export`
program that contains it needs `import vfnet.interop.export` before `torch.export.load`.
"""
from __future__ import annotations

import torch

from vfnet.model.boxes import batched_nms

NO_LIMIT = 2**31 - 1  # ONNX's max_output_boxes_per_class when every box may be kept


@torch.library.custom_op("vfnet::non_max_suppression", mutates_args=())
def non_max_suppression(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float
) -> torch.Tensor:
    """Class-wise greedy NMS with ONNX NonMaxSuppression's interface (no per-class limit).

    boxes [B, N, 4] xyxy; scores [B, C, N]. Box n competes in class c when scores[b, c, n] >
    score_threshold; it is suppressed by a higher-scoring kept box of the same image and class
    whose IoU with it is > iou_threshold. Returns the kept (image, class, box) triples [M, 3]
    int64 (order unspecified).
    """
    selected = []
    for b in range(boxes.shape[0]):
        cls, box = torch.nonzero(scores[b] > score_threshold, as_tuple=True)
        keep = batched_nms(boxes[b, box], scores[b, cls, box], cls, iou_threshold)
        image = torch.full_like(keep, b)
        selected.append(torch.stack([image, cls[keep], box[keep]], dim=1))
    if not selected:
        return torch.zeros(0, 3, dtype=torch.int64, device=boxes.device)
    return torch.cat(selected)


@non_max_suppression.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float) -> torch.Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def onnx_translation():
    """{op: onnxscript function} for `torch.onnx.export(custom_translation_table=...)`: this
    operator as NonMaxSuppression, and the stable sort of the post-processing (which the ONNX
    exporter does not translate) as a full-length TopK, whose ties go to the lower index, as a
    stable sort's do."""
    from onnxscript import opset18 as op

    def translate(boxes, scores, iou_threshold: float, score_threshold: float):
        return op.NonMaxSuppression(
            boxes,
            scores,
            op.Constant(value_ints=[NO_LIMIT]),
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[score_threshold]),
            center_point_box=0,
        )

    def stable_sort(x, stable: bool = True, dim: int = -1, descending: bool = False):
        length = op.Gather(op.Shape(x), op.Constant(value_ints=[dim]), axis=0)
        return op.TopK(x, length, axis=dim, largest=int(descending), sorted=1)

    return {torch.ops.vfnet.non_max_suppression.default: translate, torch.ops.aten.sort.stable: stable_sort}
