"""Inference rules against a brute-force, pair-by-pair statement of the reference procedure."""
import pytest
import torch

from vfnet.core.config import Config
from vfnet.model import VFNet
from vfnet.model.boxes import batched_nms
from vfnet.model.head import HeadOutputs
from vfnet.model.postprocess import large_enough, top_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDES = [8, 16, 32, 64, 128]


def small_model(num_classes, **infer) -> VFNet:
    cfg = Config()
    cfg.model.depth = 18
    cfg.model.num_classes = num_classes
    cfg.model.fpn_channels = cfg.model.head_channels = 16
    cfg.model.gn_groups = 4
    cfg.model.kernels = "torch"
    for key, value in infer.items():
        setattr(cfg.infer, key, value)
    return VFNet.from_config(cfg).eval()


def random_outputs(batch, num_classes, padded_hw, *, ties, gen):
    """Head outputs for a batch padded to padded_hw: logits (quantised to force score ties when
    `ties`) and refined distances, some zero (degenerate boxes)."""
    cls, refine = [], []
    for stride in STRIDES:
        h, w = -(-padded_hw[0] // stride), -(-padded_hw[1] // stride)
        if ties:
            logits = torch.randint(-4, 3, (batch, num_classes, h, w), generator=gen).float() / 2
        else:
            logits = torch.randn(batch, num_classes, h, w, generator=gen) * 2 - 1
        dist = torch.rand(batch, 4, h, w, generator=gen) * 3 * stride
        dist = dist * (torch.rand(batch, 4, h, w, generator=gen) > 0.15)  # some zero sides
        cls.append(logits)
        refine.append(dist)
    return HeadOutputs(cls, refine, refine)


def brute_force(outputs, image_sizes, scales, infer):
    """The reference test procedure, one image, level and (point, class) pair at a time."""
    results = []
    for i in range(len(image_sizes)):
        h, w = image_sizes[i].tolist()
        sx, sy = scales[i].tolist()
        boxes, scores, labels = [], [], []
        for logits, dist, stride in zip(outputs.cls_scores, outputs.bbox_refine, STRIDES):
            num_classes, _, width = logits.shape[1:]
            prob = logits[i].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
            d = dist[i].permute(1, 2, 0).reshape(-1, 4)
            pairs = [(p, c) for p in range(prob.shape[0]) for c in range(num_classes)
                     if prob[p, c].item() > infer.score_thr]
            # the reference orders the passing scores (row-major) with torch.sort(descending=True)
            order = torch.tensor([prob[p, c].item() for p, c in pairs]).sort(descending=True).indices.tolist()
            pairs = [pairs[i] for i in order]
            if infer.nms_pre > 0:
                pairs = pairs[: infer.nms_pre]
            for p, c in pairs:
                x, y = float(p % width * stride), float(p // width * stride)
                l, t, r, b = d[p].tolist()
                x1, y1 = min(max(x - l, 0.0), w), min(max(y - t, 0.0), h)
                x2, y2 = min(max(x + r, 0.0), w), min(max(y + b, 0.0), h)
                box = torch.tensor([x1, y1, x2, y2]) / torch.tensor([sx, sy, sx, sy])
                if infer.min_bbox_size >= 0 and not (
                    box[2] - box[0] > infer.min_bbox_size and box[3] - box[1] > infer.min_bbox_size
                ):
                    continue
                boxes.append(box)
                scores.append(prob[p, c])
                labels.append(c)
        boxes = torch.stack(boxes) if boxes else torch.zeros(0, 4)
        scores = torch.stack(scores) if scores else torch.zeros(0)
        labels = torch.tensor(labels, dtype=torch.long)
        keep = batched_nms(boxes, scores, labels, infer.nms_iou)[: infer.max_per_img]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


@pytest.mark.parametrize(
    "score_thr, nms_pre, min_bbox_size, ties",
    [(0.05, 40, 0.0, False), (0.01, 25, 0.0, True), (0.2, 1000, 4.0, False), (0.0, 0, -1.0, True)],
)
def test_detections_match_the_reference_rule_on_crowded_levels(score_thr, nms_pre, min_bbox_size, ties):
    gen = torch.Generator().manual_seed(int(score_thr * 1000) + nms_pre)
    num_classes = 11
    model = small_model(
        num_classes, score_thr=score_thr, nms_pre=nms_pre, min_bbox_size=min_bbox_size, max_per_img=60
    )
    outputs = random_outputs(2, num_classes, (128, 96), ties=ties, gen=gen)
    image_sizes = torch.tensor([[128, 96], [100, 70]])
    scales = torch.tensor([[0.5, 0.5], [2.0, 1.5]])
    passing = (outputs.cls_scores[0].sigmoid() > score_thr).flatten(1).sum(1)
    if nms_pre > 0:  # the crowded case: more passing pairs on P3 than nms_pre
        assert (passing > nms_pre).all()
    got = model.detections(outputs, image_sizes, scales)
    want = brute_force(outputs, image_sizes, scales, model.cfg.infer)
    for g, r in zip(got, want):
        assert len(r["scores"]) > 0
        assert torch.equal(g["labels"], r["labels"])
        assert torch.equal(g["scores"], r["scores"])
        torch.testing.assert_close(g["boxes"], r["boxes"], rtol=0, atol=1e-5)


def test_top_pairs_thresholds_before_topk():
    # 5 passing pairs (three at 0.6), nms_pre 3: the top 3 of the passing ones; 0.25 is not above 0.25
    scores = torch.tensor([[0.6, 0.1], [0.9, 0.6], [0.05, 0.7], [0.6, 0.25]])
    values, points, labels = top_pairs(scores, 0.25, 3)
    assert values.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert (points[:2].tolist(), labels[:2].tolist()) == ([1, 2], [0, 1])
    assert (points[2].item(), labels[2].item()) in {(0, 0), (1, 1), (3, 0)}
    assert scores[points, labels].tolist() == values.tolist()
    values, points, labels = top_pairs(scores, 0.25, 0)  # no limit: all 5
    assert len(values) == 5
    assert sorted(zip(points.tolist(), labels.tolist())) == [(0, 0), (1, 0), (1, 1), (2, 1), (3, 0)]
    values, points, labels = top_pairs(scores, 0.95, 3)  # none passes
    assert values.shape == points.shape == labels.shape == (0,)


def test_large_enough_drops_zero_size_and_keeps_all_below_zero():
    boxes = torch.tensor([[0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.5, 9.0]])
    assert large_enough(boxes, 0.0).tolist() == [False, True, True]
    assert large_enough(boxes, 0.5).tolist() == [False, True, False]
    assert large_enough(boxes, -1.0).tolist() == [True, True, True]
