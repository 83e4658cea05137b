"""Star deformable convolution: reference vs brute force, kernels vs reference, validation."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import reference, star_deform_conv2d, star_deform_conv2d_pair


def _bilinear_point(img: torch.Tensor, y: float, x: float) -> float:
    """torchvision's bilinear_interpolate, one point of one channel, in Python floats."""
    h, w = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= cy <= h - 1 and 0 <= cx <= w - 1:
                total += wy * wx * float(img[cy, cx])
    return total


def _brute_force_deform_conv(x, offsets, weight, bias):
    """deform_conv2d(x, offsets, weight, bias, padding=1) by a loop over every output value."""
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    out = torch.zeros(b, cout, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                samples = torch.zeros(cin, 3, 3, dtype=torch.float64)
                for ky in range(3):
                    for kx in range(3):
                        k = 3 * ky + kx
                        py = i - 1 + ky + float(offsets[n, 2 * k, i, j])
                        px = j - 1 + kx + float(offsets[n, 2 * k + 1, i, j])
                        for c in range(cin):
                            samples[c, ky, kx] = _bilinear_point(x[n, c], py, px)
                out[n, :, i, j] = (weight * samples).sum(dim=(1, 2, 3)) + bias
    return out


def _boxes(b: int, h: int, w: int, stride: float, scale: float = 1.5) -> torch.Tensor:
    """Random (l, t, r, b) distances: some reach inside, some past the map edges."""
    return torch.rand(b, 4, h, w, dtype=torch.float64) * scale * stride * max(h, w) / 2


def test_reference_matches_brute_force(seeded):
    b, cin, cout, h, w, stride = 2, 2, 3, 3, 4, 8.0
    x = torch.randn(b, cin, h, w, dtype=torch.float64)
    box = _boxes(b, h, w, stride)
    box[0, :, 0, 0] = 0.0  # all taps on the centre
    box[1, :, 1, 1] = torch.tensor([-3.0, 5.0, -20.0, 2.5])  # negative distances
    box[1, :2, 2, 1] = torch.tensor([1.0, 3.0]) * stride  # x - l = 0 and y - t = -1 exactly
    weight = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    expected = _brute_force_deform_conv(x, reference.star_offsets(box, stride), weight, bias)
    got = reference.star_deform_conv2d_reference(x, box, weight, stride, bias=bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_star_offsets_points(seeded):
    """Offsets + the regular 3x3 grid = the star points (y - t, y, y + b) x (x - l, x, x + r)."""
    stride = 16.0
    box = _boxes(1, 2, 3, stride)
    off = reference.star_offsets(box, stride)
    l, t, r, bt = (box[0, i] / stride for i in range(4))
    y = torch.arange(2, dtype=torch.float64).view(2, 1)
    x = torch.arange(3, dtype=torch.float64).view(1, 3)
    for ky, dy in enumerate((-t, 0 * t, bt)):
        for kx, dx in enumerate((-l, 0 * l, r)):
            k = 3 * ky + kx
            torch.testing.assert_close(y - 1 + ky + off[0, 2 * k], y + dy)
            torch.testing.assert_close(x - 1 + kx + off[0, 2 * k + 1], x + dx)


def test_reference_box_gradient_scaled_by_gradient_mul(seeded):
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    box = _boxes(1, 4, 5, 8.0, scale=0.5).requires_grad_()
    grads = []
    for g in (1.0, 0.1):
        out = reference.star_deform_conv2d_reference(x, box, weight, 8.0, gradient_mul=g)
        (grad,) = torch.autograd.grad(out.square().sum(), box)
        grads.append(grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], 0.1 * grads[0])


def test_public_pair_equals_two_singles(seeded):
    x_cls = torch.randn(2, 5, 3, 4)
    x_reg = torch.randn(2, 5, 3, 4)
    box = _boxes(2, 3, 4, 8.0).float()
    w_cls, w_reg = torch.randn(7, 5, 3, 3), torch.randn(7, 5, 3, 3)
    out_cls, out_reg = star_deform_conv2d_pair(x_cls, x_reg, box, w_cls, w_reg, 8)
    torch.testing.assert_close(out_cls, star_deform_conv2d(x_cls, box, w_cls, 8))
    torch.testing.assert_close(out_reg, star_deform_conv2d(x_reg, box, w_reg, 8))


def _good():
    return torch.randn(1, 3, 4, 4), torch.rand(1, 4, 4, 4), torch.randn(2, 3, 3, 3)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(x=torch.randn(3, 4, 4)), ValueError, "x must be"),
        (lambda a: a.update(x=torch.ones(1, 3, 4, 4, dtype=torch.int32)), TypeError, "x must be"),
        (lambda a: a.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda a: a.update(weight=torch.randn(2, 3, 1, 1)), ValueError, "weight must be"),
        (lambda a: a.update(weight=torch.randn(2, 5, 3, 3)), ValueError, "weight has Cin"),
        (lambda a: a.update(bbox_pred=torch.rand(1, 4, 4, 5)), ValueError, "bbox_pred must be"),
        (lambda a: a.update(bbox_pred=torch.rand(1, 2, 4, 4)), ValueError, "bbox_pred must be"),
        (lambda a: a.update(bias=torch.randn(3)), ValueError, "bias must be"),
        (lambda a: a.update(stride=0), ValueError, "stride"),
        (lambda a: a.update(stride=-8.0), ValueError, "stride"),
        (lambda a: a.update(stride="8"), TypeError, "stride"),
        (lambda a: a.update(gradient_mul=float("nan")), ValueError, "gradient_mul"),
        (lambda a: a.update(bias=torch.randn(2, device="meta")), ValueError, "bias is on meta"),
    ],
)
def test_single_rejects_bad_input(change, error, match):
    x, box, weight = _good()
    args = dict(x=x, bbox_pred=box, weight=weight, stride=8.0, bias=None, gradient_mul=0.1)
    change(args)
    with pytest.raises(error, match=match):
        star_deform_conv2d(
            args["x"], args["bbox_pred"], args["weight"], args["stride"],
            bias=args["bias"], gradient_mul=args["gradient_mul"],
        )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(x_reg=torch.randn(1, 3, 4, 5)), ValueError, "x_reg must have"),
        (lambda a: a.update(x_reg=torch.randn(1, 3, 4, 4).double()), TypeError, "x_reg must have"),
        (lambda a: a.update(w_reg=torch.randn(2, 4, 3, 3)), ValueError, "w_reg has Cin"),
        (lambda a: a.update(w_cls=torch.randn(2, 3, 3)), ValueError, "w_cls must be"),
        (lambda a: a.update(bbox_pred=torch.rand(2, 4, 4, 4)), ValueError, "bbox_pred must be"),
        (lambda a: a.update(w_reg=torch.randn(2, 3, 3, 3, device="meta")), ValueError, "w_reg is on"),
        (lambda a: a.update(stride=float("inf")), ValueError, "stride"),
    ],
)
def test_pair_rejects_bad_input(change, error, match):
    x, box, weight = _good()
    args = dict(x_cls=x, x_reg=x.clone(), bbox_pred=box, w_cls=weight, w_reg=weight.clone(), stride=8)
    change(args)
    with pytest.raises(error, match=match):
        star_deform_conv2d_pair(**args)
