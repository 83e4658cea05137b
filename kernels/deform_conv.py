r"""Modulated deformable convolution (DCNv2), torchvision's `deform_conv2d` contract.

Public API (docs/design.md §2.4)::

    deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *, groups=1)

This module holds the argument checks, the dispatch and the Triton kernels; the math is also
`kernels.reference.deform_conv2d_reference` (plain PyTorch), the CPU path and the tests' oracle.

Geometry. Output location m = (n, y, x) (flattened over B, Ho, Wo), tap k = i*kw + j, deform group
g' of channel c (c // (Cin/dg)), q = g'*kh*kw + k: the sample point is
    py = y*sh - ph + i*dh + offset[n, 2q, y, x],  px = x*sw - pw + j*dw + offset[n, 2q + 1, y, x],
s(m, k, c) = bilinear(input[n, c], py, px) (torchvision's boundary rule, `kernels.bilinear.axis`),
mod = mask[n, q, y, x] (1 without a mask), and for output channel o of conv group G
    out[m, o] = bias[o] + sum_{k, c in G} W[o, c, k] * mod * s(m, k, c).
That is a GEMM per conv group with M = B*Ho*Wo, N = Cout/groups, K = kh*kw*Cin/groups whose
A operand (the "columns" mod * s) is gathered inside the K loop and never stored. The star conv
(`kernels.star_conv`) is this op with offsets derived from the boxes, no mask, 3x3, padding 1:
both use the device functions of `kernels.bilinear` for the gather (`corners`, `sample`), the
sample gradient (`sample_grad`), the corner scatter (`scatter_corners`) and the coordinate
gradients (`coordinate_grads`).

Channel runs. The K loop runs over (tap, run, channel chunk). A run is SEG = gcd(Cin/groups,
Cin/dg) consecutive channels: every run lies in one conv group and one deform group (both
boundaries are multiples of SEG), so a chunk's BLOCK_K channels share one sample point per
location and its coordinates, corner offsets and bilinear weights are [BLOCK_M] vectors, as in
the star conv. groups = dg = 1: one run of Cin channels; ResNeXt (groups 32, dg 1): Cin/32.

Kernels (channels-last copies of input and grad_out, weight as [groups, kh*kw*Cin/groups,
Cout/groups], row k*(Cin/groups) + c; no columns buffer):
- forward, grid (location tiles x Cout/groups tiles, groups): per K step the sample point of the
  chunk's (tap, deform group) is read from offset (and mask), the 4 corners of BLOCK_K channels are
  gathered from the channels-last input, interpolated with the mask folded into the 4 bilinear
  weights, and fed to `tl.dot` against the weight tile (fp32 accumulation; fp64 for fp64).
- backward, data, grid (location tiles, groups): per K step the sample gradient
  gs[m, c] = d loss / d (mod * s)[m, k, c] = sum_o go[m, o] W[o, c, k] (go @ W_k^T; grad_out's
  tile stays resident when Cout/groups fits one BLOCK_N). Then
    grad_input[n, c, corner]  += gs * mod * w_corner            (relaxed fp32 atomics; 4 corners)
    grad_offset[n, 2q]        += mod * sum_c gs * d s / d py     (`coordinate_grads`: per corner
    grad_offset[n, 2q + 1]    += mod * sum_c gs * d s / d px      t = sum_c gs * v, then the
    grad_mask[n, q]           += sum_c gs * s                     bilinear weights' derivatives)
  with d s / d py = (v10 - v00)(1 - lx) + (v11 - v01) lx (ly, lx the fractional parts; floor is
  constant: the one-sided derivative at whole numbers, as torchvision) and likewise for px. The
  offset and mask sums run over the channels of one chunk per step; the chunks and runs of a
  deform group (and the conv groups sharing it) add theirs with fp32 atomics (fp64 for fp64) into
  zero-initialised [B, 2*dg*kh*kw, Ho, Wo] / [B, dg*kh*kw, Ho, Wo] buffers.
- backward, weight, grid ((tap, run, chunk, Cout tile), slices of the locations, groups):
  grad_W[o, c, k] = sum_m go[m, o] * mod * s(m, k, c): the columns are re-gathered per location
  tile, multiplied (transposed) with grad_out's tile, accumulated in registers and added with fp32
  atomics into a [groups, kh*kw*Cin/groups, Cout/groups] buffer. grad_bias = sum_m go (torch).

Memory: one channels-last copy of input (forward and again in backward), of grad_out (backward),
the output, fp32 gradient buffers of input, offset, mask and weight; no [B, Cin*kh*kw, Ho*Wo]
columns. Outputs are [B, Cout, Ho, Wo] in channels-last memory.

Precision: coordinates, interpolation and accumulation in fp32 (fp64 for fp64 input); dot operands
in input's dtype for bf16/fp16 on the GPU (tensor cores), else fp32 (IEEE unless torch allows TF32)
or fp64: `kernels.tuning.dot_dtype`/`dot_precision`, as the star conv. Under autocast input, weight
and bias take the autocast dtype (as conv2d); offset and mask keep theirs (coordinates are fp32).
The input, offset, mask and weight gradients are sums of atomic adds: their last bits depend on
the order the GPU runs the programs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference, tuning
from kernels.bilinear import coordinate_grads, corners, k_step, sample, sample_grad, scatter_corners
from kernels.checks import check_float, check_same_device, check_tensor, compute_dtype
from kernels.dispatch import use_triton

__all__ = ["deform_conv2d", "check_deform_conv2d_args"]


# ---------------------------------------------------------------------------------------------
# Device functions of the deform conv (the gather and scatter are the star conv's)

# Integer arguments not specialised: they only index memory or size the grid (divisibility by 16
# or == 1 would multiply the compiled variants by map sizes, strides, paddings and dilations).
_NOT_SPECIALISED = tuning.NOT_SPECIALISED + ["HO", "WO", "SH", "SW", "PH", "PW", "DH", "DW"]


@triton.jit
def _dcn_tile(start, M, HO, WO, SH, SW, PH, PW, ct, BLOCK_M: tl.constexpr):
    """The BLOCK_M flat output locations m = (n*Ho + y)*Wo + x from `start`: int64 indices,
    validity mask, image n, cell y*Wo + x, and the window corner (y*sh - ph, x*sw - pw) in `ct`."""
    offs_m = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    hwo = HO * WO
    batch = offs_m // hwo
    pix = offs_m % hwo
    y0 = ((pix // WO) * SH - PH).to(ct)
    x0 = ((pix % WO) * SW - PW).to(ct)
    return offs_m, mask_m, batch, pix, y0, x0


@triton.jit
def _dcn_step(i, runs, num_kc, g, CIN_G, SEG, CDG, BLOCK_K: tl.constexpr):
    """Step i of the K loop over (tap, run, chunk) of conv group g: the tap, the deform group of
    the run, the chunk's channels within the conv group (weight rows tap * CIN_G + c_local), the
    same as input channels, and their mask."""
    tap_run, offs_s, mask_c = k_step(i, num_kc, SEG, BLOCK_K)
    tap = tap_run // runs
    first = (tap_run - tap * runs) * SEG
    c_first = g * CIN_G + first
    return tap, c_first // CDG, first + offs_s, c_first + offs_s, mask_c


@triton.jit
def _dcn_point(off_ptr, mod_ptr, batch, pix, mask_m, y0, x0, tap, dgi, HWO, DG, T, KW, DH, DW,
               HAS_MASK: tl.constexpr):
    """Sample point (py, px) [BLOCK_M] of tap `tap` in deform group `dgi`, its mask value (1.0
    without a mask) and the element index of its dy in offset / of its value in mask
    ([B, 2*DG*T, Ho, Wo] / [B, DG*T, Ho, Wo] contiguous, dx at + HWO)."""
    q = dgi * T + tap
    o_idx = (batch * (2 * DG * T) + 2 * q) * HWO + pix
    dy = tl.load(off_ptr + o_idx, mask=mask_m, other=0.0)
    dx = tl.load(off_ptr + o_idx + HWO, mask=mask_m, other=0.0)
    ki = tap // KW
    py = y0 + (ki * DH).to(y0.dtype) + dy
    px = x0 + ((tap - ki * KW) * DW).to(y0.dtype) + dx
    m_idx = (batch * (DG * T) + q) * HWO + pix
    if HAS_MASK:
        mod = tl.load(mod_ptr + m_idx, mask=mask_m, other=0.0)
    else:
        mod = 1.0
    return py, px, mod, o_idx, m_idx


# ---------------------------------------------------------------------------------------------
# Forward


@tuning.autotune("dcn_fwd", "w_ptr", key=["CIN", "COUT", "CIN_G", "COUT_G", "SEG", "T", "M_LOG2"],
                 cout_arg="COUT_G")
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _dcn_fwd_kernel(
    x_ptr,  # [B, H, W, CIN] channels-last
    w_ptr,  # [G, T * CIN_G, COUT_G] dot dtype
    bias_ptr,  # [COUT] compute dtype (HAS_BIAS)
    off_ptr,  # [B, 2 * DG * T, HO, WO] compute dtype
    mod_ptr,  # [B, DG * T, HO, WO] compute dtype (HAS_MASK)
    out_ptr,  # [B, COUT, HO, WO] in channels-last memory
    M, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, SEG, CDG, DG, T, KW, M_LOG2, SH, SW, PH, PW, DH, DW,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # axis 0: (location tile, Cout/groups tile); axis 1: conv group
    num_n = tl.cdiv(COUT_G, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    g = tl.program_id(1)
    ct = off_ptr.dtype.element_ty
    offs_m, mask_m, batch, pix, y0, x0 = _dcn_tile(pid_m * BLOCK_M, M, HO, WO, SH, SW, PH, PW, ct,
                                                   BLOCK_M)
    row_base = batch * H * W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT_G
    w_ptr += g.to(tl.int64) * T * CIN_G * COUT_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ct)
    runs = CIN_G // SEG
    num_kc = tl.cdiv(SEG, BLOCK_K)
    for i in range(0, T * runs * num_kc):
        tap, dgi, c_local, offs_c, mask_c = _dcn_step(i, runs, num_kc, g, CIN_G, SEG, CDG, BLOCK_K)
        py, px, mod, _, _ = _dcn_point(off_ptr, mod_ptr, batch, pix, mask_m, y0, x0, tap, dgi,
                                       HO * WO, DG, T, KW, DH, DW, HAS_MASK)
        o00, o01, o10, o11, m00, m01, m10, m11, ly, lx = corners(py, px, row_base, mask_m, H, W,
                                                                  CIN)
        w = tl.load(w_ptr + (tap * CIN_G + c_local)[:, None] * COUT_G + offs_n[None, :],
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        s = sample(x_ptr, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, mod, offs_c, mask_c)
        acc = tl.dot(s.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=ct)
    offs_o = g * COUT_G + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * COUT + offs_o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Backward: input, offset and mask gradients


@tuning.autotune("dcn_bwd_data", "go_ptr", key=["CIN", "COUT", "CIN_G", "COUT_G", "SEG", "T", "M_LOG2"],
                 cout_arg="COUT_G", reset_to_zero=["gx_ptr", "goff_ptr", "gmod_ptr"])
@triton.heuristics({"GO_RESIDENT": lambda args: args["BLOCK_N"] >= args["COUT_G"]})
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _dcn_bwd_data_kernel(
    go_ptr,  # [M, COUT] channels-last grad_out, dot dtype
    x_ptr,  # [B, H, W, CIN] channels-last
    w_ptr,  # [G, T * CIN_G, COUT_G] dot dtype
    off_ptr,  # [B, 2 * DG * T, HO, WO] compute dtype
    mod_ptr,  # [B, DG * T, HO, WO] compute dtype (HAS_MASK)
    gx_ptr,  # [B, H, W, CIN] compute dtype, zero-initialised, atomically accumulated (NEED_X)
    goff_ptr,  # like offset, compute dtype, zero-initialised, atomically accumulated (NEED_OFFSET)
    gmod_ptr,  # like mask, compute dtype, zero-initialised, atomically accumulated (NEED_MASK)
    M, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, SEG, CDG, DG, T, KW, M_LOG2, SH, SW, PH, PW, DH, DW,
    HAS_MASK: tl.constexpr, NEED_X: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
    GO_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # axis 0: location tile; axis 1: conv group
    g = tl.program_id(1)
    ct = off_ptr.dtype.element_ty
    offs_m, mask_m, batch, pix, y0, x0 = _dcn_tile(tl.program_id(0) * BLOCK_M, M, HO, WO, SH, SW,
                                                   PH, PW, ct, BLOCK_M)
    row_base = batch * H * W
    hwo = HO * WO
    go_ptr += g * COUT_G  # this group's columns of grad_out (row stride COUT)
    w_ptr += g.to(tl.int64) * T * CIN_G * COUT_G
    go_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=go_ptr.dtype.element_ty)
    if GO_RESIDENT:
        offs_n = tl.arange(0, BLOCK_N)
        go_tile = tl.load(go_ptr + offs_m[:, None] * COUT + offs_n[None, :],
                          mask=mask_m[:, None] & (offs_n < COUT_G)[None, :], other=0.0)
    runs = CIN_G // SEG
    num_kc = tl.cdiv(SEG, BLOCK_K)
    for i in range(0, T * runs * num_kc):
        tap, dgi, c_local, offs_c, mask_c = _dcn_step(i, runs, num_kc, g, CIN_G, SEG, CDG, BLOCK_K)
        py, px, mod, o_idx, m_idx = _dcn_point(off_ptr, mod_ptr, batch, pix, mask_m, y0, x0, tap,
                                               dgi, hwo, DG, T, KW, DH, DW, HAS_MASK)
        o00, o01, o10, o11, m00, m01, m10, m11, ly, lx = corners(py, px, row_base, mask_m, H, W,
                                                                  CIN)
        gs = sample_grad(go_ptr, go_tile, w_ptr, offs_m, mask_m, tap * CIN_G + c_local, mask_c,
                          COUT, COUT_G, ct, GO_RESIDENT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        if NEED_X:
            scatter_corners(gx_ptr, gs, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, mod,
                             offs_c, mask_c)
        if NEED_OFFSET or NEED_MASK:
            d_y, d_x, value = coordinate_grads(x_ptr, gs, o00, o01, o10, o11, m00, m01, m10, m11,
                                                ly, lx, offs_c, mask_c)
            if NEED_OFFSET:
                tl.atomic_add(goff_ptr + o_idx, d_y * mod, mask=mask_m, sem="relaxed")
                tl.atomic_add(goff_ptr + o_idx + hwo, d_x * mod, mask=mask_m, sem="relaxed")
            if NEED_MASK:
                tl.atomic_add(gmod_ptr + m_idx, value, mask=mask_m, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Backward: weight gradient


@tuning.autotune("dcn_bwd_weight", "go_ptr", key=["CIN", "COUT", "CIN_G", "COUT_G", "SEG", "T", "M_LOG2"],
                 cout_arg="COUT_G", reset_to_zero=["gw_ptr"])
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _dcn_bwd_weight_kernel(
    go_ptr,  # [M, COUT] channels-last grad_out, dot dtype
    x_ptr,  # [B, H, W, CIN] channels-last
    off_ptr,  # [B, 2 * DG * T, HO, WO] compute dtype
    mod_ptr,  # [B, DG * T, HO, WO] compute dtype (HAS_MASK)
    gw_ptr,  # [G, T * CIN_G, COUT_G] compute dtype, zero-initialised, atomically accumulated
    M, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, SEG, CDG, DG, T, KW, M_LOG2, SH, SW, PH, PW, DH, DW,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # axis 0: (K step, Cout/groups tile); axis 1: slice of the locations; axis 2: conv group
    num_n = tl.cdiv(COUT_G, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    g = tl.program_id(2)
    ct = off_ptr.dtype.element_ty
    runs = CIN_G // SEG
    num_kc = tl.cdiv(SEG, BLOCK_K)
    tap, dgi, c_local, offs_c, mask_c = _dcn_step(pid // num_n, runs, num_kc, g, CIN_G, SEG, CDG,
                                                  BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT_G
    go_ptr += g * COUT_G
    m_tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(m_tiles, tl.num_programs(1))
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, m_tiles)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ct)
    for start in range(first * BLOCK_M, last * BLOCK_M, BLOCK_M):
        offs_m, mask_m, batch, pix, y0, x0 = _dcn_tile(start, M, HO, WO, SH, SW, PH, PW, ct,
                                                       BLOCK_M)
        py, px, mod, _, _ = _dcn_point(off_ptr, mod_ptr, batch, pix, mask_m, y0, x0, tap, dgi,
                                       HO * WO, DG, T, KW, DH, DW, HAS_MASK)
        o00, o01, o10, o11, m00, m01, m10, m11, ly, lx = corners(py, px, batch * H * W, mask_m, H,
                                                                  W, CIN)
        go = tl.load(go_ptr + offs_m[:, None] * COUT + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        s = sample(x_ptr, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, mod, offs_c, mask_c)
        acc = tl.dot(tl.trans(s.to(go.dtype)), go, acc, input_precision=DOT_PRECISION, out_dtype=ct)
    gw_rows = g.to(tl.int64) * T * CIN_G + tap * CIN_G + c_local
    tl.atomic_add(gw_ptr + gw_rows[:, None] * COUT_G + offs_n[None, :], acc,
                  mask=mask_c[:, None] & mask_n[None, :], sem="relaxed")


# The autotuned kernels by name (ahead-of-time checks, pre-compilation)
KERNELS = {"dcn_fwd": _dcn_fwd_kernel, "dcn_bwd_data": _dcn_bwd_data_kernel,
           "dcn_bwd_weight": _dcn_bwd_weight_kernel}


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_int_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as an (h, w) tuple."""
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items[0], items[1]


