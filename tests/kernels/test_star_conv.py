"""Star deformable convolution: reference vs brute force, kernels vs reference, validation."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import reference, star_deform_conv2d, star_deform_conv2d_pair

# CPU tests run the kernels through Triton's interpreter (tests/conftest.py); `gpu` ones compiled
pytestmark = pytest.mark.interpret


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


# ---------------------------------------------------------------------------------------------
# Kernels (Triton interpreter on CPU, see conftest) against the float64 reference


def _case(b, cin, cout, h, w, stride, box_cells, dtype, *, bias=True, seed=0):
    """Leaf inputs: x, bbox_pred (distances up to `box_cells` cells), weight, bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
    box = torch.rand(b, 4, h, w, generator=gen, dtype=torch.float64) * box_cells * stride
    weight = torch.randn(cout, cin, 3, 3, generator=gen, dtype=torch.float64) / math.sqrt(9 * cin)
    bias_t = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    return [t.to(dtype).requires_grad_() if t is not None else None
            for t in (x, box, weight, bias_t)]


def _grads(out, inputs, grad_out):
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, grad_out)


def _check_against_reference(x, box, weight, bias, stride, rtol, atol, gradient_mul=0.1):
    """Kernel output and all four gradients vs the float64 reference on the same values."""
    out = star_deform_conv2d(x, box, weight, stride, bias=bias, gradient_mul=gradient_mul)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], weight.shape[0], *x.shape[2:])
    assert "StarConv" in type(out.grad_fn).__name__  # the Triton path ran
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None
                  for t in (x, box, weight, bias)]
    ref = reference.star_deform_conv2d_reference(
        ref_inputs[0], ref_inputs[1], ref_inputs[2], stride, bias=ref_inputs[3],
        gradient_mul=gradient_mul)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    got = _grads(out, (x, box, weight, bias), grad_out)
    grad_out = grad_out.double()
    expected = _grads(ref, ref_inputs, grad_out)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    for name, g, e in zip(("x", "bbox_pred", "weight", "bias"), got, expected):
        assert g.dtype == x.dtype or name == "bbox_pred"
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    return got


# fp32: coordinates, interpolation and accumulation in fp32 over K = 9 * Cin <= 300 terms of
# magnitude <~ 1: errors ~1e-6; 2e-5 leaves margin without hiding a wrong tap or corner (~1e-1).
FP32_TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "b, cin, cout, h, w, stride, box_cells",
    [
        (2, 33, 17, 5, 7, 8, 3.0),  # partly outside the map; 2 channel chunks
        (1, 5, 33, 4, 6, 128, 2.0),  # stride 128; 2 Cout tiles
        (1, 17, 3, 1, 9, 8, 1.5),  # H = 1
        (2, 3, 5, 9, 1, 128, 1.5),  # W = 1
    ],
)
def test_kernel_matches_reference_fp32(b, cin, cout, h, w, stride, box_cells):
    _check_against_reference(*_case(b, cin, cout, h, w, stride, box_cells, torch.float32), stride,
                             **FP32_TOL)


def test_kernel_matches_reference_float64_with_fractional_gradient_mul():
    """float64 end to end with gradient_mul 0.1 and stride 12 (the other float64 tests use 1.0
    and powers of two). The interpreter keeps Python floats in float64, so only the compiled
    kernel could show gradient_mul rounded to a float32 argument (1.5e-8 relative): that is
    `test_gpu_matches_torchvision_deform_conv2d`'s float64 case, which caught it on the H200."""
    _check_against_reference(*_case(2, 5, 3, 4, 6, 12, 2.0, torch.float64, seed=3), 12,
                             rtol=1e-12, atol=1e-12, gradient_mul=0.1)


def test_kernel_zero_boxes_sample_the_centre():
    x, box, weight, bias = _case(1, 3, 5, 4, 5, 8, 0.0, torch.float32)
    _check_against_reference(x, box, weight, bias, 8, **FP32_TOL)
    # every tap reads the centre: the conv with the summed 3x3 kernel
    centre_conv = torch.einsum("bchw,oc->bohw", x.double(), weight.double().sum(dim=(2, 3)))
    expected = centre_conv + bias.double().view(1, -1, 1, 1)
    out = star_deform_conv2d(x, box, weight, 8, bias=bias)
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)


def test_kernel_boxes_wholly_outside_get_zero_box_gradient():
    x, box, weight, bias = _case(2, 5, 3, 3, 4, 16, 1.0, torch.float32)
    with torch.no_grad():
        box += 10 * 16  # every outer row and column is >= 10 cells away: outside the map
    _, grad_box, *_ = _check_against_reference(x, box, weight, bias, 16, **FP32_TOL)
    assert torch.equal(grad_box, torch.zeros_like(grad_box))


