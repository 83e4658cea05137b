import pytest
import torch

import vfnet.model.boxes as B


def random_boxes(n: int, gen: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_xywh_round_trip(seeded):
    boxes = random_boxes(20, seeded)
    xywh = B.xyxy_to_xywh(boxes)
    assert torch.allclose(xywh[:, 2:], boxes[:, 2:] - boxes[:, :2])
    assert torch.allclose(B.xywh_to_xyxy(xywh), boxes)


def test_distance_round_trip(seeded):
    boxes = random_boxes(50, seeded)
    points = torch.rand(50, 2, generator=seeded) * 120 - 10  # inside or outside the boxes
    distances = B.box_to_distance(points, boxes)
    assert torch.allclose(B.distance_to_box(points, distances), boxes, atol=1e-5)
    # (l, t, r, b) by hand for one case
    d = B.box_to_distance(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0, 10.0, 20.0]))
    assert d.tolist() == [4.0, 4.0, 5.0, 14.0]


def test_decode_clips_to_image():
    points = torch.tensor([[10.0, 10.0], [90.0, 40.0]])
    distances = torch.tensor([[20.0, 5.0, 5.0, 5.0], [5.0, 5.0, 50.0, 50.0]])
    boxes = B.distance_to_box(points, distances, torch.tensor([50, 100]))  # h=50, w=100
    assert boxes.tolist() == [[0.0, 5.0, 15.0, 15.0], [85.0, 35.0, 100.0, 50.0]]


def test_iou_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 5.0, 7.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [3.0, 3.0, 5.0, 7.0]])
    assert torch.allclose(B.iou_aligned(a, b), torch.tensor([1 / 7, 0.0, 1.0]))
    # overlapping: 1/7 - (9 - 7)/9; disjoint: 0 - (3 - 2)/3; identical: 1
    assert torch.allclose(B.giou_aligned(a, b), torch.tensor([1 / 7 - 2 / 9, -1 / 3, 1.0]))
    assert torch.allclose(B.box_area(a), torch.tensor([4.0, 1.0, 8.0]))


def test_pairwise_matches_aligned(seeded):
    a, b = random_boxes(7, seeded), random_boxes(5, seeded)
    iou, giou = B.iou_pairwise(a, b), B.giou_pairwise(a, b)
    assert iou.shape == (7, 5)
    for i in range(7):
        for j in range(5):
            assert torch.isclose(iou[i, j], B.iou_aligned(a[i], b[j]))
            assert torch.isclose(giou[i, j], B.giou_aligned(a[i], b[j]))
    assert (iou >= 0).all() and (iou <= 1).all() and (giou <= iou + 1e-6).all()


def brute_force_nms(boxes, scores, labels, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(
            int(labels[i]) != int(labels[k]) or float(B.iou_aligned(boxes[i], boxes[k])) <= thr
            for k in keep
        ):
            keep.append(i)
    return keep


@pytest.mark.parametrize("thr", [0.3, 0.6])
@pytest.mark.parametrize("joint_limit", [B.NMS_MAX_JOINT, 5])
def test_nms_matches_brute_force(seeded, monkeypatch, thr, joint_limit):
    monkeypatch.setattr(B, "NMS_MAX_JOINT", joint_limit)  # 5: the class-by-class path
    for _ in range(3):
        n = 60
        xy = torch.rand(n, 2, generator=seeded) * 60  # crowded: long suppression chains
        boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=seeded) * 30], dim=1)
        scores = torch.rand(n, generator=seeded)
        labels = torch.randint(0, 3, (n,), generator=seeded)
        keep = B.batched_nms(boxes, scores, labels, thr)
        assert keep.tolist() == brute_force_nms(boxes, scores, labels, thr)


@pytest.mark.parametrize("check_every", [1, 3, 4])
def test_nms_chain_converges_with_few_convergence_tests(monkeypatch, check_every):
    """A chain where each box suppresses only the next: the greedy result alternates, the
    fixed-point iteration needs n steps, and convergence is read back every check_every steps."""
    monkeypatch.setattr(B, "NMS_CHECK_EVERY", check_every)
    n = 13
    x = torch.arange(n, dtype=torch.float32) * 2  # neighbours overlap by IoU 8/12, others less
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(1.0, 0.1, n)
    labels = torch.zeros(n, dtype=torch.long)
    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or real_equal(a, b))
    keep = B.batched_nms(boxes, scores, labels, 0.6)
    assert keep.tolist() == brute_force_nms(boxes, scores, labels, 0.6)
    assert len(calls) <= n // check_every + 1


def test_nms_separates_classes_and_handles_empty():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    keep = B.batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]
    empty = B.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_nms_bad_shapes():
    with pytest.raises(ValueError, match="boxes"):
        B.batched_nms(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="scores"):
        B.batched_nms(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long), 0.5)