def _check_4d(name: str, value: object, layout: str) -> torch.Tensor:
    value = check_tensor(name, value)
    check_float(name, value)
    if value.dim() != 4:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(value.shape)}")
    return value


def check_deform_conv2d_args(input, offset, weight, bias, stride, padding, dilation, mask, groups
                             ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """Validate a `deform_conv2d` call; return (stride, padding, dilation) as pairs and dg.

    Shapes and dtypes only (no values are read): TypeError for a wrong type or dtype,
    ValueError for a wrong shape, size or device, each naming the argument.
    """
    input = _check_4d("input", input, "[B, Cin, H, W]")
    b, cin, h, w = input.shape
    if min(cin, h, w) == 0:
        raise ValueError(f"input must have Cin, H and W > 0 (B may be 0), got shape {tuple(input.shape)}")
    weight = _check_4d("weight", weight, "[Cout, Cin/groups, kh, kw]")
    cout, cin_g, kh, kw = weight.shape
    if min(cout, cin_g, kh, kw) == 0:
        raise ValueError(f"weight must have no empty dimension, got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1 or cin % groups or cout % groups:
        raise ValueError(f"groups must be >= 1 and divide Cin = {cin} and Cout = {cout}, got {groups}")
    if cin_g * groups != cin:
        raise ValueError(f"weight must be [Cout, Cin/groups, kh, kw] with Cin/groups = {cin // groups}, "
                         f"got shape {tuple(weight.shape)}")
    stride = _check_int_pair("stride", stride, 1)
    padding = _check_int_pair("padding", padding, 0)
    dilation = _check_int_pair("dilation", dilation, 1)
    ho = reference.conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = reference.conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"the output would be {ho} x {wo}: the {kh} x {kw} kernel with dilation {dilation} "
                         f"does not fit the {h} x {w} input padded by {padding}")
    offset = _check_4d("offset", offset, "[B, 2*dg*kh*kw, Ho, Wo]")
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    if offset.shape[1] % (2 * taps) or dg == 0 or tuple(offset.shape[2:]) != (ho, wo) or offset.shape[0] != b:
        raise ValueError(f"offset must be [B, 2*dg*kh*kw, Ho, Wo] = [{b}, 2*dg*{taps}, {ho}, {wo}] "
                         f"(dg >= 1 deform groups), got shape {tuple(offset.shape)}")
    if cin % dg:
        raise ValueError(f"offset has {offset.shape[1]} channels = 2*dg*kh*kw with dg = {dg} deform groups, "
                         f"which must divide Cin = {cin}")
    if mask is not None:
        mask = _check_4d("mask", mask, "[B, dg*kh*kw, Ho, Wo]")
        if tuple(mask.shape) != (b, dg * taps, ho, wo):
            raise ValueError(f"mask must be [B, dg*kh*kw, Ho, Wo] = {[b, dg * taps, ho, wo]}, "
                             f"got shape {tuple(mask.shape)}")
    if bias is not None:
        bias = check_tensor("bias", bias)
        check_float("bias", bias)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
    check_same_device(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    return stride, padding, dilation, dg


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
    *,
    groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2; DCNv1 when mask is None), docs/design.md §2.4.

    input [B, Cin, H, W]; offset [B, 2*dg*kh*kw, Ho, Wo] (dg deform groups, inferred; dg divides
    Cin); weight [Cout, Cin/groups, kh, kw]; bias [Cout] or None; mask [B, dg*kh*kw, Ho, Wo] or
    None (all ones); stride, padding, dilation an int or an (h, w) pair; groups divides Cin and
    Cout. Ho, Wo as conv2d: (H + 2*pad_h - dil_h*(kh - 1) - 1) // stride_h + 1.

    For deform group g and tap k = i*kw + j, offset channel 2*(g*kh*kw + k) is the row offset dy
    and the next one the column offset dx (input cells), mask channel g*kh*kw + k its factor;
    output position (y, x) samples input channels of group g bilinearly at row
    y*stride_h - pad_h + i*dil_h + dy, column x*stride_w - pad_w + j*dil_w + dx (torchvision's
    boundary rule: a point with row <= -1, row >= H, column <= -1 or column >= W reads 0, else each
    corner outside the map reads 0), multiplies by the mask and convolves with weight[:, :, i, j].
    The value of `torchvision.ops.deform_conv2d` (which infers groups from the weight) and of mmcv's
    modulated deformable convolution (`kernels.reference.modulated_offsets` gives its offset and
    mask). Returns [B, Cout, Ho, Wo] in input's dtype (channels-last memory); math in float64 for
    float64 input, else float32. Gradients reach input, offset, mask, weight and bias.
    """
    stride, padding, dilation, _ = check_deform_conv2d_args(
        input, offset, weight, bias, stride, padding, dilation, mask, groups)
    input, weight, bias = _autocast(input), _autocast(weight), _autocast(bias)
    if use_triton(input):
        return _deform_conv2d_triton(input, offset, weight, bias, stride, padding, dilation, mask, groups)
    return reference.deform_conv2d_reference(
        input, offset, weight, bias, stride, padding, dilation, mask, groups=groups)


def _deform_conv2d_triton(input, offset, weight, bias, stride, padding, dilation, mask, groups) -> torch.Tensor:
    """The Triton path: called with checked arguments (stride, padding, dilation as (h, w) pairs)
    whenever `use_triton(input)` is True."""
    return _DeformConvFunction.apply(input, offset, mask, weight, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# Launchers and autograd


def _autocast(t: torch.Tensor | None) -> torch.Tensor | None:
    """t cast to the autocast dtype when autocast is on for its device (fp64 stays fp64), as the
    star conv and conv2d do."""
    if t is None or t.dtype == torch.float64 or not torch.is_autocast_enabled(t.device.type):
        return t
    return t.to(torch.get_autocast_dtype(t.device.type))


class _Shape:
    """The integer arguments of the kernels for one call, and the host-side layouts."""

    def __init__(self, input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 groups: int) -> None:
        b, cin, h, w = input.shape
        cout, cin_g, kh, kw = weight.shape
        taps = kh * kw
        dg = offset.shape[1] // (2 * taps)
        ho, wo = offset.shape[2:]
        self.b, self.cin, self.cout, self.kh, self.kw, self.groups = b, cin, cout, kh, kw, groups
        self.m = b * ho * wo
        self.ho, self.wo = ho, wo
        self.cin_g, self.cout_g = cin_g, cout // groups
        self.seg = math.gcd(cin_g, cin // dg)  # a run: channels of one conv and one deform group
        self.ints = dict(  # in the kernels' argument order (passed positionally: the prune hooks read them)
            M=self.m, H=h, W=w, HO=ho, WO=wo, CIN=cin, COUT=cout, CIN_G=cin_g, COUT_G=self.cout_g,
            SEG=self.seg, CDG=cin // dg, DG=dg, T=taps, KW=kw, M_LOG2=tuning.m_log2(self.m),
            SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])

    def k_steps(self, block_k: int) -> int:
        """Iterations of the (tap, run, chunk) loop."""
        return self.kh * self.kw * (self.cin_g // self.seg) * triton.cdiv(self.seg, block_k)

    def weight_matrix(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[Cout, Cin/groups, kh, kw] -> contiguous [groups, kh*kw*Cin/groups, Cout/groups], row
        (i*kw + j) * Cin/groups + c."""
        w = weight.to(dtype).view(self.groups, self.cout_g, self.cin_g, self.kh, self.kw)
        return w.permute(0, 3, 4, 2, 1).reshape(self.groups, -1, self.cout_g).contiguous()

    def weight_from_matrix(self, gw: torch.Tensor) -> torch.Tensor:
        """The inverse of `weight_matrix`: [groups, kh*kw*Cin/groups, Cout/groups] -> [Cout, Cin/groups, kh, kw]."""
        g = gw.view(self.groups, self.kh, self.kw, self.cin_g, self.cout_g)
        return g.permute(0, 4, 3, 1, 2).reshape(self.cout, self.cin_g, self.kh, self.kw)


def _channels_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, H, W] -> contiguous [B, H, W, C] in `dtype` (no copy when it already is one)."""
    return t.to(dtype).permute(0, 2, 3, 1).contiguous()


def _launch_forward(input, offset, mask, weight, bias, shape: _Shape) -> torch.Tensor:
    ct, dot = compute_dtype(input.dtype), tuning.dot_dtype(input.dtype)
    out = torch.empty(shape.b, shape.cout, shape.ho, shape.wo, dtype=input.dtype, device=input.device,
                      memory_format=torch.channels_last)
    if shape.m == 0:
        return out
    xl = _channels_last(input, input.dtype)
    wl = shape.weight_matrix(weight, dot)
    offc = offset.to(ct).contiguous()
    modc = mask.to(ct).contiguous() if mask is not None else offc
    biasc = bias.to(ct).contiguous() if bias is not None else offc

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(shape.m, meta["BLOCK_M"]) * triton.cdiv(shape.cout_g, meta["BLOCK_N"]),
                shape.groups)

    _dcn_fwd_kernel[grid](xl, wl, biasc, offc, modc, out, *shape.ints.values(), HAS_MASK=mask is not None,
                          HAS_BIAS=bias is not None, DOT_PRECISION=tuning.dot_precision(dot))
    return out


def _launch_backward(grad, input, offset, mask, weight, shape: _Shape, need_x: bool, need_offset: bool,
                     need_mask: bool, need_w: bool):
    """(grad_input, grad_offset, grad_mask, grad_weight), None where not needed."""
    device = input.device
    ct, dot = compute_dtype(input.dtype), tuning.dot_dtype(input.dtype)
    precision = tuning.dot_precision(dot)
    gx = goff = gmod = gw = None
    if shape.m == 0:  # empty batch: every gradient is empty or zero
        gx = torch.zeros_like(input) if need_x else None
        goff = torch.zeros_like(offset) if need_offset else None
        gmod = torch.zeros_like(mask) if need_mask else None
        gw = torch.zeros_like(weight) if need_w else None
        return gx, goff, gmod, gw
    xl = _channels_last(input, input.dtype)
    gl = _channels_last(grad, dot)
    offc = offset.to(ct).contiguous()
    modc = mask.to(ct).contiguous() if mask is not None else offc
    common = dict(HAS_MASK=mask is not None, DOT_PRECISION=precision)
    if need_x or need_offset or need_mask:
        wl = shape.weight_matrix(weight, dot)
        dummy = torch.zeros(1, dtype=ct, device=device)  # never written: the flags skip it
        gxl = torch.zeros(shape.b, *input.shape[2:], shape.cin, dtype=ct, device=device) if need_x else dummy
        goffc = torch.zeros(offc.shape, dtype=ct, device=device) if need_offset else dummy
        gmodc = torch.zeros(modc.shape, dtype=ct, device=device) if need_mask else dummy

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(shape.m, meta["BLOCK_M"]), shape.groups)

        _dcn_bwd_data_kernel[grid](gl, xl, wl, offc, modc, gxl, goffc, gmodc, *shape.ints.values(),
                                   NEED_X=need_x, NEED_OFFSET=need_offset, NEED_MASK=need_mask, **common)
        if need_x:
            gx = gxl.permute(0, 3, 1, 2).to(input.dtype)
        if need_offset:
            goff = goffc.to(offset.dtype)
        if need_mask:
            gmod = gmodc.to(mask.dtype)
    if need_w:
        gwm = torch.zeros(shape.groups, shape.kh * shape.kw * shape.cin_g, shape.cout_g, dtype=ct,
                          device=device)

        def wgrid(meta: dict) -> tuple[int, int, int]:
            tiles = shape.k_steps(meta["BLOCK_K"]) * triton.cdiv(shape.cout_g, meta["BLOCK_N"])
            split = tuning.weight_split(triton.cdiv(shape.m, meta["BLOCK_M"]), shape.groups * tiles, device)
            return (tiles, split, shape.groups)

        _dcn_bwd_weight_kernel[wgrid](gl, xl, offc, modc, gwm, *shape.ints.values(), **common)
        gw = shape.weight_from_matrix(gwm).to(weight.dtype)
    return gx, goff, gmod, gw


class _DeformConvFunction(torch.autograd.Function):
    """deform_conv2d through the Triton kernels; backward runs the data and weight kernels for the
    gradients autograd asks for (grad_bias: a torch sum)."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias, stride, padding, dilation, groups):  # type: ignore
        shape = _Shape(input, offset, weight, stride, padding, dilation, groups)
        out = _launch_forward(input, offset, mask, weight, bias, shape)
        ctx.save_for_backward(input, offset, mask, weight)
        ctx.shape = shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        input, offset, mask, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, goff, gmod, gw = _launch_backward(grad, input, offset, mask, weight, ctx.shape, needs[0],
                                              needs[1], mask is not None and needs[2], needs[3])
        gbias = None
        if ctx.bias_dtype is not None and needs[4]:
            gbias = grad.sum(dim=(0, 2, 3), dtype=compute_dtype(grad.dtype)).to(ctx.bias_dtype)
        return gx, goff, gmod, gw, gbias, None, None, None, None