def test_kernel_negative_distances_used_as_given():
    x, box, weight, bias = _case(1, 3, 5, 5, 6, 8, 2.0, torch.float32)
    with torch.no_grad():
        box -= 8.0  # about half the distances negative
    assert (box < 0).any() and (box > 0).any()
    _check_against_reference(x, box, weight, bias, 8, **FP32_TOL)


def test_kernel_bf16():
    """bf16 in and out: under the interpreter the kernel computes in fp32 (dots included), so the
    error is the rounding of outputs and gradients to bf16: 2^-8 relative (plus a little)."""
    x, box, weight, bias = _case(2, 17, 33, 3, 5, 8, 2.0, torch.bfloat16)
    _check_against_reference(x, box, weight, bias, 8, rtol=1e-2, atol=1e-2)


def test_pair_equals_two_singles():
    x_cls, box, w_cls, _ = _case(2, 17, 5, 4, 5, 8, 2.0, torch.float32, bias=False)
    x_reg, _, w_reg, _ = _case(2, 17, 5, 4, 5, 8, 2.0, torch.float32, bias=False, seed=1)
    out_cls, out_reg = star_deform_conv2d_pair(x_cls, x_reg, box, w_cls, w_reg, 8)
    single_cls = star_deform_conv2d(x_cls, box, w_cls, 8)
    single_reg = star_deform_conv2d(x_reg, box, w_reg, 8)
    torch.testing.assert_close(out_cls, single_cls, rtol=0, atol=0)
    torch.testing.assert_close(out_reg, single_reg, rtol=0, atol=0)
    g_cls, g_reg = torch.randn_like(out_cls), torch.randn_like(out_reg)
    leaves = (x_cls, x_reg, box, w_cls, w_reg)
    got = torch.autograd.grad((out_cls, out_reg), leaves, (g_cls, g_reg))
    expected = torch.autograd.grad((single_cls, single_reg), leaves, (g_cls, g_reg))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **FP32_TOL)
    # and against the pair reference in float64
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.star_deform_conv2d_pair_reference(*ref_leaves, 8)
    torch.testing.assert_close(out_cls.double(), ref[0], **FP32_TOL)
    ref_grads = torch.autograd.grad(ref, ref_leaves, (g_cls.double(), g_reg.double()))
    for g, e in zip(got, ref_grads):
        torch.testing.assert_close(g.double(), e, **FP32_TOL)


