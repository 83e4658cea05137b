"""Modulated deformable convolution: the Triton kernels (interpreter on CPU, tests/conftest.py)
against the float64 reference `kernels.reference.deform_conv2d_reference`, forward and every
gradient (input, offset, mask, weight, bias), on fresh random inputs per case.

The reference itself is checked against a per-value loop and torchvision in
tests/kernels/test_deform_conv_reference.py. Shapes are tiny: the interpreter runs one program
after another in Python."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import deform_conv2d, reference, star_deform_conv2d
from kernels.reference import conv_output_size, deform_conv2d_reference

pytestmark = pytest.mark.interpret

LEAVES = ("input", "offset", "mask", "weight", "bias")
# float64 in the kernels (dots, interpolation, atomics): only the summation order differs from the
# reference, ~1e-15 on values ~10; 1e-10 cannot hide a wrong tap, corner or channel (~1e-1).
FP64_TOL = dict(rtol=1e-10, atol=1e-10)


def _case(b, cin, cout, h, w, kernel, stride, padding, dilation, groups, dg, with_mask, *, scale=2.5, seed=0,
          dtype=torch.float64):
    """Random arguments (leaves require grad): offsets up to `scale` cells, a third of them whole
    numbers (on cell borders), masks in [0, 1] with some exactly 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = reference.pair(kernel)
    (sh, sw), (ph, pw), (dh, dw) = reference.pair(stride), reference.pair(padding), reference.pair(dilation)
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
    offset = (torch.rand(b, 2 * dg * kh * kw, ho, wo, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    offset[:, ::3] = offset[:, ::3].round()
    mask = None
    if with_mask:
        mask = torch.rand(b, dg * kh * kw, ho, wo, generator=gen, dtype=torch.float64)
        mask.view(-1)[::7] = 0.0
        mask.view(-1)[3::7] = 1.0
    weight = torch.randn(cout, cin // groups, kh, kw, generator=gen, dtype=torch.float64) / math.sqrt(cin * kh * kw)
    bias = torch.randn(cout, generator=gen, dtype=torch.float64)
    args = dict(input=x, offset=offset, mask=mask, weight=weight, bias=bias)
    args = {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in args.items()}
    return dict(args, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _call(fn, args):
    return fn(args["input"], args["offset"], args["weight"], args["bias"], args["stride"], args["padding"],
              args["dilation"], args["mask"], groups=args["groups"])


def _check(args, rtol, atol, grad_seed=1, leaf_tol=None):
    """Kernel output and every gradient vs the float64 reference on the same values (`leaf_tol`:
    name -> tolerance of that gradient, relative to its scale); returns the kernel's (out, grads by
    name)."""
    out = _call(deform_conv2d, args)
    assert "DeformConv" in type(out.grad_fn).__name__  # the Triton path ran
    assert out.dtype == args["input"].dtype and out.is_contiguous(memory_format=torch.channels_last)
    names = [n for n in LEAVES if args[n] is not None and args[n].requires_grad]
    exact = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v)
             for k, v in args.items()}
    ref = _call(deform_conv2d_reference, exact)
    assert out.shape == ref.shape
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    got = torch.autograd.grad(out, [args[n] for n in names], grad_out.to(out.dtype))
    expected = torch.autograd.grad(ref, [exact[n] for n in names], grad_out)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    for name, g, e in zip(names, got, expected):
        assert g.dtype == args[name].dtype and g.shape == args[name].shape, name
        if leaf_tol and name in leaf_tol:
            error, scale = (g.double() - e).abs().max().item(), e.abs().max().item()
            assert error <= leaf_tol[name] * scale, f"grad {name}: max error {error} vs scale {scale}"
            continue
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")
    return out, dict(zip(names, got))


# (b, cin, cout, h, w, kernel, stride, padding, dilation, groups, dg, mask)
CASES = {
    "3x3_pad1": (2, 5, 7, 6, 7, 3, 1, 1, 1, 1, 1, True),  # 84 locations: 2 location tiles, 2 weight splits
    "stride2_dilation2_no_mask": (1, 6, 5, 9, 8, 3, (2, 1), (2, 1), (2, 1), 1, 1, False),
    # Cin/groups = 2 (ResNeXt's 32 groups of 4, scaled down), 2 conv groups per deform group
    "groups4_dg2": (1, 8, 8, 3, 4, 3, 1, 1, 1, 4, 2, True),
    "deform_groups_4": (1, 8, 6, 4, 5, 3, 2, 1, 1, 1, 4, True),
    "groups2_dg3_rect_kernel": (1, 6, 4, 3, 5, (2, 3), 1, (0, 1), 1, 2, 3, True),  # runs of 1 channel
    "chunks_and_cout_tiles": (1, 40, 36, 3, 4, 3, 1, 1, 1, 1, 1, True),  # 2 channel chunks, 2 Cout tiles
    "one_by_one_odd_map": (1, 3, 2, 1, 7, 1, 1, 0, 1, 1, 1, True),  # H = 1, 1x1 kernel
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(name):
    _check(_case(*CASES[name], seed=len(name)), **FP64_TOL)


def test_points_on_cell_borders_and_the_map_edges():
    """Every offset a whole number or half, some points exactly on -1 and H (read 0), just inside
    them, and on the last row/column: the one-sided derivative of floor, as the reference."""
    args = _case(1, 3, 4, 4, 5, 3, 1, 1, 1, 1, 1, True, seed=5)
    with torch.no_grad():
        off = args["offset"]
        off.copy_((off * 2).round() / 2)
        off[0, 0, 0, :] = -1.0 + 1.0  # tap (0, 0) of row 0: py = 0 - 1 + 0 + dy = -1 (exactly: reads 0)
        off[0, 0, 1, :] = -1.0 + 1e-3  # py = 1 - 1 - 1 + 1e-3: just inside
        off[0, 16, 3, :] = 1.0  # tap (2, 2) of row 3: py = 3 + 1 + 1 = 5 > H - 1
        off[0, 17, :, 4] = -1.0  # tap (2, 2) of column 4: px = 4 + 1 - 1 = W - 1 exactly
    _check(args, **FP64_TOL)


def test_points_outside_the_map_give_zero_offset_gradient_and_the_bias():
    args = _case(2, 3, 4, 4, 4, 3, 1, 1, 1, 1, 1, True, seed=6)
    with torch.no_grad():
        args["offset"].fill_(50.0)
    out, grads = _check(args, **FP64_TOL)
    assert torch.equal(grads["offset"], torch.zeros_like(grads["offset"]))
    assert torch.equal(grads["mask"], torch.zeros_like(grads["mask"]))
    assert torch.equal(grads["input"], torch.zeros_like(grads["input"]))
    torch.testing.assert_close(out, args["bias"].detach().view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)


def test_zero_mask_gives_the_bias_and_still_a_mask_gradient():
    args = _case(1, 3, 2, 4, 5, 3, 1, 1, 1, 1, 1, True, seed=7)
    with torch.no_grad():
        args["mask"].zero_()
    out, grads = _check(args, **FP64_TOL)
    torch.testing.assert_close(out, args["bias"].detach().view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)
    assert grads["mask"].abs().max() > 0 and torch.equal(grads["offset"], torch.zeros_like(grads["offset"]))


def test_empty_batch():
    args = _case(0, 4, 6, 5, 5, 3, 1, 1, 1, 2, 2, True)
    out = _call(deform_conv2d, args)
    assert "DeformConv" in type(out.grad_fn).__name__ and out.shape == (0, 6, 5, 5)
    grads = torch.autograd.grad(out.sum(), [args[n] for n in LEAVES])
    for name, g in zip(LEAVES, grads):
        assert g.shape == args[name].shape and not g.abs().any(), name


def test_gradcheck_float64():
    """Finite differences through the interpreted kernels (offsets kept >= 0.1 cell off whole
    numbers, where bilinear sampling has kinks), every input including the mask."""
    args = _case(1, 2, 2, 3, 3, 3, 1, 1, 1, 1, 1, True, scale=1.4, seed=4)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        off = args["offset"]
        off.copy_(off.round() + 0.1 + 0.8 * torch.rand(off.shape, generator=gen, dtype=torch.float64))

    def f(*ts):
        return _call(deform_conv2d, dict(args, **dict(zip(LEAVES, ts))))

    assert torch.autograd.gradcheck(f, [args[n] for n in LEAVES], eps=1e-6, atol=1e-8, fast_mode=True)


# fp32: float32 coordinates, interpolation and accumulation over K = 9 * 8 terms ~1: ~1e-6.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_dtypes(dtype, tol):
    """Inputs in `dtype`; the kernel computes in float32 (dots too under the interpreter), so the
    error against float64 on the same rounded values is float32 rounding plus the final cast of
    outputs and gradients to `dtype` (2^-8 relative for bf16, 2^-11 for fp16), judged against the
    scale of each tensor."""
    args = _case(1, 8, 8, 5, 6, 3, 1, 1, 1, 2, 2, True, seed=9, dtype=dtype)
    out = _call(deform_conv2d, args)
    assert out.dtype == dtype and "DeformConv" in type(out.grad_fn).__name__
    exact = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    ref = _call(deform_conv2d_reference, exact)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, [args[n] for n in LEAVES], grad_out)
    expected = torch.autograd.grad(ref, [exact[n] for n in LEAVES], grad_out.double())
    for name, g, e in zip(("out",) + LEAVES, (out,) + got, (ref,) + expected):
        assert g.dtype == dtype, name
        error = (g.double() - e).abs().max().item()
        assert error <= tol * e.abs().max().item(), f"{name}: max error {error} vs scale {e.abs().max().item()}"


def test_mixed_dtypes_and_channels_last_input():
    """float16 offset, bfloat16 mask, float64 weight with a channels-last float32 input: float32
    math, float32 output, each gradient in its leaf's dtype (the offset's and mask's rounded to
    float16 / bfloat16: 2^-11 / 2^-8 relative)."""
    args = _case(1, 4, 3, 5, 6, 3, 1, 1, 1, 1, 1, True, seed=10)
    args["input"] = args["input"].detach().float().to(memory_format=torch.channels_last).requires_grad_()
    args["offset"] = args["offset"].detach().half().requires_grad_()
    args["mask"] = args["mask"].detach().bfloat16().requires_grad_()
    out, grads = _check(args, rtol=2e-5, atol=2e-5, leaf_tol=dict(offset=1e-3, mask=8e-3))
    assert out.dtype == torch.float32 and grads["offset"].dtype == torch.float16


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast input, weight and bias take the autocast dtype (as conv2d); offset and mask
    keep theirs; each gradient comes back in its leaf's dtype."""
    args = _case(1, 4, 3, 4, 5, 3, 1, 1, 1, 1, 1, True, seed=11, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(deform_conv2d, args)
    assert out.dtype == torch.bfloat16 and "DeformConv" in type(out.grad_fn).__name__
    low = dict(args, **{k: args[k].detach().bfloat16() for k in ("input", "weight", "bias")})
    expected = _call(deform_conv2d, low)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out.float().sum(), [args[n] for n in LEAVES])
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_star_conv_is_this_op_with_box_offsets():
    """The star conv (same device functions) equals deform_conv2d over its star offsets with
    padding 1: output and the input, weight and bias gradients."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 5, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    box = torch.rand(1, 4, 4, 6, generator=gen, dtype=torch.float64) * 3 * 8
    weight = torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    star = star_deform_conv2d(x, box, weight, 8, bias=bias)
    dcn = deform_conv2d(x, reference.star_offsets(box, 8), weight, bias, padding=1)
    torch.testing.assert_close(dcn, star, **FP64_TOL)
    grad_out = torch.randn(star.shape, generator=gen, dtype=torch.float64)
    for g, e in zip(torch.autograd.grad(dcn, (x, weight, bias), grad_out),
                    torch.autograd.grad(star, (x, weight, bias), grad_out)):
        torch.testing.assert_close(g, e, **FP64_TOL)


def test_only_the_requested_gradients():
    """Offset and weight only (input and mask frozen): the data kernel skips the input scatter and
    the mask sums; the values still match."""
    args = _case(1, 4, 3, 4, 5, 3, 1, 1, 1, 1, 1, True, seed=13)
    args["input"] = args["input"].detach()
    args["mask"] = args["mask"].detach()
    _check(args, **FP64_TOL)


def test_reference_forced_by_env(monkeypatch):
    monkeypatch.setenv("VFNET_KERNELS", "torch")
    args = _case(1, 2, 2, 3, 3, 3, 1, 1, 1, 1, 1, True)
    out = _call(deform_conv2d, args)
    assert "DeformConv" not in type(out.grad_fn).__name__
