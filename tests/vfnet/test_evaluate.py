import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

COCO = pytest.importorskip("pycocotools.coco", reason="COCO evaluation needs pycocotools").COCO

from vfnet.evaluate import (  # noqa: E402
    AP_NAMES,
    STAT_NAMES,
    coco_eval,
    evaluate,
    format_table,
    to_coco_results,
    write_json,
)

BCCD_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd" / "annotations" / "test.json"


@pytest.fixture(scope="module")
def bccd_gt():
    if not BCCD_TEST.is_file():
        pytest.skip(f"{BCCD_TEST} not present")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(BCCD_TEST))


def _perfect_predictions(coco):
    """Model-style predictions (xyxy, contiguous labels) reproducing every gt box."""
    cat_ids = sorted(coco.getCatIds())
    preds, ids = [], []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        preds.append({
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.linspace(0.99, 0.5, len(anns)),
            "labels": torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64),
        })
        ids.append(image_id)
    return preds, ids, cat_ids


def test_perfect_predictions_score_one_on_bccd_test(bccd_gt):
    preds, ids, cat_ids = _perfect_predictions(bccd_gt)
    results = to_coco_results(preds, ids, cat_ids)
    assert len(results) == len(bccd_gt.getAnnIds())
    metrics = coco_eval(bccd_gt, results)
    assert list(metrics) == list(STAT_NAMES)
    for name in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_AR_100"):
        assert metrics[name] == pytest.approx(1.0), name
    for name in ("bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"):  # -1 = no gt of that size
        assert metrics[name] in (-1.0, pytest.approx(1.0)), name


def test_wrong_class_and_shifted_boxes_score_lower(bccd_gt):
    preds, ids, cat_ids = _perfect_predictions(bccd_gt)
    for p in preds:
        p["labels"] = (p["labels"] + 1) % len(cat_ids)
    assert coco_eval(bccd_gt, to_coco_results(preds, ids, cat_ids))["bbox_mAP"] < 0.05
    preds, ids, cat_ids = _perfect_predictions(bccd_gt)
    for p in preds:
        w = p["boxes"][:, 2] - p["boxes"][:, 0]
        p["boxes"][:, [0, 2]] += 0.3 * w[:, None]  # IoU ~ 0.54: counts at 0.5, not at 0.75
    metrics = coco_eval(bccd_gt, to_coco_results(preds, ids, cat_ids))
    assert metrics["bbox_mAP_50"] > 0.9 and metrics["bbox_mAP_75"] < 0.05


def test_results_use_original_category_ids_and_xywh():
    pred = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.7]),
            "labels": torch.tensor([1])}
    (entry,) = to_coco_results([pred], [42], cat_ids=[3, 7])
    assert entry == {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0],
                     "score": 0.7}


def test_no_detections_give_zero_metrics(bccd_gt):
    assert coco_eval(bccd_gt, []) == {name: 0.0 for name in STAT_NAMES}


def test_table_matches_pycocotools_summary(bccd_gt):
    from pycocotools.cocoeval import COCOeval

    preds, ids, cat_ids = _perfect_predictions(bccd_gt)
    for p in preds:
        p["boxes"] += 3.0
    results = to_coco_results(preds, ids, cat_ids)
    metrics = coco_eval(bccd_gt, results)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        ev = COCOeval(bccd_gt, bccd_gt.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate()
        out.truncate(0), out.seek(0)
        ev.summarize()
    assert format_table(metrics) == out.getvalue().rstrip("\n")
    assert len(format_table(metrics).splitlines()) == 12


class _Batch:
    def __init__(self, ids):
        self.image_ids = ids
        self.images = torch.zeros(len(ids), 3, 8, 8)
        self.image_sizes = torch.tensor([[8, 8]] * len(ids))
        self.scales = torch.ones(len(ids), 2)

    def to(self, device):
        return self


class _Oracle(torch.nn.Module):
    """Predicts the ground truth it was given; records train/eval mode while predicting."""

    def __init__(self, by_id, batches):
        super().__init__()
        self.by_id, self.modes = by_id, []
        self._next = iter(batches)

    def predict(self, images, image_sizes, scales):
        self.modes.append(self.training)
        return [self.by_id[i] for i in next(self._next)]


def test_evaluate_runs_model_in_eval_mode_over_loader(bccd_gt):
    preds, ids, cat_ids = _perfect_predictions(bccd_gt)
    batches = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    model = _Oracle(dict(zip(ids, preds)), batches)
    dataset = type("D", (), {"coco": bccd_gt, "cat_ids": cat_ids})()
    model.train()
    metrics = evaluate(model, [_Batch(b) for b in batches], dataset, "cpu")
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    assert model.modes == [False] * len(batches) and model.training


def test_write_json_is_atomic_and_readable(tmp_path):
    path = write_json(tmp_path / "eval.json", {name: 0.5 for name in AP_NAMES})
    assert json.loads(path.read_text())["bbox_mAP"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
