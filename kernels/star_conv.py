r"""Star deformable convolution: VFNet's 3x3 conv over the 9 star points of each location.

Public API (docs/design.md §2)::

    star_deform_conv2d(x, bbox_pred, weight, stride, *, bias=None, gradient_mul=0.1)
    star_deform_conv2d_pair(x_cls, x_reg, bbox_pred, w_cls, w_reg, stride, *, gradient_mul=0.1)

Geometry. Location (y, x) with box distances (l, t, r, b) (input pixels, divided by the stride to
get cells) samples the 9 points on rows Y = (y - t, y, y + b) and columns X = (x - l, x, x + r);
tap (ky, kx) is (Y[ky], X[kx]). Bilinear sampling follows torchvision's `deform_conv2d`: a point
with y <= -1, y >= H, x <= -1 or x >= W reads 0, else each corner outside the map reads 0.
Negative distances are used as given (the sample lands on the other side of the location; the
head only produces positive ones); the reference and the kernels agree on this.

Kernels (implicit GEMM, M = B*H*W locations, N = Cout, K = 9*Cin, no columns buffer):
- forward: a program owns BLOCK_M locations x BLOCK_N output channels and reads their boxes
  once. One loop runs over K as (tap, channel chunk): the tap's bilinear corner offsets and
  weights are derived from the boxes ([BLOCK_M] vectors, shared by both inputs of the pair), the
  4 corners of BLOCK_K channels are gathered from a channels-last copy of x (contiguous channel
  runs, asynchronously copied and pipelined), interpolated in fp32 (fp64 for fp64 inputs) and fed
  to `tl.dot` against the weight tile, accumulating in fp32.
- backward, data (grid: location tiles x inputs of the pair): per (tap, channel chunk) the sample
  gradient grad_out @ W_tap^T is formed in registers (grad_out's tile stays resident when Cout
  fits one BLOCK_N), scattered to the 4 corners of x's gradient with relaxed fp32 atomics (fp64
  for fp64), and contracted with the corner values for the coordinate gradient: per corner one sum
  over channels, then the bilinear weights' derivatives, summed over the 3 taps each distance
  moves and divided by the stride (the centre row and column do not depend on the box).
  Each location's box gradient is written by the one program that owns it; the pair's two
  shares are added by torch, which then scales by gradient_mul in the compute dtype. (A Python
  float reaches a kernel as a float32 argument: exact for the stride, an integer in every FPN,
  but 0.1 in float32 is 1.5e-8 relative off, a float64 error the first H200 run caught.)
- backward, weight (grid: (tap, channel chunk, Cout tile) x slices of the locations x inputs):
  samples are re-gathered and multiplied with grad_out; partial sums are added with fp32 atomics
  into a [9*Cin, Cout] buffer. grad_bias is a plain torch sum.

Layouts and their cost. The head's tensors are NCHW. x (and grad_out in backward) are copied once
per call to channels-last (B*H*W*C elements each, skipped for a single input that already is
channels-last), the weight to [9*Cin, Cout]. Outputs are [B, Cout, H, W] tensors in channels-last
memory (torch ops accept them; cuDNN convolutions prefer them); x's gradient is accumulated in a
channels-last fp32 buffer and returned in x's dtype, also channels-last.

Precision. Coordinates, interpolation and accumulation run in fp32 (fp64 for fp64 inputs). On the
GPU the dot operands are x's dtype for bf16/fp16 (tensor cores); fp32 inputs use IEEE fp32 dots
unless `torch.set_float32_matmul_precision` allows TF32. Under the interpreter dot operands are fp32
(bf16 dots are unreliable there). Under autocast, x, weight and bias are cast to the autocast dtype
(like conv2d); bbox_pred keeps its dtype (coordinates are fp32 regardless). The x and weight
gradients are sums of fp32 atomic adds, so their last bits depend on the order the GPU runs them.

Tuning (`kernels.tuning`): the autotune tables per dot width and architecture, the shared-memory
estimate that prunes them per device, the dot dtype and precision. This module keeps the kernels,
their launch and autograd.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference, tuning
from kernels.bilinear import (
    coordinate_grads,
    corners,
    k_step,
    sample,
    sample_grad,
    scatter_corners,
)
from kernels.checks import check_float, check_same_device, check_tensor, compute_dtype
from kernels.dispatch import use_triton

__all__ = ["star_deform_conv2d", "star_deform_conv2d_pair"]


# ---------------------------------------------------------------------------------------------
# Shared device functions


@triton.jit
def _tap_point(yf, xf, left, top, right, bottom, tap):
    """Row and column [BLOCK_M] of tap `tap` = 3 * ky + kx (a runtime value): rows
    (y - t, y, y + b)[ky], columns (x - l, x, x + r)[kx]."""
    ky = tap // 3
    kx = tap % 3
    yc = tl.where(ky == 0, yf - top, tl.where(ky == 2, yf + bottom, yf))
    xc = tl.where(kx == 0, xf - left, tl.where(kx == 2, xf + right, xf))
    return yc, xc


@triton.jit
def _location_tile(box_ptr, start, M, H, W, stride, BLOCK_M: tl.constexpr):
    """The BLOCK_M flat locations m = (b*H + y)*W + x from `start`: int64 indices, validity
    mask, channels-last row base b*H*W, y and x as floats, and the box (l, t, r, b) in cells
    (box_ptr: [B, 4, H, W] contiguous, in the compute dtype)."""
    offs_m = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    hw = H * W
    batch = offs_m // hw
    pix = offs_m % hw
    ct = box_ptr.dtype.element_ty
    box = box_ptr + batch * 4 * hw + pix
    left = tl.load(box, mask=mask_m, other=0.0) / stride
    top = tl.load(box + hw, mask=mask_m, other=0.0) / stride
    right = tl.load(box + 2 * hw, mask=mask_m, other=0.0) / stride
    bottom = tl.load(box + 3 * hw, mask=mask_m, other=0.0) / stride
    yf = (pix // W).to(ct)
    xf = (pix % W).to(ct)
    return offs_m, mask_m, batch * hw, yf, xf, left, top, right, bottom


# ---------------------------------------------------------------------------------------------
# Forward


@tuning.autotune("star_fwd", "w1_ptr", key=["CIN", "COUT", "M_LOG2", "PAIR"])
@triton.jit(do_not_specialize=tuning.NOT_SPECIALISED)
def _star_fwd_kernel(
    x1_ptr, x2_ptr,  # [B, H, W, CIN] channels-last (x2: PAIR)
    w1_ptr, w2_ptr,  # [9 * CIN, COUT] in the dot dtype, row tap * CIN + c (w2: PAIR)
    bias_ptr,  # [COUT] compute dtype (HAS_BIAS)
    box_ptr,  # [B, 4, H, W] compute dtype
    out1_ptr, out2_ptr,  # [B, COUT, H, W] in channels-last memory (out2: PAIR)
    M, H, W, CIN, COUT, M_LOG2, stride,
    PAIR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_n = tl.cdiv(COUT, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m, mask_m, row_base, yf, xf, left, top, right, bottom = _location_tile(
        box_ptr, pid_m * BLOCK_M, M, H, W, stride, BLOCK_M)
    ct = yf.dtype
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ct)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ct)
    # one loop over K = (tap, channel chunk): a long pipelined loop and compact code; the
    # corner offsets and weights of a tap serve both inputs of the pair
    num_kc = tl.cdiv(CIN, BLOCK_K)
    for i in range(0, 9 * num_kc):
        tap, offs_c, mask_c = k_step(i, num_kc, CIN, BLOCK_K)
        yc, xc = _tap_point(yf, xf, left, top, right, bottom, tap)
        o00, o01, o10, o11, m00, m01, m10, m11, ly, lx = corners(yc, xc, row_base, mask_m, H, W,
                                                                  CIN)
        w_offs = (tap * CIN + offs_c)[:, None] * COUT + offs_n[None, :]
        w_mask = mask_c[:, None] & mask_n[None, :]
        w1 = tl.load(w1_ptr + w_offs, mask=w_mask, other=0.0)
        s1 = sample(x1_ptr, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, 1.0, offs_c, mask_c)
        acc1 = tl.dot(s1.to(w1.dtype), w1, acc1, input_precision=DOT_PRECISION, out_dtype=ct)
        if PAIR:
            w2 = tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0)
            s2 = sample(x2_ptr, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, 1.0, offs_c,
                         mask_c)
            acc2 = tl.dot(s2.to(w2.dtype), w2, acc2, input_precision=DOT_PRECISION,
                          out_dtype=ct)
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_offs = offs_m[:, None] * COUT + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out1_ptr + out_offs, acc1.to(out1_ptr.dtype.element_ty), mask=out_mask)
    if PAIR:
        tl.store(out2_ptr + out_offs, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Backward: x and box gradients


@tuning.autotune("star_bwd_data", "go_ptr", key=["CIN", "COUT", "M_LOG2"], reset_to_zero=["gx_ptr"])
@triton.heuristics({"GO_RESIDENT": lambda args: args["BLOCK_N"] >= args["COUT"]})
@triton.jit(do_not_specialize=tuning.NOT_SPECIALISED)
def _star_bwd_data_kernel(
    go_ptr,  # [n, M, COUT] channels-last grad_out, dot dtype
    x_ptr,  # [n, B, H, W, CIN] channels-last
    w_ptr,  # [n, 9 * CIN, COUT] dot dtype
    box_ptr,  # [B, 4, H, W] compute dtype
    gx_ptr,  # [n, B, H, W, CIN] compute dtype, zero-initialised, atomically accumulated (NEED_X)
    gbox_ptr,  # [n, B, 4, H, W] compute dtype: each input's share of the box gradient before
    # gradient_mul (NEED_BOX; the wrapper scales the sum, in the compute dtype)
    M, H, W, CIN, COUT, M_LOG2, stride,
    NEED_X: tl.constexpr, NEED_BOX: tl.constexpr, GO_RESIDENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # axis 0: tile of locations; axis 1: which input of the pair
    pid_m = tl.program_id(0)
    branch = tl.program_id(1).to(tl.int64)
    go_ptr += branch * M * COUT
    x_ptr += branch * M * CIN
    w_ptr += branch * 9 * CIN * COUT
    gx_ptr += branch * M * CIN
    gbox_ptr += branch * M * 4
    offs_m, mask_m, row_base, yf, xf, left, top, right, bottom = _location_tile(
        box_ptr, pid_m * BLOCK_M, M, H, W, stride, BLOCK_M)
    ct = yf.dtype
    go_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=go_ptr.dtype.element_ty)
    if GO_RESIDENT:
        offs_n = tl.arange(0, BLOCK_N)
        go_tile = tl.load(go_ptr + offs_m[:, None] * COUT + offs_n[None, :],
                          mask=mask_m[:, None] & (offs_n < COUT)[None, :], other=0.0)
    g_left = tl.zeros((BLOCK_M,), dtype=ct)
    g_top = tl.zeros((BLOCK_M,), dtype=ct)
    g_right = tl.zeros((BLOCK_M,), dtype=ct)
    g_bottom = tl.zeros((BLOCK_M,), dtype=ct)
    num_kc = tl.cdiv(CIN, BLOCK_K)
    for i in range(0, 9 * num_kc):
        tap, offs_c, mask_c = k_step(i, num_kc, CIN, BLOCK_K)
        yc, xc = _tap_point(yf, xf, left, top, right, bottom, tap)
        o00, o01, o10, o11, m00, m01, m10, m11, ly, lx = corners(yc, xc, row_base, mask_m, H, W,
                                                                  CIN)
        gs = sample_grad(go_ptr, go_tile, w_ptr, offs_m, mask_m, tap * CIN + offs_c, mask_c, COUT,
                          COUT, ct, GO_RESIDENT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        if NEED_X:
            scatter_corners(gx_ptr, gs, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, 1.0,
                             offs_c, mask_c)
        if NEED_BOX:
            d_y, d_x, _ = coordinate_grads(x_ptr, gs, o00, o01, o10, o11, m00, m01, m10, m11, ly,
                                            lx, offs_c, mask_c)
            # rows (y - t, y, y + b), columns (x - l, x, x + r): the centre ones do not move
            ky = tap // 3
            kx = tap % 3
            g_top -= tl.where(ky == 0, d_y, 0.0)
            g_bottom += tl.where(ky == 2, d_y, 0.0)
            g_left -= tl.where(kx == 0, d_x, 0.0)
            g_right += tl.where(kx == 2, d_x, 0.0)
    if NEED_BOX:
        hw = H * W
        gbox = gbox_ptr + (offs_m // hw) * 4 * hw + offs_m % hw
        tl.store(gbox, g_left / stride, mask=mask_m)
        tl.store(gbox + hw, g_top / stride, mask=mask_m)
        tl.store(gbox + 2 * hw, g_right / stride, mask=mask_m)
        tl.store(gbox + 3 * hw, g_bottom / stride, mask=mask_m)


# ---------------------------------------------------------------------------------------------
# Backward: weight gradient


@tuning.autotune("star_bwd_weight", "go_ptr", key=["CIN", "COUT", "M_LOG2"], reset_to_zero=["gw_ptr"])
@triton.jit(do_not_specialize=tuning.NOT_SPECIALISED)
def _star_bwd_weight_kernel(
    go_ptr,  # [n, M, COUT] channels-last grad_out, dot dtype
    x_ptr,  # [n, B, H, W, CIN] channels-last
    box_ptr,  # [B, 4, H, W] compute dtype
    gw_ptr,  # [n, 9 * CIN, COUT] compute dtype, zero-initialised, atomically accumulated
    M, H, W, CIN, COUT, M_LOG2, stride,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # axis 0: (tap, channel chunk, Cout tile); axis 1: slice of the locations; axis 2: input
    num_n = tl.cdiv(COUT, BLOCK_N)
    num_k = tl.cdiv(CIN, BLOCK_K)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    k_tile = (pid // num_n) % num_k
    tap = pid // (num_n * num_k)
    branch = tl.program_id(2).to(tl.int64)
    go_ptr += branch * M * COUT
    x_ptr += branch * M * CIN
    gw_ptr += branch * 9 * CIN * COUT
    offs_c = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_c = offs_c < CIN
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT
    m_tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(m_tiles, tl.num_programs(1))
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, m_tiles)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=box_ptr.dtype.element_ty)
    for start in range(first * BLOCK_M, last * BLOCK_M, BLOCK_M):
        offs_m, mask_m, row_base, yf, xf, left, top, right, bottom = _location_tile(
            box_ptr, start, M, H, W, stride, BLOCK_M)
        yc, xc = _tap_point(yf, xf, left, top, right, bottom, tap)
        o00, o01, o10, o11, m00, m01, m10, m11, ly, lx = corners(yc, xc, row_base, mask_m, H, W,
                                                                  CIN)
        go = tl.load(go_ptr + offs_m[:, None] * COUT + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        samples = sample(x_ptr, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, 1.0, offs_c,
                          mask_c)
        acc = tl.dot(tl.trans(samples.to(go.dtype)), go, acc, input_precision=DOT_PRECISION,
                     out_dtype=acc.dtype)
    gw_offs = (tap * CIN + offs_c)[:, None] * COUT + offs_n[None, :]
    tl.atomic_add(gw_ptr + gw_offs, acc, mask=mask_c[:, None] & mask_n[None, :], sem="relaxed")


# The autotuned kernels by name (ahead-of-time checks, pre-compilation)
KERNELS = {"star_fwd": _star_fwd_kernel, "star_bwd_data": _star_bwd_data_kernel,
           "star_bwd_weight": _star_bwd_weight_kernel}


# ---------------------------------------------------------------------------------------------
# Launchers and autograd


def _channels_last(ts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[B, C, H, W] tensors -> one contiguous [n, B, H, W, C] buffer in `dtype` (one copy each;
    none for a single tensor that already is channels-last in `dtype`)."""
    if len(ts) == 1:
        return ts[0].to(dtype).permute(0, 2, 3, 1).contiguous().unsqueeze(0)
    b, c, h, w = ts[0].shape
    out = torch.empty(len(ts), b, h, w, c, dtype=dtype, device=ts[0].device)
    for dst, t in zip(out, ts):
        dst.copy_(t.permute(0, 2, 3, 1))
    return out


