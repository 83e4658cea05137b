"""Modulated deformable convolution (DCNv2): the reference against a per-output-value loop,
its chunking, gradients, dtypes, mmcv's offset layout, the public wrapper's checks and dispatch."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import Ops, deform_conv2d, reference
from kernels import deform_conv as deform_conv_module
from kernels.reference import conv_output_size, deform_conv2d_reference, modulated_offsets


def _sample(plane: list[list[float]], y: float, x: float) -> float:
    """One bilinear sample of an H x W plane (nested lists): 0 when the point is at or beyond
    one cell outside the map, else the weighted sum of the corners that lie inside."""
    h, w = len(plane), len(plane[0])
    if not (-1 < y < h and -1 < x < w):
        return 0.0
    top, left = math.floor(y), math.floor(x)
    fy, fx = y - top, x - left
    total = 0.0
    for row, wy in ((top, 1 - fy), (top + 1, fy)):
        for col, wx in ((left, 1 - fx), (left + 1, fx)):
            if 0 <= row < h and 0 <= col < w:
                total += wy * wx * plane[row][col]
    return total


def _loop(x, offset, weight, bias, stride, padding, dilation, mask, groups):
    """deform_conv2d by a loop over every output value, in Python floats."""
    b, cin, _, _ = x.shape
    cout, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = reference.pair(stride), reference.pair(padding), reference.pair(dilation)
    ho, wo = offset.shape[2:]
    dg = offset.shape[1] // (2 * kh * kw)
    xs, offs, ws = x.tolist(), offset.tolist(), weight.tolist()
    ms = None if mask is None else mask.tolist()
    out = [[[[0.0] * wo for _ in range(ho)] for _ in range(cout)] for _ in range(b)]
    for n in range(b):
        for y in range(ho):
            for xo in range(wo):
                samples = [[[0.0] * kw for _ in range(kh)] for _ in range(cin)]
                for c in range(cin):
                    g = c // (cin // dg)
                    for i in range(kh):
                        for j in range(kw):
                            q = g * kh * kw + i * kw + j
                            py = y * sh - ph + i * dh + offs[n][2 * q][y][xo]
                            px = xo * sw - pw + j * dw + offs[n][2 * q + 1][y][xo]
                            m = 1.0 if ms is None else ms[n][q][y][xo]
                            samples[c][i][j] = m * _sample(xs[n][c], py, px)
                for o in range(cout):
                    first = (o // (cout // groups)) * cin_g
                    total = 0.0 if bias is None else float(bias[o])
                    for c in range(cin_g):
                        for i in range(kh):
                            for j in range(kw):
                                total += ws[o][c][i][j] * samples[first + c][i][j]
                    out[n][o][y][xo] = total
    return torch.tensor(out, dtype=torch.float64).reshape(b, cout, ho, wo)


def _case(b, cin, cout, h, w, kernel, stride, padding, dilation, groups, dg, with_mask, scale=2.5, seed=0):
    """Random float64 arguments; offsets up to `scale` cells, a third of them whole numbers."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = reference.pair(kernel)
    (sh, sw), (ph, pw), (dh, dw) = reference.pair(stride), reference.pair(padding), reference.pair(dilation)
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
    offset = (torch.rand(b, 2 * dg * kh * kw, ho, wo, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    offset[:, ::3] = offset[:, ::3].round()
    mask = torch.rand(b, dg * kh * kw, ho, wo, generator=gen, dtype=torch.float64) if with_mask else None
    weight = torch.randn(cout, cin // groups, kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(cout, generator=gen, dtype=torch.float64)
    return dict(input=x, offset=offset, weight=weight, bias=bias, stride=stride, padding=padding,
                dilation=dilation, mask=mask, groups=groups)


def _call(f, args, **extra):
    a = dict(args)
    return f(a.pop("input"), a.pop("offset"), a.pop("weight"), a.pop("bias"), a.pop("stride"), a.pop("padding"),
             a.pop("dilation"), a.pop("mask"), groups=a.pop("groups"), **extra)


def _loop_of(args):
    return _loop(args["input"], args["offset"], args["weight"], args["bias"], args["stride"], args["padding"],
                 args["dilation"], args["mask"], args["groups"])


CASES = {
    # b, cin, cout, h, w, kernel, stride, padding, dilation, groups, dg, mask
    "3x3_s1_p1": (2, 4, 3, 5, 6, 3, 1, 1, 1, 1, 1, True),
    "3x3_s2_p1_g2_dg2_nomask_odd": (2, 4, 6, 7, 5, 3, 2, 1, 1, 2, 2, False),
    "3x2_s21_p02_d21_g4_dg4": (1, 8, 4, 6, 5, (3, 2), (2, 1), (0, 2), (2, 1), 4, 4, True),
    "3x3_d2_p0_dg4": (1, 4, 2, 7, 7, 3, 1, 0, 2, 1, 4, True),
    "1x1_g2_dg2_s2": (2, 4, 4, 5, 3, 1, 2, 0, 1, 2, 2, True),
    "3x3_g2_dg4_p2_s3": (1, 8, 2, 8, 9, 3, 3, 2, 1, 2, 4, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_the_loop(name):
    args = _case(*CASES[name])
    got = _call(deform_conv2d_reference, args)
    torch.testing.assert_close(got, _loop_of(args), rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64


def test_points_on_and_beyond_the_border():
    """Whole-number offsets put samples exactly on cells, on the last row/column, at -1 and at
    H / W (both read 0), just inside (-0.5, H - 0.5: only the inside corners count) and far away."""
    args = _case(1, 2, 2, 4, 5, 3, 1, 1, 1, 1, 1, True, seed=1)
    h, w = 4, 5
    targets = [(-1.0, 2.0), (2.0, -1.0), (h, 1.0), (1.0, w), (h - 1.0, w - 1.0), (0.0, 0.0), (-0.5, 1.0),
               (h - 0.5, w - 0.5), (-1.0, -1.0), (1e6, 2.0), (-3.0, -7.0), (2.0, 3.0)]
    offset = args["offset"]
    for t, (ty, tx) in enumerate(targets):  # position (0, t % 5), tap t // 5 (i = 0, j = t // 5)
        y, x, j = 0, t % 5, t // 5
        offset[0, 2 * j, y, x] = ty - (y - 1 + 0)  # py = y*1 - 1 + 0*1 + dy
        offset[0, 2 * j + 1, y, x] = tx - (x - 1 + j)
    got = _call(deform_conv2d_reference, args)
    torch.testing.assert_close(got, _loop_of(args), rtol=1e-12, atol=1e-12)
    # a single tap at -1 or H reads 0: with only that tap's weight the output is the bias
    single = dict(args, weight=torch.zeros_like(args["weight"]))
    single["weight"][:, :, 0, 0] = 1.0
    out = _call(deform_conv2d_reference, single)
    torch.testing.assert_close(out[0, :, 0, 0], args["bias"], rtol=0, atol=0)  # (-1, 2)
    torch.testing.assert_close(out[0, :, 0, 2], args["bias"], rtol=0, atol=0)  # (H, 1)


def test_whole_number_offsets_equal_a_shifted_conv2d():
    """dy = +1 everywhere with padding 1: tap i of output row y reads row y + i (not y - 1 + i), so
    the output is conv2d over the input padded by 0 rows above and 2 below (1 column each side)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    offset = torch.zeros(2, 18, 6, 7, dtype=torch.float64)
    offset[:, 0::2] = 1.0
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 0, 2)), weight)
    torch.testing.assert_close(deform_conv2d_reference(x, offset, weight, padding=1), expected,
                               rtol=1e-12, atol=1e-12)


def test_zero_offsets_and_unit_mask_equal_conv2d():
    args = _case(2, 8, 6, 9, 7, 3, 2, 1, 2, 2, 4, True)
    args["offset"].zero_()
    args["mask"].fill_(1.0)
    expected = torch.nn.functional.conv2d(args["input"], args["weight"], args["bias"], stride=2, padding=1,
                                          dilation=2, groups=2)
    torch.testing.assert_close(_call(deform_conv2d_reference, args), expected, rtol=1e-12, atol=1e-12)
    args["mask"] = None
    torch.testing.assert_close(_call(deform_conv2d_reference, args), expected, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    args = _case(0, 4, 6, 5, 5, 3, 1, 1, 1, 2, 2, True)
    for t in ("input", "offset", "mask", "weight", "bias"):
        args[t].requires_grad_(True)
    out = _call(deform_conv2d, args)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert args["weight"].grad.abs().max() == 0 and args["bias"].grad.abs().max() == 0
    assert args["input"].grad.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("chunk_bytes", [1, 7 * 9 * 4 * 8, 10**9])
def test_chunks_give_the_same_values_and_gradients(chunk_bytes, monkeypatch):
    """chunk_bytes=1: one position per chunk; 7*9*Cin*8: 7 positions (50 = 7*7 + 1); 1e9: one chunk."""
    args = _case(2, 4, 3, 5, 5, 3, 1, 1, 1, 1, 2, True, seed=3)
    leaves = ("input", "offset", "mask", "weight", "bias")

    def run(**extra):
        a = {k: (v.detach().clone().requires_grad_(True) if k in leaves else v) for k, v in args.items()}
        out = _call(deform_conv2d_reference, a, **extra)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), [a[k].grad for k in leaves]

    sizes = []
    original = reference._DeformGeometry.chunk

    def spy(self, start, table, offsets, *rest):
        sizes.append(offsets.shape[0])
        return original(self, start, table, offsets, *rest)

    expected, expected_grads = run()
    monkeypatch.setattr(reference._DeformGeometry, "chunk", spy)
    got, grads = run(chunk_bytes=chunk_bytes)
    per_chunk = max(1, chunk_bytes // (9 * 4 * 8))
    forward = sizes[: math.ceil(50 / min(per_chunk, 50))]
    assert sum(forward) == 50 and max(forward) == min(per_chunk, 50)  # columns of a chunk <= budget
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [reference.DEFORM_CHUNK_BYTES, 1])
@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck(chunk_bytes, with_mask):
    """Every gradient in float64 (offsets kept off whole numbers: bilinear sampling has kinks
    there); chunk_bytes=1 runs the checkpointed chunks."""
    args = _case(1, 4, 2, 3, 4, 2, 1, 0, 1, 2, 2, with_mask, scale=1.4, seed=4)
    args["offset"] = args["offset"].round() + 0.1 + 0.8 * torch.rand(args["offset"].shape, dtype=torch.float64)
    names = ["input", "offset", "weight", "bias"] + (["mask"] if with_mask else [])
    tensors = [args[n].requires_grad_(True) for n in names]

    def f(*ts):
        return _call(deform_conv2d_reference, dict(args, **dict(zip(names, ts))), chunk_bytes=chunk_bytes)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-8)


def test_points_outside_get_zero_offset_gradient():
    args = _case(1, 2, 2, 4, 4, 3, 1, 1, 1, 1, 1, True)
    args["offset"] = torch.full_like(args["offset"], 50.0).requires_grad_(True)
    out = _call(deform_conv2d_reference, args)
    out.sum().backward()
    assert args["offset"].grad.abs().max() == 0
    torch.testing.assert_close(out, args["bias"].view(1, 2, 1, 1).expand_as(out), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_close_to_float64(dtype, tol):
    """Inputs rounded to `dtype`; math in float32, so the error is float32 rounding plus the final
    cast (relative 2^-8 for bf16, 2^-11 for fp16) against float64 on the same rounded values."""
    args = _case(2, 8, 8, 6, 7, 3, 1, 1, 1, 2, 2, True)
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    exact = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
    got = _call(deform_conv2d, low)
    expected = _call(deform_conv2d_reference, exact)
    assert got.dtype == dtype and got.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * scale)


def test_mixed_dtypes_compute_in_the_inputs_compute_dtype():
    """Any floating dtypes: a float16 offset and a float64 weight with a float32 input compute in
    float32 and return float32."""
    args = _case(1, 4, 3, 5, 6, 3, 1, 1, 1, 1, 1, True)
    mixed = dict(args, input=args["input"].float(), offset=args["offset"].half(), mask=args["mask"].bfloat16())
    got = _call(deform_conv2d, mixed)
    exact = dict(args, offset=mixed["offset"].double(), mask=mixed["mask"].double(), input=mixed["input"].double())
    expected = _call(deform_conv2d_reference, exact)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_output_is_channels_last_and_writable():
    args = _case(2, 4, 6, 5, 5, 3, 1, 1, 1, 1, 1, True)
    out = _call(deform_conv2d, args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.add_(1.0)


def test_modulated_offsets_reproduces_mmcv_pack():
    """mmcv's ModulatedDeformConv2dPack: o1, o2, m = chunk(out, 3, dim=1); offset = cat(o1, o2);
    mask = sigmoid(m)."""
    dg, taps = 2, 9
    out = torch.randn(2, 3 * dg * taps, 5, 4, dtype=torch.float64)
    o1, o2, m = torch.chunk(out, 3, dim=1)
    offset, mask = modulated_offsets(out)
    assert offset.shape == (2, 2 * dg * taps, 5, 4) and mask.shape == (2, dg * taps, 5, 4)
    torch.testing.assert_close(offset, torch.cat((o1, o2), dim=1), rtol=0, atol=0)
    torch.testing.assert_close(mask, torch.sigmoid(m), rtol=0, atol=0)
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    y = deform_conv2d(x, offset, weight, padding=1, mask=mask)  # the pair plugs straight in
    assert y.shape == (2, 3, 5, 4)
    with pytest.raises(ValueError, match="conv_offset_out must be"):
        modulated_offsets(out[:, :-1])
    with pytest.raises(ValueError, match="conv_offset_out must be"):
        modulated_offsets(out[0, 0, 0])


def test_matches_torchvision():
    """torchvision.ops.deform_conv2d on the same arguments (skipped without torchvision; CI has none)."""
    tv_ops = pytest.importorskip("torchvision.ops")
    worst = 0.0
    for name, spec in CASES.items():
        args = _case(*spec)
        args["offset"][:, 1::4] = args["offset"][:, 1::4].round()
        groups = args.pop("groups")
        expected = tv_ops.deform_conv2d(**args)
        got = deform_conv2d(*args.values(), groups=groups)
        worst = max(worst, (got - expected).abs().max().item())
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
        low = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        torch.testing.assert_close(deform_conv2d(*low.values(), groups=groups), tv_ops.deform_conv2d(**low),
                                   rtol=1e-5, atol=1e-5, msg=name)
    print(f"max |ours - torchvision| float64: {worst:.3g}")


def test_ops_and_package_export_the_op():
    assert kernels.deform_conv2d is deform_conv2d
    assert Ops.from_name("triton").deform_conv2d is deform_conv2d
    assert Ops.from_name("torch").deform_conv2d is deform_conv2d_reference


def test_dispatch_point(monkeypatch):
    """use_triton(input) True sends the call to `_deform_conv2d_triton` (where the kernels plug in),
    with the checked (h, w) pairs; VFNET_KERNELS=torch runs the reference."""
    args = _case(1, 2, 2, 4, 4, 3, 1, 1, 1, 1, 1, True)
    calls = []
    monkeypatch.setattr(deform_conv_module, "use_triton", lambda t: True)
    monkeypatch.setattr(deform_conv_module, "_deform_conv2d_triton", lambda *a: calls.append(a) or "triton")
    assert _call(deform_conv2d, args) == "triton"
    assert calls[0][4:7] == ((1, 1), (1, 1), (1, 1)) and calls[0][8] == 1
    monkeypatch.undo()
    monkeypatch.setenv("VFNET_KERNELS", "torch")
    torch.testing.assert_close(_call(deform_conv2d, args), _call(deform_conv2d_reference, args), rtol=0, atol=0)


def _bad(change):
    args = _case(2, 4, 6, 5, 5, 3, 1, 1, 1, 2, 2, True)
    change(args)
    return args


def _set(**kv):
    def change(args):
        for k, v in kv.items():
            args[k] = v(args) if callable(v) else v
    return change


BAD = [
    (_set(input=lambda a: a["input"].numpy()), TypeError, "input must be a torch.Tensor"),
    (_set(input=lambda a: a["input"].long()), TypeError, "input must be float16"),
    (_set(input=lambda a: a["input"][0]), ValueError, r"input must be \[B, Cin, H, W\]"),
    (_set(input=lambda a: a["input"][:, :, :0]), ValueError, "input must have Cin, H and W > 0"),
    (_set(offset=lambda a: a["offset"][:, :-1]), ValueError, r"offset must be \[B, 2\*dg\*kh\*kw, Ho, Wo\]"),
    (_set(offset=lambda a: a["offset"][:, :, 1:]), ValueError, r"offset must be .* got shape \(2, 36, 4, 5\)"),
    (_set(offset=lambda a: a["offset"][:1]), ValueError, "offset must be"),
    (_set(offset=lambda a: torch.zeros(2, 0, 5, 5, dtype=torch.float64)), ValueError, "dg >= 1"),
    (_set(offset=lambda a: torch.zeros(2, 54, 5, 5, dtype=torch.float64), mask=None), ValueError,
     "dg = 3 deform groups, which must divide Cin = 4"),
    (_set(offset=lambda a: a["offset"].int()), TypeError, "offset must be float16"),
    (_set(mask=lambda a: a["mask"][:, :9]), ValueError, r"mask must be \[B, dg\*kh\*kw, Ho, Wo\] = \[2, 18, 5, 5\]"),
    (_set(mask=lambda a: a["mask"].bool()), TypeError, "mask must be float16"),
    (_set(mask=[1.0]), TypeError, "mask must be a torch.Tensor"),
    (_set(weight=lambda a: a["weight"][:, :1]), ValueError, r"weight must be \[Cout, Cin/groups, kh, kw\] with "
     "Cin/groups = 2"),
    (_set(weight=lambda a: a["weight"][0]), ValueError, "weight must be"),
    (_set(weight=lambda a: a["weight"].half().to(torch.int8)), TypeError, "weight must be float16"),
    (_set(groups=3), ValueError, "groups must be >= 1 and divide Cin = 4 and Cout = 6, got 3"),
    (_set(groups=4, weight=lambda a: a["weight"][:, :1]), ValueError, "divide Cin = 4 and Cout = 6, got 4"),
    (_set(groups=0), ValueError, "groups must be >= 1"),
    (_set(groups=2.0), TypeError, "groups must be an int"),
    (_set(groups=True), TypeError, "groups must be an int"),
    (_set(bias=lambda a: a["bias"][:3]), ValueError, r"bias must be \[Cout\] = \[6\]"),
    (_set(bias=lambda a: a["bias"].long()), TypeError, "bias must be float16"),
    (_set(stride=0), ValueError, "stride must be >= 1"),
    (_set(stride=1.5), TypeError, "stride must be an int or a pair of ints"),
    (_set(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair of ints"),
    (_set(padding=-1), ValueError, "padding must be >= 0"),
    (_set(dilation=(1, 0)), ValueError, "dilation must be >= 1"),
    (_set(padding=0, dilation=3), ValueError, "the output would be -1 x -1"),
    (_set(bias=lambda a: a["bias"].to("meta")), ValueError, "bias is on meta but input is on cpu"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_wrong_arguments_are_rejected(change, error, match):
    args = _bad(change)
    with pytest.raises(error, match=match):
        _call(deform_conv2d, args)
