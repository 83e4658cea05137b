import math

import pytest
import torch

from vfnet.model.assign import atss_assign, pad_gts
from vfnet.model.boxes import iou_aligned
from vfnet.model.detector import level_points

C = 4  # classes; background label = C


def grid(h, w, stride):
    return level_points((h, w), stride, torch.device("cpu"))


def assign(points, strides, gt_boxes, gt_labels, **kw):
    boxes, labels, valid = pad_gts(gt_boxes, gt_labels, torch.device("cpu"))
    return atss_assign(points, strides, boxes, labels, valid, C, **kw)


def test_hand_built_single_positive():
    # 4x4 points at 0, 8, 16, 24; anchors of side 16. gt centre (11, 10): the 3 nearest points are
    # (8, 8), (16, 8), (8, 16) with IoUs 196/348, 168/376, 140/404 -> threshold mean + std = 0.5606;
    # only (8, 8) (IoU 0.5632, inside the gt) is positive.
    ious = torch.tensor([196 / 348, 168 / 376, 140 / 404])
    assert ious[0] >= ious.mean() + ious.std() > ious[1]
    t = assign([grid(4, 4, 8)], [8], [torch.tensor([[2.0, 2.0, 20.0, 18.0]])], [torch.tensor([3])],
               topk=3, anchor_scale=2.0)
    expected = torch.full((1, 16), C)
    expected[0, 1 * 4 + 1] = 3
    assert torch.equal(t.labels, expected)
    assert torch.equal(t.positive, expected < C)
    assert t.boxes[0, 5].tolist() == [2.0, 2.0, 20.0, 18.0] and (t.boxes[0, :5] == 0).all()
    # topk 2: mean + unbiased std of two IoUs exceeds the larger one (a biased std would equal it)
    t = assign([grid(4, 4, 8)], [8], [torch.tensor([[2.0, 2.0, 20.0, 18.0]])], [torch.tensor([3])],
               topk=2, anchor_scale=2.0)
    assert not t.positive.any()


def test_point_must_lie_inside_gt():
    # gt (9, 9, 14, 14) contains no grid point: high-IoU candidates are rejected.
    t = assign([grid(4, 4, 8)], [8], [torch.tensor([[9.0, 9.0, 14.0, 14.0]])], [torch.tensor([0])],
               topk=3, anchor_scale=1.0)
    assert not t.positive.any()
    # candidates (8, 8), (16, 8), (8, 16) with IoUs ~0.145, 0, 0: (8, 8) passes the IoU threshold,
    # and is positive when inside by 0.02 px, not when inside by only 0.005 px (< 0.01)
    t = assign([grid(4, 4, 8)], [8], [torch.tensor([[7.98, 7.98, 12.0, 12.0]])], [torch.tensor([0])],
               topk=3, anchor_scale=0.5)
    assert t.positive[0].nonzero().flatten().tolist() == [5]
    t = assign([grid(4, 4, 8)], [8], [torch.tensor([[7.995, 7.995, 12.0, 12.0]])], [torch.tensor([0])],
               topk=3, anchor_scale=0.5)
    assert not t.positive.any()