def _weight_matrix(ws: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[Cout, Cin, 3, 3] weights -> contiguous [n, 9 * Cin, Cout], row (3 * ky + kx) * Cin + c."""
    cout, cin = ws[0].shape[:2]
    return torch.stack([w.to(dtype).permute(2, 3, 1, 0).reshape(9 * cin, cout) for w in ws])


def _launch_forward(xs: list[torch.Tensor], ws: list[torch.Tensor], bias: torch.Tensor | None,
                    box: torch.Tensor, stride: float) -> list[torch.Tensor]:
    """Outputs [B, Cout, H, W] (x's dtype, channels-last memory) of the star conv of each x in xs
    (one, or the pair) with its weight."""
    b, cin, h, w = xs[0].shape
    cout = ws[0].shape[0]
    m = b * h * w
    ct, dot = compute_dtype(xs[0].dtype), tuning.dot_dtype(xs[0].dtype)
    xl = _channels_last(xs, xs[0].dtype)
    wl = _weight_matrix(ws, dot)
    boxc = box.to(ct).contiguous()
    biasc = bias.to(ct).contiguous() if bias is not None else boxc
    # [B, Cout, H, W] in channels-last memory: the kernel's stores are contiguous along Cout
    outs = [torch.empty(b, cout, h, w, dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last) for x in xs]

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)

    _star_fwd_kernel[grid](
        xl[0], xl[-1], wl[0], wl[-1], biasc, boxc, outs[0], outs[-1], m, h, w, cin, cout,
        tuning.m_log2(m), stride,
        PAIR=len(xs) == 2, HAS_BIAS=bias is not None, DOT_PRECISION=tuning.dot_precision(dot),
    )
    return outs


def _launch_backward(
    grads: list[torch.Tensor], xs: list[torch.Tensor], ws: list[torch.Tensor], box: torch.Tensor,
    stride: float, gradient_mul: float, need_x: bool, need_box: bool, need_w: bool,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None, list[torch.Tensor | None]]:
    """(grad of each x, grad of box, grad of each weight), None where not needed. Each input of
    the pair is a separate program along one grid axis."""
    n = len(xs)
    b, cin, h, w = xs[0].shape
    cout = ws[0].shape[0]
    m = b * h * w
    device = xs[0].device
    ct, dot = compute_dtype(xs[0].dtype), tuning.dot_dtype(xs[0].dtype)
    precision = tuning.dot_precision(dot)
    xl = _channels_last(xs, xs[0].dtype)
    gl = _channels_last(grads, dot)
    boxc = box.to(ct).contiguous()
    grad_xs: list[torch.Tensor | None] = [None] * n
    grad_ws: list[torch.Tensor | None] = [None] * n
    grad_box = None
    if need_x or need_box:
        wl = _weight_matrix(ws, dot)
        dummy = torch.zeros(1, dtype=ct, device=device)  # never written: the flags skip it
        gx = torch.zeros(n, b, h, w, cin, dtype=ct, device=device) if need_x else dummy
        gbox = torch.empty(n, *boxc.shape, dtype=ct, device=device) if need_box else dummy

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]), n)

        _star_bwd_data_kernel[grid](
            gl, xl, wl, boxc, gx, gbox, m, h, w, cin, cout, tuning.m_log2(m), stride,
            NEED_X=need_x, NEED_BOX=need_box, DOT_PRECISION=precision,
        )
        if need_x:
            grad_xs = [g.permute(0, 3, 1, 2).to(x.dtype) for x, g in zip(xs, gx)]
        if need_box:
            # gradient_mul applied here, not in the kernel: a Python float becomes a float32 kernel
            # argument, and 0.1 in float32 is off by 1.5e-8 relative (a float64 error)
            grad_box = gbox.sum(dim=0).mul_(gradient_mul).to(box.dtype)
    if need_w:
        gw = torch.zeros(n, 9 * cin, cout, dtype=ct, device=device)

        def wgrid(meta: dict) -> tuple[int, int, int]:
            tiles = 9 * triton.cdiv(cin, meta["BLOCK_K"]) * triton.cdiv(cout, meta["BLOCK_N"])
            return (tiles, tuning.weight_split(triton.cdiv(m, meta["BLOCK_M"]), n * tiles, device), n)

        _star_bwd_weight_kernel[wgrid](
            gl, xl, boxc, gw, m, h, w, cin, cout, tuning.m_log2(m), stride, DOT_PRECISION=precision,
        )
        grad_ws = [g.view(3, 3, cin, cout).permute(3, 2, 0, 1).to(wt.dtype)
                   for g, wt in zip(gw, ws)]
    return grad_xs, grad_box, grad_ws


class _StarConvFunction(torch.autograd.Function):
    """One star conv (x2 = w2 = None) or the pair sharing bbox_pred (no bias then)."""

    @staticmethod
    def forward(ctx, bbox_pred, stride, gradient_mul, bias, x1, w1, x2, w2):  # type: ignore
        xs = [x1] if x2 is None else [x1, x2]
        ws = [w1] if w2 is None else [w1, w2]
        outs = _launch_forward(xs, ws, bias, bbox_pred, stride)
        ctx.save_for_backward(bbox_pred, *xs, *ws)
        ctx.stride, ctx.gradient_mul, ctx.has_bias = stride, gradient_mul, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        bbox_pred, *rest = ctx.saved_tensors
        n = len(grads)
        xs, ws = rest[:n], rest[n:]
        needs = ctx.needs_input_grad
        need_x = needs[4] or (n == 2 and needs[6])
        need_w = needs[5] or (n == 2 and needs[7])
        grad_xs, grad_box, grad_ws = _launch_backward(
            list(grads), list(xs), list(ws), bbox_pred, ctx.stride, ctx.gradient_mul,
            need_x, needs[0], need_w,
        )
        grad_bias = None
        if ctx.has_bias and needs[3]:
            total = grads[0].sum(dim=(0, 2, 3), dtype=compute_dtype(grads[0].dtype))
            grad_bias = total.to(ctx.bias_dtype)
        second = (grad_xs[1], grad_ws[1]) if n == 2 else (None, None)
        return grad_box, None, None, grad_bias, grad_xs[0], grad_ws[0], *second


def _autocast(t: torch.Tensor | None) -> torch.Tensor | None:
    """t cast to the autocast dtype when autocast is on for its device (fp64 stays fp64)."""
    if t is None or t.dtype == torch.float64 or not torch.is_autocast_enabled(t.device.type):
        return t
    return t.to(torch.get_autocast_dtype(t.device.type))


def _check_stride(stride: float) -> float:
    if isinstance(stride, bool) or not isinstance(stride, (int, float)):
        raise TypeError(f"stride must be a number, got {type(stride).__name__}")
    if not math.isfinite(stride) or stride <= 0:
        raise ValueError(f"stride must be a finite number > 0, got {stride}")
    return float(stride)


def _check_gradient_mul(gradient_mul: float) -> float:
    if isinstance(gradient_mul, bool) or not isinstance(gradient_mul, (int, float)):
        raise TypeError(f"gradient_mul must be a number, got {type(gradient_mul).__name__}")
    if not math.isfinite(gradient_mul):
        raise ValueError(f"gradient_mul must be finite, got {gradient_mul}")
    return float(gradient_mul)


def _check_input(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    check_float(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(x.shape)}")
    return x


def _check_box(bbox_pred: object, x: torch.Tensor) -> torch.Tensor:
    bbox_pred = check_tensor("bbox_pred", bbox_pred)
    check_float("bbox_pred", bbox_pred)
    b, _, h, w = x.shape
    if tuple(bbox_pred.shape) != (b, 4, h, w):
        raise ValueError(
            f"bbox_pred must be [B, 4, H, W] = {[b, 4, h, w]}, got {tuple(bbox_pred.shape)}")
    return bbox_pred


def _check_weight(name: str, weight: object, cin: int) -> torch.Tensor:
    weight = check_tensor(name, weight)
    check_float(name, weight)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[0] == 0:
        raise ValueError(f"{name} must be [Cout, Cin, 3, 3], got shape {tuple(weight.shape)}")
    if weight.shape[1] != cin:
        raise ValueError(f"{name} has Cin = {weight.shape[1]} but the input has {cin} channels")
    return weight


def _check_bias(bias: object, cout: int) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = check_tensor("bias", bias)
    check_float("bias", bias)
    if tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
    return bias


def star_deform_conv2d(
    x: torch.Tensor,
    bbox_pred: torch.Tensor,
    weight: torch.Tensor,
    stride: float,
    *,
    bias: torch.Tensor | None = None,
    gradient_mul: float = 0.1,
) -> torch.Tensor:
    """Star deformable 3x3 convolution.

    x: [B, Cin, H, W] features; bbox_pred: [B, 4, H, W] (l, t, r, b) distances in input-image
    pixels; weight: [Cout, Cin, 3, 3]; bias: [Cout] or None; stride: input pixels per feature
    cell (> 0). Tap (ky, kx) of location (y, x) samples x bilinearly at
    (y + (-t, 0, b)[ky] / stride, x + (-l, 0, r)[kx] / stride) with torchvision's boundary rule.
    Returns [B, Cout, H, W] in x's dtype, equal to
    `torchvision.ops.deform_conv2d(x, reference.star_offsets(bbox_pred, stride), weight, bias,
    padding=1)`. Gradients reach x, weight, bias and bbox_pred (the latter scaled by
    gradient_mul).
    """
    x = _check_input("x", x)
    bbox_pred = _check_box(bbox_pred, x)
    weight = _check_weight("weight", weight, x.shape[1])
    bias = _check_bias(bias, weight.shape[0])
    check_same_device(x=x, bbox_pred=bbox_pred, weight=weight, bias=bias)
    stride = _check_stride(stride)
    gradient_mul = _check_gradient_mul(gradient_mul)
    x, weight, bias = _autocast(x), _autocast(weight), _autocast(bias)
    if not use_triton(x):
        return reference.star_deform_conv2d_reference(
            x, bbox_pred, weight, stride, bias=bias, gradient_mul=gradient_mul
        )
    return _StarConvFunction.apply(bbox_pred, stride, gradient_mul, bias, x, weight, None, None)


def star_deform_conv2d_pair(
    x_cls: torch.Tensor,
    x_reg: torch.Tensor,
    bbox_pred: torch.Tensor,
    w_cls: torch.Tensor,
    w_reg: torch.Tensor,
    stride: float,
    *,
    gradient_mul: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's two star convolutions over one set of star points (no bias).

    x_cls, x_reg: [B, Cin, H, W] (same shape and dtype); bbox_pred: [B, 4, H, W];
    w_cls, w_reg: [Cout, Cin, 3, 3]. Returns (out_cls, out_reg), each [B, Cout, H, W], equal to
    `star_deform_conv2d(x_cls, bbox_pred, w_cls, stride)` and the same for x_reg; the sampling
    coordinates and bilinear weights are computed once for both.
    """
    x_cls = _check_input("x_cls", x_cls)
    x_reg = _check_input("x_reg", x_reg)
    if x_reg.shape != x_cls.shape:
        raise ValueError(
            f"x_reg must have x_cls's shape {tuple(x_cls.shape)}, got {tuple(x_reg.shape)}")
    if x_reg.dtype != x_cls.dtype:
        raise TypeError(f"x_reg must have x_cls's dtype {x_cls.dtype}, got {x_reg.dtype}")
    bbox_pred = _check_box(bbox_pred, x_cls)
    w_cls = _check_weight("w_cls", w_cls, x_cls.shape[1])
    w_reg = _check_weight("w_reg", w_reg, x_cls.shape[1])
    if w_reg.shape != w_cls.shape:
        raise ValueError(
            f"w_reg must have w_cls's shape {tuple(w_cls.shape)}, got {tuple(w_reg.shape)}")
    check_same_device(x_cls=x_cls, x_reg=x_reg, bbox_pred=bbox_pred, w_cls=w_cls, w_reg=w_reg)
    stride = _check_stride(stride)
    gradient_mul = _check_gradient_mul(gradient_mul)
    x_cls, x_reg = _autocast(x_cls), _autocast(x_reg)
    w_cls, w_reg = _autocast(w_cls), _autocast(w_reg)
    if not use_triton(x_cls):
        return reference.star_deform_conv2d_pair_reference(
            x_cls, x_reg, bbox_pred, w_cls, w_reg, stride, gradient_mul=gradient_mul
        )
    return _StarConvFunction.apply(bbox_pred, stride, gradient_mul, None, x_cls, w_cls, x_reg,
                                   w_reg)