def _gradcheck_inputs(pair: bool):
    """float64 inputs whose star points stay >= 0.1 cell away from integers (where the bilinear
    weights' derivative jumps), so finite differences are exact up to rounding."""
    gen = torch.Generator().manual_seed(3)
    b, cin, cout, h, w, stride = 1, 3, 2, 3, 4, 8.0
    fraction = 0.1 + 0.8 * torch.rand(b, 4, h, w, generator=gen, dtype=torch.float64)
    cells = torch.randint(0, 3, (b, 4, h, w), generator=gen) + fraction
    box = (cells * stride).requires_grad_()
    xs = [torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
          for _ in range(1 + pair)]
    ws = [torch.randn(cout, cin, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
          for _ in range(1 + pair)]
    return box, xs, ws, stride


def test_gradcheck_single_float64():
    box, (x,), (weight,), stride = _gradcheck_inputs(pair=False)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    def fn(x_, box_, w_, bias_):
        return star_deform_conv2d(x_, box_, w_, stride, bias=bias_, gradient_mul=1.0)

    assert torch.autograd.gradcheck(fn, (x, box, weight, bias), fast_mode=True)


def test_gradcheck_pair_float64():
    box, (x_cls, x_reg), (w_cls, w_reg), stride = _gradcheck_inputs(pair=True)
    def fn(x_cls_, x_reg_, box_, w_cls_, w_reg_):
        return star_deform_conv2d_pair(x_cls_, x_reg_, box_, w_cls_, w_reg_, stride,
                                       gradient_mul=1.0)

    assert torch.autograd.gradcheck(fn, (x_cls, x_reg, box, w_cls, w_reg), fast_mode=True)


def test_outputs_allow_in_place_ops_and_channels_last_inputs():
    """The head may apply an in-place ReLU; inputs may come in channels-last memory."""
    x_cls, box, w_cls, _ = _case(1, 5, 3, 3, 4, 8, 1.0, torch.float32, bias=False)
    x_reg = x_cls.detach().to(memory_format=torch.channels_last).requires_grad_()
    out_cls, out_reg = star_deform_conv2d_pair(x_cls, x_reg, box, w_cls, w_cls, 8)
    out_cls.relu_()
    out_reg.relu_()
    (out_cls.sum() + 2 * out_reg.sum()).backward()
    ref_x = x_cls.detach().double().requires_grad_()
    ref = reference.star_deform_conv2d_reference(ref_x, box.double(), w_cls.double(), 8)
    torch.testing.assert_close(out_cls.double(), ref.relu(), **FP32_TOL)
    torch.testing.assert_close(out_reg.double(), ref.relu(), **FP32_TOL)
    (ref.relu().sum() * 2).backward()
    torch.testing.assert_close(x_reg.grad.double(), ref_x.grad, **FP32_TOL)


def test_reference_forced_by_env(monkeypatch):
    monkeypatch.setenv("VFNET_KERNELS", "torch")
    x, box, weight, bias = _case(1, 3, 5, 2, 3, 8, 1.0, torch.float32)
    out = star_deform_conv2d(x, box, weight, 8, bias=bias)
    assert "StarConv" not in type(out.grad_fn).__name__


def test_autocast_runs_in_the_autocast_dtype():
    x, box, weight, _ = _case(1, 3, 5, 2, 3, 8, 1.0, torch.float32, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = star_deform_conv2d(x, box, weight, 8)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


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
        (lambda a: a.update(w_reg=torch.randn(4, 3, 3, 3)), ValueError, "w_reg must have"),
        (lambda a: a.update(bbox_pred=torch.rand(2, 4, 4, 4)), ValueError, "bbox_pred must be"),
        (lambda a: a.update(w_reg=torch.randn(2, 3, 3, 3, device="meta")), ValueError,
         "w_reg is on"),
        (lambda a: a.update(stride=float("inf")), ValueError, "stride"),
    ],
)
def test_pair_rejects_bad_input(change, error, match):
    x, box, weight = _good()
    args = dict(x_cls=x, x_reg=x.clone(), bbox_pred=box, w_cls=weight, w_reg=weight.clone(),
                stride=8)
    change(args)
    with pytest.raises(error, match=match):
        star_deform_conv2d_pair(**args)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the compiled kernels


def _cuda_case(b, cin, cout, h, w, stride, dtype, seed=0):
    x, box, weight, bias = _case(b, cin, cout, h, w, stride, 3.0, torch.float64, seed=seed)
    return [t.detach().to("cuda", dtype).requires_grad_() for t in (x, box, weight, bias)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_matches_torchvision_deform_conv2d(dtype):
    """The contract: star_deform_conv2d == torchvision.ops.deform_conv2d(x, star offsets, w,
    padding=1), gradients included (the box's through the offsets)."""
    from torchvision.ops import deform_conv2d

    x, box, weight, bias = _cuda_case(2, 24, 40, 11, 13, 16, dtype)
    out = star_deform_conv2d(x, box, weight, 16, bias=bias)
    leaves = [t.detach().clone().requires_grad_() for t in (x, box, weight, bias)]
    ref = deform_conv2d(leaves[0], reference.star_offsets(leaves[1], 16), leaves[2], leaves[3],
                        padding=1)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, box, weight, bias), grad_out)
    expected = torch.autograd.grad(ref, leaves, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [(48, 80), (256, 256)])
def test_gpu_pair_matches_reference(dtype, channels):
    """Autotuned kernels at the head's width (GO_RESIDENT path) and an odd one; bf16: operands
    rounded to bf16 on the tensor cores, so errors are judged against the outputs' scale."""
    cin, cout = channels
    x_cls, box, w_cls, _ = _cuda_case(2, cin, cout, 12, 17, 8, dtype)
    x_reg, _, w_reg, _ = _cuda_case(2, cin, cout, 12, 17, 8, dtype, seed=1)
    leaves = (x_cls, x_reg, box, w_cls, w_reg)
    outs = star_deform_conv2d_pair(x_cls, x_reg, box, w_cls, w_reg, 8)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    refs = reference.star_deform_conv2d_pair_reference(*ref_leaves, 8)
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, grads_out)
    expected = torch.autograd.grad(refs, ref_leaves, [g.double() for g in grads_out])
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for name, g, e in zip(("out_cls", "out_reg", "x_cls", "x_reg", "bbox_pred", "w_cls", "w_reg"),
                          (*outs, *got), (*refs, *expected)):
        error = (g.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert error <= rel * scale, f"{name}: max error {error} vs scale {scale}"
