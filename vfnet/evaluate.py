"""COCO bbox evaluation (pycocotools COCOeval) on the original category ids.

Metrics are returned by name, in COCOeval's `stats` order: the six of docs/design.md §4
(`bbox_mAP`, `bbox_mAP_50`, `bbox_mAP_75`, `bbox_mAP_s`, `bbox_mAP_m`, `bbox_mAP_l`) followed by
the six average recalls (`bbox_AR_1`, `bbox_AR_10`, `bbox_AR_100`, `bbox_AR_s`, `bbox_AR_m`,
`bbox_AR_l`). A value of -1 means undefined (no ground truth in that area range), as in pycocotools.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vfnet.core import atomic
from vfnet.core.optional import require

log = logging.getLogger(__name__)

AP_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")
AR_NAMES = ("bbox_AR_1", "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l")
STAT_NAMES = AP_NAMES + AR_NAMES

# (AP or AR, IoU range, area, max detections) of each COCOeval stat, for the printed table
_TABLE_ROWS = (
    ("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
)


def to_coco_results(
    predictions: Iterable[dict[str, torch.Tensor]], image_ids: Iterable[int], cat_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO result entries from model predictions.

    predictions: per image `boxes` [k, 4] xyxy in original-image pixels, `scores` [k],
    `labels` [k] contiguous; `cat_ids[label]` is the COCO category id. Returns
    `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` dicts.
    """
    results = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = pred["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({
                "image_id": int(image_id),
                "category_id": int(cat_ids[label]),
                "bbox": [round(v, 3) for v in box],
                "score": round(float(score), 5),
            })
    return results


def coco_eval(coco_gt: Any, results: list[dict[str, Any]],
              image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Run COCOeval (bbox) of `results` against `coco_gt` over `image_ids` (default: all images).

    coco_gt: a pycocotools `COCO` index. Returns the 12 stats by name (see the module
    docstring); all 0 when there are no results.
    """
    cocoeval = require("pycocotools.cocoeval", "COCO evaluation")
    if image_ids is None:
        image_ids = coco_gt.getImgIds()
    if not results:
        log.warning("no detections: every COCO metric is 0")
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()) as out:  # pycocotools prints progress
        coco_dt = coco_gt.loadRes(results)
        evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools output:\n%s", out.getvalue())
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}


def format_table(metrics: dict[str, float]) -> str:
    """The 12-line COCO summary table (as COCOeval.summarize prints it) from metrics by name."""
    lines = []
    for name, (kind, iou, area, dets) in zip(STAT_NAMES, _TABLE_ROWS):
        title = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
        lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = "
                     f"{metrics[name]:0.3f}")
    return "\n".join(lines)


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, loader: Iterable[Any], device: torch.device | str,
                    *, desc: str = "eval") -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Run `model.predict` over every batch of `loader`; return (predictions, image ids).

    The model is put in eval mode and restored to its previous mode afterwards.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    predictions: list[dict[str, torch.Tensor]] = []
    image_ids: list[int] = []
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
            batch = batch.to(device)
            for pred in module.predict(batch.images, batch.image_sizes, batch.scales):
                predictions.append({k: v.cpu() for k, v in pred.items()})
            image_ids.extend(batch.image_ids)
    finally:
        module.train(was_training)
    return predictions, image_ids


def evaluate(model: torch.nn.Module, loader: Iterable[Any], dataset: Any,
             device: torch.device | str) -> dict[str, float]:
    """COCO bbox metrics of `model` on `dataset` (a CocoDetection: `.coco`, `.cat_ids`).

    loader: batches (`vfnet.data.Batch`) of that dataset. Returns the 12 stats by name.
    """
    predictions, image_ids = predict_dataset(model, loader, device)
    results = to_coco_results(predictions, image_ids, dataset.cat_ids)
    metrics = coco_eval(dataset.coco, results, image_ids)
    log.debug("COCO bbox evaluation on %d images:\n%s", len(image_ids), format_table(metrics))
    return metrics


def write_json(path: str | Path, payload: Any) -> Path:
    """Write `payload` as indented JSON atomically (`vfnet.core.atomic`); the path."""
    return atomic.write_json(path, payload, indent=2)