def test_empty_images_and_padding():
    points = [grid(6, 6, 8), grid(3, 3, 16)]
    t = assign(points, [8, 16], [torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)] * 2)
    assert not t.positive.any() and (t.labels == C).all()
    one = torch.tensor([[4.0, 4.0, 30.0, 28.0]])
    t = assign(points, [8, 16], [one, torch.zeros(0, 4)], [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
               anchor_scale=2.0)
    assert t.positive[0].any() and not t.positive[1].any() and (t.labels[0][t.positive[0]] == 1).all()


def brute_force(points, strides, gt_boxes, gt_labels, topk, anchor_scale):
    """Per image, per gt, per level loops over plain Python values."""
    all_pts = torch.cat(points)
    sizes = [p.shape[0] for p in points]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    anchor_half = torch.cat([torch.full((n,), anchor_scale * s / 2) for n, s in zip(sizes, strides)])
    anchors = torch.cat([all_pts - anchor_half[:, None], all_pts + anchor_half[:, None]], dim=1)
    labels = torch.full((len(gt_boxes), all_pts.shape[0]), C)
    for b, (boxes, cls) in enumerate(zip(gt_boxes, gt_labels)):
        best = {}
        for g, box in enumerate(boxes):
            cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
            cands = []
            for start, n in zip(starts, sizes):
                d = [math.hypot(float(all_pts[i, 0]) - cx, float(all_pts[i, 1]) - cy) for i in range(start, start + n)]
                order = sorted(range(n), key=lambda i: d[i])[:topk]
                cands += [start + i for i in order]
            ious = torch.stack([iou_aligned(anchors[i], box) for i in cands])
            thr = ious.mean() + ious.std()
            for i, iou in zip(cands, ious):
                x, y = all_pts[i].tolist()
                inside = min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 0.01
                if iou >= thr and inside and float(iou) > best.get(i, (-1.0, 0))[0]:
                    best[i] = (float(iou), int(cls[g]))
        for i, (_, label) in best.items():
            labels[b, i] = label
    return labels


@pytest.mark.parametrize("topk", [3, 9])
def test_matches_brute_force(seeded, topk):
    points = [grid(12, 16, 8), grid(6, 8, 16), grid(3, 4, 32), grid(2, 2, 64), grid(1, 1, 128)]
    strides = [8, 16, 32, 64, 128]
    gt_boxes, gt_labels = [], []
    for n in (7, 0, 3):  # crowded, empty, sparse images
        xy = torch.rand(n, 2, generator=seeded) * torch.tensor([100.0, 70.0])
        wh = torch.rand(n, 2, generator=seeded) * 60 + 4
        gt_boxes.append(torch.cat([xy, xy + wh], dim=1))
        gt_labels.append(torch.randint(0, C, (n,), generator=seeded))
    t = assign(points, strides, gt_boxes, gt_labels, topk=topk, anchor_scale=8.0)
    expected = brute_force(points, strides, gt_boxes, gt_labels, topk, 8.0)
    assert t.positive.sum() > 5
    assert torch.equal(t.labels, expected)
    # the assigned box is a gt of the assigned class
    for b in range(3):
        for i in t.positive[b].nonzero().flatten():
            g = (gt_boxes[b] == t.boxes[b, i]).all(dim=1).nonzero().flatten()
            assert len(g) == 1 and gt_labels[b][g[0]] == t.labels[b, i]


def test_pad_gts_bad_input():
    with pytest.raises(ValueError, match="gt_boxes\\[0\\]"):
        pad_gts([torch.zeros(2, 5)], [torch.zeros(2, dtype=torch.long)], torch.device("cpu"))
    with pytest.raises(ValueError, match="gt_labels\\[0\\]"):
        pad_gts([torch.zeros(2, 4)], [torch.zeros(3, dtype=torch.long)], torch.device("cpu"))
    with pytest.raises(ValueError, match="gt_labels has 2"):
        pad_gts([torch.zeros(2, 4)], [torch.zeros(2, dtype=torch.long)] * 2, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Per-image valid extent: an image's targets in a mixed-size batch = its targets assigned alone

STRIDES = [8, 16, 32, 64, 128]
DIVISOR = 32


def ceil_div(a, b):
    return -(-a // b)


def pyramid(h, w):
    """Points of every level of a padded h x w input, and each level's (rows, cols)."""
    shapes = [(ceil_div(h, s), ceil_div(w, s)) for s in STRIDES]
    return [grid(r, c, s) for (r, c), s in zip(shapes, STRIDES)], shapes


def random_gts(h, w, n, gen):
    """n boxes inside an h x w image, about a third touching a border, at least 1 px a side;
    every other call in whole pixels (ties in the centre distances)."""
    x1 = torch.rand(n, generator=gen) * (w - 2)
    y1 = torch.rand(n, generator=gen) * (h - 2)
    x2 = x1 + 1 + torch.rand(n, generator=gen) * (w - x1 - 1)
    y2 = y1 + 1 + torch.rand(n, generator=gen) * (h - y1 - 1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    if torch.rand(1, generator=gen) < 0.5:
        boxes = boxes.round()
    border = torch.randint(0, 6, (n,), generator=gen)  # 0-3: one side on the border
    for side, value in ((0, 0.0), (1, 0.0), (2, float(w)), (3, float(h))):
        boxes[border == side, side] = value
    return boxes, torch.randint(0, C, (n,), generator=gen)


def test_each_image_of_a_mixed_batch_gets_its_targets_when_alone(seeded):
    changed = 0
    for _ in range(25):
        num = int(torch.randint(2, 5, (1,), generator=seeded))
        sizes = [tuple(torch.randint(24, 260, (2,), generator=seeded).tolist()) for _ in range(num)]
        counts = [int(torch.randint(0, 6, (1,), generator=seeded)) for _ in range(num)]
        counts[int(torch.randint(0, num, (1,), generator=seeded))] = 0  # an image without boxes
        gts = [random_gts(h, w, n, seeded) for (h, w), n in zip(sizes, counts)]
        batch_h = max(ceil_div(h, DIVISOR) * DIVISOR for h, _ in sizes)
        batch_w = max(ceil_div(w, DIVISOR) * DIVISOR for _, w in sizes)
        points, batch_shapes = pyramid(batch_h, batch_w)
        padded = [(ceil_div(h, DIVISOR) * DIVISOR, ceil_div(w, DIVISOR) * DIVISOR) for h, w in sizes]
        batch_t = assign(points, STRIDES, [b for b, _ in gts], [lab for _, lab in gts],
                         level_shapes=batch_shapes, padded_sizes=padded)
        unmasked = assign(points, STRIDES, [b for b, _ in gts], [lab for _, lab in gts])
        changed += int((unmasked.labels != batch_t.labels).sum())
        for i, ((h, w), (boxes, labels)) in enumerate(zip(sizes, gts)):
            alone_points, alone_shapes = pyramid(ceil_div(h, DIVISOR) * DIVISOR, ceil_div(w, DIVISOR) * DIVISOR)
            alone = assign(alone_points, STRIDES, [boxes], [labels])
            # the alone image's points inside the batch's flattened point list
            index, offset = [], 0
            for (rows, cols), (batch_rows, batch_cols) in zip(alone_shapes, batch_shapes):
                r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
                index.append(offset + (r * batch_cols + c).flatten())
                offset += batch_rows * batch_cols
            index = torch.cat(index)
            assert torch.equal(batch_t.labels[i, index], alone.labels[0])
            assert torch.equal(batch_t.positive[i, index], alone.positive[0])
            assert torch.equal(batch_t.boxes[i, index], alone.boxes[0])
            outside = torch.ones(offset, dtype=torch.bool)
            outside[index] = False
            assert (batch_t.labels[i, outside] == C).all() and not batch_t.positive[i, outside].any()
    assert changed > 0  # the padding's points do change targets when they compete


def test_loss_takes_padded_sizes_for_the_valid_extent():
    from vfnet.core.config import Config
    from vfnet.model import VFNet

    torch.manual_seed(0)
    cfg = Config()
    cfg.model.depth, cfg.model.num_classes = 18, C
    cfg.model.fpn_channels = cfg.model.head_channels = 16
    cfg.model.gn_groups = 4
    cfg.model.kernels = "torch"
    model = VFNet.from_config(cfg)
    sizes = [(64, 160), (150, 40)]  # padded 64 x 160 and 160 x 64 in a 160 x 160 batch
    padded = [(ceil_div(h, DIVISOR) * DIVISOR, ceil_div(w, DIVISOR) * DIVISOR) for h, w in sizes]
    gts = [(torch.tensor([[20.0, 42.0, 113.0, 60.0]]), torch.tensor([1])),  # a case where the
           (torch.tensor([[9.0, 89.0, 20.0, 114.0]]), torch.tensor([2]))]  # padding changes num_pos
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 160, 160))
        batch = model.loss(outputs, [b for b, _ in gts], [lab for _, lab in gts], torch.tensor(padded))
        alone = 0
        for (h, w), (boxes, labels) in zip(padded, gts):
            out = model(torch.randn(1, 3, h, w))
            alone += model.loss(out, [boxes], [labels], [(h, w)])["num_pos"].item()
        unmasked = model.loss(outputs, [b for b, _ in gts], [lab for _, lab in gts])
    assert batch["num_pos"].item() == alone > 0
    assert unmasked["num_pos"].item() != alone
    with pytest.raises(ValueError, match="padded_sizes"):
        model.loss(outputs, [b for b, _ in gts], [lab for _, lab in gts], torch.tensor([[64, 64]]))
